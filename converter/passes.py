"""IR optimisation passes: rewrite a Program without changing what it computes."""

from __future__ import annotations

import logging

import numpy as np
import sympy

from ..runtime.package import LINEAGE, PANEL, PANELS, SELECT_RULES, WIDENED, WINDOW, widened_source
from ..runtime.program import CHOICE, LOGITS, RULES, SAMPLING, SLOTS, STEP_GRAPHS, SUPPRESS, Role
from . import ir

log = logging.getLogger(__name__)

_PER_CALL_DIMS = ("n", "past")  # dims that change from one decoder call to the next


def _per_call(t: ir.TensorType) -> bool:
    return any(ir.dim_symbols(d) & set(_PER_CALL_DIMS) for d in t.shape)


def hoist_invariants(p: ir.Program, source: str = Role.DECODER, target: str = Role.CROSS_KV) -> ir.Program:
    """Move `source` nodes that depend only on `target`'s outputs (plus weights and constants)
    into `target`, which runs once per audio window instead of once per token.

    The moved values that the rest of `source` reads become new outputs of `target` and new
    inputs of `source`, named by their IR value names. The same ops run in the same order on the
    same operands, so results are unchanged; `target` keeps its original outputs.
    """
    src, dst = p.graph(source), p.graph(target)
    dst_values = {name: value for name, value in dst.outputs}  # target output name -> its value
    fed = {v.name for v in src.inputs if v.name in dst_values}
    static = {w.name for w in src.weights} | {c.name for c in src.constants}

    moved: dict[str, ir.Node] = {}
    derived = set(fed)  # values computed from target outputs alone
    for n in src.nodes:
        ins = [i for i in n.inputs if i]
        if ins and all(i in derived or i in static for i in ins) and any(i in derived for i in ins) and not _per_call(n.type):
            moved[n.name] = n
            derived.add(n.name)
    if not moved:
        return p

    kept = [n for n in src.nodes if n.name not in moved]
    read_by_kept = {i for n in kept for i in n.inputs} | {v for _, v in src.outputs}
    frontier = [n for n in moved.values() if n.name in read_by_kept]

    # target: its nodes, then the moved ones reading target values instead of source inputs
    hoisted = [ir.Node(n.name, n.op, tuple(dst_values.get(i, i) for i in n.inputs), n.attrs, n.type, n.scope) for n in moved.values()]
    used_static = {i for n in moved.values() for i in n.inputs if i in static}
    dst_weights = list(dst.weights) + [w for w in src.weights if w.name in used_static and w.name not in {x.name for x in dst.weights}]
    dst_consts = list(dst.constants) + [c for c in src.constants if c.name in used_static and c.name not in {x.name for x in dst.constants}]
    new_dst = ir.Graph(dst.name, dst.inputs, tuple(dst_weights), tuple(dst_consts), tuple(dst.nodes) + tuple(hoisted), dst.outputs + tuple((n.name, n.name) for n in frontier), dst.dims)

    # source: the kept nodes; the frontier arrives as inputs; drop what nothing reads any more
    still_read = {i for n in kept for i in n.inputs} | {v for _, v in src.outputs}
    inputs = [v for v in src.inputs if v.name in still_read] + [ir.Value(n.name, n.type) for n in frontier]
    new_src = ir.Graph(src.name, tuple(inputs), tuple(w for w in src.weights if w.name in still_read), tuple(c for c in src.constants if c.name in still_read), tuple(kept), src.outputs, src.dims)
    new_src.validate()
    new_dst.validate()
    log.info("hoisted %d nodes from %s into %s (%d new values per window)", len(moved), source, target, len(frontier))
    graphs = tuple(new_src if g.name == source else new_dst if g.name == target else g for g in p.graphs)
    return ir.Program(graphs, p.dims)


def _consumers(g: ir.Graph) -> dict[str, list[ir.Node]]:
    users: dict[str, list[ir.Node]] = {}
    for n in g.nodes:
        for i in dict.fromkeys(i for i in n.inputs if i):
            users.setdefault(i, []).append(n)
    return users


def _replace_graph(p: ir.Program, g: ir.Graph) -> ir.Program:
    g.validate()
    return ir.Program(tuple(g if x.name == g.name else x for x in p.graphs), p.dims)


def _drop_dead(nodes: list[ir.Node], outputs) -> list[ir.Node]:
    live = {v for _, v in outputs}
    kept = []
    for n in reversed(nodes):
        if n.name in live:
            kept.append(n)
            live.update(i for i in n.inputs if i)
    return kept[::-1]


def last_position_logits(p: ir.Program, graph: str = Role.DECODER) -> ir.Program:
    """`matmul(x, W)[:, -1]` -> `matmul(x[:, -1], W)`: project only the position that is returned.

    The traced decoder projects every position onto the vocabulary and then keeps the last, so a
    200-token prompt costs 200 vocabulary products instead of one. Selecting a row of the left
    operand before a matrix product gives the same row of the result, computed by the same dot
    products.
    """
    g = p.graph(graph)
    producer = {n.name: n for n in g.nodes}
    users = _consumers(g)
    types = g.types()
    nodes = list(g.nodes)
    renamed: dict[str, str] = {}
    for sel in g.nodes:
        if sel.op != "aten.select.int" or sel.attr("dim") != 1 or sel.attr("index") != -1:
            continue
        src = producer.get(sel.inputs[0])
        # skip a whole-range slice on the batch axis (torch writes logits[:, -1] that way)
        if (
            src is not None
            and src.op == "aten.slice.Tensor"
            and src.attr("dim") == 0
            and src.attr("start") in (0, None)
            and (src.attr("end") is None or (isinstance(src.attr("end"), int) and src.attr("end") >= ir.OPEN_END))
        ):
            src = producer.get(src.inputs[0])
        if src is None or src.op != "aten.matmul.default" or len(src.type.shape) != 3 or len(users.get(src.name, [])) != 1:
            continue
        x_name, w_name = src.inputs
        w_type = types[w_name]
        if len(w_type.shape) != 2:
            continue
        x_type = types[x_name]
        row = ir.Node(f"{src.name}/row", "aten.select.int", (x_name,), (("dim", 1), ("index", -1)), ir.TensorType(x_type.dtype, (x_type.shape[0], x_type.shape[2])), src.scope)
        mm = ir.Node(f"{src.name}/last", "aten.matmul.default", (row.name, w_name), (), ir.TensorType(src.type.dtype, (x_type.shape[0], w_type.shape[1])), src.scope)
        nodes.insert(nodes.index(src), row)
        nodes.insert(nodes.index(src), mm)
        renamed[sel.name] = mm.name
    if not renamed:
        return p
    outputs = tuple((o, renamed.get(v, v)) for o, v in g.outputs)
    nodes = [ir.Node(n.name, n.op, tuple(renamed.get(i, i) for i in n.inputs), n.attrs, n.type, n.scope) for n in nodes]
    nodes = _drop_dead(nodes, outputs)
    log.info("last-position logits in %s: %d projection(s) narrowed to one row", graph, len(renamed))
    return _replace_graph(p, ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), outputs, g.dims))


