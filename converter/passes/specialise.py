"""specialise: a copy of a graph with some symbolic dims fixed (a step of one sequence, one token)."""

from __future__ import annotations

import sympy

from .. import ir


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
    than general matrix products (see converter/passes/kernels.py).
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
        tuple(
            ir.Node(
                n.name,
                n.op,
                n.inputs,
                tuple((k, _dim_subst(v, values, names)) for k, v in n.attrs),
                sub(n.type),
                n.scope,
            )
            for n in g.nodes
        ),
        g.outputs,
        tuple(d for d in g.dims if d.name not in values),
    )
    spec.validate()
    graphs = list(p.graphs)
    graphs.insert(graphs.index(g) + 1, spec)
    return ir.Program(tuple(graphs), p.dims)
