"""whisper-convert on the real tiny.en weights: parity per layer, package contents, loading."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from whisper_max.converter import ir, onnx_io
from whisper_max.converter.cli import main
from whisper_max.runtime.manifest import FORMAT_VERSION, Target
from whisper_max.runtime.package import Package


def test_parity_covers_every_runtime_output_and_passes(tiny_en):
    """The default check (one compile): every output of the graphs the runtime loads, every
    decoding route's logits and word timestamps' inputs, against openai-whisper."""
    pkg = Package.open(tiny_en.path)
    entries = pkg.json("parity.json")
    names = [e["name"] for e in entries]
    dims = pkg.manifest.model.dims
    expected = (
        [
            "encoder.ln_post",
            "logits",
            "logits.incremental.rows",
            "logits.all",
        ]
        + [f"decoder.blocks.{i}.cross_attn.qk" for i in range(dims["n_text_layer"])]
        + [
            f"decoder.blocks.{i}.{a}.{kv}"
            for i in range(dims["n_text_layer"])
            for a in ("attn", "cross_attn")
            for kv in ("key", "value")
        ]
    )
    assert sorted(names) == sorted(expected)
    bad = [e for e in entries if not e["ok"] or e["max_rel_err"] > e["tol"]]
    assert not bad, bad
    assert all(set(e) == {"name", "shape", "max_abs_err", "max_rel_err", "tol", "ok"} for e in entries)
    assert pkg.manifest.parity["all_ok"] and not pkg.manifest.skip_check
    assert pkg.manifest.parity["check"] == "outputs" and "compile_probe" not in pkg.manifest.timings_s
    assert f"all {len(expected)} entries pass" in pkg.read("parity.md").decode()


def test_a_wrong_lowering_is_refused_naming_its_layer(tiny_en, tmp_path, monkeypatch):
    """GELU lowered as the "quick" GELU, x * sigmoid(1.702 x) (CLIP's, a real confusion) instead
    of openai-whisper's exact erf one: the default check refuses the package on its outputs,
    compiles the per-layer probe, and names encoder.conv2, the first module whose input went
    through the wrong GELU (conv1's output is still right; in PyTorch the slip moves conv2's
    output by 1.1e-2 of its range, the tolerance is 1e-4); nothing is written."""
    from whisper_max.converter import lower
    from whisper_max.converter.convert import ConvertError, convert
    from whisper_max.converter.lower import activation

    exact = activation.gelu
    assert lower._REGISTRY["aten.gelu.default"] is exact
    monkeypatch.setitem(
        lower._REGISTRY, "aten.gelu.default", lambda ctx, node, x, approximate: exact(ctx, node, x, "quick")
    )
    out = tmp_path / "wrong.maxpkg"
    with pytest.raises(ConvertError) as refused:
        convert("tiny.en", out)
    message = str(refused.value)
    assert "no package written; the first layer that diverges: encoder.conv2:" in message, message
    assert "  encoder.conv1:" not in message and "  encoder.conv2:" in message
    # the output that reads a GELU lowering fails (decoder_rows' blocks are a kernel with its own GELU)
    assert "  encoder.ln_post:" in message and "  logits" not in message
    assert list(tmp_path.iterdir()) == []


def test_manifest_describes_the_package(tiny_en):
    m = Package.open(tiny_en.path).manifest
    assert m.format_version == FORMAT_VERSION and m.dtype == "float32" and m.target == Target.host()
    assert m.model.dims["n_vocab"] == 51864 and not m.model.multilingual
    assert m.source.kind == "ctranslate2" and len(m.source.sha256) == 64
    assert m.max_version.startswith("26.7")
    # the runtime's graphs are compiled; the IR keeps the general decoder, decoder_step and alignment
    assert set(m.graphs) == {"encoder", "cross_kv", "decoder_rows", "select"}
    # decoder_rows chooses the next tokens in the same call; rows carry a lineage, prompts pick their
    # last row; each layer's cross-attention queries give word timestamps' scores
    queries = [f"decoder.blocks.{i}.cross_attn/transpose/queries" for i in range(m.model.dims["n_text_layer"])]
    assert m.graphs["decoder_rows"].output_names() == ["logits", "choice", *queries]
    assert {"lineage", "window", "logit_rows"} <= set(m.graphs["decoder_rows"].input_names())
    assert {
        "model.mef",
        "weights.bin",
        "weights.json",
        "ir/decoder.onnx",
        "assets/gpt2.tiktoken",
        "assets/mel_filters.npy",
        "parity.json",
        "MODEL_CARD.md",
    } <= set(m.files)


def test_onnx_in_package_is_the_printed_ir(tiny_en):
    pkg = Package.open(tiny_en.path)
    onnx_files = {n: pkg.read(n) for n in pkg.names() if n.startswith("ir/")}
    assert ir.format_program(onnx_io.from_onnx_files(onnx_files)) == pkg.read("ir.txt").decode()


def test_loads_in_a_new_process_without_torch_or_compiling(tiny_en, tmp_path):
    cache = tmp_path / "modular-cache"
    cache.mkdir()
    script = textwrap.dedent(
        f"""
        import sys, time, json
        t = time.perf_counter()
        import numpy as np
        from whisper_max.runtime.package import Package
        pkg = Package.open({str(tiny_en.path)!r})
        models = pkg.load_models()
        load = time.perf_counter() - t
        dims = pkg.manifest.model.dims
        mel = np.zeros((1, dims["n_mels"], 2 * dims["n_audio_ctx"]), np.float32)
        xa = models["encoder"].execute(mel)[0]
        kv = models["cross_kv"].execute(xa)
        shape = list(xa.to_numpy().shape)
        print(json.dumps({{"load_s": load, "torch": "torch" in sys.modules, "xa": shape, "kv": len(kv)}}))
        """
    )
    # The trust list lives in WHISPER_MAX_CACHE (conftest points it at a temp dir where the
    # session's conversions are recorded); without it the new process would refuse the MEF.
    env = {
        "MODULAR_CACHE_DIR": str(cache),
        "PATH": "/usr/bin:/bin",
        "WHISPER_MAX_CACHE": os.environ["WHISPER_MAX_CACHE"],
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tiny_en.path.parent
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"package load in a new process: {out['load_s']:.3f} s")
    assert out["torch"] is False
    xkv = Package.open(tiny_en.path).manifest.graphs["cross_kv"].output_names()
    # the 2 per layer cross K/V, then the values hoisted out of the decoder step (head-split, scaled)
    assert xkv[:8] == [f"decoder.blocks.{i}.cross_attn.{kv}" for i in range(4) for kv in ("key", "value")]
    assert out["xa"] == [1, 1500, 384] and out["kv"] == len(xkv) == 16
    # a compile would have filled the cache; loading a MEF writes nothing there
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_skip_check_is_recorded(tmp_path):
    from whisper_max.converter.convert import convert

    out = convert("tiny.en", tmp_path / "t.maxpkg", skip_check=True)
    m = Package.open(out.path).manifest
    assert m.skip_check is True and m.parity == {"checked": False}
    assert json.loads(Package.open(out.path).read("parity.json")) == []


def test_cli_errors_are_plain(capsys, tmp_path):
    assert main(["tiny.xx", "--out", str(tmp_path / "x.maxpkg"), "--quiet"]) == 1  # no stage lines
    err = capsys.readouterr().err
    assert err.startswith("whisper-convert: error: 'tiny.xx' is neither a model name") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert main(["--bogus-flag"]) == 2


def _without_select(src: Path, out: Path) -> Path:
    """A copy of the package `src` as a converter before the select graph made it: no graph
    `select` in its manifest, IR or ir.txt."""
    from whisper_max.runtime.package import write_package

    pkg = Package.open(src)
    files = {n: pkg.read(n) for n in pkg.names() if n not in ("manifest.json", "ir/select.onnx")}
    program = onnx_io.from_onnx_files({n: d for n, d in files.items() if n.startswith("ir/")})
    files["ir.txt"] = ir.format_program(program).encode()
    graphs = {g: sig for g, sig in pkg.manifest.graphs.items() if g != "select"}
    write_package(out, replace(pkg.manifest, graphs=graphs), files)
    return out


def test_rebuild_from_the_package_alone(tiny_en, tmp_path):
    """--rebuild recompiles from the package's IR and weights in a process where torch cannot load,
    and the rebuilt package transcribes as openai-whisper did (stored golden transcripts). The
    package given lacks the select graph (made before it existed): the runtime refuses it, saying
    to rebuild, and the rebuild adds the graph the converter makes today."""
    from whisper_max.runtime.model import WhisperModel
    from whisper_max.runtime.package import PackageError

    older = _without_select(tiny_en.path, tmp_path / "older.maxpkg")
    with pytest.raises(PackageError, match="has no select graph.*--rebuild"):
        WhisperModel(Package.open(older))
    out = tmp_path / "rebuilt.maxpkg"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # importing torch now fails
        from whisper_max.converter.cli import main
        sys.exit(main(["--rebuild", {str(older)!r}, "--out", {str(out)!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rebuilt, original = Package.open(out), Package.open(tiny_en.path)
    assert rebuilt.manifest.rebuilt.from_max_version == original.manifest.max_version
    assert rebuilt.manifest.graphs == original.manifest.graphs and rebuilt.read("ir/select.onnx") == original.read(
        "ir/select.onnx"
    )
    assert rebuilt.read("weights.bin") == original.read("weights.bin") and rebuilt.read("ir.txt") == original.read(
        "ir.txt"
    )
    from whisper_max import golden, runtime

    stored = json.loads((Path(golden.__file__).parent / "transcripts.json").read_text())["tiny.en"]["cases"][0]
    result = runtime.load(out).transcribe(str(golden.JFK_WAV), **stored["options"])
    assert [s["tokens"] for s in result["segments"]] == [s["tokens"] for s in stored["segments"]]