def _row_local(n: ir.Node, in_type: ir.TensorType, axis: int) -> int | None:
    """Where the sequence axis `axis` goes through `n`, if `n` treats every position alike and
    independently (so it can run on each concatenated part alone); None if it does not."""
    if n.op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
        out = n.type.shape
        # only splits dims after the sequence axis: leading dims and the axis itself unchanged
        if len(out) >= len(in_type.shape) and tuple(out[: axis + 1]) == tuple(in_type.shape[: axis + 1]):
            return axis
        return None
    if n.op == "aten.permute.default":
        dims = [d % len(in_type.shape) for d in n.attr("dims")]
        return dims.index(axis)
    if n.op == "aten.mul.Tensor" and len([i for i in n.inputs if i]) == 1 and isinstance(n.attr("other"), (int, float)):
        return axis
    return None


def _subst(value, old: str, new: ir.Dim):
    if isinstance(value, (list, tuple)):
        return type(value)(_subst(v, old, new) for v in value)
    return new if value == old else value


def sink_cache_layout(p: ir.Program, graph: str = Role.DECODER) -> ir.Program:
    """Store each self-attention cache in the form attention reads it (head-major, key pre-scaled).

    The traced step appends the new keys to the cache, `cat(cache, new)`, then splits heads,
    permutes and scales the whole result on every call: work that grows with the cache. When the
    ops after the concatenation act on each position independently (a head split, a permute, a
    multiplication by a constant), they give the same result applied to each part before it.
    This pass moves them onto the new rows only; the cache input and output then hold the
    transformed tensor, which the runtime treats as opaque state (zero-length at the start).
    """
    g = p.graph(graph)
    users = _consumers(g)
    output_of = {v: o for o, v in g.outputs}
    types = g.types()
    nodes = list(g.nodes)
    new_inputs = {v.name: v for v in g.inputs}
    changed = 0
    for c in g.inputs:
        cat_users = users.get(c.name, [])
        if len(c.type.shape) != 3 or len(cat_users) != 1:
            continue
        cat = cat_users[0]
        if cat.op != "aten.cat.default" or cat.inputs[0] != c.name or len(cat.inputs) != 2 or cat.attr("dim") % 3 != 1 or cat.name not in output_of:
            continue
        new = cat.inputs[1]
        axis, chain, cur_type, cur = 1, [], cat.type, cat.name
        while True:
            nxt = users.get(cur, [])
            if len(nxt) != 1:
                break
            moved_axis = _row_local(nxt[0], cur_type, axis)
            if moved_axis is None:
                break
            chain.append(nxt[0])
            axis, cur_type, cur = moved_axis, nxt[0].type, nxt[0].name
        if not chain:
            continue
        total, part = cat.type.shape[1], types[new].shape[1]
        past = c.type.shape[1]
        # the new rows go through the chain; the concatenation moves to its end
        # (only the first chain node reads the concatenation; the rest keep their inputs)
        moved = [
            ir.Node(
                n.name,
                n.op,
                tuple(new if i == cat.name else i for i in n.inputs),
                tuple((k, _subst(v, total, part)) for k, v in n.attrs),
                ir.TensorType(n.type.dtype, tuple(_subst(n.type.shape, total, part))),
                n.scope,
            )
            for n in chain
        ]
        last = chain[-1]
        new_cat = ir.Node(cat.name, cat.op, (c.name, last.name), (("dim", axis),), last.type, cat.scope)
        new_inputs[c.name] = ir.Value(c.name, ir.TensorType(c.type.dtype, tuple(_subst(last.type.shape, total, past))))
        chain_names = {n.name for n in chain}
        rebuilt = []
        for n in nodes:
            if n.name in chain_names:
                continue
            if n.name == cat.name:
                rebuilt.extend(moved)
                rebuilt.append(new_cat)
                continue
            rebuilt.append(ir.Node(n.name, n.op, tuple(cat.name if i == last.name else i for i in n.inputs), n.attrs, n.type, n.scope))
        nodes = rebuilt
        users = _consumers(ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims))
        changed += 1
    if not changed:
        return p
    log.info("cache layout in %s: %d caches stored in the form attention reads", graph, changed)
    inputs = tuple(new_inputs[v.name] for v in g.inputs)
    return _replace_graph(p, ir.Graph(g.name, inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims))


def _dim_subst(expr, values: dict[str, int], names: set[str]):
    """A dim expression with some symbols fixed; other attributes pass through unchanged."""
    if isinstance(expr, (list, tuple)):
        return type(expr)(_dim_subst(e, values, names) for e in expr)
    if not isinstance(expr, str) or not (ir.dim_symbols(expr) & set(values)):
        return expr
    if not ir.dim_symbols(expr) <= names:
        return expr  # a string attribute that merely contains a dim's name
    out = sympy.sympify(expr).subs({sympy.Symbol(k): v for k, v in values.items()})
    return int(out) if out.is_Integer else str(out)


