"""Shared fixtures: the real tiny.en package is converted once per session; op graphs are
compiled once per session as one MAX module."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from whisper_max.converter.lower.target import Target
from whisper_max.runtime.package import cpu_target

# the trust list (runtime.trust) of this test session: packages converted here are recorded in
# it, and nothing a user's own cache trusts counts; subprocesses inherit it
os.environ["WHISPER_MAX_CACHE"] = tempfile.mkdtemp(prefix="whisper-max-cache-")

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory):
    """whisper-convert tiny.en, once per session (MAX's compile cache makes repeats cheap).

    WHISPER_MAX_TEST_PACKAGE=<path> reuses a package converted earlier instead.
    """
    from whisper_max.converter.convert import ConvertResult, convert
    from whisper_max.runtime.package import Package

    given = os.environ.get("WHISPER_MAX_TEST_PACKAGE")
    if given:
        from whisper_max.runtime.trust import record

        pkg = Package.open(given)
        record(pkg.manifest["files"]["model.mef"]["sha256"], given)  # the developer vouches for it
        return ConvertResult(Path(given), pkg.manifest, [], {})
    out = tmp_path_factory.mktemp("pkg") / "tiny.en.maxpkg"
    return convert("tiny.en", out)


@pytest.fixture
def clean_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def base_pkg(tmp_path_factory):
    """whisper-convert base, once per session (slow tests only)."""
    from whisper_max.converter.convert import convert

    given = os.environ.get("WHISPER_MAX_TEST_BASE_PACKAGE")
    if given:
        from whisper_max.runtime.package import Package
        from whisper_max.runtime.trust import record

        record(Package.open(given).manifest["files"]["model.mef"]["sha256"], given)  # the developer vouches for it
        return Path(given)
    out = tmp_path_factory.mktemp("pkg") / "base.maxpkg"
    convert("base", out)
    return out


@pytest.fixture(scope="session")
def reference_model():
    """openai-whisper (PyTorch fp32) on the same weights as a package: the oracle."""
    from whisper_max.converter.sources import resolve
    from whisper_max.converter.trace import model_from_state_dict

    cache = {}

    def get(name: str):
        if name not in cache:
            src = resolve(name)
            cache[name] = model_from_state_dict(src.dims, src.state_dict, src.alignment_heads)
        return cache[name]

    return get


def shared_audio(name: str) -> Path:
    path = SHARED_AUDIO / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: the team's dev set is expected at ../shared/audio beside the checkout")
    return path


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["WHISPER_MAX_CACHE"], ignore_errors=True)
