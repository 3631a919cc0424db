"""Op lowering on tiny random modules, compiled once per session as one MAX module.

Tolerance: 1e-5 of the reference tensor's largest magnitude. These are fp32 graphs of a few
16-wide layers; MAX and torch differ only by summation order (~1e-7 relative here), so 1e-5
catches any wrong op while leaving room for order effects.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import TINY_DIMS, state_dict_np, tiny_whisper
from torch import nn
from torch.export import Dim, export
from whisper.model import Conv1d, LayerNorm, Linear

from converter import ir
from converter.convert import graph_signature
from converter.lower import LoweringError, compile_with_kernels, lower_graph, register
from converter.parity import empty_cache
from converter.passes import optimise, store_weights
from converter.trace import to_ir, trace_program
from runtime.model import StepCache, WhisperModel, decoder_call, state_specs
from runtime.package import from_bfloat16, to_bfloat16, with_widened

TOL = 1e-5


def close(got, ref, tol=TOL):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= tol, f"max_rel_err {err:.3g} > {tol}"


class Micro(nn.Module):
    """Op variants whisper itself does not use: odd-length stride-2 conv, tanh GELU, no-bias linear."""

    def __init__(self):
        super().__init__()
        self.conv = Conv1d(4, 6, kernel_size=3, stride=2, padding=1)
        self.proj = Linear(6, 5, bias=False)
        self.norm = LayerNorm(5)

    def forward(self, x):
        h = F.gelu(self.conv(x), approximate="tanh").permute(0, 2, 1)
        y = self.norm(self.proj(h) * 0.5 + 1.0)
        return F.softmax(y - 2.0, dim=-1) / 3.0


@pytest.fixture(scope="session")
def compiled():
    from max.engine import InferenceSession
    from max.graph import Module

    torch.manual_seed(0)
    model = tiny_whisper()
    program = optimise(trace_program(model))  # the form packages ship
    micro = Micro().eval()
    with torch.no_grad():
        ep = export(micro, (torch.randn(2, 4, 9),), dynamic_shapes=({0: Dim("batch", min=2)},))
    micro_ir = to_ir(ep, "micro", ["x"], [{0: "batch"}], ["y"], {"batch": (1, None)})
    mod = Module()
    for g in program.graphs + (micro_ir,):
        lower_graph(g, mod)
    weights = state_dict_np(model) | {k: v.detach().numpy().copy() for k, v in micro.state_dict().items()}
    session = InferenceSession()
    models = session.init_all(compile_with_kernels(session, mod), weights_registry=weights)
    return model, micro, program, models, weights


def test_micro_ops(compiled):
    _, micro, _, models, _ = compiled
    for batch in (1, 3):  # traced at 2: the graph is symbolic in batch
        x = np.random.default_rng(batch).standard_normal((batch, 4, 9)).astype(np.float32)
        with torch.no_grad():
            ref = micro(torch.from_numpy(x)).numpy()
        close(models["micro"].execute(x)[0].to_numpy(), ref)


def test_encoder_conv_stem_attention_mlp(compiled):
    model, _, _, models, _ = compiled
    mel = np.random.default_rng(0).standard_normal((2, TINY_DIMS["n_mels"], 2 * TINY_DIMS["n_audio_ctx"])).astype(np.float32)
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(mel)).numpy()
    close(models["encoder"].execute(mel)[0].to_numpy(), ref)


def test_cross_kv(compiled):
    model, _, _, models, _ = compiled
    xa = np.random.default_rng(1).standard_normal((2, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
    outs = models["cross_kv"].execute(xa)
    with torch.no_grad():
        for i, b in enumerate(model.decoder.blocks):
            close(outs[2 * i].to_numpy(), b.cross_attn.key(torch.from_numpy(xa)).numpy())
            close(outs[2 * i + 1].to_numpy(), b.cross_attn.value(torch.from_numpy(xa)).numpy())


def _runner(program, models, xa):
    """`run(graph, feeds)` over the compiled graphs, and cross_kv's outputs for `xa`."""
    cross = models["cross_kv"].execute(xa)
    cross = {name: cross[i] for i, (name, _) in enumerate(program.graph("cross_kv").outputs)}

    def run(gname, feed):
        gi = program.graph(gname)
        outs = models[gname].execute(*[feed[v.name] for v in gi.inputs])
        return {name: outs[i] for i, (name, _) in enumerate(gi.outputs)}

    return run, cross


