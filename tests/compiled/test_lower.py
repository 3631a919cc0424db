"""Op lowering on tiny random modules, compiled once per session as one MAX module.

Tolerance: 1e-5 of the reference tensor's largest magnitude. These are fp32 graphs of a few
16-wide layers; MAX and torch differ only by summation order (~1e-7 relative here), so 1e-5
catches any wrong op while leaving room for order effects.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import BF16_TARGETS, HAS_BF16, needs_bf16
from helpers.tiny_model import TINY_DIMS, state_dict_np, tiny_whisper
from torch import nn
from torch.export import Dim, export
from whisper.model import Conv1d, LayerNorm, Linear

from whisper_max.converter import ir
from whisper_max.converter.ir import graph_signature
from whisper_max.converter.lower import LoweringError, compile_with_kernels, lower_graph, register
from whisper_max.converter.parity import empty_cache
from whisper_max.converter.passes import optimise, panel_products, store_weights
from whisper_max.converter.trace import to_ir, trace_program
from whisper_max.runtime.manifest import Target
from whisper_max.runtime.model import WhisperModel
from whisper_max.runtime.program import StepCache, decoder_call, state_specs
from whisper_max.runtime.weights import from_bfloat16, to_bfloat16, with_derived

PANEL_KINDS = ("float32", "float16", "bfloat16")  # weight dtypes whisper_max.linear_panels reads

TOL = 1e-5


def close(got, ref, tol=TOL):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= tol, f"max_rel_err {err:.3g} > {tol}"


class Micro(nn.Module):
    """Op variants whisper itself does not use: odd-length stride-2 conv, then a conv of a
    channels-last input whose channels are no whole vector, tanh GELU, no-bias linear."""

    def __init__(self):
        super().__init__()
        self.conv = Conv1d(4, 6, kernel_size=3, stride=2, padding=1)
        self.conv2 = Conv1d(6, 6, kernel_size=3, padding=1)
        self.proj = Linear(6, 5, bias=False)
        self.norm = LayerNorm(5)

    def forward(self, x):
        h = self.conv2(F.gelu(self.conv(x), approximate="tanh")).permute(0, 2, 1)
        y = self.norm(self.proj(h) * 0.5 + 1.0)
        return F.softmax(y - 2.0, dim=-1) / 3.0


def _float16_exact_tiny_whisper():
    """The tiny model (seed 0) with every weight rounded to float16 and held in float32, as
    openai-whisper holds the checkpoints it publishes in float16."""
    torch.manual_seed(0)
    model = tiny_whisper()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    return model


@pytest.fixture(scope="session")
def compiled():
    from max.engine import InferenceSession
    from max.graph import Module

    model = _float16_exact_tiny_whisper()
    program = panel_products(optimise(trace_program(model)))  # the form packages ship
    micro = Micro().eval()
    with torch.no_grad():
        ep = export(micro, (torch.randn(2, 4, 9),), dynamic_shapes=({0: Dim("batch", min=2)},))
    micro_ir = to_ir(ep, "micro", ["x"], [{0: "batch"}], ["y"], {"batch": (1, None)})
    products, product_weights = _bf16_products() if HAS_BF16 else (ir.Program((), {}), {})
    mod = Module()
    panels, panel_weights = _panel_products()
    for g in program.graphs + (micro_ir,) + panels.graphs + (_attention_f32(),):
        lower_graph(g, mod)
    for kind, target in BF16_TARGETS.items():  # each kind of our bfloat16 kernels this CPU runs
        for g in products.graphs:
            lower_graph(g, mod, name=f"{g.name}_{kind}", target=target)
    weights = with_derived(state_dict_np(model), program.weight_names()) | {
        k: v.detach().numpy().copy() for k, v in micro.state_dict().items()
    }
    weights |= product_weights | panel_weights
    session = InferenceSession()
    models = session.init_all(compile_with_kernels(session, mod), weights_registry=weights)
    return model, micro, program, models, weights


def _panel_products():
    """Graphs `panels_float32` / `_float16` / `_bfloat16`: a product of one position per row with
    a weight (80, 72) stored in that dtype (values all three hold exactly), which passes.panel_products reads in panels
    (a last
    panel of 16 columns, a last k block of 8). Returns the program and its bound weights."""
    graphs, stored = [], {}
    rng = np.random.default_rng(15)
    w = np.clip(np.round(rng.standard_normal((80, 72)) * 64), -255, 255) / 64  # exact in all three dtypes
    for dt in PANEL_KINDS:
        t = lambda dtype, *shape: ir.TensorType(dtype, shape)  # noqa: E731
        graphs.append(
            ir.Graph(
                f"panels_{dt}",
                (ir.Value("x", t("float32", "m", 1, 72)),),
                (ir.Value(f"w_{dt}", t(dt, 80, 72)), ir.Value("b_panels", t("float32", 80))),
                (),
                (
                    ir.Node(
                        "step",
                        "aten.linear.default",
                        ("x", f"w_{dt}", "b_panels"),
                        (),
                        t("float32", "m", 1, 80),
                        "step",
                    ),
                ),
                (("y", "step"),),
                (ir.SymDim("m", 1, None),),
            )
        )
        stored[f"w_{dt}"] = to_bfloat16(w) if dt == "bfloat16" else w.astype(dt)
    stored["b_panels"] = rng.standard_normal(80).astype(np.float32)
    program = panel_products(ir.Program(tuple(graphs), {}), bfloat16=True)
    assert all(g.nodes[-1].op == ir.LINEAR_PANELS for g in program.graphs)
    return program, with_derived(stored, program.weight_names())


_ATTENTION_SHAPE = (2, 70, 128)  # 2 heads of 64; 70 keys: a padded panel, query tiles of 6 and a rest of 4


def _attention_f32():
    """A graph `attention_f32`: passes.fuse_encoder_attention's float32 node alone, on
    _ATTENTION_SHAPE (queries in an item of 48 and a rest of 22, keys in a block of 64 and a
    padded one of 6)."""
    qkv = ir.TensorType("float32", ("b", *_ATTENTION_SHAPE[1:]))
    node = ir.Node("attention", ir.ATTENTION, ("q", "k", "v"), (("heads", 2), ("scale", 0.125)), qkv, "attention")
    inputs = tuple(ir.Value(n, qkv) for n in "qkv")
    return ir.Graph("attention_f32", inputs, (), (), (node,), (("att", "attention"),), (ir.SymDim("b", 1, None),))


def _attend(q, k, v, rounded=False):
    """softmax((q s)(k s)^T) v per head of 64 (s = 0.125) in float64; `rounded`: q s, k s, v and
    the softmax's numerators rounded to bfloat16 first, as our bfloat16 kernels do."""

    def heads(a):
        return a.reshape(a.shape[0], a.shape[1], -1, 64).transpose(0, 2, 1, 3).astype(np.float64)

    r = _round_bf16 if rounded else (lambda a: a)
    s = heads(r(q * np.float32(0.125))) @ heads(r(k * np.float32(0.125))).transpose(0, 1, 3, 2)
    e = np.exp(s - s.max(-1, keepdims=True))
    num = r(e.astype(np.float32)).astype(np.float64) if rounded else e
    o = num @ heads(r(v)) / e.sum(-1, keepdims=True)
    return o.transpose(0, 2, 1, 3).reshape(q.shape)


