"""The decoder graphs and the fused decoder block: cross K/V, cached steps, the specialised
one-token step, rows of one and of many windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BF16_TARGETS, needs_bf16
from helpers.op_module import (
    TOL,
    close,
    decode_in_chunks,
    round_bf16,
    runner,
    same_bits_in_any_batch,
)
from helpers.tiny_model import TINY_DIMS

from whisper_max.converter.ir import graph_signature
from whisper_max.converter.parity import empty_cache
from whisper_max.runtime.model import WhisperModel
from whisper_max.runtime.program import StepCache, decoder_call, state_specs
from whisper_max.runtime.weights import from_bfloat16


def test_cross_kv(compiled):
    model, _, _, models, _ = compiled
    xa = (
        np.random.default_rng(1)
        .standard_normal((2, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"]))
        .astype(np.float32)
    )
    outs = models["cross_kv"].execute(xa)
    with torch.no_grad():
        for i, b in enumerate(model.decoder.blocks):
            close(outs[2 * i].to_numpy(), b.cross_attn.key(torch.from_numpy(xa)).numpy())
            close(outs[2 * i + 1].to_numpy(), b.cross_attn.value(torch.from_numpy(xa)).numpy())


@pytest.mark.parametrize("chunks", [[5], [1, 1, 1, 1, 1], [1, 2, 2], [3, 1, 1], [2, 3]])
def test_decoder_step_with_cache(compiled, chunks):
    """Prefill and incremental calls (embedding, offset positions, offset causal mask, cache concat)
    give the logits of a full-sequence openai-whisper decoder pass, for batch 2."""
    model, _, program, models, _ = compiled
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, TINY_DIMS["n_vocab"], (2, sum(chunks))).astype(np.int64)
    xa = rng.standard_normal((2, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
    with torch.no_grad():
        ref = model.decoder(torch.from_numpy(tokens), torch.from_numpy(xa)).numpy()
    for pos, logits in decode_in_chunks(program, models, tokens, xa, chunks):
        close(logits, ref[:, pos - 1])


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [3, 1, 1, 1]])
def test_specialised_single_token_step(compiled, chunks):
    """decoder_step (batch 1, one token, matrix-vector lowering) continues the general decoder's
    cache and gives openai-whisper's logits."""
    model, _, program, models, _ = compiled
    assert {v.type.shape[:2] for v in program.graph("decoder_step").inputs if v.name == "tokens"} == {(1, 1)}
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, TINY_DIMS["n_vocab"], (1, sum(chunks))).astype(np.int64)
    xa = rng.standard_normal((1, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
    with torch.no_grad():
        ref = model.decoder(torch.from_numpy(tokens), torch.from_numpy(xa)).numpy()
    for pos, logits in decode_in_chunks(program, models, tokens, xa, chunks, step_graph=True):
        close(logits, ref[:, pos - 1])


def test_rows_share_one_window_and_reorder_in_place(compiled):
    """decoder_rows: rows of one window (beams) continue a one-row prompt against one copy of the
    window's cross K/V, each row giving openai-whisper's logits for its own tokens; reordering
    the rows (rows continue from any row, repeats allowed) moves their caches in place."""
    model, _, program, models, _ = compiled
    rng = np.random.default_rng(5)
    rows, v = 3, TINY_DIMS["n_vocab"]
    xa = rng.standard_normal((1, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
    run, cross = runner(program, models, xa)
    assert all(c.shape[0] == 1 for c in cross.values())
    steps = {"decoder_rows": state_specs(graph_signature(program.graph("decoder_rows")))}
    seqs = rng.integers(0, v, (1, 3)).astype(np.int64)
    _, cache, _ = decoder_call(run, steps, seqs, empty_cache(program.graph("decoder"), 1), cross)
    seqs = np.repeat(seqs, rows, axis=0)
    for _ in range(4):
        new = rng.integers(0, v, (rows, 1)).astype(np.int64)
        select = {
            "rules": np.zeros((rows, 9), np.int32),
            "suppress": np.array([3, 7], np.int32),
            "sampling": np.zeros((rows, 2), np.float32),
            "slots": np.zeros(4, np.int32),
        }
        logits, cache, choice = decoder_call(run, steps, new, cache, cross, select)
        assert isinstance(cache, StepCache) and (cache.graph, cache.rows) == ("decoder_rows", rows)
        # the choice made in the same graph call is the select graph's on those logits
        np.testing.assert_array_equal(choice, run("select", {"logits": logits, **select})["choice"].to_numpy())
        seqs = np.concatenate([seqs, new], axis=1)
        with torch.no_grad():
            ref = model.decoder(torch.from_numpy(seqs), torch.from_numpy(np.repeat(xa, rows, axis=0))).numpy()
        close(logits, ref[:, -1])
        order = rng.integers(0, rows, rows)
        assert WhisperModel.select(cache, order) is cache
        seqs = seqs[order]


def test_rows_of_many_windows_in_one_call(compiled):
    """decoder_rows as the engine calls it (runtime.pool.RowPool): rows of three windows, with
    prompts of different lengths, at different positions, in cache slots of one pool (ten beams
    of one window sharing its prompt's slot through their lineage), in one call. Each row's
    logits are openai-whisper's for its own tokens and window, and bit for bit what the call
    gives for that window's rows alone, and for one of the ten alone: the kernel reads a window's
    keys one way for a few rows and another for many (decoder_layer's STREAM_ROWS), the same
    sums either way."""
    from max.driver import Buffer

    model, _, program, models, _ = compiled
    rng = np.random.default_rng(11)
    v, cap = TINY_DIMS["n_vocab"], TINY_DIMS["n_text_ctx"]
    xas = [
        rng.standard_normal((1, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
        for _ in range(3)
    ]
    runs = [runner(program, models, xa) for xa in xas]
    run = runs[0][0]
    sig = graph_signature(program.graph("decoder_rows"))
    caches = [i for i in sig.inputs if i.state is not None]
    cross_names = [i.name for i in sig.inputs if i.shape[0] == "windows"]
    windows = {k: np.concatenate([r[1][k].to_numpy() for r in runs]) for k in cross_names}
    beams = 10  # window 2's rows: more than STREAM_ROWS
    slots = 2 + beams
    pool = {i.name: np.zeros([slots, *i.shape[1:]], np.float32) for i in caches}
    buffers = {k: Buffer.from_numpy(a) for k, a in pool.items()}  # written in place by the graph
    prompts = [rng.integers(0, v, (1, n)).astype(np.int64) for n in (2, 5, 3)]
    # rows: (window, prompt slot, own slot); window 2 decodes `beams` rows
    rows = [(0, 0, 0), (1, 1, 1)] + [(2, 2, 2 + b) for b in range(beams)]
    for w, (prompt, (_, cross)) in enumerate(zip(prompts, runs)):
        _, cache, _ = decoder_call(run, {}, prompt, empty_cache(program.graph("decoder"), 1), cross)
        for i in caches:
            pool[i.name][w, :, : prompt.shape[1]] = cache[i.name].to_numpy()[0]
    seqs = [prompts[w][0].tolist() for w, _, _ in rows]
    lineage = np.array([[own] * cap for _, _, own in rows], np.int32)
    for r, (w, shared, _) in enumerate(rows):
        lineage[r, : prompts[w].shape[1]] = shared

    def call(members, tokens):
        pos = np.array([len(seqs[r]) for r in members], np.int64)
        feeds = {
            "tokens": tokens,
            "past": pos,
            **buffers,
            **windows,
            "lineage": np.ascontiguousarray(lineage[members]),
            "window": np.array([rows[r][0] for r in members], np.int32),
            "rules": np.zeros((len(members), 9), np.int32),
            "suppress": np.zeros(0, np.int32),
            "sampling": np.zeros((len(members), 2), np.float32),
            "slots": np.zeros(1, np.int32),
            "logit_rows": np.arange(len(members), dtype=np.int64),
        }
        return run("decoder_rows", feeds)["logits"].to_numpy()

    for _ in range(3):
        new = rng.integers(0, v, (len(rows), 1)).astype(np.int64)
        snapshot = {k: a.copy() for k, a in pool.items()}
        together = call(list(range(len(rows))), new)
        for members in ([0], [1], [2], [5], list(range(2, 2 + beams))):
            after = {k: a.copy() for k, a in pool.items()}
            for k in pool:
                pool[k][...] = snapshot[k]
            alone = call(members, new[members])
            np.testing.assert_array_equal(alone, together[members])
            for k in pool:
                pool[k][...] = after[k]
        for r, (w, _, _) in enumerate(rows):
            seqs[r].append(int(new[r, 0]))
            with torch.no_grad():
                ref = model.decoder(torch.tensor([seqs[r]]), torch.from_numpy(xas[w])).numpy()
            close(together[r], ref[0, -1])


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_decoder_step_rows(compiled, kind):
    """Products of one position per row (decoder steps, beams, the engine's rows) with a bfloat16
    weight: on AMX tiles (whisper_max.linear_rows_amx) x is rounded to bfloat16 and the weight
    read as stored; on VDPBF16PS CPUs (whisper_max.linear_rows) the weight is widened exactly
    and x kept in float32. Either way a row's result is bit-identical for M = 1..64 and in any
    place among the rows, a last partial block of weight rows included."""
    *_, models, weights = compiled
    model = models[f"steps_{kind}"]
    x = np.random.default_rng(12).standard_normal((64, 1, 96)).astype(np.float32)
    full = same_bits_in_any_batch(model, x, seed=13)
    w = from_bfloat16(weights["w3"]).astype(np.float64)
    exact = x.astype(np.float64) @ w.T + weights["b3"]
    if kind == "amx":
        close(full, round_bf16(x).astype(np.float64) @ w.T + weights["b3"])
        assert np.abs(full - exact).max() / np.abs(exact).max() > 10 * TOL  # x was rounded
    else:
        close(full, exact)
