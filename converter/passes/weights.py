"""store_weights (matrices stored in bfloat16 or exact float16) and panel_products (products with a
float32 or float16 weight, and those of one position per row, read weight panels)."""

from __future__ import annotations

import logging

from ...runtime.weights import PAIRS, PANEL, PANELS, WIDENED, widened_source
from .. import ir
from .rewrite import consumers, drop_dead

log = logging.getLogger(__name__)


STORED_DTYPES = ("bfloat16", "float16")


def store_weights(
    p: ir.Program, dtype: str = "bfloat16", min_rank: int = 2, exact: frozenset[str] | None = None
) -> ir.Program:
    """Store the float32 weight matrices (rank >= `min_rank`: linear and conv weights, the
    embedding tables) as `dtype`, and keep computing in float32.

    Each use of a stored weight reads it in one of four ways. A table lookup (`embedding`)
    gathers stored rows and casts only those. A decoder_layer (fuse_decoder_layers) reads its
    block's matrices as stored. A product of rows of one position each with the weight (a linear
    layer, or the vocabulary product through a transpose, in decoder_step and decoder_rows) reads
    it through a `cast`, which lowering turns into our matrix-vector kernel reading the stored
    bytes (the step is bound by reading weights). A linear layer of many rows (the encoder,
    cross K/V, prompts) reads it through a cast too, which lowering runs as our bfloat16 product
    (whisper_max.linear_bf16: the rows are rounded to bfloat16, the sums are float32) when the
    weight's shape fits it (ir.bfloat16_product_fits). Every other use reads `X/widened`
    (runtime.weights.WIDENED), a float32 weight the runtime makes from X once, at load, and binds
    to every graph that names it: one float32 copy in all, where a cast would have MAX make one
    per graph at initialisation. LayerNorm parameters and biases stay float32 (0.2% of the bytes).

    float16 is the lossless form of a float32 package: `exact` names the weights whose values a
    float16 holds exactly (a checkpoint published in float16, as openai-whisper's and
    CTranslate2's are), and only those of them that a decoder step reads as stored are stored:
    the kernels widen each element exactly as they load it, so every sum is the float32 one, bit
    for bit, from half the bytes. Their other uses (the many rows of a prompt) read the widened
    copy; no product runs in float16 arithmetic. The encoder's weights stay float32.
    """
    if dtype not in STORED_DTYPES:
        raise ValueError(f"store_weights: dtype {dtype!r}; packages store weights as {' or '.join(STORED_DTYPES)}")
    if (dtype == "float16") != (exact is not None):
        raise ValueError(
            "store_weights: float16 storage takes `exact`, the weights a float16 holds exactly; bfloat16 takes none"
        )
    step_only = dtype == "float16"  # only step reads read the stored weight; the rest are widened
    chosen = None  # every matrix for bfloat16; for float16 the exact ones some step reads stored
    if step_only:
        chosen = set()
        for g in p.graphs:
            shapes, users, candidates = {w.name: w.type.shape for w in g.weights}, consumers(g), _matrices(g, min_rank)
            candidates &= exact
            for n in g.nodes:
                chosen.update(
                    i
                    for i in n.inputs
                    if i in candidates
                    and (n.op == ir.DECODER_LAYER or _reads_stored(g, users, shapes, n, i, step_only))
                )
    graphs = []
    for g in p.graphs:
        stored = _matrices(g, min_rank) if chosen is None else _matrices(g, min_rank) & chosen
        graphs.append(_store(g, stored, dtype, step_only) if stored else g)
    return ir.Program(tuple(graphs), p.dims)


def _matrices(g: ir.Graph, min_rank: int) -> set[str]:
    """The float32 weights of rank >= min_rank that are not a widened copy."""
    return {
        w.name
        for w in g.weights
        if w.type.dtype == "float32" and len(w.type.shape) >= min_rank and widened_source(w.name) is None
    }


def _reads_stored(g: ir.Graph, users: dict, shapes: dict, n: ir.Node, w: str, step_only: bool) -> bool:
    """Whether node `n` reads weight `w` as stored (through a cast our kernels fuse) rather than widened."""
    if n.op == "aten.linear.default":
        return n.inputs[1] == w and (
            ir.one_position_per_row(g, n.inputs[0]) or (not step_only and ir.bfloat16_product_fits(shapes[w]))
        )
    if n.op == "aten.transpose.int" and len(shapes[w]) == 2:  # x @ Wᵀ (the tied vocabulary product)
        after = users.get(n.name, [])
        return bool(after) and all(
            m.op == "aten.matmul.default" and m.inputs[1] == n.name and ir.one_position_per_row(g, m.inputs[0])
            for m in after
        )
    return False


