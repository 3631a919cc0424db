"""What the tests share besides fixtures: where the repository and the team's dev audio are, which
bfloat16 kernels this CPU runs, and the test models (tiny_model) and the fake engine
(fake_engine) in modules beside this one. `tests/` is on pytest's pythonpath (pyproject)."""

from __future__ import annotations

from pathlib import Path

import pytest

from whisper_max.converter.target import amx
from whisper_max.runtime.manifest import Target

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED_AUDIO = ROOT.parent / "shared" / "audio"
# bfloat16 arithmetic (whisper_max.linear_bf16, attention_bf16) compiles only for CPUs with
# AVX512_BF16; elsewhere whisper-convert refuses it (test_convert_bfloat16 checks the refusal)
_HOST = Target.host()
HAS_BF16 = _HOST.has("avx512_bf16")
needs_bf16 = pytest.mark.skipif(
    not HAS_BF16,
    reason=f"this CPU has no AVX512_BF16 (features: {list(_HOST.features)}); bfloat16 kernels cannot compile here",
)
# the kinds of our bfloat16 kernels this CPU runs (converter/target.py): "amx" where it has
# AMX-BF16 (what conversions here use), "bf16" (VDPBF16PS, what Zen 4/5 use) where it has
# AVX512_BF16; on an AMX CPU both are tested, the second by lowering for the CPU without AMX
BF16_TARGETS: dict[str, Target] = {}
if amx(_HOST):
    BF16_TARGETS["amx"] = _HOST
if HAS_BF16:
    BF16_TARGETS["bf16"] = _HOST.without("amx_tile", "amx_bf16")


# the fields of a segment in openai-whisper's result (and the OpenAI API's verbose_json), in its
# order: the contract whisper-run's JSON and whisper-serve's responses are held to
OPENAI_SEGMENT_KEYS = (
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
)


def shared_audio(name: str) -> Path:
    path = SHARED_AUDIO / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the team's dev set is expected at ../shared/audio beside the checkout")
    return path


def manifest_doc(**fields) -> dict:
    """manifest.json of a small package made here (one graph `g` binding the float32 weight
    a.weight (3, 5)), as JSON, `fields` replacing top-level ones; no `files` (write_package
    fills them)."""
    from whisper_max.runtime.manifest import FORMAT, FORMAT_VERSION
    from whisper_max.runtime.package import max_version

    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": "tiny.en", "dims": {"n_mels": 80}, "multilingual": False, "alignment_heads": []},
        "max_version": max_version(),
        "target": _HOST.to_json(),
        "graphs": {"g": {"weights": [{"name": "a.weight", "dtype": "float32", "shape": [3, 5]}]}},
        "files": {},
    }
    return doc | fields


def typed(doc: dict):
    """The runtime.manifest.Manifest a JSON document describes (write_package takes one)."""
    from whisper_max.runtime.manifest import Manifest

    return Manifest.from_json(doc)


def words_of(text: str) -> list[str]:
    """The words of a transcript, lower case, without punctuation (to compare live and offline text)."""
    import re

    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def wer(hypothesis: str, reference: str) -> float:
    """Word error rate of `hypothesis` against `reference` over words_of (golden.word_edits)."""
    from whisper_max.golden import word_edits

    ref = words_of(reference)
    return word_edits(ref, words_of(hypothesis)) / max(1, len(ref))
