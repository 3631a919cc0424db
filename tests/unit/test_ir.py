"""IR: the traced program prints stably (snapshot), validates, and round-trips through ONNX."""

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.tiny_model import tiny_whisper, traced_tiny

from whisper_max.converter import ir, onnx_io
from whisper_max.converter.trace import trace_program

SNAPSHOT = Path(__file__).parent / "snapshots" / "tiny_random.ir.txt"


@pytest.fixture(scope="module")
def program():
    return traced_tiny()


def test_snapshot(program):
    text = ir.format_program(program)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text(), "IR changed; review the diff and rerun with UPDATE_SNAPSHOTS=1 if intended"


def test_trace_is_deterministic(program):
    assert ir.format_program(trace_program(tiny_whisper(seed=1))) == ir.format_program(program)


def test_no_casts_or_asserts_survive(program):
    ops = {n.op for g in program.graphs for n in g.nodes}
    assert not any(("to" in op.split(".")[1:2]) or "assert" in op for op in ops), ops


def test_graph_contracts(program):
    enc, xkv, dec = program.graphs  # word timestamps need no graph (passes.cross_queries)
    assert [v.name for v in enc.inputs] == ["mel"] and enc.outputs[0][0] == "encoder"
    assert [o for o, _ in xkv.outputs] == [
        f"decoder.blocks.{i}.cross_attn.{kv}" for i in range(2) for kv in ("key", "value")
    ]
    assert dec.outputs[0][0] == "logits" and dict(dec.types())[dec.outputs[0][1]].shape == ("batch", 50)
    assert {d.name: (d.min, d.max) for d in dec.dims} == {"batch": (1, None), "n": (1, 12), "past": (0, 11)}
    assert [c.name for c in dec.constants] == ["decoder.mask"]
    # weights are referenced by state-dict name, the tied head only once
    assert sum(w.name == "decoder.token_embedding.weight" for w in dec.weights) == 1


def test_module_output(program):
    enc = program.graph("encoder")
    assert ir.module_output(enc, "encoder.blocks.1") == "encoder.blocks.1/add.1"
    assert ir.module_output(enc, "encoder.ln_post") == enc.outputs[0][1]
    with pytest.raises(KeyError):
        ir.module_output(enc, "encoder.nothing")


def test_validate_catches_undefined_values(program):
    g = program.graph("cross_kv")
    n = g.nodes[0]
    broken = ir.Graph(
        g.name,
        g.inputs,
        g.weights,
        g.constants,
        (ir.Node(n.name, n.op, ("nope",), n.attrs, n.type, n.scope),) + g.nodes[1:],
        g.outputs,
    )
    with pytest.raises(ValueError, match="undefined 'nope'"):
        broken.validate()


def test_onnx_round_trip_is_lossless(program):
    files = onnx_io.to_onnx_files(program)
    assert sorted(files) == ["ir/cross_kv.onnx", "ir/decoder.onnx", "ir/encoder.onnx"]
    for data in files.values():
        onnx.checker.check_model(onnx.load_from_string(data))
    back = onnx_io.from_onnx_files(files)
    assert ir.format_program(back) == ir.format_program(program)
    assert back.dims == program.dims
    for g1, g2 in zip(program.graphs, back.graphs):
        for c1, c2 in zip(g1.constants, g2.constants):
            np.testing.assert_array_equal(c1.data, c2.data)
        # float attributes keep full double precision (ONNX FLOAT would round the attention scale)
        assert [n.attrs for n in g1.nodes] == [n.attrs for n in g2.nodes]
