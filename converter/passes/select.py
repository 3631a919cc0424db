"""token_selection: the next-token choice as a kernel after each decoder call, and a select graph of its own."""

from __future__ import annotations

from ...runtime.program import CHOICE, LOGITS, RULES, SAMPLING, SELECT_RULES, SLOTS, STEP_GRAPHS, SUPPRESS, Role
from .. import ir


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
        node = ir.Node(
            CHOICE,
            ir.SELECT_TOKENS,
            (logits, *(v.name for v in extra)),
            (),
            ir.TensorType("float32", (rows, "k", 2)),
            Role.SELECT,
        )
        out = ir.Graph(
            g.name,
            g.inputs + extra,
            g.weights,
            g.constants,
            g.nodes + (node,),
            g.outputs + ((CHOICE, CHOICE),),
            g.dims + _selection_dims(n_vocab),
        )
        out.validate()
        graphs[i] = out
    if not any(g.name == Role.SELECT for g in graphs):
        inputs = (ir.Value(LOGITS, ir.TensorType("float32", ("batch", n_vocab))),) + _selection_inputs("batch")
        node = ir.Node(
            CHOICE,
            ir.SELECT_TOKENS,
            tuple(v.name for v in inputs),
            (),
            ir.TensorType("float32", ("batch", "k", 2)),
            Role.SELECT,
        )
        g = ir.Graph(
            Role.SELECT,
            inputs,
            (),
            (),
            (node,),
            ((CHOICE, CHOICE),),
            (ir.SymDim("batch", 1, None),) + _selection_dims(n_vocab),
        )
        g.validate()
        graphs.append(g)
    return ir.Program(tuple(graphs), p.dims) if graphs != list(p.graphs) else p
