"""whisper-max IR: a small, frozen, printable graph of source ops.

A `Graph` is a list of `Node`s in topological order. Values are referred to by name: a graph
input, a weight (its state-dict name), a constant, or a node. A node keeps the exact source op
(`aten.linear.default`), its tensor inputs in the op schema's order ("" for an absent optional
tensor), its other arguments as attributes, its output type, and the PyTorch module path (scope)
it was traced in. A dim is an int or a symbolic expression over named dims ("batch",
"n + past"), printed the way sympy prints it so that equal expressions print equally.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime import manifest
from ..runtime.manifest import GraphSignature, State, TensorSpec
from ..runtime.weights import pairs_source, panels_source, widened_source

Dim = int | str

# torch writes an open slice end (`x[a:]`) as sys.maxsize; any end at least this large means "to the end"
OPEN_END = 2**62


def dim_symbols(d: Dim) -> set[str]:
    """The named dims a dim expression mentions ("n + past" -> {"n", "past"}; 4 -> none)."""
    return set(re.findall(r"[A-Za-z_]\w*", d)) if isinstance(d, str) else set()


# Ops of whisper-max's own, made by passes rather than traced, live in this domain.
# `cache_append(state, new, position, axis=a)` writes `new` into the graph input `state` at
# `position` along axis `a`, in place, and is the filled prefix `state[..., :position + len(new)]`.
# A graph input written in place (a "state" input) is read by nothing else, so the order of the
# write and the reads is the node's own.
OWN_DOMAIN = "whisper_max"
CACHE_APPEND = f"{OWN_DOMAIN}.cache_append"
# `cast(x, dtype=d)`: x's values in dtype d (passes.store_weights reads stored weights through it)
CAST = f"{OWN_DOMAIN}.cast"
# `decoder_layer(x, key_cache, value_cache, position, <the block's weights>, cross_keys,
# cross_values[, lineage], axis=2, heads=h, scale=s, eps=e)`: one residual attention block of the text
# decoder for rows of one position each (passes.fuse_decoder_layers documents the operands);
# writes the new token's key and value into the two caches at `position` along `axis`.
DECODER_LAYER = f"{OWN_DOMAIN}.decoder_layer"
# `cross_queries(layer)`: the rows' cross-attention queries (rows, d), scaled as the keys are, of
# the decoder_layer node `layer` (its kernel's second output); passes.cross_queries returns them,
# so word timestamps take the alignment heads' scores from them and the window's keys.
CROSS_QUERIES = f"{OWN_DOMAIN}.cross_queries"
# `select_tokens(logits, rules, suppress, sampling, slots)`: the next-token choice of each row of
# logits (rows, n_vocab) after openai-whisper's logit filters -> (rows, k, 2) float32 (token,
# log-probability) pairs, k the length of `slots` (its values are not read). The kernel
# whisper_max.select_tokens documents the operands; passes.token_selection makes its graph.
SELECT_TOKENS = f"{OWN_DOMAIN}.select_tokens"
# `attention_bf16(q, k, v, heads=h, scale=s)`: multi-head attention without a mask over
# (batch, t, d) inputs, softmax((q s)(k s)^T) v per head, in bfloat16 arithmetic with float32
# sums (the kernel whisper_max.attention_bf16); passes.fuse_encoder_attention makes it in the
# encoder of a bfloat16 package.
ATTENTION_BF16 = f"{OWN_DOMAIN}.attention_bf16"
# `attention(q, k, v, heads=h, scale=s)`: the same attention in float32 (the kernel
# whisper_max.attention: scores kept in cache); fuse_encoder_attention makes it in the encoder
# of a float32 package.
ATTENTION = f"{OWN_DOMAIN}.attention"
# `linear_panels(x, w, bias)`: x (..., k) @ W^T + bias -> (..., n), n = len(bias), for x of one
# position per row (decoder steps), with W (n, k) given as `W/panels` (runtime.weights.to_panels:
# (ceil(n / 64), k, 64), float32, float16 or bfloat16): passes.panel_products makes it; the kernel
# whisper_max.linear_panels sums each output in the same order whatever the number of rows.
LINEAR_PANELS = f"{OWN_DOMAIN}.linear_panels"
# `linear_pairs(x, w, bias)`: the same product with a bfloat16 W given as `W/pairs`
# (runtime.weights.to_pairs: (ceil(n / 64), k / 2, 64, 2)), on AVX512_BF16 (VDPBF16PS: x rounded to
# bfloat16, pair products summed in float32); panel_products makes it for bfloat16 weights on such
# targets without AMX. Each output summed in one order whatever the number of rows.
LINEAR_PAIRS = f"{OWN_DOMAIN}.linear_pairs"
# The products and attention passes.select_kernels picks for a target (the package's IR holds
# none of them: it is the same for every CPU, and each compile chooses for its own):
# `linear_rows(x, w[, bias])`: x (..., k) of one position per row @ w^T (+ bias), w (n, k) a graph
# weight read as stored (float32, float16 or bfloat16; the kernel widens it exactly);
# `linear_rows_amx`: the same with a bfloat16 w on AMX tiles (x rounded to bfloat16);
# `linear_bf16(x, w[, bias])`: many rows with a bfloat16 w (n, k): x rounded to bfloat16, pair
# products summed in float32 (AVX512_BF16); `linear_amx`: the same on AMX tiles;
# `attention_amx(q, k, v, heads=h, scale=s)`: attention_bf16's arithmetic on AMX tiles.
LINEAR_ROWS = f"{OWN_DOMAIN}.linear_rows"
LINEAR_ROWS_AMX = f"{OWN_DOMAIN}.linear_rows_amx"
LINEAR_BF16 = f"{OWN_DOMAIN}.linear_bf16"
LINEAR_AMX = f"{OWN_DOMAIN}.linear_amx"
ATTENTION_AMX = f"{OWN_DOMAIN}.attention_amx"
# op -> (the operands it writes in place, the operand holding the position it writes at)
IN_PLACE_OPS = {CACHE_APPEND: ((0,), 2), DECODER_LAYER: ((1, 2), 3)}


def write_position(n: Node) -> str:
    """The value holding the position at which the in-place op `n` writes its state inputs."""
    return n.inputs[IN_PLACE_OPS[n.op][1]]


class TraceError(RuntimeError):
    """A PyTorch module could not be turned into IR (raised by converter.trace)."""


@dataclass(frozen=True)
class TensorType:
    dtype: str  # numpy dtype name ("float32", "int64", "float16"), or "bfloat16" (a stored weight)
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class Value:
    name: str
    type: TensorType


@dataclass(frozen=True, eq=False)
class Constant:
    """A small fixed tensor that is part of the program, not of the checkpoint (e.g. a mask)."""

    name: str
    data: np.ndarray

    @property
    def type(self) -> TensorType:
        return TensorType(str(self.data.dtype), tuple(int(d) for d in self.data.shape))


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...]
    type: TensorType
    scope: str

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)


@dataclass(frozen=True)
class SymDim:
    """A named symbolic dim and the values it may take at run time."""

    name: str
    min: int
    max: int | None


@dataclass(frozen=True, eq=False)
class Graph:
    name: str
    inputs: tuple[Value, ...]
    weights: tuple[Value, ...]
    constants: tuple[Constant, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[tuple[str, str], ...]  # (output name, value name)
    dims: tuple[SymDim, ...] = field(default=())

    def types(self) -> dict[str, TensorType]:
        t = {v.name: v.type for v in self.inputs + self.weights}
        t.update({c.name: c.type for c in self.constants})
        t.update({n.name: n.type for n in self.nodes})
        return t

    def validate(self) -> None:
        """Names unique, every input defined before use, every output defined."""
        seen: set[str] = set()
        for v in list(self.inputs) + list(self.weights) + list(self.constants):
            if v.name in seen:
                raise ValueError(f"graph {self.name}: {v.name!r} defined twice")
            seen.add(v.name)
        for n in self.nodes:
            for i in n.inputs:
                if i and i not in seen:
                    raise ValueError(f"graph {self.name}: node {n.name} ({n.scope}) uses undefined {i!r}")
            if n.name in seen:
                raise ValueError(f"graph {self.name}: {n.name!r} defined twice")
            seen.add(n.name)
        for out, v in self.outputs:
            if v not in seen:
                raise ValueError(f"graph {self.name}: output {out!r} refers to undefined {v!r}")
        state = self.state_inputs()
        inputs = {v.name for v in self.inputs}
        for n in self.nodes:
            for k, i in enumerate(n.inputs):
                if i in state and state[i] is not n:
                    raise ValueError(
                        f"graph {self.name}: {n.name} reads {i!r}, which {state[i].name} writes in place; only the "
                        "writer may read it"
                    )
                if k in IN_PLACE_OPS.get(n.op, ((), None))[0] and i not in inputs:
                    raise ValueError(
                        f"graph {self.name}: {n.name} ({n.op}) writes {i!r} in place, which is not a graph input"
                    )
        if state.keys() & {v for _, v in self.outputs}:
            raise ValueError(f"graph {self.name}: a state input is also an output")

    def state_inputs(self) -> dict[str, Node]:
        """Graph inputs written in place, each with the node that writes it."""
        out: dict[str, Node] = {}
        for n in self.nodes:
            for k in IN_PLACE_OPS.get(n.op, ((), None))[0]:
                if n.inputs[k] in out:
                    raise ValueError(
                        f"graph {self.name}: {n.inputs[k]!r} is written in place by {out[n.inputs[k]].name} and "
                        f"{n.name}"
                    )
                out[n.inputs[k]] = n
        return out


def graph_signature(g: Graph) -> GraphSignature:
    """What a runtime needs to call a graph (the manifest's record of it): inputs, outputs and
    weights by name, with types; the inputs written in place with their axis and position."""
    types = g.types()
    state = g.state_inputs()

    def arg(name: str, t, written: Node | None = None) -> TensorSpec:
        where = None if written is None else State(written.attr("axis"), write_position(written))
        return TensorSpec(name, t.dtype, tuple(t.shape), where)

    return GraphSignature(
        inputs=tuple(arg(v.name, v.type, state.get(v.name)) for v in g.inputs),
        outputs=tuple(arg(name, types[v]) for name, v in g.outputs),
        weights=tuple(arg(w.name, w.type) for w in g.weights),
        dims=tuple(manifest.Dim(d.name, d.min, d.max) for d in g.dims),
    )


def one_position_per_row(g: Graph, name: str) -> bool:
    """Whether the value `name` holds one position per row: every dim between the rows and the
    last is 1 (a decoder step, one token for each row), or it is one position selected from
    (rows, positions, d) (passes.last_position_logits: the prompt's last position).
    passes.select_kernels gives products of such values with weights to the matrix-vector
    kernels, which read stored weights as they are stored."""
    types = g.types()
    shape = types[name].shape
    if len(shape) >= 3:
        return all(d == 1 for d in shape[1:-1])
    src = next((n for n in g.nodes if n.name == name), None)
    if len(shape) == 2 and src is not None and src.op == "aten.select.int" and src.attr("dim") == 1:
        return len(types[src.inputs[0]].shape) == 3
    return False


def bfloat16_product_fits(weight_shape) -> bool:
    """Whether a product of many rows with a bfloat16 weight (n, k) can run as our bfloat16
    kernel (whisper_max.linear_bf16): n a multiple of 64 (its column panels), k even (its
    pairs). Every Whisper size's linear layers fit."""
    return (
        len(weight_shape) == 2
        and all(isinstance(d, int) for d in weight_shape)
        and weight_shape[0] % 64 == 0
        and weight_shape[1] % 2 == 0
    )


def uses_bfloat16_arithmetic(p: Program) -> bool:
    """Whether lowering runs any of the program's products in bfloat16 arithmetic: a fused
    bfloat16 attention, or a linear layer of many rows reading a stored bfloat16 weight through
    a cast (passes.select_kernels: whisper_max.linear_bf16)."""
    for g in p.graphs:
        stored = {w.name for w in g.weights if w.type.dtype == "bfloat16"}
        casts = {n.name for n in g.nodes if n.op == CAST and n.inputs[0] in stored}
        for n in g.nodes:
            if n.op == ATTENTION_BF16:
                return True
            if n.op == "aten.linear.default" and n.inputs[1] in casts and not one_position_per_row(g, n.inputs[0]):
                return True
    return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, str):
        return repr(v)
    return str(v)


def format_graph(g: Graph) -> str:
    """Deterministic text form, one line per value; used by snapshot tests and `--print-ir`."""
    lines = [f"graph {g.name}("]
    for d in g.dims:
        lines.append(f"  dim {d.name} in [{d.min}, {d.max if d.max is not None else 'inf'}]")
    for v in g.inputs:
        lines.append(f"  input {v.name}: {v.type}")
    for v in g.weights:
        lines.append(f"  weight {v.name}: {v.type}")
    for c in g.constants:
        lines.append(f"  const {c.name}: {c.type}")
    lines.append(") {")
    for n in g.nodes:
        args = ", ".join(i if i else "None" for i in n.inputs)
        attrs = "".join(f", {k}={_fmt(v)}" for k, v in n.attrs)
        lines.append(f"  {n.name}: {n.type} = {n.op}({args}{attrs})  # {n.scope}")
    for out, v in g.outputs:
        lines.append(f"  return {out} = {v}")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, eq=False)