def _store(g: ir.Graph, stored: set[str], dtype: str, step_only: bool) -> ir.Graph:
    """Graph `g` with the weights `stored` bound as `dtype`: each read through a gather, a cast, a
    decoder_layer, or the widened copy (see store_weights)."""
    shapes = {w.name: w.type.shape for w in g.weights}
    users = consumers(g)
    casts: dict[str, ir.Node] = {}  # weight -> its float32 view, made before its first use
    read: dict[str, str] = {}  # weight -> the dtype a graph weight of that name is bound as
    nodes: list[ir.Node] = []
    for n in g.nodes:
        if n.op == "aten.embedding.default" and n.inputs[0] in stored:
            rows = ir.Node(f"{n.name}/{dtype}", n.op, n.inputs, n.attrs, ir.TensorType(dtype, n.type.shape), n.scope)
            nodes += [rows, ir.Node(n.name, ir.CAST, (rows.name,), (("dtype", n.type.dtype),), n.type, n.scope)]
            read[n.inputs[0]] = dtype
            continue
        if n.op == ir.DECODER_LAYER:  # its kernel reads stored weights as they are
            read.update((i, dtype) for i in n.inputs if i in stored)
            nodes.append(n)
            continue
        inputs = []
        for i in n.inputs:
            if i not in stored:
                inputs.append(i)
            elif _reads_stored(g, users, shapes, n, i, step_only):
                if i not in casts:
                    float32 = ir.TensorType("float32", shapes[i])
                    casts[i] = ir.Node(f"{i}/float32", ir.CAST, (i,), (("dtype", "float32"),), float32, n.scope)
                    nodes.append(casts[i])
                    read[i] = dtype
                inputs.append(casts[i].name)
            else:
                read[i + WIDENED] = "float32"
                inputs.append(i + WIDENED)
        nodes.append(ir.Node(n.name, n.op, tuple(inputs), n.attrs, n.type, n.scope))
    weights = [w for w in g.weights if w.name not in stored]
    weights += [
        ir.Value(name, ir.TensorType(dt, shapes[name.removesuffix(WIDENED)])) for name, dt in sorted(read.items())
    ]
    out = ir.Graph(g.name, g.inputs, tuple(weights), g.constants, tuple(nodes), g.outputs, g.dims)
    out.validate()
    widened = sum(dt == "float32" for dt in read.values())
    log.info("%s: %d weights stored as %s (%d read widened)", g.name, len(stored), dtype, widened)
    return out


PANEL_DTYPES = ("float32", "float16")  # and bfloat16 where its products do not run on AMX
LAYER_MATRICES = (6, 8, 9, 11, 15, 17, 21, 23)  # a decoder_layer node's wq wk wv wo wcq wco w1 w2


