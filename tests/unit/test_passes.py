"""IR passes: what hoisting moves, and that the graphs stay well formed. (Numerical equality of the
optimised program with PyTorch is checked by tests/compiled/test_decoder.py, which compiles the hoisted form.)"""

import numpy as np
import onnx
import pytest
from helpers.tiny_model import TINY_DIMS, optimised_tiny, state_dict_np, tiny_whisper, traced_tiny

from whisper_max.converter import ir, onnx_io
from whisper_max.converter.passes import (
    LAYER_MATRICES,
    engine_rows,
    fuse_decoder_layers,
    fuse_encoder_attention,
    hoist_invariants,
    in_place_cache,
    optimise,
    panel_products,
    share_window,
    specialise,
    store_cross_kv,
    store_weights,
    token_selection,
)
from whisper_max.runtime.weights import PAIRS, PANELS, pairs_source, panels_source, widened_source


def test_hoist_moves_cross_kv_preparation_out_of_the_step():
    before = traced_tiny()
    after = hoist_invariants(before)
    dec, xkv = after.graph("decoder"), after.graph("cross_kv")
    moved = {n.name for n in xkv.nodes} - {n.name for n in before.graph("cross_kv").nodes}
    # per layer: K head split, scale, transpose; V head split; nothing that depends on n or past
    assert moved and all(n.scope.endswith(".cross_attn") for n in xkv.nodes if n.name in moved)
    assert {n.op for n in xkv.nodes if n.name in moved} == {
        "aten.view.default",
        "aten.permute.default",
        "aten.mul.Tensor",
        "aten.transpose.int",
    }
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


def _whole_cache_ops(g: ir.Graph) -> set[str]:
    """Ops whose result spans the grown cache (n + past positions)."""
    return {n.op for n in g.nodes if "n + past" in map(str, n.type.shape)}


