"""Shared fixtures: the real tiny.en package is converted once per session; op graphs are
compiled once per session as one MAX module."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_AUDIO = ROOT.parent / "shared" / "audio"


@pytest.fixture(scope="session")
def tiny_en(tmp_path_factory):
    """whisper-convert tiny.en, once per session (MAX's compile cache makes repeats cheap).

    WHISPER_MAX_TEST_PACKAGE=<path> reuses a package converted earlier instead.
    """
    from converter.convert import ConvertResult, convert
    from runtime.package import Package

    given = os.environ.get("WHISPER_MAX_TEST_PACKAGE")
    if given:
        pkg = Package.open(given)
        return ConvertResult(Path(given), pkg.manifest, [], {})
    out = tmp_path_factory.mktemp("pkg") / "tiny.en.maxpkg"
    return convert("tiny.en", out)


@pytest.fixture
def clean_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
