"""Shared fixtures: the real tiny.en package is converted once per session; op graphs are
compiled once per session as one MAX module."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# the trust list (runtime.trust) of this test session: packages converted here are recorded in
# it, and nothing a user's own cache trusts counts; subprocesses inherit it
os.environ["WHISPER_MAX_CACHE"] = tempfile.mkdtemp(prefix="whisper-max-cache-")

from helpers import ROOT, SHARED_AUDIO  # noqa: F401 (fixtures below use them)


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
        record(pkg.manifest.files["model.mef"].sha256, given)  # the developer vouches for it
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

        record(Package.open(given).manifest.files["model.mef"].sha256, given)  # the developer vouches for it
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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["WHISPER_MAX_CACHE"], ignore_errors=True)
