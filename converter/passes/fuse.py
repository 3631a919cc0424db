"""fuse_decoder_layers and fuse_encoder_attention: traced blocks matched and replaced by one op of ours each."""

from __future__ import annotations

import logging

import numpy as np

from ...runtime.program import Role
from .. import ir
from .rewrite import consumers, replace_graph

log = logging.getLogger(__name__)


# The ops of one traced residual attention block of the text decoder in a graph of one position
# per row, after in_place_cache, in trace order: fuse_decoder_layers replaces exactly these.
_LN, _LIN, _VIEW, _PERM, _MUL = (
    "aten.layer_norm.default",
    "aten.linear.default",
    "aten.view.default",
    "aten.permute.default",
    "aten.mul.Tensor",
)
_MM, _ADD, _SM, _FLAT, _SLICE = (
    "aten.matmul.default",
    "aten.add.Tensor",
    "aten.softmax.int",
    "aten.flatten.using_ints",
    "aten.slice.Tensor",
)
# fmt: off
_BLOCK_OPS = (
    # ln, q, k, v; cache writes
    _LN, _LIN, _LIN, _VIEW, _PERM, _MUL, ir.CACHE_APPEND, _LIN, _VIEW, _PERM, ir.CACHE_APPEND,
    # self-attention
    _VIEW, _PERM, _MUL, "aten.transpose.int", _MM, _SLICE, _SLICE, _ADD, _SM, _MM, _PERM, _FLAT, _LIN, _ADD,
    _LN, _LIN, _VIEW, _PERM, _MUL, _MM, _SM, _MM, _PERM, _FLAT, _LIN, _ADD,  # cross-attention
    _LN, _LIN, "aten.gelu.default", _LIN, _ADD,  # MLP
)
# fmt: on


def _causal_mask(c: ir.Constant | None) -> bool:
    """A square mask of 0 on and below the diagonal and -inf above it (openai-whisper's)."""
    if c is None or c.data.ndim != 2 or c.data.shape[0] != c.data.shape[1]:
        return False
    upper = np.triu(np.ones(c.data.shape, bool), 1)
    return bool(np.all(c.data[~upper] == 0) and np.all(np.isneginf(c.data[upper])))


def fuse_decoder_layers(p: ir.Program, graph: str) -> ir.Program:
    """Replace each residual attention block of `graph` (one position per row: decoder_step,
    decoder_rows) by one `decoder_layer` node, which lowering runs as one kernel of ours.

    The step reads ~13 MB per block on tiny.en and is bound by that, but as ~40 graph ops per
    block it paid a launch and a pass over memory for each. Each block is checked to be exactly
    the traced one (_BLOCK_OPS, wired as openai-whisper's ResidualAttentionBlock: pre-norm
    residuals, q and k scaled by one constant, k without bias, exact GELU), reading its caches
    at the position every cache write uses. The causal mask is checked to be 0 up to and
    including the row's own position, so adding it changes nothing and the kernel omits it.
    Nothing outside a block may read its inner values. The operands, in order: the residual
    input, the key and value caches, the position, attn_ln (w, b), query (w, b), key (w),
    value (w, b), out (w, b), cross_attn_ln (w, b), cross query (w, b), cross out (w, b),
    mlp_ln (w, b), fc1 (w, b), fc2 (w, b), the window's scaled keys transposed (rows or 1,
    heads, hd, frames) and values (rows or 1, heads, frames, hd)."""
    g = p.graph(graph)
    if any(d.name == "n" for d in g.dims):
        raise ValueError(f"{graph}: has a dim n (positions per row); decoder_layer takes one position per row")
    inputs = {v.name: v for v in g.inputs}
    consts = {c.name: c for c in g.constants}
    nodes = list(g.nodes)
    fused = 0
    while True:
        prefix = f"decoder.blocks.{fused}"
        region = [n for n in nodes if n.scope == prefix or n.scope.startswith(prefix + ".")]
        if not region:
            break
        block = _Block(f"{graph}: {prefix}", prefix, region)
        if tuple(n.op for n in region) != _BLOCK_OPS:
            raise ValueError(
                f"{block.where} is not the residual attention block fuse_decoder_layers knows: ops "
                f"{[n.op.split('.', 1)[-1] for n in region]}"
            )
        outside = {i for n in nodes if n.name not in block.by for i in n.inputs} | {val for _, val in g.outputs}
        layer = _decoder_layer(block, inputs, consts, outside)
        at = nodes.index(region[0])
        nodes = [n for n in nodes if n.name not in block.by]
        nodes.insert(at, layer)
        fused += 1
    if not fused:
        raise ValueError(f"{graph}: no decoder blocks to fuse")
    read = {i for n in nodes for i in n.inputs}
    out = ir.Graph(
        g.name,
        g.inputs,
        tuple(w for w in g.weights if w.name in read),
        tuple(c for c in g.constants if c.name in read),
        tuple(nodes),
        g.outputs,
        g.dims,
    )
    log.info("%s: %d decoder blocks fused into decoder_layer kernels", graph, fused)
    return replace_graph(p, out)


