"""share_window, row_lineage, engine_rows, logit_rows, cross_queries: the decoder_rows graph the
engine calls, rows of many windows and lineages in one call, logits for the rows that need them,
and each layer's cross-attention queries for word timestamps."""

from __future__ import annotations

import logging

from ...runtime.program import LINEAGE, LOGIT_ROWS, QUERIES, RULES, SAMPLING, WINDOW, Role
from .. import ir
from .rewrite import replace_graph, subst

log = logging.getLogger(__name__)


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
            raise ValueError(
                f"{graph}: {n.name} ({n.op}) reads a per-window value; only matrix products can share one across rows"
            )
    inputs = []
    for v in g.inputs:
        if v.name in shared:
            if v.type.shape[:1] != ("batch",):
                raise ValueError(f"{graph}: per-window input {v.name} is {v.type}; expected a leading dim batch")
            v = ir.Value(v.name, ir.TensorType(v.type.dtype, (1,) + tuple(v.type.shape[1:])))
        inputs.append(v)
    log.info("%s: %d per-window inputs shared by all rows", graph, len(shared))
    return replace_graph(p, ir.Graph(g.name, tuple(inputs), g.weights, g.constants, g.nodes, g.outputs, g.dims))


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
    nodes = tuple(
        ir.Node(n.name, n.op, n.inputs + (LINEAGE,), n.attrs, n.type, n.scope) if n.op == ir.DECODER_LAYER else n
        for n in g.nodes
    )
    out = ir.Graph(g.name, g.inputs + (lineage,), g.weights, g.constants, nodes, g.outputs, g.dims)
    out.validate()
    return replace_graph(p, out)


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
    layers, e = _check_engine_rows(g, inputs, position)
    caches = {n.inputs[i] for n in layers for i in (1, 2)}
    cross = {n.inputs[i] for n in layers for i in (25, 26)}
    if any(inputs[c].type.shape[0] != 1 for c in cross):
        raise ValueError(f"{graph}: cross keys/values not shared by all rows (leading dim 1; run share_window first)")
    rows = g.types()[layers[0].inputs[0]].shape[0]

    def retype(v: ir.Value) -> ir.Value:
        if v.name == position:
            return ir.Value(v.name, ir.TensorType("int64", (rows,)))
        if v.name in caches:
            return ir.Value(v.name, ir.TensorType(v.type.dtype, ("pool",) + tuple(v.type.shape[1:])))
        if v.name in cross:
            return ir.Value(v.name, ir.TensorType(v.type.dtype, ("windows",) + tuple(v.type.shape[1:])))
        return v

    at, looked_up = _position_lookup(e, position, rows)
    nodes = []
    for n in g.nodes:
        if n is e:
            nodes += [at, looked_up]
        elif n.op == ir.DECODER_LAYER:
            nodes.append(ir.Node(n.name, n.op, n.inputs + (WINDOW,), n.attrs, n.type, n.scope))
        else:
            nodes.append(n)
    new_inputs = tuple(retype(v) for v in g.inputs) + (ir.Value(WINDOW, ir.TensorType("int32", (rows,))),)
    used = {s for v in new_inputs for dim in v.type.shape for s in ir.dim_symbols(dim)} | {
        s for n in nodes for dim in n.type.shape for s in ir.dim_symbols(dim)
    }
    dims = tuple(dim for dim in g.dims if dim.name in used) + (
        ir.SymDim("pool", 1, None),
        ir.SymDim("windows", 1, None),
    )
    out = ir.Graph(g.name, new_inputs, g.weights, g.constants, tuple(nodes), g.outputs, dims)
    out.validate()
    log.info("%s: per-row positions, %d cache slots and windows by index", graph, len(caches))
    return replace_graph(p, out)


def logit_rows(p: ir.Program, graph: str = Role.DECODER_ROWS) -> ir.Program:
    """Compute the logits, and the choice after them, for the rows LOGIT_ROWS (picked,) int64
    names, not for every row: a prompt prefilled as rows, one per token at consecutive positions,
    needs the last one's, while the vocabulary product (n_vocab x d per row) is most of a long
    prompt's work; a decoding step names every row. The rows are gathered before the final layer
    norm; what follows it, and the choice's per-row inputs, are per picked row."""
    g = p.graph(graph)
    norms = [n for n in g.nodes if n.op == "aten.layer_norm.default"]
    if not norms or any(n.op == ir.DECODER_LAYER for n in g.nodes[g.nodes.index(norms[-1]) :]):
        raise ValueError(f"{graph}: no final layer norm after the decoder layers to pick rows before")
    norm = norms[-1]
    at = g.nodes.index(norm)
    x = g.types()[norm.inputs[0]]
    rows = x.shape[0]
    gather = ir.Node(
        f"{norm.inputs[0]}/picked",
        "aten.index_select.default",
        (norm.inputs[0], LOGIT_ROWS),
        (("dim", 0),),
        ir.TensorType(x.dtype, ("picked", *x.shape[1:])),
        norm.scope,
    )

    def picked(t: ir.TensorType) -> ir.TensorType:
        return ir.TensorType(t.dtype, subst(tuple(t.shape), rows, "picked"))

    tail = [
        ir.Node(
            n.name,
            n.op,
            tuple(gather.name if i == norm.inputs[0] else i for i in n.inputs),
            n.attrs,
            picked(n.type),
            n.scope,
        )
        for n in g.nodes[at:]
    ]
    inputs = tuple(ir.Value(v.name, picked(v.type)) if v.name in (RULES, SAMPLING) else v for v in g.inputs) + (
        ir.Value(LOGIT_ROWS, ir.TensorType("int64", ("picked",))),
    )
    dims = g.dims + (ir.SymDim("picked", 1, None),)
    out = ir.Graph(g.name, inputs, g.weights, g.constants, (*g.nodes[:at], gather, *tail), g.outputs, dims)
    out.validate()
    return replace_graph(p, out)


