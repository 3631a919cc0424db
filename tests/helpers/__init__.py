"""What the tests share besides fixtures: where the repository and the team's dev audio are, which
bfloat16 kernels this CPU runs, and the test models (tiny_model) and the fake engine
(fake_engine) in modules beside this one. `tests/` is on pytest's pythonpath (pyproject)."""

from __future__ import annotations

from pathlib import Path

import pytest

from whisper_max.converter.lower.target import Target
from whisper_max.runtime.package import cpu_target

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED_AUDIO = ROOT.parent / "shared" / "audio"
# bfloat16 arithmetic (whisper_max.linear_bf16, attention_bf16) compiles only for CPUs with
# AVX512_BF16; elsewhere whisper-convert refuses it (test_convert_bfloat16 checks the refusal)
HAS_BF16 = "avx512_bf16" in cpu_target()["features"]
needs_bf16 = pytest.mark.skipif(
    not HAS_BF16,
    reason=f"this CPU has no AVX512_BF16 (features: {cpu_target()['features']}); bfloat16 kernels cannot compile here",
)
# the kinds of our bfloat16 kernels this CPU runs (converter/lower/target.py): "amx" where it has
# AMX-BF16 (what conversions here use), "bf16" (VDPBF16PS, what Zen 4/5 use) where it has
# AVX512_BF16; on an AMX CPU both are tested, the second by lowering for the CPU without AMX
_HOST = Target.host()
BF16_TARGETS: dict[str, frozenset[str]] = {}
if _HOST.amx:
    BF16_TARGETS["amx"] = _HOST.features
if HAS_BF16:
    BF16_TARGETS["bf16"] = _HOST.features - {"amx_tile", "amx_bf16"}


def shared_audio(name: str) -> Path:
    path = SHARED_AUDIO / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the team's dev set is expected at ../shared/audio beside the checkout")
    return path