def test_float32_attention(compiled):
    """whisper_max.attention (the float32 encoder's attention, scores kept in cache) is
    softmax((q s)(k s)^T) v within float32 rounding, and a window's result is the same bits
    alone or in a batch."""
    *_, models, _ = compiled
    q, k, v = np.random.default_rng(19).standard_normal((3, *_ATTENTION_SHAPE)).astype(np.float32) * np.float32(3)
    model = models["attention_f32"]
    att = model.execute(q, k, v)[0].to_numpy()
    close(att, _attend(q, k, v))
    one = model.execute(*(np.ascontiguousarray(a[1:]) for a in (q, k, v)))[0].to_numpy()
    assert np.array_equal(one, att[1:])


def _bf16_products():
    """A graph `products` of two linear layers of many rows whose weights store_weights makes
    bfloat16: (128, 96) fits whisper_max.linear_bf16, (48, 96) does not (read widened). Returns
    the program and the weights bound to it."""

    def f32(*shape):
        return ir.TensorType("float32", shape)

    qkv = f32(*_ATTENTION_SHAPE)
    g = ir.Graph(
        "products",
        (ir.Value("x", f32(2, 7, 96)), ir.Value("q", qkv), ir.Value("k", qkv), ir.Value("v", qkv)),
        (ir.Value("w", f32(128, 96)), ir.Value("b", f32(128)), ir.Value("w2", f32(48, 96))),
        (),
        (
            ir.Node("fits", "aten.linear.default", ("x", "w", "b"), (), f32(2, 7, 128), "fits"),
            ir.Node("widened", "aten.linear.default", ("x", "w2", ""), (), f32(2, 7, 48), "widened"),
            ir.Node(
                "attention", ir.ATTENTION_BF16, ("q", "k", "v"), (("heads", 2), ("scale", 0.125)), qkv, "attention"
            ),
        ),
        (("y", "fits"), ("y2", "widened"), ("att", "attention")),
    )
    rows = ir.Graph(
        "rows",
        (ir.Value("x", f32("m", 96)),),
        (ir.Value("w", f32(128, 96)), ir.Value("b", f32(128))),
        (),
        (ir.Node("fits", "aten.linear.default", ("x", "w", "b"), (), f32("m", 128), "fits"),),
        (("y", "fits"),),
        (ir.SymDim("m", 1, None),),
    )
    steps = ir.Graph(  # one position per row (decoder steps): 80 weight rows, a half block at the end
        "steps",
        (ir.Value("x", f32("m", 1, 96)),),
        (ir.Value("w3", f32(80, 96)), ir.Value("b3", f32(80))),
        (),
        (ir.Node("step", "aten.linear.default", ("x", "w3", "b3"), (), f32("m", 1, 80), "step"),),
        (("y", "step"),),
        (ir.SymDim("m", 1, None),),
    )
    program = store_weights(ir.Program((g, rows, steps), {}))
    rng = np.random.default_rng(7)
    w, b, w2, w3, b3 = (
        rng.standard_normal(s).astype(np.float32) for s in ((128, 96), (128,), (48, 96), (80, 96), (80,))
    )
    stored = {"w": to_bfloat16(w), "b": b, "w2": to_bfloat16(w2), "w3": to_bfloat16(w3), "b3": b3}
    return program, with_derived(stored, program.weight_names())