def cross_queries(p: ir.Program, graph: str = Role.DECODER_ROWS) -> ir.Program:
    """Return each decoder_layer's cross-attention queries (rows, d), scaled as its keys are, as
    the output `<its cross keys input>` + QUERIES, in layer order: a prompt decoded a row per
    token then gives word timestamps' alignment scores (those heads' queries times the window's
    keys, on the host) and every position's logits (LOGIT_ROWS all rows) in one call, where a
    graph of its own (alignment) would be compiled for them."""
    g = p.graph(graph)
    layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
    if not layers or any(len(n.inputs) < 27 for n in layers):
        raise ValueError(f"{graph}: no decoder_layer nodes with cross keys to return the queries of")
    types = g.types()
    nodes, outputs = [], []
    for n in layers:
        x = types[n.inputs[0]]
        name = n.inputs[25] + QUERIES
        nodes.append(
            ir.Node(name, ir.CROSS_QUERIES, (n.name,), (), ir.TensorType("float32", (x.shape[0], x.shape[-1])), n.scope)
        )
        outputs.append((name, name))
    out = ir.Graph(g.name, g.inputs, g.weights, g.constants, g.nodes + tuple(nodes), g.outputs + tuple(outputs), g.dims)
    out.validate()
    return replace_graph(p, out)


def _check_engine_rows(g: ir.Graph, inputs: dict, position: str) -> tuple[list[ir.Node], ir.Node]:
    """The decoder_layer nodes (with a lineage) and the one positional-embedding slice at
    `position`, which with the layers alone read it; else the error says what engine_rows needs."""
    if WINDOW in inputs or any(d.name in ("pool", "windows") for d in g.dims):
        raise ValueError(f"{g.name}: already has per-row windows or slots")
    layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
    if not layers or any(len(n.inputs) != 28 or n.inputs[-1] != LINEAGE for n in layers):
        raise ValueError(
            f"{g.name}: expected decoder_layer nodes with a lineage (run fuse_decoder_layers and row_lineage first)"
        )
    if inputs.get(position) is None or inputs[position].type.shape != ():
        raise ValueError(f"{g.name}: no scalar input {position!r} (the position every row writes at)")
    embed = [n for n in g.nodes if n.op == "aten.slice.Tensor" and n.inputs[0] == "decoder.positional_embedding"]
    if (
        len(embed) != 1
        or embed[0].attr("start") != position
        or embed[0].attr("end") != f"{position} + 1"
        or embed[0].attr("dim") != 0
    ):
        raise ValueError(f"{g.name}: the positional embedding is not one slice at {position!r}")
    users = [n for n in g.nodes if position in n.inputs or position in ir.dim_symbols(str(n.attrs))]
    if {n.name for n in users} != {n.name for n in layers} | {embed[0].name}:
        raise ValueError(
            f"{g.name}: {position!r} is read by {[n.name for n in users if n.op != ir.DECODER_LAYER]} as well; only "
            "the layers and the positional embedding may"
        )
    return layers, embed[0]


def _position_lookup(e: ir.Node, position: str, rows) -> tuple[ir.Node, ir.Node]:
    """The slice `e` of the positional embedding at one position, as a lookup of each row's."""
    at = ir.Node(
        f"{e.name}/rows",
        "aten.view.default",
        (position,),
        (("size", [-1, 1]),),
        ir.TensorType("int64", (rows, 1)),
        e.scope,
    )
    looked_up = ir.Node(
        e.name,
        "aten.embedding.default",
        ("decoder.positional_embedding", at.name),
        (("padding_idx", -1), ("scale_grad_by_freq", False), ("sparse", False)),
        ir.TensorType(e.type.dtype, (rows, 1, e.type.shape[-1])),
        e.scope,
    )
    return at, looked_up
