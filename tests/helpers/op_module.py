"""What the compiled op tests share: the graphs of the one module they compile per session
(tests/compiled/conftest.py), comparisons, and running the decoder graphs of a program.

Tolerance: 1e-5 of the reference tensor's largest magnitude. These are fp32 graphs of a few
16-wide layers; MAX and torch differ only by summation order (~1e-7 relative here), so 1e-5
catches any wrong op while leaving room for order effects.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from whisper.model import Conv1d, LayerNorm, Linear

from helpers.tiny_model import TINY_DIMS, tiny_whisper
from whisper_max.converter import ir
from whisper_max.converter.ir import graph_signature
from whisper_max.converter.parity import empty_cache
from whisper_max.converter.passes import panel_products, store_weights
from whisper_max.runtime.program import StepCache, decoder_call, state_specs
from whisper_max.runtime.weights import to_bfloat16, with_derived

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


def float16_exact_tiny_whisper():
    """The tiny model (seed 0) with every weight rounded to float16 and held in float32, as
    openai-whisper holds the checkpoints it publishes in float16."""
    torch.manual_seed(0)
    model = tiny_whisper()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    return model


def panel_product_graphs():
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
    # the bfloat16 one in pair panels (VDPBF16PS; compiled everywhere, run where AVX512_BF16 is)
    bf16 = dataclasses.replace(graphs[-1], name="pairs_bfloat16")
    pairs = panel_products(ir.Program((bf16,), {}), pairs=True)
    assert pairs.graphs[0].nodes[-1].op == ir.LINEAR_PAIRS
    program = ir.Program(program.graphs + pairs.graphs, {})
    return program, with_derived(stored, program.weight_names())


ATTENTION_SHAPE = (2, 70, 128)  # 2 heads of 64; 70 keys: a padded panel, query tiles of 6 and a rest of 4


def attention_f32_graph():
    """A graph `attention_f32`: passes.fuse_encoder_attention's float32 node alone, on
    ATTENTION_SHAPE (queries in an item of 48 and a rest of 22, keys in a block of 64 and a
    padded one of 6)."""
    qkv = ir.TensorType("float32", ("b", *ATTENTION_SHAPE[1:]))
    node = ir.Node("attention", ir.ATTENTION, ("q", "k", "v"), (("heads", 2), ("scale", 0.125)), qkv, "attention")
    inputs = tuple(ir.Value(n, qkv) for n in "qkv")
    return ir.Graph("attention_f32", inputs, (), (), (node,), (("att", "attention"),), (ir.SymDim("b", 1, None),))


def to_bfloat16_graph():
    """A graph `to_bfloat16`: a cast of float32 values (n) to bfloat16, as passes.store_cross_kv
    makes at the end of cross_kv (lowered to our kernel whisper_max.to_bfloat16)."""
    x = ir.Value("x", ir.TensorType("float32", ("n",)))
    node = ir.Node("rounded", ir.CAST, ("x",), (("dtype", "bfloat16"),), ir.TensorType("bfloat16", ("n",)), "rounded")
    return ir.Graph("to_bfloat16", (x,), (), (), (node,), (("y", "rounded"),), (ir.SymDim("n", 1, None),))


def attend(q, k, v, rounded=False):
    """softmax((q s)(k s)^T) v per head of 64 (s = 0.125) in float64; `rounded`: q s, k s, v and
    the softmax's numerators rounded to bfloat16 first, as our bfloat16 kernels do."""

    def heads(a):
        return a.reshape(a.shape[0], a.shape[1], -1, 64).transpose(0, 2, 1, 3).astype(np.float64)

    r = round_bf16 if rounded else (lambda a: a)
    s = heads(r(q * np.float32(0.125))) @ heads(r(k * np.float32(0.125))).transpose(0, 1, 3, 2)
    e = np.exp(s - s.max(-1, keepdims=True))
    num = r(e.astype(np.float32)).astype(np.float64) if rounded else e
    o = num @ heads(r(v)) / e.sum(-1, keepdims=True)
    return o.transpose(0, 2, 1, 3).reshape(q.shape)


def bf16_product_graphs():
    """A graph `products` of two linear layers of many rows whose weights store_weights makes
    bfloat16: (128, 96) fits whisper_max.linear_bf16, (48, 96) does not (read widened). Returns
    the program and the weights bound to it."""

    def f32(*shape):
        return ir.TensorType("float32", shape)

    qkv = f32(*ATTENTION_SHAPE)
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


def same_bits_in_any_batch(model, x, seed):
    """The model's output for the 64 rows of x, after checking that the first m rows alone (m = 1..64)
    and the rows in a random order give each row's bits unchanged."""
    full = model.execute(x)[0].to_numpy()
    for m in range(1, 65):
        assert np.array_equal(model.execute(np.ascontiguousarray(x[:m]))[0].to_numpy(), full[:m]), f"{m} rows"
    perm = np.random.default_rng(seed).permutation(64)
    assert np.array_equal(model.execute(np.ascontiguousarray(x[perm]))[0].to_numpy(), full[perm])
    return full


def round_bf16(a):
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return (((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16) << 16).view(np.float32)


def runner(program, models, xa):
    """`run(graph, feeds)` over the compiled graphs, and cross_kv's outputs for `xa`."""
    cross = models["cross_kv"].execute(xa)
    cross = {name: cross[i] for i, (name, _) in enumerate(program.graph("cross_kv").outputs)}

    def run(gname, feed):
        gi = program.graph(gname)
        outs = models[gname].execute(*[feed[v.name] for v in gi.inputs])
        return {name: outs[i] for i, (name, _) in enumerate(gi.outputs)}

    return run, cross


def decode_in_chunks(program, models, tokens, xa, chunks, step_graph=False):
    """Logits of each chunk's last position, feeding each call's cache to the next, routed as the
    runtime routes them (runtime.model.decoder_call): with `step_graph`, single-token calls go
    to decoder_step, which grows the cache in place."""
    run, cross = runner(program, models, xa)
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
