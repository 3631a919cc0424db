"""Trace openai-whisper's modules with torch.export into whisper-max IR.

Three graphs, each traced from the real openai-whisper modules so that every node is scoped by
its PyTorch module path and every weight keeps its state-dict name (word timestamps need no
graph of their own: decoder_rows returns each layer's cross-attention queries,
passes.cross_queries):

- `encoder`:  mel (batch, n_mels, 2 * n_audio_ctx) -> `encoder` (batch, n_audio_ctx, d)
- `cross_kv`: `encoder` -> `decoder.blocks.{i}.cross_attn.{key,value}`, once per audio window
- `decoder`:  one incremental step: tokens (batch, n), the self-attention cache
  `decoder.blocks.{i}.attn.{key,value}` (batch, past, d) and the cross K/V -> `logits` for the
  last position (batch, n_vocab) and the grown cache (batch, past + n, d). The position offset
  is the cache length `past`, exactly as openai-whisper's kv_cache defines it.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import sympy
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, export
from whisper.model import MultiHeadAttention, TextDecoder, Whisper, disable_sdpa

from ..runtime.program import AUDIO_FEATURES, LOGITS, MEL, TOKENS, Role
from .ir import Constant, Graph, Node, Program, SymDim, TensorType, TraceError, Value

log = logging.getLogger(__name__)

# Ops that only check metadata or change nothing numerically; they become aliases of their input.
_DROPPED = {
    "aten._assert_tensor_metadata.default",
    "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default",
}
_ALIASES = {
    "aten.detach.default",
    "aten.alias.default",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.lift_fresh_copy.default",
}
_CASTS = {"aten.to.dtype", "aten._to_copy.default", "aten.to.dtype_layout"}


def _np_dtype(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype)


class _Namer:
    """Symbolic sizes -> expressions over the user's dim names."""

    def __init__(self) -> None:
        self.subs: dict[sympy.Symbol, sympy.Symbol] = {}

    def bind(self, size: Any, name: str) -> None:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            if not isinstance(expr, sympy.Symbol):
                raise TraceError(f"dim {name!r} traced as {expr}, expected a plain symbol")
            self.subs[expr] = sympy.Symbol(name, integer=True, positive=True)

    def dim(self, size: Any) -> int | str:
        if isinstance(size, int):
            return size
        if isinstance(size, torch.SymInt):
            expr = sympy.sympify(size.node.expr).xreplace(self.subs)
            if expr.is_Integer:
                return int(expr)
            unknown = expr.free_symbols - set(self.subs.values())
            if unknown:
                raise TraceError(f"size {expr} uses symbols {unknown} not bound to a named input dim")
            return str(expr)
        raise TraceError(f"unexpected size {size!r}")

    def shape(self, t: torch.Tensor) -> tuple[int | str, ...]:
        return tuple(self.dim(s) for s in t.shape)


def _tensor_arg(arg: Any) -> str | None:
    """'one', 'optional' or 'list' if a schema argument holds tensors, else None."""
    t = arg.type
    if isinstance(t, torch.TensorType):
        return "one"
    if isinstance(t, torch.OptionalType) and isinstance(t.getElementType(), torch.TensorType):
        return "optional"
    if isinstance(t, torch.ListType) and isinstance(t.getElementType(), (torch.TensorType, torch.OptionalType)):
        return "list"
    return None


def _scope(node: torch.fx.Node, root: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values() if p]
    return paths[-1] if paths else root


