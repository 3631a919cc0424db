"""store_cross_kv: the cross-attention keys and values the decoder steps read, stored in bfloat16."""

from __future__ import annotations

import logging

from ...runtime.program import Role
from .. import ir

log = logging.getLogger(__name__)


def store_cross_kv(p: ir.Program, dtype: str = "bfloat16") -> ir.Program:
    """Have cross_kv give the per-window keys and values that decoder_rows reads (its inputs of
    many windows) as `dtype` (rounded to nearest even at the end of cross_kv), and every graph
    that takes them take them so: the fused decoder blocks read them as they are (widening each
    element exactly as it loads it), any other reader through a cast to float32.

    A decoder step of a bfloat16 package reads its weights in bfloat16 and, per row, its window's
    cross keys and values (18 MB a window in float32 for tiny.en, a quarter of the one-row step's
    bytes; 590 MB for a call of 32 rows of 32 windows, most of what such a call reads): in
    bfloat16 half that, and the engine's pool of windows half the memory. Only a package that
    already rounds (bfloat16) takes it: the float32 package's values stay float32. cross_kv's
    other outputs (the unsplit keys and values, which only word timestamps and parity read) stay
    float32."""
    if dtype != "bfloat16":
        raise ValueError(f"store_cross_kv: dtype {dtype!r}; cross keys and values are stored as bfloat16 only")
    rows = p.graph(Role.DECODER_ROWS)
    source = p.graph(Role.CROSS_KV)
    produced = dict(source.outputs)
    stored = {v.name for v in rows.inputs if v.type.shape[:1] == ("windows",) and v.name in produced}
    if not stored:
        raise ValueError(f"store_cross_kv: {Role.DECODER_ROWS} reads no per-window values of {Role.CROSS_KV}")
    types = source.types()
    if any(types[produced[name]].dtype != "float32" for name in stored):
        raise ValueError("store_cross_kv: the cross keys and values are not float32 (stored already?)")
    graphs = []
    for g in p.graphs:
        if g.name == Role.CROSS_KV:
            nodes, outputs = list(g.nodes), []
            for name, value in g.outputs:
                if name in stored:
                    cast = ir.Node(
                        f"{value}/{dtype}",
                        ir.CAST,
                        (value,),
                        (("dtype", dtype),),
                        ir.TensorType(dtype, types[value].shape),
                        name,
                    )
                    nodes.append(cast)
                    value = cast.name
                outputs.append((name, value))
            g = ir.Graph(g.name, g.inputs, g.weights, g.constants, tuple(nodes), tuple(outputs), g.dims)
        elif any(v.name in stored for v in g.inputs):
            g = _read_stored(g, stored, dtype)
        g.validate()
        graphs.append(g)
    log.info("%s: %d per-window values stored as %s", Role.CROSS_KV, len(stored), dtype)
    return ir.Program(tuple(graphs), p.dims)


def _read_stored(g: ir.Graph, stored: set[str], dtype: str) -> ir.Graph:
    """Graph g taking its inputs among `stored` as `dtype`: decoder_layer nodes read them as
    they are, every other node through one cast to float32 per input."""
    inputs = tuple(ir.Value(v.name, ir.TensorType(dtype, v.type.shape)) if v.name in stored else v for v in g.inputs)
    widened: dict[str, ir.Node] = {}
    float32 = {v.name: v.type for v in g.inputs}
    nodes = []
    for n in g.nodes:
        if n.op != ir.DECODER_LAYER and any(i in stored for i in n.inputs):
            for i in n.inputs:
                if i in stored and i not in widened:
                    widened[i] = ir.Node(f"{i}/float32", ir.CAST, (i,), (("dtype", "float32"),), float32[i], n.scope)
                    nodes.append(widened[i])
            n = ir.Node(
                n.name, n.op, tuple(widened[i].name if i in stored else i for i in n.inputs), n.attrs, n.type, n.scope
            )
        nodes.append(n)
    return ir.Graph(g.name, inputs, g.weights, g.constants, tuple(nodes), g.outputs, g.dims)
