"""Attention kernels (float32 and each bfloat16 kind this CPU runs) against torch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BF16_TARGETS, needs_bf16
from helpers.op_module import (
    ATTENTION_SHAPE,
    TOL,
    attend,
    close,
)


def test_float32_attention(compiled):
    """whisper_max.attention (the float32 encoder's attention, scores kept in cache) is
    softmax((q s)(k s)^T) v within float32 rounding, and a window's result is the same bits
    alone or in a batch."""
    *_, models, _ = compiled
    q, k, v = np.random.default_rng(19).standard_normal((3, *ATTENTION_SHAPE)).astype(np.float32) * np.float32(3)
    model = models["attention_f32"]
    att = model.execute(q, k, v)[0].to_numpy()
    close(att, attend(q, k, v))
    one = model.execute(*(np.ascontiguousarray(a[1:]) for a in (q, k, v)))[0].to_numpy()
    assert np.array_equal(one, att[1:])


@needs_bf16
@pytest.mark.parametrize("kind", list(BF16_TARGETS))
def test_bfloat16_attention(compiled, kind):
    """Our bfloat16 attention (whisper_max.attention_amx on AMX tiles, attention_bf16 on
    VDPBF16PS) is softmax((q s)(k s)^T) v per head of 64 with q s, k s, v and the softmax's
    numerators rounded to bfloat16 and float32 sums: equal to that computed in float64 (to
    bfloat16 rounding flips of a numerator), and near the float32 attention."""
    *_, models, _ = compiled
    q, k, v = np.random.default_rng(9).standard_normal((3, *ATTENTION_SHAPE)).astype(np.float32) * np.float32(3)
    x = np.zeros((2, 7, 96), np.float32)
    att = models[f"products_{kind}"].execute(x, q, k, v)[2].to_numpy()

    close(att, attend(q, k, v, rounded=True), 1e-3)
    exact = attend(q, k, v)
    err = np.abs(att - exact).max() / np.abs(exact).max()
    assert 10 * TOL < err < 3e-2, err  # rounded, and only by bfloat16's 8 bits