def panel_products(p: ir.Program, bfloat16: bool = False, pairs: bool = False) -> ir.Program:
    """Give each linear layer with a weight W stored in float32 or float16 (the encoder's, cross
    K/V's, any outside the fused blocks) and each product of one position per row (the
    vocabulary projection of decoder steps, beams and the engine's rows, tied or not) its own op,
    `linear_panels(x, W/panels, bias)`, which reads W in panels of 64 output columns
    (runtime.weights.to_panels, made at load); and have each fused decoder block read its eight
    matrices in panels (its kernel then runs its products as linear_panels does). Every float32
    product of a package is then our kernel, each row's result the same bits whatever the rows
    beside it (MAX's matmul, which it replaces, also costs the module ~11 s of compile).

    The kernel it lowers to sums, for every row, 64 outputs in registers from one contiguous pass
    over each panel, several rows at a time: the weight is read once per call and every load
    feeds several multiply-adds, where a dot product per output feeds one; each output's sum
    runs in the same order whatever the number of rows. W may be the graph weight itself or its
    float32 view (a cast of a float16 one, passes.store_weights); the tied vocabulary product
    is `x @ transpose(W)`. A bfloat16 weight is read in panels too when `bfloat16` (a target
    without AMX: VDPBF16PS kernels would round the rows to bfloat16, and a dot product per output
    is load-bound), else it keeps its AMX kernels (convert passes `not amx(Target.host())`).

    With `pairs` (a target with AVX512_BF16 and without AMX) a bfloat16 weight of an even number
    of columns is read in pair panels instead (`W/pairs`, runtime.weights.to_pairs) by
    `linear_pairs` and the fused blocks: VDPBF16PS on rows rounded to bfloat16, as the encoder's
    bfloat16 products and the AMX kernels compute, at twice the multiply-adds per instruction of
    float32 FMA, which is what a step of many rows is bound by."""
    dtypes = (*PANEL_DTYPES, "bfloat16") if bfloat16 or pairs else PANEL_DTYPES

    def as_panels(w: str, t: ir.TensorType) -> tuple[str, ir.TensorType, str]:
        out, k = t.shape
        return w + PANELS, ir.TensorType(t.dtype, (-(-out // PANEL), k, PANEL)), ir.LINEAR_PANELS

    def packed(w: str, t: ir.TensorType) -> tuple[str, ir.TensorType, str]:
        """The derived weight (name, type) a product reads stored weight w (of type t) as, and its op."""
        out, k = t.shape
        if pairs and t.dtype == "bfloat16" and k % 2 == 0:
            return w + PAIRS, ir.TensorType(t.dtype, (-(-out // PANEL), k // 2, PANEL, 2)), ir.LINEAR_PAIRS
        return as_panels(w, t)

    graphs = []
    for g in p.graphs:
        weights = {w.name: w.type for w in g.weights}
        producers = {n.name: n for n in g.nodes}

        def source(v: str) -> str | None:
            """The stored weight a product's operand W is (itself, or cast to float32)."""
            n = producers.get(v)
            if n is not None and n.op == ir.CAST and n.inputs[0] in weights and n.attr("dtype") == "float32":
                v = n.inputs[0]
            elif n is not None:
                return None
            t = weights.get(v)
            if t is None or widened_source(v) is not None or t.dtype not in dtypes or len(t.shape) != 2:
                return None
            return v if all(isinstance(d, int) for d in t.shape) else None

        nodes, panels = [], {}
        for n in g.nodes:
            src, bias = None, ""
            if n.op == "aten.linear.default":
                src, bias = source(n.inputs[1]), (n.inputs[2] if len(n.inputs) > 2 else "")
                many = not ir.one_position_per_row(g, n.inputs[0])
                if src is not None and many and weights[src].dtype not in PANEL_DTYPES:
                    src = None  # many rows of a bfloat16 weight: its bfloat16 kernels (VDPBF16PS or AMX)
            elif n.op == "aten.matmul.default" and ir.one_position_per_row(g, n.inputs[0]):
                t = producers.get(n.inputs[1])
                if (
                    t is not None
                    and t.op == "aten.transpose.int"
                    and sorted((t.attr("dim0"), t.attr("dim1"))) in ([0, 1], [-2, -1])
                ):
                    src = source(t.inputs[0])
            if n.op == ir.DECODER_LAYER:
                sources = [source(n.inputs[i]) for i in LAYER_MATRICES]
                if None in sources:  # the kernel takes all of a block's matrices in panels or none
                    nodes.append(n)
                    continue
                inputs = list(n.inputs)
                forms = [packed(w, weights[w]) for w in sources]
                if len({op for *_, op in forms}) > 1:  # the kernel takes one layout for all eight
                    forms = [as_panels(w, weights[w]) for w in sources]
                for i, (name, t, _) in zip(LAYER_MATRICES, forms):
                    panels[name] = t
                    inputs[i] = name
                nodes.append(ir.Node(n.name, n.op, tuple(inputs), n.attrs, n.type, n.scope))
                continue
            if src is None:
                nodes.append(n)
                continue
            name, t, op = packed(src, weights[src])
            panels[name] = t
            nodes.append(ir.Node(n.name, op, (n.inputs[0], name, bias), (), n.type, n.scope))
        if not panels:
            graphs.append(g)
            continue
        nodes = drop_dead(nodes, g.outputs)
        read = {i for n in nodes for i in n.inputs if i}
        kept = tuple(w for w in g.weights if w.name in read) + tuple(
            ir.Value(name, t) for name, t in sorted(panels.items())
        )
        out = ir.Graph(
            g.name, g.inputs, kept, tuple(c for c in g.constants if c.name in read), tuple(nodes), g.outputs, g.dims
        )
        out.validate()
        log.info("%s: %d products read weights in panels", g.name, len(panels))
        graphs.append(out)
    return ir.Program(tuple(graphs), p.dims)