class _Block:
    """One traced residual attention block: its nodes by local name (`.attn.query/linear`), and
    `expect`, which refuses the fusion naming the block and what differs."""

    def __init__(self, where: str, prefix: str, region: list[ir.Node]) -> None:
        self.where, self.prefix = where, prefix
        self.by = {n.name: n for n in region}

    def __getitem__(self, local: str) -> ir.Node:
        n = self.by.get(self.prefix + local)
        if n is None:
            raise ValueError(f"{self.where}: no node {self.prefix + local}")
        return n

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{self.where}: {what}; not fused")

    def chain(self, *locals_: str, source: str) -> bool:
        """Whether each of these nodes reads the next one first, and the last reads `source`."""
        nodes = [self[local] for local in locals_]
        return all(n.inputs[0] == m.name for n, m in zip(nodes, nodes[1:])) and nodes[-1].inputs[0] == source


def _decoder_layer(b: _Block, inputs: dict, consts: dict, outside: set[str]) -> ir.Node:
    """The decoder_layer node replacing block `b`, once every check of fuse_decoder_layers holds."""
    ln1, ln2, ln3 = b[".attn_ln/layer_norm"], b[".cross_attn_ln/layer_norm"], b[".mlp_ln/layer_norm"]
    q, k, v, o = (b[f".attn.{m}/linear"] for m in ("query", "key", "value", "out"))
    cq, co = b[".cross_attn.query/linear"], b[".cross_attn.out/linear"]
    fc1, fc2 = b[".mlp.0/linear"], b[".mlp.2/linear"]
    kcat, vcat = b[".attn.key/cat"], b[".attn.value/cat"]
    _check_block_wiring(b)
    eps = {ln.attr("eps") for ln in (ln1, ln2, ln3)}
    scales = {b[m].attr("other") for m in (".attn/mul", ".attn/mul.1", ".cross_attn/mul")}
    b.expect(len(eps) == 1 and len(scales) == 1, f"layer norms' eps {eps} or attention scales {scales} differ")
    position = _check_self_attention(b, inputs, consts)
    ckt, cv = _check_cross_attention(b, inputs)
    add2 = b["/add.2"]
    b.expect(
        outside & set(b.by) == {add2.name},
        f"values inside the block are read outside it: {sorted(outside & set(b.by) - {add2.name})}",
    )
    heads = b[".attn/view"].type.shape[2]
    operands = (
        ln1.inputs[0],
        kcat.inputs[0],
        vcat.inputs[0],
        position,
        *ln1.inputs[1:3],
        *q.inputs[1:3],
        k.inputs[1],
        *v.inputs[1:3],
        *o.inputs[1:3],
        *ln2.inputs[1:3],
        *cq.inputs[1:3],
        *co.inputs[1:3],
        *ln3.inputs[1:3],
        *fc1.inputs[1:3],
        *fc2.inputs[1:3],
        ckt,
        cv,
    )
    attrs = (("axis", 2), ("heads", heads), ("scale", scales.pop()), ("eps", eps.pop()))
    return ir.Node(add2.name, ir.DECODER_LAYER, operands, attrs, add2.type, b.prefix)


def _check_block_wiring(b: _Block) -> None:
    """Pre-norm residuals, the products fed by their norms, exact GELU, biases as traced."""
    ln1, ln2, ln3 = b[".attn_ln/layer_norm"], b[".cross_attn_ln/layer_norm"], b[".mlp_ln/layer_norm"]
    q, k, v, o = (b[f".attn.{m}/linear"] for m in ("query", "key", "value", "out"))
    cq, co = b[".cross_attn.query/linear"], b[".cross_attn.out/linear"]
    fc1, gelu, fc2 = b[".mlp.0/linear"], b[".mlp.1/gelu"], b[".mlp.2/linear"]
    add0, add1, add2 = b["/add"], b["/add.1"], b["/add.2"]
    x = ln1.inputs[0]
    b.expect(
        add0.inputs[:2] == (x, o.name)
        and ln2.inputs[0] == add0.name
        and add1.inputs[:2] == (add0.name, co.name)
        and ln3.inputs[0] == add1.name
        and add2.inputs[:2] == (add1.name, fc2.name),
        "residual wiring differs",
    )
    b.expect(all(a.attr("alpha") == 1 for a in (add0, add1, add2)), "a residual add has alpha != 1")
    b.expect(
        q.inputs[0] == k.inputs[0] == v.inputs[0] == ln1.name
        and cq.inputs[0] == ln2.name
        and fc1.inputs[0] == ln3.name
        and gelu.inputs[0] == fc1.name
        and fc2.inputs[0] == gelu.name
        and gelu.attr("approximate") == "none",
        "products wired differently",
    )
    b.expect(
        all(n.inputs[2] for n in (q, v, o, cq, co, fc1, fc2)) and not k.inputs[2],
        "biases differ (key has none, the rest have one)",
    )
    b.expect(all(ln.inputs[1] and ln.inputs[2] for ln in (ln1, ln2, ln3)), "a layer norm lacks weight or bias")