def specialise(p: ir.Program, graph: str, values: dict[str, int], name: str) -> ir.Program:
    """Add a copy of `graph` named `name` with symbolic dims fixed (`{"batch": 1, "n": 1}`).

    Static sizes let lowering pick kernels for the shape at hand: a decoder step for one sequence
    and one token is a chain of matrix-vector products, which are memory-bound and lower better
    than general matrix products (see converter/lower/linear.py).
    """
    g = p.graph(graph)
    names = {d.name for d in g.dims}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"graph {graph} has no dims {sorted(unknown)} (has {sorted(names)})")
    for d in g.dims:
        v = values.get(d.name)
        if v is not None and (v < d.min or (d.max is not None and v > d.max)):
            raise ValueError(f"{graph}: {d.name}={v} is outside [{d.min}, {d.max}]")
    sub = lambda t: ir.TensorType(t.dtype, tuple(_dim_subst(d, values, names) for d in t.shape))  # noqa: E731
    spec = ir.Graph(
        name,
        tuple(ir.Value(v.name, sub(v.type)) for v in g.inputs),
        g.weights,
        g.constants,
        tuple(ir.Node(n.name, n.op, n.inputs, tuple((k, _dim_subst(v, values, names)) for k, v in n.attrs), sub(n.type), n.scope) for n in g.nodes),
        g.outputs,
        tuple(d for d in g.dims if d.name not in values),
    )
    spec.validate()
    graphs = list(p.graphs)
    graphs.insert(graphs.index(g) + 1, spec)
    return ir.Program(tuple(graphs), p.dims)


def in_place_cache(p: ir.Program, graph: str = Role.DECODER_STEP, position: str = "past", length: str = "kv_len") -> ir.Program:
    """Grow `graph`'s self-attention caches in place instead of by concatenation.

    Each cache input `X` (…, past, …) that one `cat(X, new)` extends and that is returned becomes
    a state input of fixed capacity (n_text_ctx positions) which `cache_append` writes `new` into
    at `position`, a new int64 scalar input holding the number of cached positions. The cache is
    no longer an output: the caller keeps the buffers and the count. A concatenation copies the
    whole cache on every call (1.3 ms a step for 4 layers at 300 positions here); the in-place
    write copies one row. The attention reads the same values in the same order, so results are
    unchanged. The grown length, `past + len(new)`, becomes the symbol `length`: `past` is no
    longer the size of any input.
    """
    g = p.graph(graph)
    capacity = p.dims["n_text_ctx"]
    inputs = {v.name: v for v in g.inputs}
    returned = {v for _, v in g.outputs}
    if position in inputs or any(d.name == length for d in g.dims):
        raise ValueError(f"{graph}: already has an input {position!r} or a dim {length!r}")
    if any(d.name == position and d.max is None for d in g.dims):
        raise ValueError(f"{graph}: {position!r} has no upper bound")
    appends: dict[str, ir.Node] = {}
    grown = None
    for n in g.nodes:
        if n.op == "aten.cat.default" and len(n.inputs) == 2 and n.inputs[0] in inputs and n.name in returned:
            axis = n.attr("dim") % len(n.type.shape)
            if inputs[n.inputs[0]].type.shape[axis] != position:
                continue
            if grown not in (None, n.type.shape[axis]):
                raise ValueError(f"{graph}: caches grow to {grown} and {n.type.shape[axis]}; expected one length")
            grown = n.type.shape[axis]
            appends[n.name] = ir.Node(n.name, ir.CACHE_APPEND, (n.inputs[0], n.inputs[1], position), (("axis", axis),), n.type, n.scope)
    if not appends:
        raise ValueError(f"{graph}: no cache input grown by concatenation along {position!r}")

    def retype(t: ir.TensorType, stored: bool = False) -> ir.TensorType:
        shape = tuple(capacity if stored and d == position else length if d == grown else d for d in t.shape)
        left = [d for d in shape if position in ir.dim_symbols(d)]
        if left:
            raise ValueError(f"{graph}: a value of type {t} has a size in {position!r} other than {grown}; cannot cache in place")
        return ir.TensorType(t.dtype, shape)

    state = {a.inputs[0] for a in appends.values()}
    new_inputs = [ir.Value(v.name, retype(v.type, v.name in state)) for v in g.inputs]
    new_inputs.insert(1, ir.Value(position, ir.TensorType("int64", ())))
    nodes = tuple(ir.Node(m.name, m.op, m.inputs, m.attrs, retype(m.type), m.scope) for m in (appends.get(n.name, n) for n in g.nodes))
    outputs = tuple((o, v) for o, v in g.outputs if v not in appends)
    dims = tuple(g.dims) + (ir.SymDim(length, 1, capacity),)
    out = ir.Graph(g.name, tuple(new_inputs), g.weights, g.constants, nodes, outputs, dims)
    log.info("%s: %d caches grown in place", graph, len(appends))
    return _replace_graph(p, out)


def share_window(p: ir.Program, graph: str, source: str = Role.CROSS_KV) -> ir.Program:
    """Let every row of `graph` read one window's values: the inputs `source` computes per window
    (cross-attention K/V) take a leading dim of 1 instead of `batch`.

    Beam search and best-of sampling decode several rows of one window. Fed per row, the window's
    K/V are copied once per row and read once per row on every call (18 MB per row for tiny.en);
    shared, they are read once. Only matrix products may read them: a product broadcasts a
    leading dim of 1 against `batch`, so each row computes exactly what it did from its own copy.
    """
    g = p.graph(graph)
    per_window = {name for name, _ in p.graph(source).outputs}
    shared = {v.name for v in g.inputs if v.name in per_window}
    if not shared:
        raise ValueError(f"{graph}: no inputs computed by {source}")
    for n in g.nodes:
        if set(n.inputs) & shared and n.op not in ("aten.matmul.default", "aten.bmm.default"):
            raise ValueError(f"{graph}: {n.name} ({n.op}) reads a per-window value; only matrix products can share one across rows")
    inputs = []
    for v in g.inputs:
        if v.name in shared:
            if v.type.shape[:1] != ("batch",):
                raise ValueError(f"{graph}: per-window input {v.name} is {v.type}; expected a leading dim batch")
            v = ir.Value(v.name, ir.TensorType(v.type.dtype, (1,) + tuple(v.type.shape[1:])))
        inputs.append(v)
    log.info("%s: %d per-window inputs shared by all rows", graph, len(shared))
    return _replace_graph(p, ir.Graph(g.name, tuple(inputs), g.weights, g.constants, g.nodes, g.outputs, g.dims))


