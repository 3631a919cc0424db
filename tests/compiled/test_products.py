"""Products of rows with stored weights: float32, float16 and bfloat16 panels, the bfloat16
kernels (VDPBF16PS, AMX); each row the same bits in any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BF16_TARGETS, needs_bf16
from helpers.op_module import (
    ATTENTION_SHAPE,
    PANEL_KINDS,
    TOL,
    bf16_product_graphs,
    close,
    decode_in_chunks,
    round_bf16,
    same_bits_in_any_batch,
)
from helpers.tiny_model import TINY_DIMS, tiny_whisper
from max.dtype import DType

from whisper_max.converter import ir
from whisper_max.converter.lower import compile_with_kernels, lower_graph
from whisper_max.runtime.manifest import Target
from whisper_max.runtime.weights import from_bfloat16, to_bfloat16


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_product_of_many_rows(compiled, kind):
    """A linear layer of many rows with a bfloat16 weight runs as our bfloat16 kernel of the
    target's kind (whisper_max.linear_amx on AMX tiles, linear_bf16 on VDPBF16PS): x rounded to
    bfloat16 (ties to even), exact pair products, float32 sums, bias added; a weight whose shape
    the kernel cannot take is read widened, in float32."""
    *_, models, weights = compiled
    g = bf16_product_graphs()[0].graphs[0]
    assert next(n for n in g.nodes if n.name == "fits").inputs[1] == "w/float32"  # read as stored
    assert "w2/widened" in next(n for n in g.nodes if n.name == "widened").inputs
    x = np.random.default_rng(8).standard_normal((2, 7, 96)).astype(np.float32)
    qkv = np.random.default_rng(9).standard_normal((3, *ATTENTION_SHAPE)).astype(np.float32)
    y, y2, _ = (t.to_numpy() for t in models[f"products_{kind}"].execute(x, *qkv))
    w = from_bfloat16(weights["w"]).astype(np.float64)
    ref = round_bf16(x).astype(np.float64) @ w.T + weights["b"]
    close(y, ref)
    unrounded = x.astype(np.float64) @ w.T + weights["b"]
    assert np.abs(y - unrounded).max() / np.abs(unrounded).max() > 10 * TOL  # x was rounded
    close(y2, x.astype(np.float64) @ from_bfloat16(weights["w2"]).astype(np.float64).T)


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_rows_are_the_same_in_any_batch(compiled, kind):
    """A row's bfloat16 product is bit-identical whatever the number of rows it is computed
    with (M = 1..64) and its place among them (a permutation): one instruction path and one k
    order for every M, the last partial block of rows included."""
    *_, models, _ = compiled
    model = models[f"rows_{kind}"]
    x = np.random.default_rng(10).standard_normal((64, 96)).astype(np.float32)
    full = same_bits_in_any_batch(model, x, seed=11)
    close(
        full,
        round_bf16(x).astype(np.float64) @ from_bfloat16(compiled[4]["w"]).astype(np.float64).T + compiled[4]["b"],
    )


@pytest.mark.parametrize("dtype", PANEL_KINDS)
def test_panel_products_rows_are_the_same_in_any_batch(compiled, dtype):
    """whisper_max.linear_panels (products of one position per row, the weight in panels): a
    row's result is bit-identical for M = 1..64 and in any place among the rows (one instruction
    path and one k order for every M, tiles of rows and their rest), also among the many rows of
    an encoder's product, which the kernel takes in chunks of 96 (rows.CHUNK_ROWS); a float16 or
    bfloat16 weight gives the float32 one's bits, and the sums are the exact ones within float32
    rounding."""
    *_, models, weights = compiled
    model = models[f"panels_{dtype}"]
    many = np.random.default_rng(16).standard_normal((250, 1, 72)).astype(np.float32)
    x = many[:64]
    full = same_bits_in_any_batch(model, x, seed=17)
    rows = model.execute(many)[0].to_numpy()
    assert np.array_equal(rows[:64], full)
    for m in (95, 96, 97, 192, 193):
        assert np.array_equal(model.execute(np.ascontiguousarray(many[:m]))[0].to_numpy(), rows[:m]), f"{m} rows"
    perm = np.random.default_rng(18).permutation(250)
    assert np.array_equal(model.execute(np.ascontiguousarray(many[perm]))[0].to_numpy(), rows[perm])
    assert np.array_equal(full, models["panels_float32"].execute(x)[0].to_numpy())
    w = weights["w_float32"].astype(np.float64)
    as_array = lambda a: from_bfloat16(a) if dtype == "bfloat16" else a  # noqa: E731
    np.testing.assert_array_equal(
        as_array(weights[f"w_{dtype}/panels"])[1, :, :16], as_array(weights[f"w_{dtype}"])[64:].T
    )
    close(full, x.astype(np.float64) @ w.T + weights["b_panels"])


@needs_bf16
def test_pair_products_rows_are_the_same_in_any_batch(compiled):
    """whisper_max.linear_pairs (a bfloat16 weight in pair panels, VDPBF16PS: the steps of a
    bfloat16 package on AVX512_BF16 without AMX): a row's result is bit-identical for M = 1..64,
    in any place among the rows and in any chunk of 96 rows; x is rounded to bfloat16 (ties to
    even), the pair products are exact and summed in float32, then the bias."""
    *_, models, weights = compiled
    model = models["pairs_bfloat16"]
    many = np.random.default_rng(19).standard_normal((250, 1, 72)).astype(np.float32)
    full = same_bits_in_any_batch(model, many[:64], seed=20)
    rows = model.execute(many)[0].to_numpy()
    assert np.array_equal(rows[:64], full)
    for m in (95, 96, 97, 192, 193):
        assert np.array_equal(model.execute(np.ascontiguousarray(many[:m]))[0].to_numpy(), rows[:m]), f"{m} rows"
    perm = np.random.default_rng(21).permutation(250)
    assert np.array_equal(model.execute(np.ascontiguousarray(many[perm]))[0].to_numpy(), rows[perm])
    w = from_bfloat16(weights["w_bfloat16"]).astype(np.float64)
    pairs = from_bfloat16(weights["w_bfloat16/pairs"])  # (2, 36, 64, 2): columns 64.. of the second panel
    np.testing.assert_array_equal(pairs[1, :, :16, :], w[64:].reshape(16, 36, 2).transpose(1, 0, 2))
    assert not pairs[1, :, 16:].any()  # zero columns after n
    ref = round_bf16(many).astype(np.float64) @ w.T + weights["b_panels"]
    close(rows, ref)
    unrounded = many.astype(np.float64) @ w.T + weights["b_panels"]
    assert np.abs(rows - unrounded).max() / np.abs(unrounded).max() > 10 * TOL  # x was rounded


def test_float32_values_are_rounded_to_bfloat16_to_nearest_even(compiled):
    """A cast to bfloat16 (a bfloat16 package's cross keys and values, passes.store_cross_kv) is
    our kernel whisper_max.to_bfloat16: every value rounded to nearest, ties to even, as
    runtime.weights.to_bfloat16 rounds (VCVTNEPS2BF16's result for finite values), over both
    workers' shares and a tail shorter than a vector; ties, signs, subnormals and the largest
    values included."""
    *_, models, _ = compiled
    rng = np.random.default_rng(22)
    special = np.array(
        [0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x00000001, 0x80400000, 0x7F7FFFFF, 0x7F7F7FFF, 0, 0x80000000],
        np.uint32,
    ).view(np.float32)
    x = np.concatenate([special, rng.standard_normal(200_003).astype(np.float32) * 1e3]).astype(np.float32)
    got = models["to_bfloat16"].execute(x)[0].view(DType.uint16).to_numpy()
    np.testing.assert_array_equal(got, to_bfloat16(x).view(DType.uint16).to_numpy())
    assert list(got[:4]) == [0x3F80, 0x3F82, 0xBF80, 0x3F80]  # ties to even, down and up


def test_amx_kernels_compile_on_any_cpu():
    """Our AMX kernels (tile instructions as inline assembly) compile on every CPU the suite runs
    on, so a change to them fails here too; they run, against numpy, only where the CPU has AMX
    (the bf16 product tests with kind "amx"). Compiled, never run: no tile instruction executes."""
    from max.engine import InferenceSession
    from max.graph import Module

    products, _ = bf16_product_graphs()
    host = Target.host()
    amx = Target(host.device, host.arch, (*host.without("amx_tile", "amx_bf16").features, "amx_tile", "amx_bf16"))
    mod = Module()
    for g in products.graphs:
        lower_graph(g, mod, name=f"{g.name}_amx_compiled", target=amx)
    assert compile_with_kernels(InferenceSession(), mod) is not None


def test_float16_stored_weights_give_the_float32_bits(compiled, compiled_float16):
    """A float32 package keeps the decoder step's matrices in float16 where float16 holds them
    exactly (half the bytes the step reads): the kernels widen each element exactly as they
    load it, so prompts and steps give the logits of the float32 program bit for bit."""
    program, models = compiled_float16
    stored = {k for k, dt in program.stored_weights().items() if dt == "float16"}
    assert "decoder.token_embedding.weight" in stored and "decoder.blocks.0.attn.query.weight" in stored
    assert not any(k.startswith("encoder.") for k in stored)
    _, _, program32, models32, _ = compiled
    rng = np.random.default_rng(14)
    tokens = rng.integers(0, TINY_DIMS["n_vocab"], (2, 6)).astype(np.int64)
    xa = rng.standard_normal((2, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
    for step_graph in (False, True):
        got = decode_in_chunks(program, models, tokens, xa, [3, 1, 1, 1], step_graph=step_graph)
        ref = decode_in_chunks(program32, models32, tokens, xa, [3, 1, 1, 1], step_graph=step_graph)
        for (pos, a), (_, b) in zip(got, ref):
            assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)), (
                f"position {pos}, step graph {step_graph}"
            )


@needs_bf16
def test_bfloat16_weights_compute_what_torch_computes_on_them(compiled_bf16):
    """Against openai-whisper on the rounded weights, to the bfloat16 package tolerances of
    golden/tolerances.json: the encoder and the general decoder, whose linear layers of many
    rows run in bfloat16 where the weight fits the kernel (here the MLPs' (64, 16) fc1), and the
    single-token step graphs, which read the window's cross keys and values stored in bfloat16
    (cross_kv rounds them; store_cross_kv) and, on AVX512_BF16 ("bf16"), the weights in pair
    panels with their rows rounded to bfloat16 (linear_pairs); on AMX the tiny model's width,
    16, is not a multiple of 32, so the steps read the weights widened
    (test_bfloat16_rows_on_amx checks the tile path). Neither is the float32 model: the
    rounding shows."""
    from whisper_max import golden

    kind, model, program, models = compiled_bf16
    pairs = [n for g in program.graphs for n in g.nodes if n.op == ir.LINEAR_PAIRS]
    assert bool(pairs) == (kind == "bf16")  # the vocabulary products of the step graphs
    layers = [n for g in program.graphs for n in g.nodes if n.op == ir.DECODER_LAYER]
    assert layers and all(n.inputs[6].endswith("/pairs") == (kind == "bf16") for n in layers)  # wq: all eight
    rng = np.random.default_rng(4)
    mel = rng.standard_normal((1, TINY_DIMS["n_mels"], 2 * TINY_DIMS["n_audio_ctx"])).astype(np.float32)
    with torch.no_grad():
        xa_ref = model.encoder(torch.from_numpy(mel))
        unrounded = tiny_whisper().encoder(torch.from_numpy(mel)).numpy()
    xa = models["encoder"].execute(mel)[0].to_numpy()
    close(xa, xa_ref.numpy(), golden.tolerance("encoder", "bfloat16")[0])
    assert np.abs(xa - unrounded).max() / np.abs(unrounded).max() > 10 * TOL
    tokens = rng.integers(0, TINY_DIMS["n_vocab"], (1, 5)).astype(np.int64)
    with torch.no_grad():
        ref = model.decoder(torch.from_numpy(tokens), xa_ref).numpy()
    for pos, logits in decode_in_chunks(program, models, tokens, xa_ref.numpy(), [2, 3]):
        close(logits, ref[:, pos - 1], golden.tolerance("logits", "bfloat16")[0])
    cross = [v for v in program.graph("decoder_rows").inputs if v.type.shape[:1] == ("windows",)]
    assert cross and all(v.type.dtype == "bfloat16" for v in cross)
    for pos, logits in decode_in_chunks(program, models, tokens, xa_ref.numpy(), [1, 1, 1, 1, 1], step_graph=True):
        close(logits, ref[:, pos - 1], golden.tolerance("logits", "bfloat16")[0])