def _same_bits_in_any_batch(model, x, seed):
    """The model's output for the 64 rows of x, after checking that the first m rows alone (m = 1..64)
    and the rows in a random order give each row's bits unchanged."""
    full = model.execute(x)[0].to_numpy()
    for m in range(1, 65):
        assert np.array_equal(model.execute(np.ascontiguousarray(x[:m]))[0].to_numpy(), full[:m]), f"{m} rows"
    perm = np.random.default_rng(seed).permutation(64)
    assert np.array_equal(model.execute(np.ascontiguousarray(x[perm]))[0].to_numpy(), full[perm])
    return full


def _round_bf16(a):
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return (((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16) << 16).view(np.float32)


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_product_of_many_rows(compiled, kind):
    """A linear layer of many rows with a bfloat16 weight runs as our bfloat16 kernel of the
    target's kind (whisper_max.linear_amx on AMX tiles, linear_bf16 on VDPBF16PS): x rounded to
    bfloat16 (ties to even), exact pair products, float32 sums, bias added; a weight whose shape
    the kernel cannot take is read widened, in float32."""
    *_, models, weights = compiled
    g = _bf16_products()[0].graphs[0]
    assert next(n for n in g.nodes if n.name == "fits").inputs[1] == "w/float32"  # read as stored
    assert "w2/widened" in next(n for n in g.nodes if n.name == "widened").inputs
    x = np.random.default_rng(8).standard_normal((2, 7, 96)).astype(np.float32)
    qkv = np.random.default_rng(9).standard_normal((3, *_ATTENTION_SHAPE)).astype(np.float32)
    y, y2, _ = (t.to_numpy() for t in models[f"products_{kind}"].execute(x, *qkv))
    w = from_bfloat16(weights["w"]).astype(np.float64)
    ref = _round_bf16(x).astype(np.float64) @ w.T + weights["b"]
    close(y, ref)
    unrounded = x.astype(np.float64) @ w.T + weights["b"]
    assert np.abs(y - unrounded).max() / np.abs(unrounded).max() > 10 * TOL  # x was rounded
    close(y2, x.astype(np.float64) @ from_bfloat16(weights["w2"]).astype(np.float64).T)


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_attention(compiled, kind):
    """Our bfloat16 attention (whisper_max.attention_amx on AMX tiles, attention_bf16 on
    VDPBF16PS) is softmax((q s)(k s)^T) v per head of 64 with q s, k s, v and the softmax's
    numerators rounded to bfloat16 and float32 sums: equal to that computed in float64 (to
    bfloat16 rounding flips of a numerator), and near the float32 attention."""
    *_, models, _ = compiled
    q, k, v = np.random.default_rng(9).standard_normal((3, *_ATTENTION_SHAPE)).astype(np.float32) * np.float32(3)
    x = np.zeros((2, 7, 96), np.float32)
    att = models[f"products_{kind}"].execute(x, q, k, v)[2].to_numpy()

    close(att, _attend(q, k, v, rounded=True), 1e-3)
    exact = _attend(q, k, v)
    err = np.abs(att - exact).max() / np.abs(exact).max()
    assert 10 * TOL < err < 3e-2, err  # rounded, and only by bfloat16's 8 bits


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_rows_are_the_same_in_any_batch(compiled, kind):
    """A row's bfloat16 product is bit-identical whatever the number of rows it is computed
    with (M = 1..64) and its place among them (a permutation): one instruction path and one k
    order for every M, the last partial block of rows included."""
    *_, models, _ = compiled
    model = models[f"rows_{kind}"]
    x = np.random.default_rng(10).standard_normal((64, 96)).astype(np.float32)
    full = _same_bits_in_any_batch(model, x, seed=11)
    close(
        full,
        _round_bf16(x).astype(np.float64) @ from_bfloat16(compiled[4]["w"]).astype(np.float64).T + compiled[4]["b"],
    )


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
    full = _same_bits_in_any_batch(model, x, seed=13)
    w = from_bfloat16(weights["w3"]).astype(np.float64)
    exact = x.astype(np.float64) @ w.T + weights["b3"]
    if kind == "amx":
        close(full, _round_bf16(x).astype(np.float64) @ w.T + weights["b3"])
        assert np.abs(full - exact).max() / np.abs(exact).max() > 10 * TOL  # x was rounded
    else:
        close(full, exact)


@pytest.mark.parametrize("dtype", PANEL_KINDS)
def test_panel_products_rows_are_the_same_in_any_batch(compiled, dtype):
    """whisper_max.linear_panels (products of one position per row, the weight in panels): a
    row's result is bit-identical for M = 1..64 and in any place among the rows (one instruction
    path and one k order for every M, tiles of rows and their rest), a float16 or bfloat16
    weight gives the float32 one's bits, and the sums are the exact ones within float32 rounding."""
    *_, models, weights = compiled
    model = models[f"panels_{dtype}"]
    x = np.random.default_rng(16).standard_normal((64, 1, 72)).astype(np.float32)
    full = _same_bits_in_any_batch(model, x, seed=17)
    assert np.array_equal(full, models["panels_float32"].execute(x)[0].to_numpy())
    w = weights["w_float32"].astype(np.float64)
    as_array = lambda a: from_bfloat16(a) if dtype == "bfloat16" else a  # noqa: E731
    np.testing.assert_array_equal(
        as_array(weights[f"w_{dtype}/panels"])[1, :, :16], as_array(weights[f"w_{dtype}"])[64:].T
    )
    close(full, x.astype(np.float64) @ w.T + weights["b_panels"])


def test_micro_ops(compiled):
    _, micro, _, models, _ = compiled
    for batch in (1, 3):  # traced at 2: the graph is symbolic in batch
        x = np.random.default_rng(batch).standard_normal((batch, 4, 9)).astype(np.float32)
        with torch.no_grad():
            ref = micro(torch.from_numpy(x)).numpy()
        close(models["micro"].execute(x)[0].to_numpy(), ref)


def test_encoder_conv_stem_attention_mlp(compiled):
    model, _, _, models, _ = compiled
    mel = (
        np.random.default_rng(0)
        .standard_normal((2, TINY_DIMS["n_mels"], 2 * TINY_DIMS["n_audio_ctx"]))
        .astype(np.float32)
    )
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(mel)).numpy()
    close(models["encoder"].execute(mel)[0].to_numpy(), ref)


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
        logits, cache, _ = decoder_call(run, steps, tokens[:, pos : pos + n], cache, cross)
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
    runs = [_runner(program, models, xa) for xa in xas]
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


