"""Helpers every pass uses to rewrite a graph: who reads a value, dead nodes, a graph replaced in
its program, a dim renamed."""

from __future__ import annotations

from .. import ir


def consumers(g: ir.Graph) -> dict[str, list[ir.Node]]:
    users: dict[str, list[ir.Node]] = {}
    for n in g.nodes:
        for i in dict.fromkeys(i for i in n.inputs if i):
            users.setdefault(i, []).append(n)
    return users


def replace_graph(p: ir.Program, g: ir.Graph) -> ir.Program:
    g.validate()
    return ir.Program(tuple(g if x.name == g.name else x for x in p.graphs), p.dims)


def drop_dead(nodes: list[ir.Node], outputs) -> list[ir.Node]:
    live = {v for _, v in outputs}
    kept = []
    for n in reversed(nodes):
        if n.name in live:
            kept.append(n)
            live.update(i for i in n.inputs if i)
    return kept[::-1]


def subst(value, old: str, new: ir.Dim):
    if isinstance(value, (list, tuple)):
        return type(value)(subst(v, old, new) for v in value)
    return new if value == old else value
