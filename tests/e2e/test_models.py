"""Models by name (runtime.models): converted once into the cache, reused, rebuilt for this machine."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from whisper_max import golden
from whisper_max.runtime import models
from whisper_max.runtime.cli import main
from whisper_max.runtime.manifest import Target
from whisper_max.runtime.package import Package, PackageError, write_package

WHISPER_RUN = [sys.executable, "-c", "from whisper_max.runtime.cli import run; run()"]


def _whisper_run(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*WHISPER_RUN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _with_manifest(src: Path, dst: Path, **changes) -> Path:
    """A copy of package `src` whose manifest says other things (as one made elsewhere would)."""
    pkg = Package.open(src)
    write_package(dst, replace(pkg.manifest, **changes), {n: pkg.read(n) for n in pkg.names()})
    return dst


@pytest.fixture(scope="module")
def jfk_txt(tiny_en, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("explicit")
    assert main([str(tiny_en.path), str(golden.JFK_WAV), "-o", str(out), "-f", "txt", "--verbose", "False"]) == 0
    return (out / "jfk.txt").read_text()


def test_a_name_converts_once_for_concurrent_first_uses_then_is_reused(tiny_en, jfk_txt, tmp_path):
    """`whisper-run tiny.en` twice at once on an empty model dir: one converts, the other waits
    for it; both transcribe as the explicit package does; a third run converts nothing; with the
    package deleted, a fourth converts from the cached IR, tracing nothing, to the same program."""
    model_dir = tmp_path / "models"
    runs = [
        _whisper_run(
            "tiny.en",
            golden.JFK_WAV,
            "--model_dir",
            model_dir,
            "-o",
            tmp_path / f"out{i}",
            "-f",
            "txt",
            "--verbose",
            "False",
        )
        for i in range(2)
    ]
    done = [(p.wait(timeout=1800), *p.communicate()) for p in runs]
    for rc, _, err in done:
        assert rc == 0, err
    converted = [err for _, _, err in done if "converting it once" in err]
    assert len(converted) == 1, [err for _, _, err in done]
    assert any("waiting for it" in err for _, _, err in done), [err for _, _, err in done]
    for i in range(2):
        assert (tmp_path / f"out{i}" / "jfk.txt").read_text() == jfk_txt
    pkg = model_dir / "tiny.en.maxpkg"
    assert sorted(p.name for p in model_dir.iterdir()) == ["tiny.en.maxpkg", "tiny.en.maxpkg.lock"]  # no temp left
    made = pkg.stat().st_mtime_ns
    again = _whisper_run(
        "tiny.en", golden.JFK_WAV, "--model_dir", model_dir, "-o", tmp_path / "out2", "-f", "txt", "--verbose", "False"
    )
    rc, _, err = again.wait(timeout=600), *again.communicate()
    assert rc == 0 and "convert" not in err and "rebuild" not in err, err
    assert (tmp_path / "out2" / "jfk.txt").read_text() == jfk_txt
    assert pkg.stat().st_mtime_ns == made
    # a deleted package converts again from the optimised IR the first conversion cached (no trace)
    ir_text = Package.open(pkg).read("ir.txt")
    pkg.unlink()
    again = _whisper_run(
        "tiny.en", golden.JFK_WAV, "--model_dir", model_dir, "-o", tmp_path / "out3", "-f", "txt", "--verbose", "False"
    )
    rc, _, err = again.wait(timeout=600), *again.communicate()
    assert rc == 0 and "reading the optimised IR from the cache" in err and "torch.export" not in err, err
    assert (tmp_path / "out3" / "jfk.txt").read_text() == jfk_txt
    assert Package.open(pkg).read("ir.txt") == ir_text


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"max_version": "26.6.0"}, "compiled with MAX 26.6.0"),
        (
            {"target": Target("cpu", "x86_64", (*Target.host().features, "amx_fp16"))},
            "lacking ['amx_fp16']",
        ),
    ],
    ids=["max-version", "cpu-features"],
)
def test_an_explicit_package_for_another_build_or_cpu_is_refused_with_the_rebuild_hint(
    tiny_en, tmp_path, capsys, changes, says
):
    other = _with_manifest(tiny_en.path, tmp_path / "other.maxpkg", **changes)
    assert main([str(other), str(golden.JFK_WAV), "-o", str(tmp_path), "-f", "txt"]) == 1
    err = capsys.readouterr().err
    assert says in err and f"whisper-convert --rebuild {other}" in err, err
    assert not (tmp_path / "jfk.txt").exists()


def test_a_cached_package_for_another_cpu_is_rebuilt_in_the_cache(tiny_en, jfk_txt, tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    # compiled for a CPU with AVX2 alone: it would run here, but not as well as a program for this CPU
    stale = _with_manifest(tiny_en.path, model_dir / "tiny.en.maxpkg", target=Target("cpu", "x86_64", ("avx2",)))
    assert models.stale_reason(stale) is not None
    run = _whisper_run(
        "tiny.en", golden.JFK_WAV, "--model_dir", model_dir, "-o", tmp_path / "out", "-f", "txt", "--verbose", "False"
    )
    rc, _, err = run.wait(timeout=1800), *run.communicate()
    assert rc == 0, err
    assert "must be recompiled for this machine" in err and "converting" not in err, err
    assert (tmp_path / "out" / "jfk.txt").read_text() == jfk_txt
    manifest = Package.open(stale).manifest
    assert manifest.target == Target.host() and manifest.rebuilt.from_target.features == ("avx2",)
    assert models.stale_reason(stale) is None


def test_what_is_not_a_model_says_what_is(tmp_path):
    with pytest.raises(PackageError, match=r"not a model name \(tiny.en, tiny, .*\.maxpkg"):
        models.cache_key(str(tmp_path / "nothing"))
    pt = tmp_path / "mine.pt"
    pt.write_bytes(b"x")
    first = models.cache_key(str(pt))
    assert first.startswith("mine-") and models.cache_key(str(pt)) == first
    os.utime(pt, ns=(0, 0))  # a replaced checkpoint converts again
    assert models.cache_key(str(pt)) != first
    assert models.resolve(tmp_path / "given.maxpkg") == tmp_path / "given.maxpkg"  # used as it is


def test_the_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("WHISPER_MAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.default_model_dir() == tmp_path / "whisper-max" / "models"


def test_a_name_without_the_converter_installed_says_what_to_install(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(
        PackageError, match=r"needs the converter's dependencies \(torch missing\).*whisper-max\[convert\]"
    ):
        models.resolve("tiny.en", tmp_path / "models")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny.en.maxpkg.lock"]  # no package
