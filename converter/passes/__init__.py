"""IR optimisation passes: rewrite a Program without changing what it computes. One module per
pass (or per family of passes), the helpers they share in `rewrite`; `optimise` is the pipeline
packages ship, and each precision's recipe (converter.recipes) names the passes after it."""

from __future__ import annotations

from ...runtime.program import STEP_GRAPHS, Role
from .. import ir
from .cache import in_place_cache, sink_cache_layout
from .cross import store_cross_kv
from .fuse import fuse_decoder_layers, fuse_encoder_attention
from .hoist import hoist_invariants
from .logits import last_position_logits
from .rows import cross_queries, engine_rows, logit_rows, row_lineage, share_window
from .select import token_selection
from .specialise import specialise
from .weights import LAYER_MATRICES, PANEL_DTYPES, STORED_DTYPES, panel_products, store_weights

__all__ = [
    "LAYER_MATRICES",
    "PANEL_DTYPES",
    "STORED_DTYPES",
    "cross_queries",
    "engine_rows",
    "logit_rows",
    "fuse_decoder_layers",
    "fuse_encoder_attention",
    "hoist_invariants",
    "in_place_cache",
    "last_position_logits",
    "optimise",
    "panel_products",
    "row_lineage",
    "share_window",
    "sink_cache_layout",
    "specialise",
    "store_cross_kv",
    "store_weights",
    "token_selection",
]


def optimise(p: ir.Program, fuse: bool = True) -> ir.Program:
    """The pipeline packages ship: hoist per-window work, narrow the logits, cache in attention's
    layout; a step graph specialised to one sequence and one token that grows its caches in
    place; and a rows graph, one token for each of several rows of one window (beams, best-of
    samples), that grows its caches in place and shares the window's cross-attention K/V. With
    `fuse`, each residual block of those two graphs becomes one decoder_layer kernel."""
    p = hoist_invariants(p)
    p = last_position_logits(p)
    p = sink_cache_layout(p)
    p = specialise(p, Role.DECODER, {"batch": 1, "n": 1}, Role.DECODER_STEP)
    p = in_place_cache(p, Role.DECODER_STEP)
    p = specialise(p, Role.DECODER, {"n": 1}, Role.DECODER_ROWS)
    p = in_place_cache(p, Role.DECODER_ROWS)
    p = share_window(p, Role.DECODER_ROWS)
    if fuse:
        for g in STEP_GRAPHS:
            p = fuse_decoder_layers(p, g)
        p = row_lineage(p, Role.DECODER_ROWS)
        p = engine_rows(p, Role.DECODER_ROWS)
        return cross_queries(logit_rows(token_selection(p), Role.DECODER_ROWS), Role.DECODER_ROWS)
    return token_selection(p)
