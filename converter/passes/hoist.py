"""hoist_invariants: the decoder's work that depends only on the window (cross-attention K/V) moves
to a graph run once per window."""

from __future__ import annotations

import logging

from ...runtime.program import Role
from .. import ir

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
        if (
            ins
            and all(i in derived or i in static for i in ins)
            and any(i in derived for i in ins)
            and not _per_call(n.type)
        ):
            moved[n.name] = n
            derived.add(n.name)
    if not moved:
        return p

    kept = [n for n in src.nodes if n.name not in moved]
    read_by_kept = {i for n in kept for i in n.inputs} | {v for _, v in src.outputs}
    frontier = [n for n in moved.values() if n.name in read_by_kept]

    # target: its nodes, then the moved ones reading target values instead of source inputs
    hoisted = [
        ir.Node(n.name, n.op, tuple(dst_values.get(i, i) for i in n.inputs), n.attrs, n.type, n.scope)
        for n in moved.values()
    ]
    used_static = {i for n in moved.values() for i in n.inputs if i in static}
    dst_weights = list(dst.weights) + [
        w for w in src.weights if w.name in used_static and w.name not in {x.name for x in dst.weights}
    ]
    dst_consts = list(dst.constants) + [
        c for c in src.constants if c.name in used_static and c.name not in {x.name for x in dst.constants}
    ]
    new_dst = ir.Graph(
        dst.name,
        dst.inputs,
        tuple(dst_weights),
        tuple(dst_consts),
        tuple(dst.nodes) + tuple(hoisted),
        dst.outputs + tuple((n.name, n.name) for n in frontier),
        dst.dims,
    )

    # source: the kept nodes; the frontier arrives as inputs; drop what nothing reads any more
    still_read = {i for n in kept for i in n.inputs} | {v for _, v in src.outputs}
    inputs = [v for v in src.inputs if v.name in still_read] + [ir.Value(n.name, n.type) for n in frontier]
    new_src = ir.Graph(
        src.name,
        tuple(inputs),
        tuple(w for w in src.weights if w.name in still_read),
        tuple(c for c in src.constants if c.name in still_read),
        tuple(kept),
        src.outputs,
        src.dims,
    )
    new_src.validate()
    new_dst.validate()
    log.info("hoisted %d nodes from %s into %s (%d new values per window)", len(moved), source, target, len(frontier))
    graphs = tuple(new_src if g.name == source else new_dst if g.name == target else g for g in p.graphs)
    return ir.Program(graphs, p.dims)
