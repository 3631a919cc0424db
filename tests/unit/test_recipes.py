"""Recipes: which passes, kernels and tolerances a (family, precision) conversion uses on a target."""

import pytest
from helpers.tiny_model import state_dict_np, tiny_whisper, traced_tiny

from whisper_max import golden
from whisper_max.converter import ir, passes
from whisper_max.converter.recipes import RECIPES, Context, RecipeError, float16_exact, recipe_for
from whisper_max.runtime.manifest import Target

AVX2 = Target("cpu", "x86_64", ("avx2", "fma"))
ZEN4 = Target("cpu", "x86_64", ("avx2", "fma", "avx512f", "avx512_bf16"))
XEON = Target("cpu", "x86_64", ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"))


def test_each_precision_names_its_passes_kernels_and_tolerances():
    f32, bf16 = recipe_for("whisper", "float32", AVX2), recipe_for("whisper", "bfloat16", ZEN4)
    assert f32.pass_names == [
        "optimise",
        "store_weights(float16, exact)",
        "fuse_encoder_attention(attention)",
        "panel_products",
    ]
    assert bf16.pass_names == [
        "optimise",
        "store_weights(bfloat16)",
        "store_cross_kv(bfloat16)",
        "fuse_encoder_attention(attention_bf16)",
        "panel_products",
    ]
    assert [f32.kernels(t) for t in (AVX2, ZEN4, XEON)] == ["fma", "fma", "fma"]
    assert [bf16.kernels(t) for t in (ZEN4, XEON)] == ["bf16", "amx"]
    for recipe in RECIPES.values():  # every recipe's tolerance table exists
        assert golden.tolerance("logits", recipe.tolerances)[0] > 0


def test_a_recipe_the_target_cannot_run_is_refused_by_name():
    with pytest.raises(RecipeError, match=r"AVX512_BF16.*has only \['avx2', 'fma'\]; convert with --dtype float32"):
        recipe_for("whisper", "bfloat16", AVX2)
    with pytest.raises(RecipeError, match="no recipe for whisper at int4: expected one of bfloat16, float32"):
        recipe_for("whisper", "int4", XEON)


def test_the_float32_recipe_is_the_pipeline_it_names():
    """apply() runs exactly the named passes: the same program as calling them by hand."""
    sd = state_dict_np(tiny_whisper())
    got = recipe_for("whisper", "float32", AVX2).apply(traced_tiny(), Context(AVX2, sd))
    p = passes.store_weights(passes.optimise(traced_tiny()), "float16", exact=float16_exact(sd))
    p = passes.panel_products(passes.fuse_encoder_attention(p, op=ir.ATTENTION, require=False), bfloat16=True)
    assert ir.format_program(got) == ir.format_program(p)
