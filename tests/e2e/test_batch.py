"""whisper-batch over the dev audio folder: failures recorded, resumable, the same files on Ray."""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from helpers import SHARED_AUDIO, shared_audio

from whisper_max import golden
from whisper_max.runtime.batch import BatchError, collect, main
from whisper_max.runtime.cli import main as whisper_run
from whisper_max.runtime.writers import WRITERS


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> Path:
    """The team's dev audio folder (links to its WAV and FLAC files) and one corrupt file: a FLAC
    cut after 5000 bytes."""
    shared_audio("manifest.json")
    folder = tmp_path_factory.mktemp("dev")
    # WAV and FLAC only: an .mp3 needs ffmpeg, which a machine here may not have (test_audio_inputs
    # checks that error); this job's point is the corrupt file among good ones
    audio = sorted(p for p in SHARED_AUDIO.iterdir() if p.suffix in (".wav", ".flac"))
    for p in audio:
        (folder / p.name).symlink_to(p)
    (folder / "corrupt.flac").write_bytes((SHARED_AUDIO / "jfk.flac").read_bytes()[:5000])
    return folder


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "summary.json"}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def local_run(tiny_en, dev, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    rc = main([str(tiny_en.path), str(dev), "--out", str(out), "--beam_size", "None"])
    return rc, out


def test_batch_records_the_corrupt_file_and_writes_the_others(local_run, dev, tiny_en, tmp_path):
    rc, out = local_run
    assert rc == 1  # one file failed
    summary = _summary(out)
    good = sorted(p.name for p in dev.iterdir() if p.name != "corrupt.flac")
    assert (summary["done"], summary["failed"], summary["skipped"], summary["pending"]) == (len(good), 1, 0, 0)
    [bad] = [f for f in summary["files"] if f["status"] == "failed"]
    assert bad["input"].endswith("corrupt.flac") and "corrupt.flac" in bad["error"] and bad["duration"] is None
    assert all(f["duration"] > 1 and f["error"] is None for f in summary["files"] if f["status"] == "done")
    # jfk.wav and jfk.flac differ only by extension: their outputs keep it
    names = set(_outputs(out))
    for stem in ("jfk.wav", "jfk.flac", "ls_1221-135766-0002", "longform_lj001_0001-0032"):
        assert {f"{stem}.{fmt}" for fmt in WRITERS} <= names, stem
    assert not any(n.startswith("corrupt") for n in names)
    # what whisper-run writes for the same file and options
    assert (
        whisper_run(
            [
                str(tiny_en.path),
                str(golden.JFK_WAV),
                "-o",
                str(tmp_path),
                "-f",
                "json",
                "--beam_size",
                "None",
                "--verbose",
                "False",
            ]
        )
        == 0
    )
    assert (tmp_path / "jfk.json").read_text() == (out / "jfk.wav.json").read_text()


def test_a_rerun_redoes_only_what_is_missing(local_run, dev, tiny_en):
    rc, out = local_run
    (out / "pv_test_fr.txt").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(("pv_test_fr.", "summary"))}
    assert (
        main([str(tiny_en.path), str(dev), "--out", str(out), "--beam_size", "None"]) == 1
    )  # the corrupt file fails again
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(("pv_test_fr.", "summary"))}
    assert after == before, "files whose outputs were complete were written again"
    assert all((out / f"pv_test_fr.{fmt}").is_file() for fmt in WRITERS)
    summary = _summary(out)
    status = {Path(f["input"]).name: f["status"] for f in summary["files"]}
    assert status.pop("pv_test_fr.wav") == "done" and status.pop("corrupt.flac") == "failed"
    assert set(status.values()) == {"skipped"}
    assert all(f["duration"] for f in summary["files"] if f["status"] == "skipped")  # kept from the first run


def test_the_same_job_on_a_local_ray_gives_the_same_files(local_run, dev, tiny_en, tmp_path):
    """Actors each load the package and decode groups of files; fallback sampling is seeded
    per window (--seed), so texts that needed it are the same too."""
    _, out = local_run
    ray_out = tmp_path / "ray"
    assert main([str(tiny_en.path), str(dev), "--out", str(ray_out), "--beam_size", "None", "--ray"]) == 1
    assert _outputs(ray_out) == _outputs(out)
    local = {
        f["input"]: (f["status"] if f["status"] != "skipped" else "done", f["duration"], f["error"])
        for f in _summary(out)["files"]
    }
    assert {f["input"]: (f["status"], f["duration"], f["error"]) for f in _summary(ray_out)["files"]} == local


def test_a_ray_actor_killed_mid_job_is_restarted_and_the_job_finishes(local_run, dev, tiny_en, tmp_path):
    """SIGKILL to the Ray actor while it decodes a group (as the OOM killer would): Ray restarts
    it and decodes that group again; every output is written once and is the local run's, and
    summary.json is the local run's."""
    _, out = local_run
    ray_out = tmp_path / "ray"
    killed: list[int] = []
    stop = threading.Event()

    def kill_a_busy_actor() -> None:
        while not stop.wait(0.2) and not killed:
            if not any(ray_out.glob("*.txt")):  # mid-job: after the first group is written
                continue
            for proc in Path("/proc").iterdir():
                try:
                    title = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::_Worker.transcribe"):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
                    return

    killer = threading.Thread(target=kill_a_busy_actor, daemon=True)
    killer.start()
    try:
        rc = main(
            [str(tiny_en.path), str(dev), "--out", str(ray_out), "--beam_size", "None", "--ray", "--batch_size", "2"]
        )
    finally:
        stop.set()
        killer.join()
    assert killed, "no actor was decoding after the first group was written: nothing was killed"
    assert rc == 1  # the corrupt file
    assert _outputs(ray_out) == _outputs(out)
    local = {
        f["input"]: (f["status"] if f["status"] != "skipped" else "done", f["duration"], f["error"])
        for f in _summary(out)["files"]
    }
    files = _summary(ray_out)["files"]
    assert len(files) == len(local)
    assert {f["input"]: (f["status"], f["duration"], f["error"]) for f in files} == local


def test_inputs_files_folders_and_lists(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/x.wav", "a/sub/x.wav", "a/notes.md", "b.flac", "c.mp3"):
        (tmp_path / name).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\nb.flac\n\nc.mp3  # trailing\n")
    jobs = collect([tmp_path / "a", listing, tmp_path / "b.flac"])  # b.flac twice: once
    assert [(j.audio.relative_to(tmp_path).as_posix(), j.rel.as_posix()) for j in jobs] == [
        ("a/sub/x.wav", "sub/x"),
        ("a/x.wav", "x"),
        ("b.flac", "b"),
        ("c.mp3", "c"),
    ]
    (tmp_path / "empty").mkdir()
    assert (
        main(["x.maxpkg", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    )  # no audio there: an error, not an empty success
    with pytest.raises(BatchError, match="no such file or folder"):
        collect([tmp_path / "missing"])
    listing.write_text("b.flac\nnope.wav\n")
    with pytest.raises(BatchError, match=r"list.txt:2: nope.wav: no such file"):
        collect([listing])
    os.rename(tmp_path / "a" / "sub" / "x.wav", tmp_path / "x.wav")
    with pytest.raises(BatchError, match="would both write x"):
        collect([tmp_path / "a", tmp_path / "x.wav"])