# The ops of one traced residual attention block of the text decoder in a graph of one position
# per row, after in_place_cache, in trace order: fuse_decoder_layers replaces exactly these.
_LN, _LIN, _VIEW, _PERM, _MUL = "aten.layer_norm.default", "aten.linear.default", "aten.view.default", "aten.permute.default", "aten.mul.Tensor"
_MM, _ADD, _SM, _FLAT, _SLICE = "aten.matmul.default", "aten.add.Tensor", "aten.softmax.int", "aten.flatten.using_ints", "aten.slice.Tensor"
# fmt: off
_BLOCK_OPS = (
    _LN, _LIN, _LIN, _VIEW, _PERM, _MUL, ir.CACHE_APPEND, _LIN, _VIEW, _PERM, ir.CACHE_APPEND,  # ln, q, k, v; cache writes
    _VIEW, _PERM, _MUL, "aten.transpose.int", _MM, _SLICE, _SLICE, _ADD, _SM, _MM, _PERM, _FLAT, _LIN, _ADD,  # self-attention
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
        where = f"{graph}: {prefix}"
        if tuple(n.op for n in region) != _BLOCK_OPS:
            raise ValueError(f"{where} is not the residual attention block fuse_decoder_layers knows: ops {[n.op.split('.', 1)[-1] for n in region]}")
        by = {n.name: n for n in region}

        def node(local: str) -> ir.Node:
            n = by.get(prefix + local)
            if n is None:
                raise ValueError(f"{where}: no node {prefix + local}")
            return n

        def expect(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{where}: {what}; not fused")

        ln1, ln2, ln3 = node(".attn_ln/layer_norm"), node(".cross_attn_ln/layer_norm"), node(".mlp_ln/layer_norm")
        q, k, v, o = (node(f".attn.{m}/linear") for m in ("query", "key", "value", "out"))
        cq, co = node(".cross_attn.query/linear"), node(".cross_attn.out/linear")
        fc1, gelu, fc2 = node(".mlp.0/linear"), node(".mlp.1/gelu"), node(".mlp.2/linear")
        add0, add1, add2 = node("/add"), node("/add.1"), node("/add.2")
        kcat, vcat = node(".attn.key/cat"), node(".attn.value/cat")
        x = ln1.inputs[0]
        expect(
            add0.inputs[:2] == (x, o.name) and ln2.inputs[0] == add0.name and add1.inputs[:2] == (add0.name, co.name) and ln3.inputs[0] == add1.name and add2.inputs[:2] == (add1.name, fc2.name),
            "residual wiring differs",
        )
        expect(all(a.attr("alpha") == 1 for a in (add0, add1, add2)), "a residual add has alpha != 1")
        expect(
            q.inputs[0] == k.inputs[0] == v.inputs[0] == ln1.name
            and cq.inputs[0] == ln2.name
            and fc1.inputs[0] == ln3.name
            and gelu.inputs[0] == fc1.name
            and fc2.inputs[0] == gelu.name
            and gelu.attr("approximate") == "none",
            "products wired differently",
        )
        expect(all(n.inputs[2] for n in (q, v, o, cq, co, fc1, fc2)) and not k.inputs[2], "biases differ (key has none, the rest have one)")
        expect(all(ln.inputs[1] and ln.inputs[2] for ln in (ln1, ln2, ln3)), "a layer norm lacks weight or bias")
        eps = {ln.attr("eps") for ln in (ln1, ln2, ln3)}
        scales = {node(m).attr("other") for m in (".attn/mul", ".attn/mul.1", ".cross_attn/mul")}
        expect(len(eps) == 1 and len(scales) == 1, f"layer norms' eps {eps} or attention scales {scales} differ")
        expect(
            node(".attn/mul").inputs[0] == node(".attn/permute").name and node(".attn/permute").inputs[0] == node(".attn/view").name and node(".attn/view").inputs[0] == q.name,
            "q is not scaled after its product",
        )
        expect(
            kcat.inputs[1] == node(".attn/mul.1").name
            and node(".attn/mul.1").inputs[0] == node(".attn/permute.1").name
            and node(".attn/permute.1").inputs[0] == node(".attn/view.1").name
            and node(".attn/view.1").inputs[0] == k.name,
            "the key cache does not store the scaled key",
        )
        expect(
            vcat.inputs[1] == node(".attn/permute.2").name and node(".attn/permute.2").inputs[0] == node(".attn/view.2").name and node(".attn/view.2").inputs[0] == v.name,
            "the value cache does not store the value",
        )
        position = kcat.inputs[2]
        expect(vcat.inputs[2] == position and kcat.attr("axis") == vcat.attr("axis") == 2 and position in inputs, "the caches are written elsewhere")
        expect(
            node(".attn/transpose").inputs[0] == kcat.name
            and node(".attn/matmul").inputs == (node(".attn/mul").name, node(".attn/transpose").name)
            and node(".attn/matmul.1").inputs == (node(".attn/softmax").name, vcat.name),
            "self-attention reads other values",
        )
        mask_add, row, cols = node(".attn/add"), node(".attn/slice"), node(".attn/slice.1")
        expect(
            mask_add.inputs[:2] == (node(".attn/matmul").name, cols.name)
            and cols.inputs[0] == row.name
            and _causal_mask(consts.get(row.inputs[0]))
            and row.attr("dim") == 0
            and row.attr("start") == position
            and cols.attr("dim") == 1
            and cols.attr("start") in (None, 0)
            and cols.attr("end") == f"{position} + 1",
            "the mask added is not row `position` of a causal mask up to that position",
        )
        ckt, cv = node(".cross_attn/matmul").inputs[1], node(".cross_attn/matmul.1").inputs[1]
        expect(
            ckt in inputs
            and cv in inputs
            and node(".cross_attn/matmul").inputs[0] == node(".cross_attn/mul").name
            and node(".cross_attn/mul").inputs[0] == node(".cross_attn/permute").name
            and node(".cross_attn/permute").inputs[0] == node(".cross_attn/view").name
            and node(".cross_attn/view").inputs[0] == cq.name,
            "cross-attention reads other values",
        )
        outside = {i for n in nodes if n.name not in by for i in n.inputs} | {val for _, val in g.outputs}
        expect(outside & set(by) == {add2.name}, f"values inside the block are read outside it: {sorted(outside & set(by) - {add2.name})}")
        heads = node(".attn/view").type.shape[2]
        operands = (
            x,
            kcat.inputs[0],
            vcat.inputs[0],
            position,
            ln1.inputs[1],
            ln1.inputs[2],
            q.inputs[1],
            q.inputs[2],
            k.inputs[1],
            v.inputs[1],
            v.inputs[2],
            o.inputs[1],
            o.inputs[2],
            ln2.inputs[1],
            ln2.inputs[2],
            cq.inputs[1],
            cq.inputs[2],
            co.inputs[1],
            co.inputs[2],
            ln3.inputs[1],
            ln3.inputs[2],
            fc1.inputs[1],
            fc1.inputs[2],
            fc2.inputs[1],
            fc2.inputs[2],
            ckt,
            cv,
        )
        layer = ir.Node(add2.name, ir.DECODER_LAYER, operands, (("axis", 2), ("heads", heads), ("scale", scales.pop()), ("eps", eps.pop())), add2.type, prefix)
        at = nodes.index(region[0])
        nodes = [n for n in nodes if n.name not in by]
        nodes.insert(at, layer)
        fused += 1
    if not fused:
        raise ValueError(f"{graph}: no decoder blocks to fuse")
    read = {i for n in nodes for i in n.inputs}
    out = ir.Graph(g.name, g.inputs, tuple(w for w in g.weights if w.name in read), tuple(c for c in g.constants if c.name in read), tuple(nodes), g.outputs, g.dims)
    log.info("%s: %d decoder blocks fused into decoder_layer kernels", graph, fused)
    return _replace_graph(p, out)


def optimise(p: ir.Program, fuse: bool = True) -> ir.Program:
    """The pipeline packages ship: hoist per-window work, narrow the logits, cache in attention's
    layout; a step graph specialised to one sequence and one token that grows its caches in
    place; and a rows graph, one token for each of several rows of one window (beams, best-of
    samples), that grows its caches in place and shares the window's cross-attention K/V. With
    `fuse`, each residual block of those two graphs becomes one decoder_layer kernel."""
    p = hoist_invariants(p)
    p = last_position_logits(p)
    p = sink_cache_layout(p)
    p = specialise(p, Role.DECODER, {"batch": 1, "n": 1}, Role.DECODER_STEP)
    p = in_place_cache(p, Role.DECODER_STEP)
    p = specialise(p, Role.DECODER, {"n": 1}, Role.DECODER_ROWS)
    p = in_place_cache(p, Role.DECODER_ROWS)
    p = share_window(p, Role.DECODER_ROWS)
    if fuse:
        for g in STEP_GRAPHS:
            p = fuse_decoder_layers(p, g)
        p = row_lineage(p, Role.DECODER_ROWS)
        p = engine_rows(p, Role.DECODER_ROWS)
    return token_selection(p)


def row_lineage(p: ir.Program, graph: str) -> ir.Program:
    """Give `graph`'s decoder_layer nodes the input `lineage` (batch, capacity) int32: position
    i of row r is read from cache row lineage[r, i]. Beam search continues each row from any
    row after every step; with this map the caller rewrites a few ints per row instead of
    moving every layer's cached keys and values (~0.8 ms a step for tiny.en's 5 beams here)."""
    g = p.graph(graph)
    layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
    if not layers:
        raise ValueError(f"{graph}: no decoder_layer nodes to give a lineage (run fuse_decoder_layers first)")
    if any(v.name == LINEAGE for v in g.inputs):
        raise ValueError(f"{graph}: already has an input {LINEAGE!r}")
    types = g.types()
    caps = {types[n.inputs[1]].shape[2] for n in layers}
    rows = {types[n.inputs[1]].shape[0] for n in layers}
    if len(caps) != 1 or len(rows) != 1:
        raise ValueError(f"{graph}: caches of capacities {caps} and rows {rows}; expected one of each")
    lineage = ir.Value(LINEAGE, ir.TensorType("int32", (rows.pop(), caps.pop())))
    nodes = tuple(ir.Node(n.name, n.op, n.inputs + (LINEAGE,), n.attrs, n.type, n.scope) if n.op == ir.DECODER_LAYER else n for n in g.nodes)
    out = ir.Graph(g.name, g.inputs + (lineage,), g.weights, g.constants, nodes, g.outputs, g.dims)
    out.validate()
    return _replace_graph(p, out)


def engine_rows(p: ir.Program, graph: str = Role.DECODER_ROWS, position: str = "past") -> ir.Program:
    """Let each row of `graph` (one token per row, decoder_layer kernels with a lineage) be at its
    own position and read its own window, so that one call decodes rows of many streams.

    - `position` (a scalar, every row's) becomes one position per row (batch,) int64; the
      positional embedding, a slice at `position`, becomes a lookup of each row's position;
    - the caches' leading dim becomes `pool`, slots the rows' lineage maps into (each row
      writes its new token into slot lineage[r, position[r]]);
    - the window's values (cross K/V, leading dim 1) get a leading dim `windows`, and the input
      WINDOW (batch,) int32 says which one each row reads.

    Every row computes what it computes alone: each of its sums runs over its own positions and
    window in the same order. Beams are rows of one window whose lineages share a prefix."""
    g = p.graph(graph)
    inputs = {v.name: v for v in g.inputs}
    if WINDOW in inputs or any(d.name in ("pool", "windows") for d in g.dims):
        raise ValueError(f"{graph}: already has per-row windows or slots")
    layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
    if not layers or any(len(n.inputs) != 28 or n.inputs[-1] != LINEAGE for n in layers):
        raise ValueError(f"{graph}: expected decoder_layer nodes with a lineage (run fuse_decoder_layers and row_lineage first)")
    if inputs.get(position) is None or inputs[position].type.shape != ():
        raise ValueError(f"{graph}: no scalar input {position!r} (the position every row writes at)")
    caches = {n.inputs[i] for n in layers for i in (1, 2)}
    cross = {n.inputs[i] for n in layers for i in (25, 26)}
    if any(inputs[c].type.shape[0] != 1 for c in cross):
        raise ValueError(f"{graph}: cross keys/values not shared by all rows (leading dim 1; run share_window first)")
    rows = g.types()[layers[0].inputs[0]].shape[0]
    embed = [n for n in g.nodes if n.op == "aten.slice.Tensor" and n.inputs[0] == "decoder.positional_embedding"]
    if len(embed) != 1 or embed[0].attr("start") != position or embed[0].attr("end") != f"{position} + 1" or embed[0].attr("dim") != 0:
        raise ValueError(f"{graph}: the positional embedding is not one slice at {position!r}")
    users = [n for n in g.nodes if position in n.inputs or position in ir.dim_symbols(str(n.attrs))]
    if {n.name for n in users} != {n.name for n in layers} | {embed[0].name}:
        raise ValueError(f"{graph}: {position!r} is read by {[n.name for n in users if n.op != ir.DECODER_LAYER]} as well; only the layers and the positional embedding may")

    def retype(v: ir.Value) -> ir.Value:
        if v.name == position:
            return ir.Value(v.name, ir.TensorType("int64", (rows,)))
        if v.name in caches:
            return ir.Value(v.name, ir.TensorType(v.type.dtype, ("pool",) + tuple(v.type.shape[1:])))
        if v.name in cross:
            return ir.Value(v.name, ir.TensorType(v.type.dtype, ("windows",) + tuple(v.type.shape[1:])))
        return v

    e = embed[0]
    d = e.type.shape[-1]
    at = ir.Node(f"{e.name}/rows", "aten.view.default", (position,), (("size", [-1, 1]),), ir.TensorType("int64", (rows, 1)), e.scope)
    looked_up = ir.Node(
        e.name,
        "aten.embedding.default",
        ("decoder.positional_embedding", at.name),
        (("padding_idx", -1), ("scale_grad_by_freq", False), ("sparse", False)),
        ir.TensorType(e.type.dtype, (rows, 1, d)),
        e.scope,
    )
    nodes = []
    for n in g.nodes:
        if n is e:
            nodes += [at, looked_up]
        elif n.op == ir.DECODER_LAYER:
            nodes.append(ir.Node(n.name, n.op, n.inputs + (WINDOW,), n.attrs, n.type, n.scope))
        else:
            nodes.append(n)
    new_inputs = tuple(retype(v) for v in g.inputs) + (ir.Value(WINDOW, ir.TensorType("int32", (rows,))),)
    used = {s for v in new_inputs for dim in v.type.shape for s in ir.dim_symbols(dim)} | {s for n in nodes for dim in n.type.shape for s in ir.dim_symbols(dim)}
    dims = tuple(dim for dim in g.dims if dim.name in used) + (ir.SymDim("pool", 1, None), ir.SymDim("windows", 1, None))
    out = ir.Graph(g.name, new_inputs, g.weights, g.constants, tuple(nodes), g.outputs, dims)
    out.validate()
    log.info("%s: per-row positions, %d cache slots and windows by index", graph, len(caches))
    return _replace_graph(p, out)


STORED_DTYPES = ("bfloat16", "float16")


def store_weights(p: ir.Program, dtype: str = "bfloat16", min_rank: int = 2, exact: frozenset[str] | None = None) -> ir.Program:
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
    (runtime.package.WIDENED), a float32 weight the runtime makes from X once, at load, and binds
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
        raise ValueError("store_weights: float16 storage takes `exact`, the weights a float16 holds exactly; bfloat16 takes none")
    step_only = dtype == "float16"  # only step reads read the stored weight; the rest are widened

    def reads_stored(g: ir.Graph, users: dict, shapes: dict, n: ir.Node, w: str) -> bool:
        if n.op == "aten.linear.default":
            return n.inputs[1] == w and (ir.one_position_per_row(g, n.inputs[0]) or (not step_only and ir.bfloat16_product_fits(shapes[w])))
        if n.op == "aten.transpose.int" and len(shapes[w]) == 2:  # x @ Wᵀ (the tied vocabulary product)
            after = users.get(n.name, [])
            return bool(after) and all(m.op == "aten.matmul.default" and m.inputs[1] == n.name and ir.one_position_per_row(g, m.inputs[0]) for m in after)
        return False

    def matrices(g: ir.Graph) -> set[str]:
        return {w.name for w in g.weights if w.type.dtype == "float32" and len(w.type.shape) >= min_rank and widened_source(w.name) is None}

    chosen = None  # every matrix for bfloat16; for float16 the exact ones some step reads stored
    if step_only:
        chosen = set()
        for g in p.graphs:
            shapes, users, candidates = {w.name: w.type.shape for w in g.weights}, _consumers(g), matrices(g) & exact
            for n in g.nodes:
                chosen.update(i for i in n.inputs if i in candidates and (n.op == ir.DECODER_LAYER or reads_stored(g, users, shapes, n, i)))
    graphs = []
    for g in p.graphs:
        stored = matrices(g) if chosen is None else matrices(g) & chosen
        if not stored:
            graphs.append(g)
            continue
        shapes = {w.name: w.type.shape for w in g.weights}
        users = _consumers(g)
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
                elif reads_stored(g, users, shapes, n, i):
                    if i not in casts:
                        casts[i] = ir.Node(f"{i}/float32", ir.CAST, (i,), (("dtype", "float32"),), ir.TensorType("float32", shapes[i]), n.scope)
                        nodes.append(casts[i])
                        read[i] = dtype
                    inputs.append(casts[i].name)
                else:
                    read[i + WIDENED] = "float32"
                    inputs.append(i + WIDENED)
            nodes.append(ir.Node(n.name, n.op, tuple(inputs), n.attrs, n.type, n.scope))
        weights = [w for w in g.weights if w.name not in stored]
        weights += [ir.Value(name, ir.TensorType(dt, shapes[name.removesuffix(WIDENED)])) for name, dt in sorted(read.items())]
        out = ir.Graph(g.name, g.inputs, tuple(weights), g.constants, tuple(nodes), g.outputs, g.dims)
        out.validate()
        log.info("%s: %d weights stored as %s (%d read widened)", g.name, len(stored), dtype, sum(dt == "float32" for dt in read.values()))
        graphs.append(out)
    return ir.Program(tuple(graphs), p.dims)


PANEL_DTYPES = ("float32", "float16")  # and bfloat16 where its products do not run on AMX
LAYER_MATRICES = (6, 8, 9, 11, 15, 17, 21, 23)  # a decoder_layer node's wq wk wv wo wcq wco w1 w2


def panel_products(p: ir.Program, bfloat16: bool = False) -> ir.Program:
    """Give each product of one position per row (the vocabulary projection of decoder steps,
    beams and the engine's rows, tied or not; any linear layer outside the fused blocks) with a
    weight W stored in float32 or float16 its own op, `linear_panels(x, W/panels, bias)`, which
    reads W in panels of 64 output columns (runtime.package.to_panels, made at load); and have
    each fused decoder block read its eight matrices in panels (its kernel then runs its
    products as linear_panels does).

    The kernel it lowers to sums, for every row, 64 outputs in registers from one contiguous pass
    over each panel, several rows at a time: the weight is read once per call and every load
    feeds several multiply-adds, where a dot product per output feeds one; each output's sum
    runs in the same order whatever the number of rows. W may be the graph weight itself or its
    float32 view (a cast of a float16 one, passes.store_weights); the tied vocabulary product
    is `x @ transpose(W)`. A bfloat16 weight is read in panels too when `bfloat16` (a target
    without AMX: VDPBF16PS kernels would round the rows to bfloat16, and a dot product per output
    is load-bound), else it keeps its AMX kernels (convert passes `not Target.amx`)."""
    dtypes = (*PANEL_DTYPES, "bfloat16") if bfloat16 else PANEL_DTYPES
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
            if n.op == "aten.linear.default" and ir.one_position_per_row(g, n.inputs[0]):
                src, bias = source(n.inputs[1]), (n.inputs[2] if len(n.inputs) > 2 else "")
            elif n.op == "aten.matmul.default" and ir.one_position_per_row(g, n.inputs[0]):
                t = producers.get(n.inputs[1])
                if t is not None and t.op == "aten.transpose.int" and sorted((t.attr("dim0"), t.attr("dim1"))) in ([0, 1], [-2, -1]):
                    src = source(t.inputs[0])
            if n.op == ir.DECODER_LAYER:
                sources = [source(n.inputs[i]) for i in LAYER_MATRICES]
                if None in sources:  # the kernel takes all of a block's matrices in panels or none
                    nodes.append(n)
                    continue
                inputs = list(n.inputs)
                for i, w in zip(LAYER_MATRICES, sources):
                    out, k = weights[w].shape
                    panels[w + PANELS] = ir.TensorType(weights[w].dtype, (-(-out // PANEL), k, PANEL))
                    inputs[i] = w + PANELS
                nodes.append(ir.Node(n.name, n.op, tuple(inputs), n.attrs, n.type, n.scope))
                continue
            if src is None:
                nodes.append(n)
                continue
            out, k = weights[src].shape
            panels[src + PANELS] = ir.TensorType(weights[src].dtype, (-(-out // PANEL), k, PANEL))
            nodes.append(ir.Node(n.name, ir.LINEAR_PANELS, (n.inputs[0], src + PANELS, bias), (), n.type, n.scope))
        if not panels:
            graphs.append(g)
            continue
        nodes = _drop_dead(nodes, g.outputs)
        read = {i for n in nodes for i in n.inputs if i}
        kept = tuple(w for w in g.weights if w.name in read) + tuple(ir.Value(name, t) for name, t in sorted(panels.items()))
        out = ir.Graph(g.name, g.inputs, kept, tuple(c for c in g.constants if c.name in read), tuple(nodes), g.outputs, g.dims)
        out.validate()
        log.info("%s: %d products of one position per row read weights in panels", g.name, len(panels))
        graphs.append(out)
    return ir.Program(tuple(graphs), p.dims)


def fuse_encoder_attention(p: ir.Program, graph: str = Role.ENCODER, head_dim: int = 64, op: str = ir.ATTENTION_BF16, require: bool = True) -> ir.Program:
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
    prod = {n.name: n for n in g.nodes}
    users = _consumers(g)
    types = g.types()
    outputs = {v for _, v in g.outputs}

    def only(name: str, op: str, **attrs) -> ir.Node | None:
        n = prod.get(name)
        if n is None or n.op != op or any(n.attr(k) != v for k, v in attrs.items()):
            return None
        if len(users.get(name, [])) != 1 or name in outputs:
            return None
        return n

    def head_view(name: str) -> tuple[ir.Node, ir.Node] | None:
        perm = only(name, "aten.permute.default", dims=(0, 2, 1, 3))
        view = perm and only(perm.inputs[0], "aten.view.default")
        if view is None:
            return None
        size = view.attr("size")
        if len(size) != 4 or size[3] != -1 or perm.type.shape[3] != head_dim:
            return None
        return view, perm

    replace: dict[str, ir.Node] = {}  # the flatten's name -> the fused node
    drop: set[str] = set()
    for sm in g.nodes:
        if sm.op != "aten.softmax.int" or sm.attr("dim") != -1 or sm.attr("dtype") is not None:
            continue
        qk = only(sm.inputs[0], "aten.matmul.default")
        pv = users.get(sm.name, [])
        if qk is None or len(pv) != 1 or pv[0].op != "aten.matmul.default" or pv[0].inputs[0] != sm.name or sm.name in outputs:
            continue
        pv = pv[0]
        mq = only(qk.inputs[0], "aten.mul.Tensor")
        tr = only(qk.inputs[1], "aten.transpose.int")
        mk = tr and only(tr.inputs[0], "aten.mul.Tensor")
        if mq is None or mk is None or {tr.attr("dim0"), tr.attr("dim1")} != {-1, -2}:
            continue
        scale = mq.attr("other")
        if not isinstance(scale, float) or mk.attr("other") != scale:
            continue
        q, k, v = head_view(mq.inputs[0]), head_view(mk.inputs[0]), head_view(pv.inputs[1])
        after = users.get(pv.name, [])
        back = only(after[0].name, "aten.permute.default", dims=(0, 2, 1, 3)) if len(after) == 1 and pv.name not in outputs else None
        flat = users.get(back.name, []) if back is not None else []
        if q is None or k is None or v is None or len(flat) != 1:
            continue
        flat = flat[0]
        if flat.op != "aten.flatten.using_ints" or flat.attr("start_dim") != 2 or flat.attr("end_dim") != -1:
            continue
        heads = q[1].type.shape[1]
        sources = (q[0].inputs[0], k[0].inputs[0], v[0].inputs[0])
        if not isinstance(heads, int) or any(types[x] != flat.type for x in sources):
            continue
        replace[flat.name] = ir.Node(flat.name, op, sources, (("heads", heads), ("scale", scale)), flat.type, flat.scope)
        drop |= {q[0].name, q[1].name, k[0].name, k[1].name, v[0].name, v[1].name, mq.name, mk.name, tr.name, qk.name, sm.name, pv.name, back.name}
    if not replace:
        why = f"{graph}: no attention matched openai-whisper's unmasked qkv_attention (view, permute, scale, matmul, softmax, matmul, permute, flatten; heads of {head_dim})"
        if require:
            raise ValueError(why)
        log.info("%s; MAX's ops compute it", why)
        return p
    nodes = [replace.get(n.name, n) for n in g.nodes if n.name not in drop]
    log.info("%s: %d attentions fused (%s)", graph, len(replace), op)
    return _replace_graph(p, ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims))


def _selection_inputs(rows: ir.Dim) -> tuple[ir.Value, ...]:
    return (
        ir.Value(RULES, ir.TensorType("int32", (rows, SELECT_RULES))),
        ir.Value(SUPPRESS, ir.TensorType("int32", ("n_suppress",))),
        ir.Value(SAMPLING, ir.TensorType("float32", (rows, 2))),
        ir.Value(SLOTS, ir.TensorType("int32", ("k",))),
    )


def _selection_dims(n_vocab: int) -> tuple[ir.SymDim, ...]:
    return (ir.SymDim("n_suppress", 0, n_vocab), ir.SymDim("k", 1, n_vocab))


def token_selection(p: ir.Program, steps: tuple[str, ...] = STEP_GRAPHS) -> ir.Program:
    """The next-token choice after a decoder call (ir.SELECT_TOKENS), so that a decoding step
    hands back a few (token, log-probability) pairs per row instead of the logits.

    Adds the graph `select` (logits (batch, n_vocab), rules (batch, 9) int32, suppress
    (n_suppress,) int32, sampling (batch, 2) float32, slots (k,) int32 -> choice (batch, k, 2)),
    run after the general decoder; and gives each one-token graph in `steps` the same four
    inputs and a `choice` output beside its logits, so a step is one graph call. A program that
    has them already is returned as it is."""
    graphs = list(p.graphs)
    n_vocab = p.dims["n_vocab"]
    for i, g in enumerate(graphs):
        if g.name not in steps or any(n.op == ir.SELECT_TOKENS for n in g.nodes):
            continue
        logits = dict(g.outputs)[LOGITS]
        rows = g.types()[logits].shape[0]
        extra = _selection_inputs(rows)
        node = ir.Node(CHOICE, ir.SELECT_TOKENS, (logits, *(v.name for v in extra)), (), ir.TensorType("float32", (rows, "k", 2)), Role.SELECT)
        out = ir.Graph(g.name, g.inputs + extra, g.weights, g.constants, g.nodes + (node,), g.outputs + ((CHOICE, CHOICE),), g.dims + _selection_dims(n_vocab))
        out.validate()
        graphs[i] = out
    if not any(g.name == Role.SELECT for g in graphs):
        inputs = (ir.Value(LOGITS, ir.TensorType("float32", ("batch", n_vocab))),) + _selection_inputs("batch")
        node = ir.Node(CHOICE, ir.SELECT_TOKENS, tuple(v.name for v in inputs), (), ir.TensorType("float32", ("batch", "k", 2)), Role.SELECT)
        g = ir.Graph(Role.SELECT, inputs, (), (), (node,), ((CHOICE, CHOICE),), (ir.SymDim("batch", 1, None),) + _selection_dims(n_vocab))
        g.validate()
        graphs.append(g)
    return ir.Program(tuple(graphs), p.dims) if graphs != list(p.graphs) else p