def test_amx_kernels_compile_on_any_cpu():
    """Our AMX kernels (tile instructions as inline assembly) compile on every CPU the suite runs
    on, so a change to them fails here too; they run, against numpy, only where the CPU has AMX
    (the bf16 product tests with kind "amx"). Compiled, never run: no tile instruction executes."""
    from max.engine import InferenceSession
    from max.graph import Module

    products, _ = _bf16_products()
    host = Target.host()
    amx = Target(host.device, host.arch, (*host.without("amx_tile", "amx_bf16").features, "amx_tile", "amx_bf16"))
    mod = Module()
    for g in products.graphs:
        lower_graph(g, mod, name=f"{g.name}_amx_compiled", target=amx)
    assert compile_with_kernels(InferenceSession(), mod) is not None


@pytest.fixture(scope="session", params=list(BF16_TARGETS))
def compiled_bf16(request):
    """The tiny program with bfloat16-stored weights lowered for one kind of our bfloat16 kernels
    (conftest.BF16_TARGETS; none on a CPU without them, so its tests are skipped), and
    openai-whisper on the same rounded weights."""
    from max.engine import InferenceSession
    from max.graph import Module

    torch.manual_seed(0)
    program = store_weights(optimise(trace_program(tiny_whisper())))
    stored = {k for k, dt in program.stored_weights().items() if dt == "bfloat16"}
    weights = {k: to_bfloat16(v) if k in stored else v for k, v in state_dict_np(tiny_whisper()).items()}
    widened = {k: from_bfloat16(v) if k in stored else v for k, v in weights.items()}
    bound = with_derived(weights, program.weight_names())
    model = tiny_whisper()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in widened.items()})
    mod = Module()
    for g in program.graphs:
        lower_graph(g, mod, target=BF16_TARGETS[request.param])
    session = InferenceSession()
    return (
        request.param,
        model.eval(),
        program,
        session.init_all(compile_with_kernels(session, mod), weights_registry=bound),
    )


