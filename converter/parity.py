"""Parity: the MAX program against PyTorch reference tensors, by module path.

end_to_end checks what the runtime's graphs compute (encoder, cross K/V, caches, every decoding
route's logits, word timestamps' inputs) from the compiled artifact that goes into the package; layer_outputs
checks every layer through a probe build of the same IR graphs with module outputs as extra
outputs (a second compile, not one per layer), to name the first layer that diverges.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from .. import golden
from ..runtime.program import (
    AUDIO_FEATURES,
    LOGITS,
    MEL,
    QUERIES,
    STEP_GRAPHS,
    TOKENS,
    Role,
    StepCache,
    alignment_call,
    decoder_call,
    empty_cache_shape,
    host,
    shape_of,
    state_specs,
)
from . import ir
from .lower import lower_graph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    name: str
    shape: list[int]
    max_abs_err: float
    max_rel_err: float  # max |got - ref| / max |ref|
    tol: float
    ok: bool
    reason: str

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "reason"}


def compare(name: str, got: np.ndarray, ref: np.ndarray, dtype: str = "float32") -> Entry:
    tol, reason = golden.tolerance(name, dtype)
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return Entry(
            name, list(ref.shape), float("inf"), float("inf"), tol, False, f"shape {got.shape} != reference {ref.shape}"
        )
    abs_err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = abs_err / scale if scale > 0 else abs_err
    ok = bool(np.isfinite(got).all()) and rel <= tol
    return Entry(name, list(ref.shape), abs_err, rel, tol, ok, reason)


def encoder_taps(dims: dict) -> list[str]:
    return ["encoder.conv1", "encoder.conv2"] + [f"encoder.blocks.{i}" for i in range(dims["n_audio_layer"])]


def decoder_taps(dims: dict) -> list[str]:
    return [f"decoder.blocks.{i}" for i in range(dims["n_text_layer"])] + ["decoder.ln"]


def build_probe(program: ir.Program, module) -> dict[str, list[str]]:
    """Add `encoder_probe` and `decoder_probe` to `module`; returns each one's tapped modules."""
    taps = {Role.ENCODER: encoder_taps(program.dims), Role.DECODER: decoder_taps(program.dims)}
    for gname, scopes in taps.items():
        g = program.graph(gname)
        lower_graph(g, module, name=f"{gname}_probe", taps=tuple(ir.module_output(g, s) for s in scopes))
    return taps


def run(model, g: ir.Graph, inputs: dict[str, object], n_taps: int = 0):
    """Execute a compiled graph with inputs by IR name; returns (outputs by name, tap values)."""
    missing = [v.name for v in g.inputs if v.name not in inputs]  # extra inputs (e.g. unused cross values) are ignored
    if missing:
        raise KeyError(f"graph {g.name}: inputs missing {missing}")
    outs = model.execute(*[inputs[v.name] for v in g.inputs])
    n = len(g.outputs)
    named = {name: outs[i] for i, (name, _) in enumerate(g.outputs)}
    return named, outs[n : n + n_taps]


def empty_cache(g: ir.Graph, batch: int) -> dict[str, np.ndarray]:
    """Zero-length self-attention caches for a first decoder call, in the graph's cache layout."""
    out = {}
    for v in g.inputs:
        if "past" in v.type.shape:
            out[v.name] = np.zeros(empty_cache_shape(v.type.shape, batch), np.dtype(v.type.dtype))
    return out


def cache_form(g: ir.Graph, cache_output: str, ref: np.ndarray) -> np.ndarray:
    """The reference cache (batch, positions, d) in the form graph `g` stores it.

    passes.sink_cache_layout moves the head split, permute and scale of the new rows in front of
    the concatenation; this replays those nodes (view, permute, mul by a constant) on the
    reference, so the stored cache is compared element for element."""
    producer = {n.name: n for n in g.nodes}
    cat = producer[dict(g.outputs)[cache_output]]
    chain, cur = [], producer.get(cat.inputs[1])
    while cur is not None and cur.op in ("aten.view.default", "aten.permute.default", "aten.mul.Tensor"):
        chain.append(cur)
        cur = producer.get(cur.inputs[0])
    x = np.asarray(ref)
    for n in reversed(chain):
        if n.op == "aten.view.default":
            x = x.reshape(x.shape[:2] + tuple(d for d in n.type.shape[2:]))
        elif n.op == "aten.permute.default":
            x = np.transpose(x, [d % x.ndim for d in n.attr("dims")])
        else:
            x = (x * np.float32(n.attr("other"))).astype(np.float32)
    return x


