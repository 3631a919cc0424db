"""The bare runtime transcribes without the extras' packages, and each feature that needs one
says, in one line, which extra installs it (runtime/extras.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

JFK = Path(__file__).resolve().parents[2] / "golden" / "data" / "jfk.wav"

# A child process in which the extras' packages (and the converter's) cannot be imported.
CHILD = """
import contextlib, importlib.abc, io, json, sys
BLOCKED = {"fastapi", "starlette", "uvicorn", "python_multipart", "multipart", "onnxruntime", "ray", "torch", "whisper"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
from whisper_max import runtime
from whisper_max.runtime import batch, cli, serve

package, audio, out = sys.argv[1:]
text = runtime.load(package).transcribe(audio, beam_size=None, temperature=0.0)["text"]
lines = {}
vad_args = [package, audio, "-o", out, "--vad_filter", "True", "--verbose", "False"]
ray_args = [package, audio, "-o", out + "-ray", "--ray"]
for name, main, args in (("serve", serve.main, [package]), ("vad", cli.main, vad_args), ("ray", batch.main, ray_args)):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    lines[name] = (rc, err.getvalue())
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps({"text": text, "lines": lines, "loaded": loaded}))
"""


def test_bare_runtime_transcribes_and_names_the_missing_extras(tiny_en, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_en.path), str(JFK), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["text"].strip().startswith("And so my fellow Americans")
    assert got["loaded"] == []
    rc, err = got["lines"]["serve"]
    assert rc == 1 and err == (
        "whisper-serve: error: whisper-serve needs fastapi, which is not installed: pip install 'whisper-max[server]'\n"
    )
    rc, err = got["lines"]["vad"]
    assert rc == 1 and err.splitlines()[-1] == (
        "whisper-run: error: Silero VAD (vad_filter, the batched mode) needs onnxruntime, which is not "
        "installed: pip install 'whisper-max[vad]'"
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written
    rc, err = got["lines"]["ray"]
    assert rc == 1 and err.splitlines()[-1] == (
        "whisper-batch: error: whisper-batch --ray needs ray, which is not installed: pip install 'whisper-max[ray]'"
    )