@pytest.fixture(scope="session")
def compiled_float16():
    """The decoder graphs of the tiny program (float16-exact weights) with the step's matrices
    stored in float16, as a float32 package stores them (passes.store_weights)."""
    from max.engine import InferenceSession
    from max.graph import Module

    from whisper_max.converter.convert import float16_exact, stored_as

    model = _float16_exact_tiny_whisper()
    sd = state_dict_np(model)
    program = panel_products(store_weights(optimise(trace_program(model)), "float16", exact=float16_exact(sd)))
    stored = program.stored_weights()
    weights = with_derived({k: stored_as(v, stored[k]) for k, v in sd.items()}, program.weight_names())
    mod = Module()
    for name in ("cross_kv", "decoder", "decoder_step"):
        lower_graph(program.graph(name), mod)
    session = InferenceSession()
    return program, session.init_all(compile_with_kernels(session, mod), weights_registry=weights)


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
        got = _decode_in_chunks(program, models, tokens, xa, [3, 1, 1, 1], step_graph=step_graph)
        ref = _decode_in_chunks(program32, models32, tokens, xa, [3, 1, 1, 1], step_graph=step_graph)
        for (pos, a), (_, b) in zip(got, ref):
            assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)), (
                f"position {pos}, step graph {step_graph}"
            )


