"""whisper-convert on bad inputs: one line naming the file and what is wrong, exit code 1, and no
package (whole or partial) left behind, also when the disk fills or the process is killed."""

import json
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict

import numpy as np
import pytest
import torch
from helpers.tiny_model import TINY_DIMS, tiny_whisper, to_ct2_variables, write_model_bin

from whisper_max.converter.cli import main
from whisper_max.runtime.package import Package


def _checkpoint(path, edit=lambda dims, sd: None):
    model = tiny_whisper()
    dims, sd = asdict(model.dims), dict(model.state_dict())
    edit(dims, sd)
    torch.save({"dims": dims, "model_state_dict": sd}, path)
    return path


def _without_stages(err: str) -> str:
    """whisper-convert's stderr without its stage lines (`whisper-convert [  1.2s] tracing ...`)."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("whisper-convert ["))


def _fails(capsys, argv, out_dir):
    before = sorted(p.name for p in out_dir.iterdir())
    assert main(argv) == 1
    err = _without_stages(capsys.readouterr().err)
    assert err.startswith("whisper-convert: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == before, "a failed conversion wrote something"
    return err


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d, sd: d.pop("n_mels"),
            r"'dims' does not fit openai-whisper's ModelDimensions: missing \['n_mels'\], extra \[\]",
        ),
        (lambda d, sd: d.update(n_heads=4), r"missing \[\], extra \['n_heads'\]"),
        (lambda d, sd: d.update(n_audio_ctx=-3), r"'dims' values must be positive integers: \{'n_audio_ctx': -3\}"),
        (lambda d, sd: sd.pop("decoder.ln.weight"), r"missing \['decoder.ln.weight'\], extra \[\]"),
        (lambda d, sd: sd.update({"decoder.extra": torch.zeros(2)}), r"missing \[\], extra \['decoder.extra'\]"),
        (
            lambda d, sd: sd.update({"decoder.ln.bias": torch.zeros(7)}),
            r"decoder.ln.bias: shape \(7,\), openai-whisper expects \(16,\)",
        ),
        (
            lambda d, sd: sd.update({"decoder.ln.bias": [0.0] * 16}),
            r"entries that are not tensors: \['decoder.ln.bias'\]",
        ),
    ],
)
def test_checkpoint_that_does_not_fit(tmp_path, capsys, edit, message):
    pt = _checkpoint(tmp_path / "m.pt", edit)
    err = _fails(capsys, [str(pt), "--out", str(tmp_path / "m.maxpkg")], tmp_path)
    assert err.startswith(f"whisper-convert: error: {pt}: ") and re.search(message, err), err


def test_ctranslate2_folder_of_another_architecture(tmp_path, capsys):
    """A CTranslate2 translation model (TransformerSpec) is not Whisper: said so, by its folder."""
    sd = {k: v.numpy() for k, v in tiny_whisper().state_dict().items()}
    folder = tmp_path / "opus-mt"
    folder.mkdir()
    (folder / "model.bin").write_bytes(write_model_bin(to_ct2_variables(sd, TINY_DIMS), {}, spec="TransformerSpec"))
    (folder / "config.json").write_text(json.dumps({"bos_token": "<s>"}))
    err = _fails(capsys, [str(folder), "--out", str(tmp_path / "x.maxpkg")], tmp_path)
    assert f"{folder}" in err and "spec 'TransformerSpec' is not a Whisper model" in err


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "m.maxpkg"
    out.write_bytes(b"an earlier package")
    pt = _checkpoint(tmp_path / "m.pt", lambda d, sd: d.pop("n_mels"))
    err = _fails(capsys, [str(pt), "--out", str(out)], tmp_path)
    assert f"{out} exists; pass --force to replace it" in err
    # with --force the conversion goes ahead (and here fails on the checkpoint, after the check)
    err = _fails(capsys, [str(pt), "--out", str(out), "--force"], tmp_path)
    assert "missing ['n_mels']" in err and out.read_bytes() == b"an earlier package"


@pytest.mark.parametrize(
    "module, function, limit_kb, message",
    [
        (
            "whisper_max.converter.convert",
            "export_mef",
            2048,
            "cannot export the compiled program to {tmp}/model.mef (File too large); set TMPDIR to a folder with "
            "room, nothing was written",
        ),
        (
            "whisper_max.runtime.package",
            "write_package",
            65536,
            "{out}: cannot write the package (File too large); nothing was written, any earlier file there is "
            "unchanged",
        ),
    ],
    ids=["mef-export", "package-write"],
)
def test_full_disk_while_writing_leaves_nothing_and_a_rerun_works(
    tiny_en, tmp_path, module, function, limit_kb, message
):
    """RLIMIT_FSIZE (`ulimit -f`) stops a write part way, first the compiled program's export
    (18 MB for tiny.en), then the package (~130 MB): one line, exit 1, nothing left behind; the same
    command without the limit then writes the package. The limit is set around that write alone:
    under a process-wide `ulimit -f` MAX's own compile-cache writes fail first when the cache is cold
    (LLVM ERROR, or std::terminate at exit), which is not what this test is about."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "tiny.en.maxpkg"
    script = textwrap.dedent(
        f"""
        import importlib, resource
        mod = importlib.import_module({module!r})
        real = getattr(mod, {function!r})
        def limited(*a, **k):
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_kb} * 1024, hard))
            try:
                return real(*a, **k)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        setattr(mod, {function!r}, limited)
        from whisper_max.converter.cli import run
        run()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "--rebuild", str(tiny_en.path), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, f"exit code {proc.returncode} with {function} limited to {limit_kb} KB: {proc.stderr}"
    lines = _without_stages(proc.stderr).strip().splitlines()
    pattern = re.escape(message).replace(r"\{tmp\}", "/.+").replace(r"\{out\}", re.escape(str(out)))
    assert len(lines) == 1 and re.fullmatch("whisper-convert: error: " + pattern, lines[0]), lines
    assert list(out_dir.iterdir()) == []
    assert main(["--rebuild", str(tiny_en.path), "--out", str(out)]) == 0
    assert Package.open(out).read("weights.bin") == Package.open(tiny_en.path).read("weights.bin")
    assert [p.name for p in out_dir.iterdir()] == ["tiny.en.maxpkg"]


def test_killed_while_writing_leaves_no_package_and_a_rerun_cleans_up(tiny_en, tmp_path):
    """SIGKILL in the middle of the write (after the first zip entry): no package at the output
    path; the temp file the killed process could not remove is removed by the next write."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "tiny.en.maxpkg"
    script = textwrap.dedent(
        f"""
        import os, signal, zipfile
        real = zipfile.ZipFile.writestr
        def writestr(self, name, data, *a, **k):
            if name != "manifest.json":
                self.fp.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, name, data, *a, **k)
        zipfile.ZipFile.writestr = writestr
        from whisper_max.converter.cli import main
        main(["--rebuild", {str(tiny_en.path)!r}, "--out", {str(out)!r}])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(out_dir.iterdir())
    assert (
        not out.exists()
        and len(left) == 1
        and left[0].name.startswith(".tiny.en.maxpkg.")
        and left[0].name.endswith(".tmp")
    )
    assert main(["--rebuild", str(tiny_en.path), "--out", str(out)]) == 0
    assert [p.name for p in out_dir.iterdir()] == ["tiny.en.maxpkg"]
    assert np.array_equal(
        Package.open(out).weights()["decoder.ln.weight"], Package.open(tiny_en.path).weights()["decoder.ln.weight"]
    )