def _decode_in_chunks(program, models, tokens, xa, chunks, step_graph=False):
    """Logits of each chunk's last position, feeding each call's cache to the next, routed as the
    runtime routes them (runtime.model.decoder_call): with `step_graph`, single-token calls go
    to decoder_step, which grows the cache in place."""
    run, cross = _runner(program, models, xa)
    steps = {"decoder_step": state_specs(graph_signature(program.graph("decoder_step")))} if step_graph else {}
    cache = empty_cache(program.graph("decoder"), tokens.shape[0])
    pos, got = 0, []
    for n in chunks:
        logits, cache = decoder_call(run, steps, tokens[:, pos : pos + n], cache, cross)
        pos += n
        got.append((pos, logits))
        # head-major cache: (batch, heads, positions, head dim)
        h, d = TINY_DIMS["n_text_head"], TINY_DIMS["n_text_state"]
        held = cache.as_cache() if isinstance(cache, StepCache) else {k: v.to_numpy() for k, v in cache.items()}
        assert all(c.shape == (tokens.shape[0], h, pos, d // h) for c in held.values())
    return got


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
    for pos, logits in _decode_in_chunks(program, models, tokens, xa, chunks):
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
    for pos, logits in _decode_in_chunks(program, models, tokens, xa, chunks, step_graph=True):
        close(logits, ref[:, pos - 1])


def test_rows_share_one_window_and_reorder_in_place(compiled):
    """decoder_rows: rows of one window (beams) continue a one-row prompt against one copy of the
    window's cross K/V, each row giving openai-whisper's logits for its own tokens; reordering
    the rows (rows continue from any row, repeats allowed) moves their caches in place."""
    model, _, program, models, _ = compiled
    rng = np.random.default_rng(5)
    rows, v = 3, TINY_DIMS["n_vocab"]
    xa = rng.standard_normal((1, TINY_DIMS["n_audio_ctx"], TINY_DIMS["n_audio_state"])).astype(np.float32)
    run, cross = _runner(program, models, xa)
    assert all(c.shape[0] == 1 for c in cross.values())
    steps = {"decoder_rows": state_specs(graph_signature(program.graph("decoder_rows")))}
    seqs = rng.integers(0, v, (1, 3)).astype(np.int64)
    _, cache = decoder_call(run, steps, seqs, empty_cache(program.graph("decoder"), 1), cross)
    seqs = np.repeat(seqs, rows, axis=0)
    for _ in range(4):
        new = rng.integers(0, v, (rows, 1)).astype(np.int64)
        logits, cache = decoder_call(run, steps, new, cache, cross)
        assert isinstance(cache, StepCache) and (cache.graph, cache.rows) == ("decoder_rows", rows)
        seqs = np.concatenate([seqs, new], axis=1)
        with torch.no_grad():
            ref = model.decoder(torch.from_numpy(seqs), torch.from_numpy(np.repeat(xa, rows, axis=0))).numpy()
        close(logits, ref[:, -1])
        order = rng.integers(0, rows, rows)
        assert WhisperModel.select(cache, order) is cache
        seqs = seqs[order]


@pytest.fixture(scope="session")
def compiled_bf16():
    """The tiny program with bfloat16-stored weights, and openai-whisper on the same rounded weights."""
    from max.engine import InferenceSession
    from max.graph import Module

    torch.manual_seed(0)
    program = store_weights(optimise(trace_program(tiny_whisper())))
    stored = {k for k, dt in program.stored_weights().items() if dt == "bfloat16"}
    weights = {k: to_bfloat16(v) if k in stored else v for k, v in state_dict_np(tiny_whisper()).items()}
    widened = {k: from_bfloat16(v) if k in stored else v for k, v in weights.items()}
    bound = with_widened(weights, program.weight_names())
    model = tiny_whisper()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in widened.items()})
    mod = Module()
    for g in program.graphs:
        lower_graph(g, mod)
    session = InferenceSession()
    return model.eval(), program, session.init_all(compile_with_kernels(session, mod), weights_registry=bound)


def test_bfloat16_weights_compute_what_torch_computes_on_them(compiled_bf16):
    """Stored bfloat16 weights are read through exact casts: the encoder and the general decoder
    equal openai-whisper on the rounded weights to the fp32 tolerance (and are not the float32
    model: the rounding shows). The single-token step multiplies in bfloat16, within its own
    tolerance from golden/tolerances.json."""
    import golden

    model, program, models = compiled_bf16
    rng = np.random.default_rng(4)
    mel = rng.standard_normal((1, TINY_DIMS["n_mels"], 2 * TINY_DIMS["n_audio_ctx"])).astype(np.float32)
    with torch.no_grad():
        xa_ref = model.encoder(torch.from_numpy(mel))
        unrounded = tiny_whisper().encoder(torch.from_numpy(mel)).numpy()
    xa = models["encoder"].execute(mel)[0].to_numpy()
    close(xa, xa_ref.numpy())
    assert np.abs(xa - unrounded).max() / np.abs(unrounded).max() > 10 * TOL
    tokens = rng.integers(0, TINY_DIMS["n_vocab"], (1, 5)).astype(np.int64)
    with torch.no_grad():
        ref = model.decoder(torch.from_numpy(tokens), xa_ref).numpy()
    for pos, logits in _decode_in_chunks(program, models, tokens, xa_ref.numpy(), [2, 3]):
        close(logits, ref[:, pos - 1])
    step_tol = golden.tolerance("logits.incremental", "bfloat16")[0]
    for pos, logits in _decode_in_chunks(program, models, tokens, xa_ref.numpy(), [2, 1, 1, 1], step_graph=True):
        close(logits, ref[:, pos - 1], step_tol)


def test_missing_lowering_names_op_and_module():
    g = ir.Graph(
        "g",
        (ir.Value("x", ir.TensorType("float32", (2, 3))),),
        (),
        (),
        (ir.Node("blocks.0.mlp/frob", "aten.frobnicate.default", ("x",), (), ir.TensorType("float32", (2, 3)), "blocks.0.mlp"),),
        (("y", "blocks.0.mlp/frob"),),
    )
    with pytest.raises(LoweringError, match=r"no lowering for aten\.frobnicate\.default .*module blocks\.0\.mlp"):
        lower_graph(g)


def test_registering_an_op_twice_fails():
    with pytest.raises(LoweringError, match="registered twice"):
        register("aten.linear.default")(lambda ctx, node, *a: None)