@needs_bf16
def test_bfloat16_weights_compute_what_torch_computes_on_them(compiled_bf16):
    """Against openai-whisper on the rounded weights: the single-token step graphs read the
    stored bfloat16 weights exactly and sum in float32, so they are held to the float32
    tolerance (the tiny model's width, 16, is not a multiple of 32, so even the AMX kind reads
    them widened: test_bfloat16_rows_on_amx checks the tile path); the encoder and the general decoder, whose linear
    layers of many
    rows run in bfloat16 where the weight fits the kernel (here the MLPs' (64, 16) fc1), to the
    bfloat16 package tolerances of golden/tolerances.json. Neither is the float32 model: the
    rounding shows."""
    from whisper_max import golden

    _, model, program, models = compiled_bf16
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
    for pos, logits in _decode_in_chunks(program, models, tokens, xa_ref.numpy(), [2, 3]):
        close(logits, ref[:, pos - 1], golden.tolerance("logits", "bfloat16")[0])
    for pos, logits in _decode_in_chunks(program, models, tokens, xa_ref.numpy(), [1, 1, 1, 1, 1], step_graph=True):
        close(logits, ref[:, pos - 1])


def test_missing_lowering_names_op_and_module():
    g = ir.Graph(
        "g",
        (ir.Value("x", ir.TensorType("float32", (2, 3))),),
        (),
        (),
        (
            ir.Node(
                "blocks.0.mlp/frob",
                "aten.frobnicate.default",
                ("x",),
                (),
                ir.TensorType("float32", (2, 3)),
                "blocks.0.mlp",
            ),
        ),
        (("y", "blocks.0.mlp/frob"),),
    )
    with pytest.raises(LoweringError, match=r"no lowering for aten\.frobnicate\.default .*module blocks\.0\.mlp"):
        lower_graph(g)


def test_registering_an_op_twice_fails():
    with pytest.raises(LoweringError, match="registered twice"):
        register("aten.linear.default")(lambda ctx, node, *a: None)


class _Tk:
    """The ids openai-whisper's logit filters read, in the tiny vocabulary (50 tokens: text
    0-39, eot 40, specials, timestamps 44-49)."""

    eot, sot, no_timestamps, timestamp_begin = 40, 41, 42, 44

    def encode(self, text):
        assert text == " "
        return [17]


def _filtered(logits, tokens, sample_begin, suppress, blank, timestamps, max_initial):
    """openai-whisper's own logit filters on the logits (torch): the oracle."""
    from whisper.decoding import ApplyTimestampRules, SuppressBlank, SuppressTokens

    x = torch.from_numpy(logits.copy())
    t = torch.from_numpy(tokens)
    filters = ([SuppressBlank(_Tk(), sample_begin)] if blank else []) + [SuppressTokens(suppress)]
    if timestamps:
        filters.append(ApplyTimestampRules(_Tk(), sample_begin, max_initial))
    for f in filters:
        f.apply(x, t)
    return x.numpy(), F.log_softmax(x.float(), dim=-1).numpy()