def _check_self_attention(b: _Block, inputs: dict, consts: dict) -> str:
    """q scaled after its product; the caches store the scaled key and the value at one position
    (an input, returned); the scores read them; the mask is a causal row that changes nothing."""
    q, k, v = (b[f".attn.{m}/linear"] for m in ("query", "key", "value"))
    kcat, vcat = b[".attn.key/cat"], b[".attn.value/cat"]
    b.expect(b.chain(".attn/mul", ".attn/permute", ".attn/view", source=q.name), "q is not scaled after its product")
    b.expect(
        kcat.inputs[1] == b[".attn/mul.1"].name
        and b.chain(".attn/mul.1", ".attn/permute.1", ".attn/view.1", source=k.name),
        "the key cache does not store the scaled key",
    )
    b.expect(
        vcat.inputs[1] == b[".attn/permute.2"].name and b.chain(".attn/permute.2", ".attn/view.2", source=v.name),
        "the value cache does not store the value",
    )
    position = kcat.inputs[2]
    b.expect(
        vcat.inputs[2] == position and kcat.attr("axis") == vcat.attr("axis") == 2 and position in inputs,
        "the caches are written elsewhere",
    )
    b.expect(
        b[".attn/transpose"].inputs[0] == kcat.name
        and b[".attn/matmul"].inputs == (b[".attn/mul"].name, b[".attn/transpose"].name)
        and b[".attn/matmul.1"].inputs == (b[".attn/softmax"].name, vcat.name),
        "self-attention reads other values",
    )
    mask_add, row, cols = b[".attn/add"], b[".attn/slice"], b[".attn/slice.1"]
    b.expect(
        mask_add.inputs[:2] == (b[".attn/matmul"].name, cols.name)
        and cols.inputs[0] == row.name
        and _causal_mask(consts.get(row.inputs[0]))
        and row.attr("dim") == 0
        and row.attr("start") == position
        and cols.attr("dim") == 1
        and cols.attr("start") in (None, 0)
        and cols.attr("end") == f"{position} + 1",
        "the mask added is not row `position` of a causal mask up to that position",
    )
    return position


def _check_cross_attention(b: _Block, inputs: dict) -> tuple[str, str]:
    """The cross keys and values the block reads: graph inputs, read by the scaled query."""
    ckt, cv = b[".cross_attn/matmul"].inputs[1], b[".cross_attn/matmul.1"].inputs[1]
    query = b[".cross_attn.query/linear"].name
    b.expect(
        ckt in inputs
        and cv in inputs
        and b.chain(".cross_attn/matmul", ".cross_attn/mul", ".cross_attn/permute", ".cross_attn/view", source=query),
        "cross-attention reads other values",
    )
    return ckt, cv