ROWS = 3  # rows (beams) the decoder_rows route decodes


def cross_kv(program: ir.Program, models: dict, ref: dict[str, np.ndarray]) -> dict:
    """cross_kv's outputs for the reference encoder output, so that what reads them measures
    itself alone."""
    xa_ref = np.ascontiguousarray(ref["encoder.ln_post"], np.float32)
    return run(models[Role.CROSS_KV], program.graph(Role.CROSS_KV), {AUDIO_FEATURES: xa_ref})[0]


def layer_outputs(
    program: ir.Program, probe: dict, taps: dict[str, list[str]], ref: dict, mel: np.ndarray, tokens, cross, dtype
) -> list[Entry]:
    """The probe graphs' tapped modules (every encoder and decoder layer) against the reference:
    what names the first layer that diverges."""
    enc_g, dec_g = program.graph(Role.ENCODER), program.graph(Role.DECODER)
    entries = []
    _, enc_taps = run(probe["encoder_probe"], enc_g, {MEL: mel}, len(taps[Role.ENCODER]))
    for name, val in zip(taps[Role.ENCODER], enc_taps):
        entries.append(compare(name, host(val), ref[name], dtype))
    dec_in = {TOKENS: np.array([tokens], np.int64), **empty_cache(dec_g, 1), **cross}
    _, dec_taps = run(probe["decoder_probe"], dec_g, dec_in, len(taps[Role.DECODER]))
    for name, val in zip(taps[Role.DECODER], dec_taps):
        entries.append(compare(name, host(val), ref[name], dtype))
    return entries


def end_to_end(program: ir.Program, models: dict, ref: dict, mel: np.ndarray, tokens, cross, dtype) -> list[Entry]:
    """The outputs of the graphs the runtime loads (`models`) against the reference: the
    encoder's, cross K/V, the prompt's caches and logits (decoded as the runtime decodes a prompt:
    the general decoder where the program compiles one, else decoder_rows, a row per token), the
    logits of every decoding route (incremental_routes), and word timestamps' inputs
    (alignment_outputs)."""
    enc_g, dec_g = program.graph(Role.ENCODER), program.graph(Role.DECODER)
    enc_out, _ = run(models[Role.ENCODER], enc_g, {MEL: mel})
    entries = [compare("encoder.ln_post", host(enc_out[AUDIO_FEATURES]), ref["encoder.ln_post"], dtype)]
    # the values hoisted out of the decoder (head-split, scaled) have no module of their own
    entries += [compare(name, host(val), ref[name], dtype) for name, val in cross.items() if name in ref]
    # the whole prompt at once (past = 0), on cross_kv's outputs for the reference encoder output
    tok = np.array([tokens], np.int64)
    general = Role.DECODER in models
    logits, cache, _ = decoder_call(
        _by_name(program, models), _steps(program, models), tok, empty_cache(dec_g, 1), cross, general=general
    )
    cache = cache.as_cache() if isinstance(cache, StepCache) else cache
    for name, val in cache.items():
        entries.append(compare(name, host(val), cache_form(dec_g, name, ref[name]), dtype))
    entries.append(compare("logits", logits, ref["logits"], dtype))
    entries += incremental_routes(program, models, ref, tok, cross, dtype)
    return entries + alignment_outputs(program, models, ref, tok, cross, dtype)


