"""whisper-run end to end, and the runtime's promise: no torch, no converter, no compiling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import OPENAI_SEGMENT_KEYS

from whisper_max import golden
from whisper_max.runtime.cli import main

STORED = Path(golden.__file__).parent / "transcripts.json"


def test_whisper_run_writes_every_format(tiny_en, tmp_path, capsys):
    assert main([str(tiny_en.path), str(golden.JFK_WAV), "-o", str(tmp_path), "--beam_size", "5"]) == 0
    out = capsys.readouterr().out
    assert "[00:00.000 --> " in out and "ask what you can do for your country" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jfk.json", "jfk.srt", "jfk.tsv", "jfk.txt", "jfk.vtt"]
    result = json.loads((tmp_path / "jfk.json").read_text())
    assert set(result) == {"text", "segments", "language"} and result["language"] == "en"
    assert set(result["segments"][0]) == set(OPENAI_SEGMENT_KEYS)


def test_whisper_run_several_files_in_input_order(tiny_en, tmp_path, capsys):
    """Files decoded together still print and write as one after another would."""
    from helpers import shared_audio

    short = shared_audio("ls_1221-135766-0002.wav")
    assert (
        main(
            [
                str(tiny_en.path),
                str(golden.JFK_WAV),
                str(short),
                "-o",
                str(tmp_path),
                "-f",
                "txt",
                "--beam_size",
                "None",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    jfk = [i for i, line in enumerate(out) if "country" in line or "fellow Americans" in line]
    other = [i for i, line in enumerate(out) if line.startswith("[") and i not in jfk]
    assert jfk and other and max(jfk) < min(other), out
    for name in ("jfk.txt", "ls_1221-135766-0002.txt"):
        single = tmp_path / "single"
        src = golden.JFK_WAV if name.startswith("jfk") else short
        assert (
            main(
                [
                    str(tiny_en.path),
                    str(src),
                    "-o",
                    str(single),
                    "-f",
                    "txt",
                    "--beam_size",
                    "None",
                    "--batch_size",
                    "1",
                ]
            )
            == 0
        )
        assert (tmp_path / name).read_text() == (single / name).read_text()
    assert main([str(tiny_en.path), str(short), "--batch_size", "0"]) == 2


def test_whisper_run_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.maxpkg"), str(golden.JFK_WAV)]) == 1
    assert "whisper-convert" in capsys.readouterr().err
    assert main(["x.maxpkg", "a.wav", "--verbose", "maybe"]) == 2


def test_stored_golden_without_torch(tiny_en, tmp_path):
    """Transcripts openai-whisper produced (stored by scripts/make_golden_transcripts.py), checked
    in a process that must not import torch, openai-whisper or the converter."""
    stored = json.loads(STORED.read_text())
    script = textwrap.dedent(
        f"""
        import json, sys
        from whisper_max import runtime
        model = runtime.load({str(tiny_en.path)!r})
        src = model.package.manifest.source.sha256
        out = {{}}
        for case in json.loads(open({str(STORED)!r}).read())["tiny.en"]["cases"]:
            r = model.transcribe({str(golden.DATA)!r} + "/" + case["clip"], **case["options"])
            out[case["name"]] = [[s["tokens"], s["start"], s["end"]] for s in r["segments"]]
        banned = [m for m in ("torch", "whisper", "whisper_max.converter") if m in sys.modules]
        print(json.dumps({{"source": src, "out": out, "banned": banned}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["banned"] == []
    assert got["source"] == stored["tiny.en"]["source_sha256"], "golden transcripts were made from other weights"
    for case in stored["tiny.en"]["cases"]:
        assert got["out"][case["name"]] == [[s["tokens"], s["start"], s["end"]] for s in case["segments"]], case["name"]


def test_one_import_name(tmp_path):
    """Installed, the project is `whisper_max` only: no generic top-level names are claimed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("runtime", "converter", "golden", "templates"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert proc.returncode != 0 and f"No module named '{name}'" in proc.stderr, (name, proc.stderr)
    script = (
        "import whisper_max.runtime, whisper_max.golden, whisper_max.templates, whisper_max.converter.lower; "
        "print(whisper_max.golden.JFK_WAV)"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("jfk.wav"), proc.stderr
