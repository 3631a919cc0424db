"""A package's model.mef is machine code: it runs only if this machine compiled it or the user
said --trust (runtime.trust); anything else is refused before the MEF is read."""

from __future__ import annotations

import pytest

from whisper_max import golden, runtime
from whisper_max.runtime.cli import main
from whisper_max.runtime.package import Package, PackageError


@pytest.fixture
def stranger(tiny_en, tmp_path, monkeypatch):
    """tiny.en as another machine's package: this machine's trust list is empty."""
    monkeypatch.setenv("WHISPER_MAX_CACHE", str(tmp_path / "cache"))
    return tiny_en.path


def test_a_package_from_elsewhere_is_refused_before_its_mef_is_read(stranger, monkeypatch):
    import max.engine

    read = max.engine.read
    monkeypatch.setattr(max.engine, "read", lambda *a, **k: pytest.fail("the MEF of an untrusted package was read"))
    with pytest.raises(PackageError, match=r"not made on this machine.*whisper-convert --rebuild .*--trust"):
        runtime.load(stranger)
    monkeypatch.setattr(max.engine, "read", read)
    runtime.load(stranger, trust=True)  # vouched for: loads, and is remembered
    runtime.load(stranger)


def test_whisper_run_says_how_to_trust_or_rebuild(stranger, tmp_path, capsys):
    args = [str(stranger), str(golden.JFK_WAV), "-o", str(tmp_path / "out"), "-f", "txt"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "whisper-convert --rebuild" in err and "--trust" in err
    assert list((tmp_path / "out").iterdir()) == []
    assert main([*args, "--trust"]) == 0
    assert main(args) == 0  # remembered


def test_converting_here_trusts_the_result(tiny_en):
    from whisper_max.runtime.trust import is_trusted

    assert is_trusted(Package.open(tiny_en.path).manifest.files["model.mef"].sha256)
    assert not is_trusted("0" * 64)
