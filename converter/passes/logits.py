"""last_position_logits: the decoder computes logits for its last position only."""

from __future__ import annotations

import logging

from ...runtime.program import Role
from .. import ir
from .rewrite import consumers, drop_dead, replace_graph

log = logging.getLogger(__name__)


def last_position_logits(p: ir.Program, graph: str = Role.DECODER) -> ir.Program:
    """`matmul(x, W)[:, -1]` -> `matmul(x[:, -1], W)`: project only the position that is returned.

    The traced decoder projects every position onto the vocabulary and then keeps the last, so a
    200-token prompt costs 200 vocabulary products instead of one. Selecting a row of the left
    operand before a matrix product gives the same row of the result, computed by the same dot
    products.
    """
    g = p.graph(graph)
    producer = {n.name: n for n in g.nodes}
    users = consumers(g)
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
        if (
            src is None
            or src.op != "aten.matmul.default"
            or len(src.type.shape) != 3
            or len(users.get(src.name, [])) != 1
        ):
            continue
        x_name, w_name = src.inputs
        w_type = types[w_name]
        if len(w_type.shape) != 2:
            continue
        x_type = types[x_name]
        row = ir.Node(
            f"{src.name}/row",
            "aten.select.int",
            (x_name,),
            (("dim", 1), ("index", -1)),
            ir.TensorType(x_type.dtype, (x_type.shape[0], x_type.shape[2])),
            src.scope,
        )
        mm = ir.Node(
            f"{src.name}/last",
            "aten.matmul.default",
            (row.name, w_name),
            (),
            ir.TensorType(src.type.dtype, (x_type.shape[0], w_type.shape[1])),
            src.scope,
        )
        nodes.insert(nodes.index(src), row)
        nodes.insert(nodes.index(src), mm)
        renamed[sel.name] = mm.name
    if not renamed:
        return p
    outputs = tuple((o, renamed.get(v, v)) for o, v in g.outputs)
    nodes = [ir.Node(n.name, n.op, tuple(renamed.get(i, i) for i in n.inputs), n.attrs, n.type, n.scope) for n in nodes]
    nodes = drop_dead(nodes, outputs)
    log.info("last-position logits in %s: %d projection(s) narrowed to one row", graph, len(renamed))
    return replace_graph(p, ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), outputs, g.dims))
