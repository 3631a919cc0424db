"""Recipes: how one model family is converted at one precision for one target, declared as data.

A recipe names the passes a traced program goes through after `passes.optimise` (in order,
each a function of the program and the conversion's context), the kind of our kernels it
compiles to on a target (`kernels`), and the tolerance table its parity check uses (golden's
`tolerances.json` by precision). whisper-convert looks the recipe up (`recipe_for`) instead of
deciding each of these in its own place; MAX's `SupportedArchitecture` records, which name a
model's pipeline, encodings and defaults per architecture, are the model.

    recipe = recipe_for("whisper", "bfloat16", Target.host())
    program = recipe.apply(trace_program(model), Context(target, state_dict))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..runtime.manifest import Target
from . import ir, passes
from .target import amx, bfloat16, bfloat16_kernels


class RecipeError(ValueError):
    """No recipe converts this family at this precision for this target; the message says why."""


@dataclass(frozen=True)
class Context:
    """What a recipe's passes may read besides the program: the target, and the checkpoint's
    float32 tensors (which weights float16 holds exactly)."""

    target: Target
    state_dict: dict

    @cached_property
    def exact(self) -> frozenset[str]:
        """The checkpoint's float32 tensors float16 holds exactly (float16_exact), computed once."""
        return float16_exact(self.state_dict)


@dataclass(frozen=True)
class Step:
    """One pass of a recipe: its name (printed, tested) and the rewrite."""

    name: str
    run: Callable[[ir.Program, Context], ir.Program]


@dataclass(frozen=True)
class Recipe:
    family: str
    precision: str  # the weight storage: float32 (exact float16 step matrices) or bfloat16
    steps: tuple[Step, ...]
    tolerances: str  # the key of golden/tolerances.json the parity check reads
    needs_bfloat16: bool = False  # computes products in bfloat16: AMX-BF16 or AVX512_BF16 required
    reads_exact: bool = False  # a pass reads Context.exact (the IR cache's key then holds it)

    @property
    def pass_names(self) -> list[str]:
        return ["optimise", *(s.name for s in self.steps)]

    def kernels(self, target: Target) -> str:
        """The kind of our kernels the program compiles to there: "amx" (tiles), "bf16"
        (VDPBF16PS) for bfloat16 products, "fma" (float32 FMA, AVX2 or AVX-512) otherwise."""
        return bfloat16_kernels(target) if self.needs_bfloat16 else "fma"

    def apply(self, traced: ir.Program, ctx: Context) -> ir.Program:
        program = passes.optimise(traced)
        for step in self.steps:
            program = step.run(program, ctx)
        return program


def float16_exact(state_dict: dict) -> frozenset[str]:
    """The checkpoint's float32 tensors whose every value float16 holds exactly (openai-whisper's
    checkpoints are published in float16): stored as float16, they widen to the same bits."""
    out = set()
    for name, w in state_dict.items():
        a = np.asarray(w)
        if a.dtype == np.float32 and np.isfinite(a).all():
            with np.errstate(over="ignore"):
                if np.array_equal(a.astype(np.float16).astype(np.float32), a):
                    out.add(name)
    return frozenset(out)


def _panels(program: ir.Program, ctx: Context) -> ir.Program:
    # the products of a few rows read weight panels; bfloat16 ones in pair panels (VDPBF16PS)
    # where the target has AVX512_BF16 without AMX, whose row kernels read the stored bfloat16
    # weight as the tiles' operand
    return passes.panel_products(
        program, bfloat16=not amx(ctx.target), pairs=bfloat16(ctx.target) and not amx(ctx.target)
    )


RECIPES: dict[tuple[str, str], Recipe] = {
    ("whisper", "float32"): Recipe(
        "whisper",
        "float32",
        (
            # the decoder step's matrices in half the bytes where float16 holds them exactly
            Step(
                "store_weights(float16, exact)",
                lambda p, c: passes.store_weights(p, "float16", exact=c.exact),
            ),
            # heads of 64 columns: every Whisper
            Step(
                "fuse_encoder_attention(attention)",
                lambda p, c: passes.fuse_encoder_attention(p, op=ir.ATTENTION, require=False),
            ),
            Step("panel_products", _panels),
        ),
        tolerances="float32",
        reads_exact=True,
    ),
    ("whisper", "bfloat16"): Recipe(
        "whisper",
        "bfloat16",
        (
            Step("store_weights(bfloat16)", lambda p, c: passes.store_weights(p, "bfloat16")),
            # the cross keys and values the steps read, per window, in half the bytes
            Step("store_cross_kv(bfloat16)", lambda p, c: passes.store_cross_kv(p, "bfloat16")),
            Step("fuse_encoder_attention(attention_bf16)", lambda p, c: passes.fuse_encoder_attention(p)),
            Step("panel_products", _panels),
        ),
        tolerances="bfloat16",
        needs_bfloat16=True,
    ),
}


def recipe_for(family: str, precision: str, target: Target) -> Recipe:
    """The recipe converting `family` at `precision` for `target`; RecipeError when there is
    none, or when the target lacks the instructions the recipe's kernels need."""
    recipe = RECIPES.get((family, precision))
    if recipe is None:
        known = sorted(p for f, p in RECIPES if f == family)
        raise RecipeError(f"no recipe for {family} at {precision}: expected one of {', '.join(known) or 'none'}")
    if recipe.needs_bfloat16 and not bfloat16(target):
        raise RecipeError(
            f"{precision} computes products in bfloat16 (our AMX or AVX512_BF16 kernels), which need AMX-BF16 or "
            f"AVX512_BF16, and this CPU has only {list(target.features)}; convert with --dtype float32 here"
        )
    return recipe