class Program:
    """The graphs of one model, plus what a runtime needs to know about them."""

    graphs: tuple[Graph, ...]
    dims: dict  # openai-whisper ModelDimensions fields

    def graph(self, name: str) -> Graph:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(f"program has no graph {name!r} (has {[g.name for g in self.graphs]})")

    def weight_names(self) -> list[str]:
        """Every weight a graph binds (widened ones included)."""
        return sorted({w.name for g in self.graphs for w in g.weights})

    def stored_weights(self) -> dict[str, str]:
        """The weights a package stores, each with its stored dtype: every graph weight, except
        that a derived one stands for its source X: `X/panels` (runtime.weights.PANELS) and
        `X/pairs` (PAIRS) for X stored in its own dtype, `X/widened` (runtime.weights.WIDENED) for X stored as a graph
        that reads X binds it (or panels it), or as bfloat16 where only widened copies are read."""
        out: dict[str, str] = {}
        weights = [w for g in self.graphs for w in g.weights]

        def order(w: Value) -> int:  # direct reads first, then panels, then widened copies
            packed = panels_source(w.name) or pairs_source(w.name)
            return 2 if widened_source(w.name) is not None else 1 if packed is not None else 0

        for w in sorted(weights, key=order):
            widened, panels = widened_source(w.name), panels_source(w.name) or pairs_source(w.name)
            if panels is not None:
                name, dtype = panels, w.type.dtype
            elif widened is not None:
                name, dtype = widened, out.get(widened, "bfloat16")
                if dtype not in ("bfloat16", "float16"):
                    raise ValueError(f"weight {w.name!r} widens {widened!r}, which is stored as {dtype}")
            else:
                name, dtype = w.name, w.type.dtype
            if out.setdefault(name, dtype) != dtype:
                raise ValueError(f"weight {name!r} is stored as {out[name]} and as {dtype}")
        return dict(sorted(out.items()))


def format_program(p: Program) -> str:
    return "\n".join(format_graph(g) for g in p.graphs)


def module_output(g: Graph, scope: str) -> str:
    """The value a module hands on: the last node in its scope used outside it (or returned)."""
    inside = lambda s: s == scope or s.startswith(scope + ".")  # noqa: E731
    producer = {n.name: n for n in g.nodes}
    escaping = {v for _, v in g.outputs}
    for n in g.nodes:
        if not inside(n.scope):
            escaping.update(i for i in n.inputs if i in producer and inside(producer[i].scope))
    found = [n.name for n in g.nodes if inside(n.scope) and n.name in escaping]
    if not found:
        raise KeyError(f"graph {g.name}: no value leaves module {scope!r}")
    return found[-1]
