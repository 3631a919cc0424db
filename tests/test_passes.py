"""IR passes: what hoisting moves, and that the graphs stay well formed. (Numerical equality of the
hoisted program with PyTorch is checked by test_lower, which compiles the hoisted form.)"""

from tiny_model import tiny_whisper

from converter import ir
from converter.passes import hoist_invariants
from converter.trace import trace_program


def test_hoist_moves_cross_kv_preparation_out_of_the_step():
    before = trace_program(tiny_whisper())
    after = hoist_invariants(before)
    dec, xkv = after.graph("decoder"), after.graph("cross_kv")
    moved = {n.name for n in xkv.nodes} - {n.name for n in before.graph("cross_kv").nodes}
    # per layer: K head split, scale, transpose; V head split; nothing that depends on n or past
    assert moved and all(n.scope.endswith(".cross_attn") for n in xkv.nodes if n.name in moved)
    assert {n.op for n in xkv.nodes if n.name in moved} == {"aten.view.default", "aten.permute.default", "aten.mul.Tensor", "aten.transpose.int"}
    assert all("n" not in str(d) and "past" not in str(d) for n in xkv.nodes for d in n.type.shape)
    # the decoder reads the hoisted values instead of the raw cross K/V; cross_kv keeps its originals
    assert not any(v.name.endswith(("cross_attn.key", "cross_attn.value")) for v in dec.inputs)
    hoisted_inputs = [v.name for v in dec.inputs if "/" in v.name]
    assert hoisted_inputs and set(hoisted_inputs) <= {name for name, _ in xkv.outputs}
    assert [o for o, _ in xkv.outputs][:4] == [o for o, _ in before.graph("cross_kv").outputs]
    assert len(dec.nodes) + len(moved) == len(before.graph("decoder").nodes)
    # other graphs untouched; idempotent
    assert ir.format_graph(after.graph("encoder")) == ir.format_graph(before.graph("encoder"))
    assert ir.format_program(hoist_invariants(after)) == ir.format_program(after)