def to_ir(
    ep: torch.export.ExportedProgram,
    name: str,
    input_names: list[str],
    dim_names: list[dict[int, str]],
    output_names: list[str],
    dim_ranges: dict[str, tuple[int, int | None]],
) -> Graph:
    from torch.export.graph_signature import OutputKind

    t = _Translator(name)
    inputs, weights, constants = t.signature_inputs(ep, input_names, dim_names)
    calls = (t.node(n) for n in ep.graph_module.graph.nodes if n.op == "call_function")
    nodes = [node for node in calls if node is not None]
    outs = [s for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(outs) != len(output_names):
        raise TraceError(f"{name}: {len(outs)} outputs traced, {len(output_names)} names given")
    outputs = tuple((o_name, t.env[s.arg.name]) for s, o_name in zip(outs, output_names))

    # drop weights/constants/inputs nothing uses (e.g. an input only read for its shape)
    used = {i for nd in nodes for i in nd.inputs} | {v for _, v in outputs}
    weights = [w for w in weights if w.name in used]
    constants = [c for c in constants if c.name in used]
    dims = tuple(SymDim(d, *dim_ranges[d]) for d in sorted({d for dn in dim_names for d in dn.values()}))
    g = Graph(name, tuple(inputs), tuple(weights), tuple(constants), tuple(nodes), outputs, dims)
    g.validate()
    return g


class _Translator:
    """torch.export's FX graph of `name` into IR values and nodes: `env` maps an FX node's name to
    its IR value; node names are `scope/op` with a counter for repeats."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.namer = _Namer()
        self.env: dict[str, str] = {}
        self.used_names: dict[str, int] = {}

    def signature_inputs(self, ep, input_names: list[str], dim_names: list[dict[int, str]]):
        """The graph's inputs (named `input_names`, dims bound to `dim_names`), weights and constants."""
        from torch.export.graph_signature import InputKind

        placeholders = {n.name: n for n in ep.graph_module.graph.nodes if n.op == "placeholder"}
        inputs, weights, constants = [], [], []
        user = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        if len(user) != len(input_names):
            raise TraceError(f"{self.name}: {len(user)} user inputs traced, {len(input_names)} names given")
        for spec, dnames in zip(user, dim_names):
            val = placeholders[spec.arg.name].meta["val"]
            for axis, dname in dnames.items():
                self.namer.bind(val.shape[axis], dname)
        for spec in ep.graph_signature.input_specs:
            val = placeholders[spec.arg.name].meta["val"]
            if spec.kind == InputKind.USER_INPUT:
                ir_name = input_names[user.index(spec)]
                inputs.append(Value(ir_name, TensorType(_np_dtype(val.dtype), self.namer.shape(val))))
            elif spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
                ir_name = spec.target
                weights.append(Value(ir_name, TensorType(_np_dtype(val.dtype), self.namer.shape(val))))
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                ir_name = spec.target
                constants.append(Constant(ir_name, ep.constants[spec.target].detach().numpy().copy()))
            else:
                raise TraceError(f"{self.name}: unsupported input kind {spec.kind} for {spec.arg.name}")
            self.env[spec.arg.name] = ir_name
        return inputs, weights, constants

    def value_of(self, a: Any) -> str:
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        raise TraceError(f"{self.name}: expected a tensor, got {a!r}")

    def attr_of(self, a: Any, op: str) -> Any:
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("val")
            if isinstance(v, (torch.SymInt, int)):
                return self.namer.dim(v)
            raise TraceError(f"{self.name}: op {op} has a tensor where an attribute was expected")
        if isinstance(a, (list, tuple)):
            return tuple(self.attr_of(x, op) for x in a)
        if isinstance(a, torch.SymInt):
            return self.namer.dim(a)
        if isinstance(a, torch.dtype):
            return _np_dtype(a)
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        if isinstance(a, (torch.memory_format, torch.layout, torch.device)):
            return str(a)
        raise TraceError(f"{self.name}: op {op} has an attribute {a!r} of type {type(a).__name__}")

    def node(self, n) -> Node | None:
        """The IR node of call `n`, or None where it becomes no node (size arithmetic, asserts,
        aliases and same-dtype casts, which map to their input)."""
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            if isinstance(val, (torch.SymInt, int, type(None))) or str(n.target) in _DROPPED:
                return None  # size arithmetic is inlined where it is used; asserts are dropped
            raise TraceError(f"{self.name}: node {n.name} ({n.target}) produces {type(val).__name__}")
        op = str(n.target)
        if op in _ALIASES or (op in _CASTS and n.args[0].meta["val"].dtype == val.dtype):
            self.env[n.name] = self.value_of(n.args[0])
            return None
        schema = getattr(n.target, "_schema", None)
        if schema is None:
            raise TraceError(f"{self.name}: {op} at {_scope(n, self.name)} is not an aten op")
        ins, attrs = self.operands(n, schema, op)
        scope = _scope(n, self.name)
        base = f"{scope}/{op.split('.')[1]}"
        k = self.used_names.get(base, 0)
        self.used_names[base] = k + 1
        node_name = base if k == 0 else f"{base}.{k}"
        self.env[n.name] = node_name
        kind = TensorType(_np_dtype(val.dtype), self.namer.shape(val))
        return Node(node_name, op, tuple(ins), tuple(attrs), kind, scope)

    def operands(self, n, schema, op: str) -> tuple[list[str], list[tuple[str, Any]]]:
        """The call's tensor inputs (in the schema's order; "" for a missing optional one) and its
        attributes (the other arguments, defaults filled in)."""
        ins: list[str] = []
        attrs: list[tuple[str, Any]] = []
        for i, arg in enumerate(schema.arguments):
            if i < len(n.args):
                a = n.args[i]
            elif arg.name in n.kwargs:
                a = n.kwargs[arg.name]
            elif arg.has_default_value():
                a = arg.default_value
            else:
                raise TraceError(f"{self.name}: {op} lacks argument {arg.name}")
            kind = _tensor_arg(arg)
            if kind is not None and isinstance(a, (bool, int, float)):
                attrs.append((arg.name, a))  # a Python scalar in a tensor slot (`q * scale`)
            elif kind == "list":
                ins.extend(self.value_of(x) for x in a)
            elif kind is not None:
                ins.append("" if a is None else self.value_of(a))
            else:
                attrs.append((arg.name, self.attr_of(a, op)))
        return ins, attrs


def _offset_qkv_attention(self: MultiHeadAttention, q, k, v, mask=None):
    """openai-whisper's explicit attention with the causal mask taken at the cache offset.

    openai-whisper slices `mask[:n_ctx, :n_ctx]`, which is right only when the cache is empty or
    one token is decoded: the only two ways it calls the decoder. The traced step serves both
    with one graph, so it takes rows [past, past + n) and columns [0, past + n): the same values
    in those two cases, and the correct causal mask in any other.
    """
    n_batch, n_ctx, n_state = q.shape
    scale = (n_state // self.n_head) ** -0.25
    q = q.view(*q.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
    k = k.view(*k.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
    v = v.view(*v.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
    qk = (q * scale) @ (k * scale).transpose(-1, -2)
    if mask is not None:
        past = k.shape[2] - n_ctx
        qk = qk + mask[past : past + n_ctx, : past + n_ctx]
    w = F.softmax(qk.float(), dim=-1).to(q.dtype)
    out = (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)
    return out, qk.detach()


@contextlib.contextmanager
def incremental_decoder(decoder: TextDecoder, self_k, self_v, cross_k, cross_v) -> Iterator[dict]:
    """openai-whisper's kv_cache dict filled from explicit tensors, hooks growing the self cache.

    The dict's first entry is block 0's self-attention key, so openai-whisper's
    `offset = next(iter(kv_cache.values())).shape[1]` is the cache length `past`.
    """
    cache: dict[nn.Module, torch.Tensor] = {}
    for i, b in enumerate(decoder.blocks):
        cache[b.attn.key], cache[b.attn.value] = self_k[i], self_v[i]
    for i, b in enumerate(decoder.blocks):
        cache[b.cross_attn.key], cache[b.cross_attn.value] = cross_k[i], cross_v[i]

    def grow(module, _, output):
        cache[module] = torch.cat([cache[module], output], dim=1)
        return cache[module]

    hooks = []
    try:
        for b in decoder.blocks:
            hooks += [b.attn.key.register_forward_hook(grow), b.attn.value.register_forward_hook(grow)]
            b.attn.qkv_attention = types.MethodType(_offset_qkv_attention, b.attn)
        yield cache
    finally:
        for h in hooks:
            h.remove()
        for b in decoder.blocks:
            del b.attn.qkv_attention  # back to the class method


class EncoderModule(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, mel):
        return self.encoder(mel)


class CrossKVModule(nn.Module):
    def __init__(self, model: Whisper):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, xa):
        out = []
        for b in self.decoder.blocks:
            out += [b.cross_attn.key(xa), b.cross_attn.value(xa)]
        return out


class DecoderStepModule(nn.Module):
    """One decoder call with an explicit cache: logits for the last position, grown cache."""

    def __init__(self, model: Whisper):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, self_k: list, self_v: list, cross_k: list, cross_v: list):
        with incremental_decoder(self.decoder, self_k, self_v, cross_k, cross_v) as cache:
            # xa is read only for its dtype once every cross K/V is cached
            logits = self.decoder(tokens, cross_k[0], kv_cache=cache)
        blocks = self.decoder.blocks
        return [logits[:, -1]] + [cache[m] for b in blocks for m in (b.attn.key, b.attn.value)]


def cache_names(dims: dict, kind: str) -> list[str]:
    """`attn` (self) or `cross_attn` K/V names, interleaved key, value per block."""
    return [f"decoder.blocks.{i}.{kind}.{kv}" for i in range(dims["n_text_layer"]) for kv in ("key", "value")]


def trace_program(model: Whisper) -> Program:
    dims = vars(model.dims).copy()
    L, d, d_a = dims["n_text_layer"], dims["n_text_state"], dims["n_audio_state"]
    n_ctx = dims["n_text_ctx"]
    model = model.eval()
    # torch.export specialises sizes 0 and 1, so trace with 2..; the graphs are symbolic in
    # these dims and the ranges recorded are the run-time contract (checked by parity on n=1, past=0).
    ranges = {"batch": (1, None), "n": (1, n_ctx), "past": (0, n_ctx - 1)}
    batch = Dim("batch", min=2)
    with torch.no_grad(), disable_sdpa():
        mel = torch.zeros(2, dims["n_mels"], 2 * dims["n_audio_ctx"])
        ep = export(EncoderModule(model), (mel,), dynamic_shapes=({0: batch},))
        enc = to_ir(ep, Role.ENCODER, [MEL], [{0: "batch"}], [AUDIO_FEATURES], ranges)

        xa = torch.zeros(2, dims["n_audio_ctx"], d_a)
        ep = export(CrossKVModule(model), (xa,), dynamic_shapes=({0: batch},))
        xkv = to_ir(ep, Role.CROSS_KV, [AUDIO_FEATURES], [{0: "batch"}], cache_names(dims, "cross_attn"), ranges)

        n, past = Dim("n", min=2, max=n_ctx - 2), Dim("past", min=2, max=n_ctx - 2)
        tokens = torch.zeros(2, 3, dtype=torch.long)
        sk = [torch.zeros(2, 5, d) for _ in range(L)]
        sv = [torch.zeros(2, 5, d) for _ in range(L)]
        ck = [torch.zeros(2, dims["n_audio_ctx"], d) for _ in range(L)]
        cv = [torch.zeros(2, dims["n_audio_ctx"], d) for _ in range(L)]
        spec = (
            {0: batch, 1: n},
            [{0: batch, 1: past}] * L,
            [{0: batch, 1: past}] * L,
            [{0: batch}] * L,
            [{0: batch}] * L,
        )
        ep = export(DecoderStepModule(model), (tokens, sk, sv, ck, cv), dynamic_shapes=spec)
        self_names = cache_names(dims, "attn")
        cross_names = cache_names(dims, "cross_attn")
        in_names = [TOKENS] + self_names[0::2] + self_names[1::2] + cross_names[0::2] + cross_names[1::2]
        in_dims = [{0: "batch", 1: "n"}] + [{0: "batch", 1: "past"}] * (2 * L) + [{0: "batch"}] * (2 * L)
        dec = to_ir(ep, Role.DECODER, in_names, in_dims, [LOGITS] + self_names, ranges)

    return Program((enc, xkv, dec), dims)


def model_from_state_dict(
    dims: dict,
    state_dict: dict[str, np.ndarray],
    alignment_heads: list[list[int]] | None = None,
    source: str = "state dict",
) -> Whisper:
    """openai-whisper's model on these weights, as whisper.load_model builds it (alignment heads set)."""
    from whisper.model import ModelDimensions

    model = Whisper(ModelDimensions(**dims))
    expected = model.state_dict()
    missing, extra = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or extra:
        raise TraceError(
            f"{source}: the state dict does not fit openai-whisper: missing {sorted(missing)[:5]}, extra "
            f"{sorted(extra)[:5]}"
        )
    for k, v in expected.items():
        if tuple(v.shape) != state_dict[k].shape:
            raise TraceError(f"{source}: {k}: shape {state_dict[k].shape}, openai-whisper expects {tuple(v.shape)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()})
    if alignment_heads is not None:
        mask = torch.zeros(dims["n_text_layer"], dims["n_text_head"], dtype=torch.bool)
        for layer, head in alignment_heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.eval()