def test_optimise_decoder_logits_and_caches():
    """passes.optimise on the traced tiny model: the decoder graph."""
    before = hoist_invariants(traced_tiny())
    after = optimised_tiny()
    dec, d0 = after.graph("decoder"), before.graph("decoder")
    v = TINY_DIMS["n_vocab"]
    # logits: one vocabulary product for the last position, none over every position
    assert [t.shape for t in [d0.types()[dict(d0.outputs)["logits"]]]] == [("batch", v)]
    assert any(n.type.shape == ("batch", "n", v) for n in d0.nodes)
    assert not any(n.type.shape == ("batch", "n", v) for n in dec.nodes)
    logits = dec.types()[dict(dec.outputs)["logits"]]
    assert logits.shape == ("batch", v)
    # caches: stored head-major, so the head split/permute/scale run on the new rows only
    h, d = TINY_DIMS["n_text_head"], TINY_DIMS["n_text_state"]
    caches = [x for x in dec.inputs if "past" in x.type.shape]
    assert len(caches) == 2 * TINY_DIMS["n_text_layer"]
    assert all(x.type.shape == ("batch", h, "past", d // h) for x in caches)
    assert {"aten.view.default", "aten.permute.default", "aten.mul.Tensor"} <= _whole_cache_ops(d0)
    # left: the concatenation, attention itself and the causal mask slice
    assert _whole_cache_ops(dec) == {
        "aten.cat.default",
        "aten.transpose.int",
        "aten.matmul.default",
        "aten.add.Tensor",
        "aten.softmax.int",
        "aten.slice.Tensor",
    }


def test_optimise_graph_list_and_select():
    """The program's graphs, the select graph, and the passes applied once."""
    after = optimised_tiny()
    with pytest.raises(ValueError, match="already has per-row windows"):
        engine_rows(after)
    assert [g.name for g in after.graphs] == [
        "encoder",
        "cross_kv",
        "decoder",
        "decoder_rows",
        "decoder_step",
        "select",
    ]
    select = after.graph("select")  # the next-token choice, after any decoder call
    assert [n.op for n in select.nodes] == [ir.SELECT_TOKENS] and select.outputs == (("choice", "choice"),)
    assert str(select.nodes[0].type) == "float32[batch, k, 2]"
    assert [str(v.type) for v in select.inputs] == [
        f"float32[batch, {TINY_DIMS['n_vocab']}]",
        "int32[batch, 9]",
        "int32[n_suppress]",
        "float32[batch, 2]",
        "int32[k]",
    ]
    assert token_selection(after) is after  # added once


def test_fuse_decoder_layers_refuses_a_block_it_does_not_know():
    p = optimise(traced_tiny(), fuse=False)
    fused = fuse_decoder_layers(p, "decoder_step").graph("decoder_step")
    assert sum(n.op == ir.DECODER_LAYER for n in fused.nodes) == TINY_DIMS["n_text_layer"]
    with pytest.raises(ValueError, match="dim n"):
        fuse_decoder_layers(p, "decoder")
    step = p.graph("decoder_step")

    def changed(edit) -> ir.Program:
        g = ir.Graph(
            step.name,
            step.inputs,
            step.weights,
            step.constants,
            tuple(edit(n) for n in step.nodes),
            step.outputs,
            step.dims,
        )
        return ir.Program(tuple(g if x.name == step.name else x for x in p.graphs), p.dims)

    # tanh GELU, another scale for the keys, a mask that is not causal: each a different block
    tanh = changed(
        lambda n: (
            ir.Node(n.name, n.op, n.inputs, (("approximate", "tanh"),), n.type, n.scope)
            if n.op == "aten.gelu.default"
            else n
        )
    )
    with pytest.raises(ValueError, match="products wired differently"):
        fuse_decoder_layers(tanh, "decoder_step")
    scaled = changed(
        lambda n: (
            ir.Node(n.name, n.op, n.inputs, (("other", 0.5),), n.type, n.scope) if n.name.endswith("attn/mul.1") else n
        )
    )
    with pytest.raises(ValueError, match="attention scales"):
        fuse_decoder_layers(scaled, "decoder_step")
    open_mask = ir.Graph(
        step.name,
        step.inputs,
        step.weights,
        tuple(ir.Constant(c.name, np.zeros_like(c.data)) for c in step.constants),
        step.nodes,
        step.outputs,
        step.dims,
    )
    with pytest.raises(ValueError, match="causal mask"):
        fuse_decoder_layers(
            ir.Program(tuple(open_mask if x.name == step.name else x for x in p.graphs), p.dims), "decoder_step"
        )


def test_share_window_only_under_matrix_products():
    p = hoist_invariants(traced_tiny())
    shared = share_window(p, "decoder").graph("decoder")
    dec = p.graph("decoder")
    per_window = {o for o, _ in p.graph("cross_kv").outputs}
    for before, after in zip(dec.inputs, shared.inputs):
        want = (1, *before.type.shape[1:]) if before.name in per_window else before.type.shape
        assert after.type.shape == want, before.name
    assert shared.nodes == dec.nodes
    with pytest.raises(ValueError, match="no inputs computed by"):
        share_window(p, "encoder")
    # anything but a matrix product (which broadcasts a leading 1) reading a shared value: refused
    name = next(v.name for v in dec.inputs if v.name in per_window)
    reader = ir.Node("peek", "aten.mul.Tensor", (name,), (("other", 2.0),), dec.types()[name], "x")
    broken = ir.Graph(dec.name, dec.inputs, dec.weights, dec.constants, dec.nodes + (reader,), dec.outputs, dec.dims)
    with pytest.raises(ValueError, match="only matrix products"):
        share_window(ir.Program(tuple(broken if g.name == "decoder" else g for g in p.graphs), p.dims), "decoder")


def test_specialise_rejects_unknown_or_out_of_range_dims():
    p = traced_tiny()
    with pytest.raises(ValueError, match="no dims"):
        specialise(p, "decoder", {"frames": 1}, "x")
    with pytest.raises(ValueError, match="outside"):
        specialise(p, "decoder", {"n": 0}, "x")


def test_in_place_cache_needs_a_grown_cache_and_one_writer():
    p = specialise(traced_tiny(), "decoder", {"batch": 1, "n": 1}, "step")
    with pytest.raises(ValueError, match="no cache input grown"):
        in_place_cache(p, "encoder")
    step = in_place_cache(p, "step").graph("step")
    with pytest.raises(ValueError, match="already has"):
        in_place_cache(ir.Program((step,), p.dims), "step")
    # a second reader of a state input would see it before or after the write: refused
    state, writer = next(iter(step.state_inputs().items()))
    reader = ir.Node("peek", "aten.mul.Tensor", (state,), (("other", 2.0),), step.types()[state], "x")
    broken = ir.Graph(
        step.name, step.inputs, step.weights, step.constants, step.nodes + (reader,), step.outputs, step.dims
    )
    with pytest.raises(ValueError, match="only the writer may read it"):
        broken.validate()


def test_optimised_program_round_trips_through_onnx():
    p = optimised_tiny()
    files = onnx_io.to_onnx_files(p)
    for data in files.values():
        onnx.checker.check_model(onnx.load_from_string(data))
    assert ir.format_program(onnx_io.from_onnx_files(files)) == ir.format_program(p)


def test_store_weights_keeps_matrices_in_bfloat16_and_computes_in_float32():
    before = optimised_tiny()
    after = store_weights(before)
    matrices = {w.name for g in before.graphs for w in g.weights if len(w.type.shape) >= 2}
    for g0, g in zip(before.graphs, after.graphs):
        types = {w.name: w.type for w in g.weights}
        for name, t in types.items():  # stored matrices bfloat16; widened ones float32; the rest as before
            src = widened_source(name)
            assert t.dtype == ("float32" if src or name not in matrices else "bfloat16"), name
            assert src is None or src in matrices
        assert {widened_source(n) or n for n in types} == {w.name for w in g0.weights}
        casts = [n for n in g.nodes if n.op == ir.CAST]
        assert all(n.attr("dtype") == "float32" and n.type.dtype == "float32" for n in casts)
        # only casts are new; every other node keeps its op and shape (a lookup's rows are renamed,
        # its cast takes its name)
        kept = [n for n in g.nodes if n.op != ir.CAST]
        assert [(n.name.removesuffix("/bfloat16"), n.op, n.type.shape) for n in kept] == [
            (n.name, n.op, n.type.shape) for n in g0.nodes
        ]
        assert {n.name for n in g0.nodes} <= {n.name for n in g.nodes}
        for n in g.nodes:  # the table lookup gathers stored rows, then casts those rows only
            if n.op == "aten.embedding.default":
                assert n.type.dtype == "bfloat16" and types[n.inputs[0]].dtype == "bfloat16"
            elif n.op == ir.DECODER_LAYER:  # its kernel reads the block's matrices as stored
                assert all(
                    types[i].dtype == ("bfloat16" if i in matrices else "float32") for i in n.inputs if i in types
                ), n.name
            elif n.op != ir.CAST:
                assert all(types[i].dtype == "float32" for i in n.inputs if i in types), n.name
        # a stored matrix is read through a cast only by products of rows of one position each
        # (decoder_step, decoder_rows, the prompt's last position in decoder) and by linear layers
        # of many rows whose weight fits the bfloat16 kernel; everything else reads its widened copy
        readers = {c.name: [m for m in g.nodes if c.name in m.inputs] for c in casts if c.inputs[0] in types}
        for users in readers.values():
            assert users and all(m.op in ("aten.linear.default", "aten.transpose.int") for m in users)
        if g.name in ("decoder_step", "decoder_rows"):
            assert not any(widened_source(n) for n in types if n != "decoder.positional_embedding/widened")
        last = {c.inputs[0] for c in casts if any(m.op == "aten.transpose.int" for m in readers.get(c.name, []))}
        assert last == (
            {"decoder.token_embedding.weight"} if g.name in ("decoder", "decoder_step", "decoder_rows") else set()
        ), g.name
        if g.name in ("encoder", "decoder"):
            many_rows = {c.inputs[0] for c in casts if c.inputs[0] in types} - last
            assert many_rows == {
                w
                for w in types
                if ir.bfloat16_product_fits(types[w].shape)
                and any(m.op == "aten.linear.default" and m.inputs[1] == f"{w}/float32" for m in g.nodes)
            }
            assert many_rows and all(types[w].shape[0] % 64 == 0 for w in many_rows)  # the tiny MLP's fc1 (64, 16)
    # one stored dtype per weight; widened weights stand for their bfloat16 source
    assert after.stored_weights() == {n: ("bfloat16" if n in matrices else "float32") for n in before.weight_names()}
    assert ir.format_program(onnx_io.from_onnx_files(onnx_io.to_onnx_files(after))) == ir.format_program(after)
    assert ir.format_program(store_weights(after)) == ir.format_program(after)
    with pytest.raises(ValueError, match="int8"):
        store_weights(before, "int8")


def test_store_weights_float16_keeps_the_step_matrices_that_float16_holds():
    """float16 storage of a float32 package: of the matrices a float16 holds exactly, those a
    decoder step reads as stored (the blocks' matrices, the vocabulary product) are stored; the
    encoder's stay float32, a prompt's products of many rows read the widened copy, and a matrix
    not named exact stays float32 everywhere."""
    before = optimised_tiny()
    matrices = {w.name for g in before.graphs for w in g.weights if len(w.type.shape) >= 2}
    inexact = "decoder.blocks.0.mlp.0.weight"
    assert inexact in matrices
    after = store_weights(before, "float16", exact=frozenset(matrices - {inexact}))
    stored = {n for n, dt in after.stored_weights().items() if dt == "float16"}
    assert stored and not any(n.startswith("encoder.") for n in stored) and inexact not in stored
    assert "decoder.token_embedding.weight" in stored and "decoder.positional_embedding" not in stored
    step = after.graph("decoder_rows")
    layers = [n for n in step.nodes if n.op == ir.DECODER_LAYER]
    types = {w.name: w.type.dtype for w in step.weights}
    assert layers and {i for n in layers for i in n.inputs if types.get(i) == "float16"} == {
        i for n in layers for i in n.inputs if i in stored
    }
    assert not any(widened_source(n) for n in types if n != "decoder.positional_embedding/widened")
    prompt = after.graph("decoder")
    ptypes = {w.name: w.type.dtype for w in prompt.weights}
    linears = [n for n in prompt.nodes if n.op == "aten.linear.default"]
    for n in linears:  # many rows: the widened copy; one position per row: the stored weight through a cast
        src = n.inputs[1].removesuffix("/widened").removesuffix("/float32")
        if src in stored:
            assert n.inputs[1] == src + ("/float32" if ir.one_position_per_row(prompt, n.inputs[0]) else "/widened"), (
                n.name
            )
    assert any(n.inputs[1].endswith("/widened") for n in linears)
    assert ptypes.get(inexact) == "float32" and all(widened_source(w) in stored for w in ptypes if widened_source(w))
    assert ir.format_program(onnx_io.from_onnx_files(onnx_io.to_onnx_files(after))) == ir.format_program(after)
    with pytest.raises(ValueError, match="exact"):
        store_weights(before, "float16")


def test_panel_products_give_the_step_products_weight_panels():
    """Each product of one position per row outside the fused blocks (the tied vocabulary
    projection of the step graphs) becomes linear_panels on `W/panels`, and each fused block
    reads its eight matrices as panels, in float32 and float16 packages alike (one float32
    matrix among float16 ones here); so does each linear layer of many rows with a float32
    weight (the encoder's, cross K/V's), so no float32 product is left to MAX's matmul; the
    stored weights are the same (panels are made at load), and the IR round-trips through ONNX;
    bfloat16 weights keep their kernels unless asked (targets without AMX), then panels too,
    except the encoder's products of many rows, which keep their bfloat16 kernels."""
    base = optimised_tiny()
    vocab, d = "decoder.token_embedding.weight", TINY_DIMS["n_text_state"]
    f16 = store_weights(
        base,
        "float16",
        exact=frozenset(w.name for g in base.graphs for w in g.weights if w.name != "decoder.blocks.1.mlp.0.weight"),
    )
    for before in (base, f16):
        after = panel_products(before)
        assert after.stored_weights() == before.stored_weights()
        for name in ("decoder_step", "decoder_rows"):
            g = after.graph(name)
            products = [n for n in g.nodes if n.op == ir.LINEAR_PANELS]
            assert [n.inputs[1] for n in products] == [vocab + PANELS]
            assert not any(
                n.op in ("aten.matmul.default", "aten.transpose.int", ir.CAST) and vocab in n.inputs[0] for n in g.nodes
            )
            panels = {w.name: w.type for w in g.weights if panels_source(w.name)}
            dtype = before.stored_weights()[vocab]
            assert panels[vocab + PANELS] == ir.TensorType(dtype, (-(-TINY_DIMS["n_vocab"] // 64), d, 64))
            layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
            matrices = {n.inputs[i] for n in layers for i in LAYER_MATRICES}
            assert layers and len(matrices) == 8 * len(layers) and matrices | {vocab + PANELS} == set(panels)
            fc1 = f"decoder.blocks.0.mlp.0.weight{PANELS}"
            assert (
                panels[fc1].shape == (4 * d // 64, d, 64)
                and panels[fc1].dtype == before.stored_weights()[fc1.removesuffix(PANELS)]
            )
            assert products[0].type == next(n for n in before.graph(name).nodes if n.name == products[0].name).type
        for name in ("encoder", "cross_kv"):
            linears = [n for n in before.graph(name).nodes if n.op == "aten.linear.default"]
            g = after.graph(name)
            types = g.types()
            products = {n.name: n for n in g.nodes if n.op == ir.LINEAR_PANELS}
            assert linears and set(products) == {n.name for n in linears}, name
            assert not any(n.op == "aten.linear.default" for n in g.nodes)
            for n in linears:
                w = products[n.name].inputs[1]
                assert w == n.inputs[1] + PANELS and types[w].dtype == "float32"
                assert before.graph(name).types()[n.inputs[1]].dtype == "float32"
        assert ir.format_program(panel_products(after)) == ir.format_program(after)
        assert ir.format_program(onnx_io.from_onnx_files(onnx_io.to_onnx_files(after))) == ir.format_program(after)
    bf16 = store_weights(base)  # on AMX targets bfloat16 weights keep their kernels; elsewhere panels
    assert ir.format_program(panel_products(bf16)) == ir.format_program(bf16)
    after = panel_products(bf16, bfloat16=True)
    assert after.stored_weights() == bf16.stored_weights()
    for name in ("decoder_step", "decoder_rows"):
        g = after.graph(name)
        panels = {w.name: w.type for w in g.weights if panels_source(w.name)}
        layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
        assert [n.inputs[1] for n in g.nodes if n.op == ir.LINEAR_PANELS] == [vocab + PANELS]
        assert {n.inputs[i] for n in layers for i in LAYER_MATRICES} | {vocab + PANELS} == set(panels)
        assert {t.dtype for t in panels.values()} == {"bfloat16"}
    assert ir.format_graph(after.graph("encoder")) == ir.format_graph(bf16.graph("encoder"))
    # AVX512_BF16 without AMX: pair panels, the same products on VDPBF16PS
    paired = panel_products(bf16, bfloat16=True, pairs=True)
    assert paired.stored_weights() == bf16.stored_weights()
    for name in ("decoder_step", "decoder_rows"):
        g = paired.graph(name)
        pairs = {w.name: w.type for w in g.weights if pairs_source(w.name)}
        layers = [n for n in g.nodes if n.op == ir.DECODER_LAYER]
        assert not any(n.op == ir.LINEAR_PANELS or panels_source(w.name) for n in g.nodes for w in g.weights)
        assert [n.inputs[1] for n in g.nodes if n.op == ir.LINEAR_PAIRS] == [vocab + PAIRS]
        assert {n.inputs[i] for n in layers for i in LAYER_MATRICES} | {vocab + PAIRS} == set(pairs)
        assert pairs[vocab + PAIRS] == ir.TensorType("bfloat16", (-(-TINY_DIMS["n_vocab"] // 64), d // 2, 64, 2))
    assert ir.format_graph(paired.graph("encoder")) == ir.format_graph(bf16.graph("encoder"))
    assert ir.format_program(onnx_io.from_onnx_files(onnx_io.to_onnx_files(paired))) == ir.format_program(paired)


def test_store_cross_kv_gives_the_steps_bfloat16_keys_and_values():
    """store_cross_kv: cross_kv rounds the per-window keys and values decoder_rows reads to
    bfloat16 (a cast at its end, under the same output names); every graph taking them takes
    them as bfloat16, the fused blocks as they are, any other reader (the general decoder's
    products) through one cast to float32; cross_kv's unsplit outputs stay float32. Refused
    twice, and for another dtype."""
    before = store_weights(optimised_tiny())
    after = store_cross_kv(before)
    rows = after.graph("decoder_rows")
    stored = {v.name for v in rows.inputs if v.type.shape[:1] == ("windows",)}
    assert stored and all(v.type.dtype == "bfloat16" for v in rows.inputs if v.name in stored)
    kv = after.graph("cross_kv")
    types, producers = kv.types(), {n.name: n for n in kv.nodes}
    for name, value in kv.outputs:
        if name in stored:
            cast = producers[value]
            assert cast.op == ir.CAST and cast.attr("dtype") == "bfloat16" and types[value].dtype == "bfloat16"
            assert cast.inputs[0] == dict(before.graph("cross_kv").outputs)[name]
        else:
            assert types[value].dtype == "float32" and value == dict(before.graph("cross_kv").outputs)[name]
    for g in after.graphs:
        if g.name == "cross_kv":  # its own nodes of those names compute them
            continue
        takes = {v.name for v in g.inputs} & stored
        for n in g.nodes:
            if n.op == ir.DECODER_LAYER:
                continue
            assert not set(n.inputs) & stored or (n.op == ir.CAST and n.attr("dtype") == "float32"), (g.name, n.name)
        if takes and g.name != "decoder_rows":
            assert all(v.type.dtype == "bfloat16" for v in g.inputs if v.name in takes)
    assert any(n.op == ir.CAST and n.inputs[0] in stored for n in after.graph("decoder").nodes)
    assert ir.format_program(onnx_io.from_onnx_files(onnx_io.to_onnx_files(after))) == ir.format_program(after)
    with pytest.raises(ValueError, match="not float32"):
        store_cross_kv(after)
    with pytest.raises(ValueError, match="bfloat16 only"):
        store_cross_kv(before, "float16")


def test_fuse_encoder_attention_replaces_each_blocks_chain():
    """Each encoder block's qkv_attention (view, permute, scale, matmul, softmax, matmul, permute,
    flatten) becomes one attention_bf16 node on the three linear outputs, nothing else changes;
    a chain that differs (here: another head size) is refused with the reason."""
    p = store_weights(optimised_tiny())
    hd = TINY_DIMS["n_audio_state"] // TINY_DIMS["n_audio_head"]
    fused = fuse_encoder_attention(p, head_dim=hd)
    before, after = p.graph("encoder"), fused.graph("encoder")
    att = [n for n in after.nodes if n.op == ir.ATTENTION_BF16]
    assert len(att) == TINY_DIMS["n_audio_layer"]
    assert not any(n.op in ("aten.softmax.int", "aten.matmul.default") for n in after.nodes)
    for i, n in enumerate(att):
        assert n.inputs == tuple(f"encoder.blocks.{i}.attn.{w}/linear" for w in ("query", "key", "value"))
        assert n.attr("heads") == TINY_DIMS["n_audio_head"] and n.attr("scale") == pytest.approx(hd**-0.25)
        assert n.name == f"encoder.blocks.{i}.attn/flatten"  # its readers are unchanged
    assert len(before.nodes) - len(after.nodes) == 13 * len(att)
    assert [g for g in fused.graphs if g.name != "encoder"] == [g for g in p.graphs if g.name != "encoder"]
    with pytest.raises(ValueError, match="no attention matched"):
        fuse_encoder_attention(p, head_dim=64)
    # what needs AVX512_BF16 (convert.require_cpu_features): bfloat16 products of many rows, the attention
    assert ir.uses_bfloat16_arithmetic(p) and ir.uses_bfloat16_arithmetic(fused)
    assert not ir.uses_bfloat16_arithmetic(optimised_tiny())
    # float32 packages: the same chain as the float32 kernel's node; none matched is no error there
    f32 = optimised_tiny()
    fused32 = fuse_encoder_attention(f32, head_dim=hd, op=ir.ATTENTION)
    assert [n.inputs for n in fused32.graph("encoder").nodes if n.op == ir.ATTENTION] == [n.inputs for n in att]
    assert not ir.uses_bfloat16_arithmetic(fused32)
    assert fuse_encoder_attention(f32, head_dim=64, op=ir.ATTENTION, require=False) is f32
    with pytest.raises(ValueError, match="not an attention op"):
        fuse_encoder_attention(f32, op=ir.LINEAR_PANELS)


def test_select_kernels_gives_every_stored_weight_product_to_a_kernel():
    """Lowering's kernel choice, as a pass on the package's target-neutral IR: every product of
    a stored weight becomes one of our kernels reading the weight as stored (its cast dropped),
    the encoder's float32 products stay MAX's, and choosing twice changes nothing."""
    from whisper_max.converter.passes.kernels import select_kernels
    from whisper_max.runtime.manifest import Target

    avx2 = Target("cpu", "x86_64", ("avx2", "fma"))
    names = frozenset(state_dict_np(tiny_whisper()))
    program = store_weights(optimised_tiny(), "float16", exact=names)  # the step matrices stored as float16
    chose = set()
    for g in program.graphs:
        chosen = select_kernels(g, avx2)
        weights = {w.name: w.type.dtype for w in g.weights}
        producers = {n.name: n for n in chosen.nodes}
        for n in chosen.nodes:
            chose.add((g.name, n.op))
            if n.op in ("aten.linear.default", "aten.matmul.default"):  # no product reads a stored weight
                src = producers.get(n.inputs[1])
                assert not (src is not None and src.op == ir.CAST), (g.name, n.name)
            if n.op == ir.LINEAR_ROWS:
                assert n.inputs[1] in weights, (g.name, n.name)
        assert ir.format_graph(select_kernels(chosen, avx2)) == ir.format_graph(chosen)
    assert {("decoder_step", ir.LINEAR_ROWS), ("decoder_rows", ir.LINEAR_ROWS)} <= chose  # the tied vocabulary
    assert ("encoder", "aten.linear.default") in chose  # many rows, float32: MAX's matmul
    assert not {op for _, op in chose} & {ir.LINEAR_ROWS_AMX, ir.LINEAR_AMX, ir.LINEAR_BF16, ir.ATTENTION_AMX}