def alignment_outputs(program: ir.Program, models: dict, ref: dict, tok: np.ndarray, cross, dtype) -> list[Entry]:
    """Word timestamps' inputs: every position's logits and each layer's cross-attention scores,
    as the runtime takes them (decoder_rows' queries and the window's keys, alignment_call; or
    the alignment graph of a program that compiles one)."""
    if Role.ALIGNMENT in models:
        xa_ref = np.ascontiguousarray(ref["encoder.ln_post"], np.float32)
        align, _ = run(models[Role.ALIGNMENT], program.graph(Role.ALIGNMENT), {TOKENS: tok, AUDIO_FEATURES: xa_ref})
        entries = [compare("logits.all", host(align[LOGITS])[0], ref["logits.all"], dtype)]
        return entries + [compare(name, host(val), ref[name], dtype) for name, val in align.items() if name != LOGITS]
    rows = program.graph(Role.DECODER_ROWS)
    queries = [name for name, _ in rows.outputs if name.endswith(QUERIES)]
    specs = state_specs(ir.graph_signature(rows))
    n_head, _, frames = shape_of(cross[queries[0].removesuffix(QUERIES)])[1:]
    heads = [
        (layer, head) for layer in range(len(queries)) for head in range(n_head)
    ]  # every head, not only the alignment's
    logits, scores = alignment_call(_by_name(program, models), specs, tok, cross, queries, heads, frames)
    scores = scores.reshape(len(queries), n_head, *scores.shape[1:])
    entries = [compare("logits.all", logits[0], ref["logits.all"], dtype)]
    names = [f"decoder.blocks.{i}.cross_attn.qk" for i in range(len(queries))]
    return entries + [compare(name, got[None], ref[name], dtype) for name, got in zip(names, scores)]


def _by_name(program: ir.Program, models: dict):
    def by_name(gname: str, inputs: dict) -> dict:
        return run(models[gname], program.graph(gname), inputs)[0]

    return by_name


def _steps(program: ir.Program, models: dict) -> dict:
    """The in-place graphs among the compiled ones, with their state inputs (decoder_call's `steps`)."""
    return {g: state_specs(ir.graph_signature(program.graph(g))) for g in STEP_GRAPHS if g in models}


def incremental_routes(program: ir.Program, models: dict, ref: dict, tok: np.ndarray, cross, dtype) -> list[Entry]:
    """1 token (past 0), 2 tokens (past 1: the offset causal mask), then 1 at a time; logits of
    each call's last position against the reference at that position. Through each decoder the
    program compiles: the general decoder alone (`.decoder`), one row as the runtime called it
    with decoder_step (no suffix), and the rows of one window (`.rows`: beams: after the prompt,
    ROWS rows sharing the window's cross K/V through decoder_rows, every row against the
    reference; without a general decoder the prompt's calls are decoder_rows too, a row per
    token)."""
    dec_g = program.graph(Role.DECODER)
    n = tok.shape[1]
    bounds = [b for b in [0, 1, 3, *range(4, n + 1)] if b <= n]
    positions = [hi - 1 for hi in bounds[1:]]
    steps = _steps(program, models)
    general = Role.DECODER in models
    routes = {"logits.incremental.decoder": ({}, 1)} if general else {}
    if Role.DECODER_STEP in steps:
        routes["logits.incremental"] = ({Role.DECODER_STEP: steps[Role.DECODER_STEP]}, 1)
    if Role.DECODER_ROWS in steps:
        routes["logits.incremental.rows"] = (steps, ROWS)
    by_name = _by_name(program, models)
    entries = []
    for entry_name, (route, rows) in routes.items():
        cache = empty_cache(dec_g, 1)
        got = []
        for lo, hi in zip(bounds, bounds[1:]):
            part = tok[:, lo:hi] if lo < bounds[2] else np.repeat(tok[:, lo:hi], rows, axis=0)
            logits, cache, _ = decoder_call(by_name, route, part, cache, cross, general=general)
            got.append(np.broadcast_to(logits, (rows, logits.shape[-1])))
        want = ref["logits.all"][positions][:, None]
        entries.append(
            compare(entry_name, np.stack(got), np.broadcast_to(want, (len(positions), rows, want.shape[-1])), dtype)
        )
    return entries
