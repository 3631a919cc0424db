"""sink_cache_layout (the self-attention cache kept in attention's layout) and in_place_cache (a
step graph that grows its caches in place)."""

from __future__ import annotations

import logging

from ...runtime.program import Role
from .. import ir
from .rewrite import consumers, replace_graph, subst

log = logging.getLogger(__name__)


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
    users = consumers(g)
    output_of = {v: o for o, v in g.outputs}
    types = g.types()
    nodes = list(g.nodes)
    new_inputs = {v.name: v for v in g.inputs}
    changed = 0
    for c in g.inputs:
        found = _row_local_chain(c, users, output_of)
        if found is None:
            continue
        cat, chain, axis = found
        new = cat.inputs[1]
        total, part = cat.type.shape[1], types[new].shape[1]
        past = c.type.shape[1]
        # the new rows go through the chain; the concatenation moves to its end
        # (only the first chain node reads the concatenation; the rest keep their inputs)
        moved = [
            ir.Node(
                n.name,
                n.op,
                tuple(new if i == cat.name else i for i in n.inputs),
                tuple((k, subst(v, total, part)) for k, v in n.attrs),
                ir.TensorType(n.type.dtype, tuple(subst(n.type.shape, total, part))),
                n.scope,
            )
            for n in chain
        ]
        last = chain[-1]
        new_cat = ir.Node(cat.name, cat.op, (c.name, last.name), (("dim", axis),), last.type, cat.scope)
        new_inputs[c.name] = ir.Value(c.name, ir.TensorType(c.type.dtype, tuple(subst(last.type.shape, total, past))))
        chain_names = {n.name for n in chain}
        rebuilt = []
        for n in nodes:
            if n.name in chain_names:
                continue
            if n.name == cat.name:
                rebuilt += [*moved, new_cat]
                continue
            inputs = tuple(cat.name if i == last.name else i for i in n.inputs)
            rebuilt.append(ir.Node(n.name, n.op, inputs, n.attrs, n.type, n.scope))
        nodes = rebuilt
        users = consumers(ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims))
        changed += 1
    if not changed:
        return p
    log.info("cache layout in %s: %d caches stored in the form attention reads", graph, changed)
    inputs = tuple(new_inputs[v.name] for v in g.inputs)
    return replace_graph(p, ir.Graph(g.name, inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims))


def _row_local_chain(c: ir.Value, users: dict, output_of: dict):
    """For a cache input `c` read once by `cat(c, new)` on its positions' axis (a graph output):
    the cat, the chain of position-wise ops after it (head split, permute, scale) and the axis
    of the positions at its end; None when there is no such chain."""
    cat_users = users.get(c.name, [])
    if len(c.type.shape) != 3 or len(cat_users) != 1:
        return None
    cat = cat_users[0]
    if (
        cat.op != "aten.cat.default"
        or cat.inputs[0] != c.name
        or len(cat.inputs) != 2
        or cat.attr("dim") % 3 != 1
        or cat.name not in output_of
    ):
        return None
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
    return (cat, chain, axis) if chain else None


def in_place_cache(
    p: ir.Program, graph: str = Role.DECODER_STEP, position: str = "past", length: str = "kv_len"
) -> ir.Program:
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
            appends[n.name] = ir.Node(
                n.name, ir.CACHE_APPEND, (n.inputs[0], n.inputs[1], position), (("axis", axis),), n.type, n.scope
            )
    if not appends:
        raise ValueError(f"{graph}: no cache input grown by concatenation along {position!r}")

    def retype(t: ir.TensorType, stored: bool = False) -> ir.TensorType:
        shape = tuple(capacity if stored and d == position else length if d == grown else d for d in t.shape)
        left = [d for d in shape if position in ir.dim_symbols(d)]
        if left:
            raise ValueError(
                f"{graph}: a value of type {t} has a size in {position!r} other than {grown}; cannot cache in place"
            )
        return ir.TensorType(t.dtype, shape)

    state = {a.inputs[0] for a in appends.values()}
    new_inputs = [ir.Value(v.name, retype(v.type, v.name in state)) for v in g.inputs]
    new_inputs.insert(1, ir.Value(position, ir.TensorType("int64", ())))
    nodes = tuple(
        ir.Node(m.name, m.op, m.inputs, m.attrs, retype(m.type), m.scope)
        for m in (appends.get(n.name, n) for n in g.nodes)
    )
    outputs = tuple((o, v) for o, v in g.outputs if v not in appends)
    dims = tuple(g.dims) + (ir.SymDim(length, 1, capacity),)
    out = ir.Graph(g.name, tuple(new_inputs), g.weights, g.constants, nodes, outputs, dims)
    log.info("%s: %d caches grown in place", graph, len(appends))
    return replace_graph(p, out)