def test_select_tokens_is_openai_whispers_choice(compiled):
    """The select graph (kernel whisper_max.select_tokens, fed by decoding.TokenRules) picks what
    openai-whisper's filters and argmax / top-k pick, ties to the lower token, with the
    log-probabilities of its log_softmax; the timestamp rules' text ban included."""
    from whisper_max.runtime.decoding import TokenRules

    models = compiled[3]
    rng = np.random.default_rng(0)
    forced = exhausted = 0
    for case in range(400):
        rows, k, sample_begin = int(rng.integers(1, 6)), int(rng.integers(1, 8)), 3
        blank, timestamps = bool(case % 3), bool(case % 4)
        max_initial = None if case % 5 == 0 else int(rng.integers(0, 4))
        suppress = sorted({int(i) for i in rng.integers(0, 50, int(rng.integers(0, 6)))} | {41})
        logits = (rng.standard_normal((rows, 50)) * 3).astype(np.float32)
        logits[:, 44:] += rng.uniform(-4, 6, (rows, 1)).astype(np.float32)
        if case % 7 == 0:
            logits = np.round(logits).astype(np.float32)  # ties
        sampled = [sorted(rng.choice([*range(40), *range(44, 50)], int(rng.integers(0, 5)))) for _ in range(rows)]
        width = sample_begin + min(len(s) for s in sampled)
        tokens = np.array([[41, 1, 2] + s[: width - sample_begin] for s in sampled], np.int64)
        want_logits, want_lp = _filtered(logits, tokens, sample_begin, suppress, blank, timestamps, max_initial)
        rules = TokenRules(_Tk(), sample_begin, blank, suppress, timestamps, max_initial)
        choice = (
            models["select"]
            .execute(
                logits, rules.rows(tokens), rules.suppress, np.zeros((rows, 2), np.float32), np.zeros(k, np.int32)
            )[0]
            .to_numpy()
        )
        want = np.argsort(-want_logits, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(choice[:, :, 0].astype(np.int64), want, err_msg=f"case {case}")
        assert (choice[:, 0, 0] == want_logits.argmax(axis=-1)).all()
        got_lp, ref_lp = choice[:, :, 1], np.take_along_axis(want_lp, want, axis=-1)
        finite = np.isfinite(ref_lp)
        np.testing.assert_array_equal(np.isfinite(got_lp), finite)
        np.testing.assert_allclose(got_lp[finite], ref_lp[finite], rtol=0, atol=2e-6)
        if timestamps:
            forced += int(
                np.sum(np.isneginf(want_logits[:, :44]).all(axis=1) & ~np.isneginf(logits[:, :44]).all(axis=1))
            )
        exhausted += int((~finite).any())
    assert forced > 30 and exhausted > 10  # the text ban and rows with fewer than k tokens left were exercised


def test_select_tokens_samples_and_reports_nan(compiled):
    """Temperature > 0: slot 0 is the first token whose running probability (softmax(logits / T)
    after the filters, float64 sums in token order) passes u times the total, with its log-
    probability at temperature 1. A NaN logit gives a NaN log-probability (decoding raises)."""
    from whisper_max.runtime.decoding import TokenRules

    models = compiled[3]
    rng = np.random.default_rng(1)
    rules = TokenRules(_Tk(), 3, True, [41, 43], True, 1)
    for case in range(200):
        rows, temperature = int(rng.integers(1, 5)), float(rng.choice([0.2, 0.6, 1.0]))
        logits = (rng.standard_normal((rows, 50)) * 2).astype(np.float32)
        tokens = np.array([[41, 1, 2, 44, 7, 9][: 3 + case % 4]] * rows, np.int64)
        u = rng.random(rows).astype(np.float32)
        sampling = np.stack([np.full(rows, temperature, np.float32), u], axis=1)
        choice = (
            models["select"]
            .execute(logits, rules.rows(tokens), rules.suppress, sampling, np.zeros(2, np.int32))[0]
            .to_numpy()
        )
        want_logits, want_lp = _filtered(logits, tokens, 3, [41, 43], True, True, 1)
        for r in range(rows):
            y = (want_logits[r] / np.float32(temperature)).astype(np.float32)
            p = np.exp(y - y.max()).astype(np.float64)
            pick = int(np.argmax(np.cumsum(p) > np.float64(u[r]) * p.sum()))
            assert int(choice[r, 0, 0]) == pick and np.isfinite(want_logits[r, pick])
            np.testing.assert_allclose(choice[r, 0, 1], want_lp[r, pick], rtol=0, atol=2e-6)
            assert choice[r, 1, 0] == -1 and np.isneginf(choice[r, 1, 1])
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    logits[1, 5] = np.nan
    tokens = np.array([[41, 1, 2, 3]] * 2, np.int64)
    choice = (
        models["select"]
        .execute(logits, rules.rows(tokens), rules.suppress, np.zeros((2, 2), np.float32), np.zeros(3, np.int32))[0]
        .to_numpy()
    )
    assert np.isfinite(choice[0, :, 1]).all() and np.isnan(choice[1, 0, 1])
