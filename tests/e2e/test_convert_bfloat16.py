"""whisper-convert --dtype bfloat16 on the real tiny.en weights: parity on the stored weights, half
the weight bytes, and a word error rate on the English dev set within 0.5 points of float32."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import HAS_BF16, needs_bf16

from whisper_max.runtime.package import Package

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    HAS_BF16, reason="this CPU has AVX512_BF16: test_bfloat16_package_parity_size_and_wer converts for real"
)
def test_bfloat16_refused_without_avx512_bf16(tmp_path, capsys):
    """On a CPU without AVX512_BF16 the bfloat16 kernels cannot run: whisper-convert says so in
    one line, before compiling anything, and writes nothing."""
    from whisper_max.converter.cli import main

    out = tmp_path / "tiny.en.bf16.maxpkg"
    assert main(["tiny.en", "--out", str(out), "--dtype", "bfloat16"]) != 0
    err = capsys.readouterr().err
    assert "AVX512_BF16" in err and "--dtype float32" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_bf16
def test_bfloat16_package_parity_size_and_wer(tiny_en, tmp_path):
    from whisper_max.converter.cli import main

    out = tmp_path / "tiny.en.bf16.maxpkg"
    assert main(["tiny.en", "--out", str(out), "--dtype", "bfloat16"]) == 0
    pkg, fp32 = Package.open(out), Package.open(tiny_en.path)
    m = pkg.manifest
    assert m.dtype == "bfloat16" and m.parity["dtype"] == "bfloat16" and m.parity["all_ok"]
    entries = pkg.json("parity.json")
    assert len(entries) == len(fp32.json("parity.json")) and all(e["ok"] for e in entries)
    assert "bfloat16" in pkg.read("MODEL_CARD.md").decode() and "rounded weights" in pkg.read("parity.md").decode()
    index = json.loads(pkg.read("weights.json"))
    assert (
        index["decoder.token_embedding.weight"]["dtype"] == "bfloat16"
        and index["decoder.ln.weight"]["dtype"] == "float32"
    )
    # half the bytes of the same weights in float32 (the float32 package keeps the decoder step's
    # matrices in float16 where that is exact, so its own size is not the float32 one)
    float32_bytes = sum(4 * int(np.prod(e["shape"])) for e in json.loads(fp32.read("weights.json")).values())
    assert m.files["weights.bin"].bytes < 0.51 * float32_bytes

    rows_json = tmp_path / "wer.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "wer.py"), str(tiny_en.path), str(out), "--json", str(rows_json)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    f32, bf16 = json.loads(rows_json.read_text())
    assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert f32["words"] > 700 and f32["wer"] < 10, f32  # the dev set was transcribed, not skipped
    assert bf16["wer"] - f32["wer"] <= 0.5, run.stdout