def fuse_encoder_attention(
    p: ir.Program, graph: str = Role.ENCODER, head_dim: int = 64, op: str = ir.ATTENTION_BF16, require: bool = True
) -> ir.Program:
    """Replace the attention of each block of `graph` (the encoder: no mask) by one
    `op(q, k, v)` node, which lowering runs as our kernel: `attention_bf16` for bfloat16
    packages (the kernel rounds q, k, v and the softmax's numerators to bfloat16), `attention`
    for float32 ones (float32 throughout, the scores kept in cache instead of written out).

    The traced chain, from the three linear outputs (batch, t, d) to the flattened heads, must
    be exactly openai-whisper's qkv_attention with no mask: each of q, k, v viewed as
    (batch, t, heads, hd) and permuted to (batch, heads, t, hd); q and k multiplied by one
    constant s; k transposed; q @ k^T; softmax over the last dim; @ v; permuted back and
    flattened. Every value of the chain has no other reader. hd must be `head_dim` (the kernel's
    panel; every Whisper size has 64). Blocks that differ are left as they are; if none matched,
    an error says why, or with `require=False` (float32, where MAX's ops compute the same
    attention) `p` is returned unchanged and the log says so."""
    if op not in (ir.ATTENTION_BF16, ir.ATTENTION):
        raise ValueError(f"fuse_encoder_attention: {op!r} is not an attention op")
    g = p.graph(graph)
    chain = _AttentionChain(g, head_dim)
    replace: dict[str, ir.Node] = {}  # the flatten's name -> the fused node
    drop: set[str] = set()
    for sm in g.nodes:
        found = chain.match(sm)
        if found is not None:
            flat, sources, heads, scale, inner = found
            replace[flat.name] = ir.Node(
                flat.name, op, sources, (("heads", heads), ("scale", scale)), flat.type, flat.scope
            )
            drop |= inner
    if not replace:
        why = (
            f"{graph}: no attention matched openai-whisper's unmasked qkv_attention (view, permute, scale, "
            f"matmul, softmax, matmul, permute, flatten; heads of {head_dim})"
        )
        if require:
            raise ValueError(why)
        log.info("%s; MAX's ops compute it", why)
        return p
    nodes = [replace.get(n.name, n) for n in g.nodes if n.name not in drop]
    log.info("%s: %d attentions fused (%s)", graph, len(replace), op)
    return replace_graph(p, ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims))


class _AttentionChain:
    """Matches openai-whisper's unmasked qkv_attention in a graph, from its softmax (see
    fuse_encoder_attention): every value of the chain with one reader and not an output."""

    def __init__(self, g: ir.Graph, head_dim: int) -> None:
        self.prod = {n.name: n for n in g.nodes}
        self.users = consumers(g)
        self.types = g.types()
        self.outputs = {v for _, v in g.outputs}
        self.head_dim = head_dim

    def only(self, name: str, op: str, **attrs) -> ir.Node | None:
        n = self.prod.get(name)
        if n is None or n.op != op or any(n.attr(k) != v for k, v in attrs.items()):
            return None
        if len(self.users.get(name, [])) != 1 or name in self.outputs:
            return None
        return n

    def head_view(self, name: str) -> tuple[ir.Node, ir.Node] | None:
        perm = self.only(name, "aten.permute.default", dims=(0, 2, 1, 3))
        view = perm and self.only(perm.inputs[0], "aten.view.default")
        if view is None:
            return None
        size = view.attr("size")
        if len(size) != 4 or size[3] != -1 or perm.type.shape[3] != self.head_dim:
            return None
        return view, perm

    def match(self, sm: ir.Node):
        """(the flatten, (q, k, v) sources, heads, scale, the chain's inner names) or None."""
        if sm.op != "aten.softmax.int" or sm.attr("dim") != -1 or sm.attr("dtype") is not None:
            return None
        qk = self.only(sm.inputs[0], "aten.matmul.default")
        pv = self.users.get(sm.name, [])
        if qk is None or len(pv) != 1 or pv[0].op != "aten.matmul.default" or pv[0].inputs[0] != sm.name:
            return None
        if sm.name in self.outputs:
            return None
        pv = pv[0]
        mq = self.only(qk.inputs[0], "aten.mul.Tensor")
        tr = self.only(qk.inputs[1], "aten.transpose.int")
        mk = tr and self.only(tr.inputs[0], "aten.mul.Tensor")
        if mq is None or mk is None or {tr.attr("dim0"), tr.attr("dim1")} != {-1, -2}:
            return None
        scale = mq.attr("other")
        if not isinstance(scale, float) or mk.attr("other") != scale:
            return None
        q, k, v = self.head_view(mq.inputs[0]), self.head_view(mk.inputs[0]), self.head_view(pv.inputs[1])
        after = self.users.get(pv.name, [])
        back = None
        if len(after) == 1 and pv.name not in self.outputs:
            back = self.only(after[0].name, "aten.permute.default", dims=(0, 2, 1, 3))
        flat = self.users.get(back.name, []) if back is not None else []
        if q is None or k is None or v is None or len(flat) != 1:
            return None
        flat = flat[0]
        if flat.op != "aten.flatten.using_ints" or flat.attr("start_dim") != 2 or flat.attr("end_dim") != -1:
            return None
        heads = q[1].type.shape[1]
        sources = (q[0].inputs[0], k[0].inputs[0], v[0].inputs[0])
        if not isinstance(heads, int) or any(self.types[x] != flat.type for x in sources):
            return None
        inner = {n.name for n in (*q, *k, *v, mq, mk, tr, qk, sm, pv, back)}
        return flat, sources, heads, scale, inner
