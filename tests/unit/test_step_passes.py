"""The step graphs' passes on a tiny traced Whisper (no MAX): decoder_step (one row) and
decoder_rows (the engine's: rows of many windows, lineages, logits of the picked rows, each
layer's cross-attention queries)."""

import pytest
from helpers.tiny_model import TINY_DIMS, optimised_tiny

from whisper_max.converter import ir
from whisper_max.converter.passes import cross_queries, logit_rows
from whisper_max.runtime.program import LINEAGE, LOGIT_ROWS, QUERIES, WINDOW


def _optimised_decoder():
    """The optimised tiny program, its general decoder, its heads and width, and its caches."""
    after = optimised_tiny()
    dec = after.graph("decoder")
    caches = [x for x in dec.inputs if "past" in x.type.shape]
    return after, dec, TINY_DIMS["n_text_head"], TINY_DIMS["n_text_state"], caches


def test_optimise_step_graph():
    """The one-row step graph: decoder_layer kernels and the token choice in one graph."""
    after, dec, h, d, caches = _optimised_decoder()
    # the step graph: the decoder with batch = n = 1, its caches grown in place
    step = after.graph("decoder_step")
    assert [dm.name for dm in step.dims] == ["past", "kv_len", "n_suppress", "k"]
    inputs = dict((x.name, x.type.shape) for x in step.inputs)
    assert inputs["tokens"] == (1, 1) and inputs["past"] == ()
    state = step.state_inputs()
    assert set(state) == {x.name for x in caches}
    assert all(inputs[k] == (1, h, TINY_DIMS["n_text_ctx"], d // h) for k in state)
    # each residual block is one decoder_layer node, which writes that block's two caches
    blocks = [n for n in step.nodes if n.op == ir.DECODER_LAYER]
    assert [n.scope for n in blocks] == [f"decoder.blocks.{i}" for i in range(TINY_DIMS["n_text_layer"])]
    assert {k: n.name for k, n in state.items()} == {n.inputs[i]: n.name for n in blocks for i in (1, 2)}
    outside = lambda g: [n.op for n in g.nodes if not n.scope.startswith("decoder.blocks.")]  # noqa: E731
    assert outside(step) == outside(dec) + [ir.SELECT_TOKENS] and len(step.nodes) == len(outside(dec)) + len(blocks) + 1
    # and the next-token choice on its logits, in the same graph (passes.token_selection)
    assert [o for o, _ in step.outputs] == ["logits", "choice"] and step.nodes[-1].op == ir.SELECT_TOKENS
    assert step.nodes[-1].inputs == (dict(step.outputs)["logits"], "rules", "suppress", "sampling", "slots")
    assert not any(s in str(dim) for n in step.nodes for dim in n.type.shape for s in ("batch", "n ", "past"))
    assert LINEAGE not in inputs and all(len(n.inputs) == 27 for n in blocks)  # one row: its own cache row


def test_optimise_rows_graph():
    """The engine's rows graph: pool slots, per-row positions and windows, lineage."""
    after, dec, h, d, caches = _optimised_decoder()
    blocks = [n for n in after.graph("decoder_step").nodes if n.op == ir.DECODER_LAYER]
    # the rows graph (the engine's): the decoder with n = 1 for any rows, caches grown in place
    # in slots of a pool, each row at its own position, reading its own window's cross K/V
    rows = after.graph("decoder_rows")
    assert [dm.name for dm in rows.dims] == ["batch", "pool", "windows", "n_suppress", "k", "picked"]
    inputs = dict((x.name, x.type.shape) for x in rows.inputs)
    assert (
        inputs["tokens"] == ("batch", 1)
        and inputs["past"] == ("batch",)
        and set(rows.state_inputs()) == {x.name for x in caches}
    )
    assert all(inputs[k] == ("pool", h, TINY_DIMS["n_text_ctx"], d // h) for k in rows.state_inputs())
    per_window = {o for o, _ in after.graph("cross_kv").outputs} & set(inputs)
    general = dict((x.name, x.type.shape) for x in dec.inputs)
    assert per_window and all(inputs[k] == ("windows", *general[k][1:]) for k in per_window)
    assert inputs[WINDOW] == ("batch",)
    # each block reads the rows' lineage (passes.row_lineage: reordering beams moves no cache) and windows
    assert inputs[LINEAGE] == ("batch", TINY_DIMS["n_text_ctx"])
    layers = [n for n in rows.nodes if n.op == ir.DECODER_LAYER]
    assert [n.inputs for n in layers] == [n.inputs + (LINEAGE, WINDOW) for n in blocks]
    # the positional embedding: a lookup of each row's position instead of a slice at `past`
    embed = [n for n in rows.nodes if "decoder.positional_embedding" in n.inputs]
    assert [n.op for n in embed] == ["aten.embedding.default"] and not any(
        n.op == "aten.slice.Tensor" for n in rows.nodes
    )
    # passes.logit_rows: the final norm, the vocabulary product and the choice for the picked rows
    # only (a prompt decoded a row per token needs its last row's)
    types = rows.types()
    assert inputs[LOGIT_ROWS] == ("picked",) and inputs["rules"][0] == inputs["sampling"][0] == "picked"
    assert types[dict(rows.outputs)["logits"]].shape == ("picked", TINY_DIMS["n_vocab"])
    assert types[dict(rows.outputs)["choice"]].shape[0] == "picked"
    picked = [n for n in rows.nodes if LOGIT_ROWS in n.inputs]
    assert len(picked) == 1 and picked[0].inputs[0] == layers[-1].name
    with pytest.raises(ValueError, match="no final layer norm after the decoder layers"):
        logit_rows(after, "select")
    # passes.cross_queries: each layer's cross-attention queries, named after its cross keys, for
    # word timestamps (the alignment graph is not compiled)
    queries = [(name, v) for name, v in rows.outputs if name.endswith(QUERIES)]
    assert [name for name, _ in queries] == [n.inputs[25] + QUERIES for n in layers]
    assert all(types[v].shape == ("batch", d) for _, v in queries)
    assert [rows.nodes[[n.name for n in rows.nodes].index(v)].inputs for _, v in queries] == [(n.name,) for n in layers]
    with pytest.raises(ValueError, match="no decoder_layer nodes with cross keys"):
        cross_queries(after, "encoder")
