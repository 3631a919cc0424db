"""How scripts/bench.py runs each engine, each run in its own process: whisper-max (the
repository's runtime), openai-whisper and faster-whisper in this Python (`run_engine`), whisper-run's
start-up (`startup`), and the peers outside it, OpenVINO GenAI and whisper.cpp (`run_peer`)."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

from bench_setup import CLIP, PEER_TOOLS, package_manifest


def startup(package: str) -> dict:
    """Runs in its own process: `whisper-run PACKAGE CLIP` with its default options on the
    bundled clip, timed from process start (the parent's clock just before spawning) to the
    first token's logits, and to the written outputs."""
    import tempfile

    from whisper_max.runtime import cli
    from whisper_max.runtime.pool import PoolRows

    spawned = float(os.environ["WHISPER_MAX_BENCH_SPAWN"])
    out: dict = {"engine": "whisper-run start-up", "clip": CLIP.name}
    prefill = PoolRows.prefill  # the first window's prompt: its logits choose the first token

    def first(self, *a, **k):
        r = prefill(self, *a, **k)
        out.setdefault("first_token_s", time.time() - spawned)
        return r

    PoolRows.prefill = first
    with tempfile.TemporaryDirectory() as tmp:
        if cli.main([package, str(CLIP), "--output_dir", tmp, "--verbose", "False"]) != 0:
            raise SystemExit("whisper-run failed on the bundled clip")
    out["end_to_end_s"] = time.time() - spawned
    return out


def run_engine(engine: str, package: str, audio_path: str, beam: int | None = None) -> dict:
    """Runs in its own process: load, transcribe once, report times, tokens and peak RSS.
    `beam`: beam search of that width instead of greedy decoding."""
    from whisper_max.runtime.audio import load_audio

    audios = [load_audio(p) for p in audio_path.split(",")]  # several: a corpus, one after another
    out: dict = {"engine": engine, "duration_s": sum(len(a) for a in audios) / 16000}
    t = time.perf_counter()  # load_s counts the engine's imports too
    if engine.startswith("whisper-max"):
        _whisper_max(engine, package, audios, beam, out, t)
    elif engine == "openai-whisper":
        _openai_whisper(package, audios, beam, out, t)
    elif engine.startswith("faster-whisper"):
        _faster_whisper(engine, package, audios, beam, out, t)
    else:
        raise SystemExit(f"unknown engine {engine}")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _huge_pages_mb() -> float | None:
    """How much of this process the kernel backs with 2 MiB pages (the weights ask for them)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    lines = smaps.read_text().splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith("AnonHugePages:")) / 1024


def _whisper_max(engine: str, package: str, audios: list, beam: int | None, out: dict, t: float) -> None:
    import numpy as np

    from whisper_max import runtime
    from whisper_max.runtime.engine import Engine
    from whisper_max.runtime.options import TranscribeOptions
    from whisper_max.runtime.transcribe import transcribe_batched, transcribe_many

    model = runtime.load(package)
    out["load_s"] = time.perf_counter() - t
    out["huge_pages_mb"] = _huge_pages_mb()
    t0 = time.perf_counter()
    for a in audios:
        model.log_mel(np.asarray(a), padding=16000 * 30)
    out["log_mel_s"] = time.perf_counter() - t0
    model.stats.reset(durations=True)  # the graphs' calls and seconds, as the model counts them
    t = time.perf_counter()
    eng = Engine(model)
    if engine.endswith("batched"):  # faster-whisper's batched mode: VAD chunks, 8 at once, openai-whisper's fallback
        options = TranscribeOptions.from_kwargs(language="en", beam_size=beam, without_timestamps=True, verbose=None)
        results = [transcribe_batched(model, a, batch_size=8, options=options, engine=eng) for a in audios]
    else:
        batch = 1 if engine.endswith("sequential") else 8
        results = [
            r
            for _, r in transcribe_many(
                model,
                audios,
                batch_size=batch,
                temperature=0.0,
                language="en",
                condition_on_previous_text=True,
                verbose=None,
                beam_size=beam,
                engine=eng,
            )
        ]
    out["wall_s"] = time.perf_counter() - t
    out["texts"] = [r.text for r in results]
    out["tokens"] = [list(s.tokens) for r in results for s in r.segments]
    out["components"] = _components(model.stats, eng, out)


def _components(stats, eng, out: dict) -> dict:
    """The split of whisper-max's time by graph, as the model and the engine count it."""
    graph_s = dict(stats.seconds)
    steps = {"decoder_rows": stats.durations.get("decoder_rows", [])}  # one token for each row in flight
    return {
        "encoder_s_per_window": graph_s.get("encoder", 0.0) / max(stats.calls.get("encoder", 0), 1),
        "windows": stats.calls.get("encoder", 0),
        "decoder_calls": eng.calls,
        "rows_per_call": eng.rows_decoded / max(eng.calls, 1),
        "decoder_ms_per_call": 1000 * graph_s.get("decoder_rows", 0.0) / max(eng.calls, 1),
        "decoder_s": graph_s.get("decoder_rows", 0.0),
        "prompts_s": sum(graph_s.get(g, 0.0) for g in ("decoder", "decoder_step", "decoder_rows.prompt", "select")),
        "tokens": sum(len(s) for s in out["tokens"]),
        "graph_s": graph_s,
        "outside_graphs_s": out["wall_s"] - sum(graph_s.values()),
        **{f"{g}_ms_median": 1000 * statistics.median(v) for g, v in steps.items() if v},
        **{f"{g}_calls": len(v) for g, v in steps.items()},
    }


def _openai_whisper(package: str, audios: list, beam: int | None, out: dict, t: float) -> None:
    import torch
    import whisper

    from whisper_max.converter.sources import resolve
    from whisper_max.converter.trace import model_from_state_dict

    torch.set_num_threads(2)
    src = resolve(package_manifest(package).model.name)
    model = model_from_state_dict(src.dims, src.state_dict, src.alignment_heads)
    out["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = [
        whisper.transcribe(
            model,
            a,
            temperature=0.0,
            language="en",
            condition_on_previous_text=True,
            fp16=False,
            beam_size=beam,
            best_of=None,
        )
        for a in audios
    ]
    out["wall_s"] = time.perf_counter() - t
    out["tokens"] = [s["tokens"] for r in results for s in r["segments"]]


def _faster_whisper(engine: str, package: str, audios: list, beam: int | None, out: dict, t: float) -> None:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    source = package_manifest(package).source
    if source is None or source.kind != "ctranslate2":
        raise SystemExit(
            f"faster-whisper needs a CTranslate2 model; {package} came from {source.kind if source else 'nowhere'}"
        )
    location = source.location.split(" + ")[0]
    model_dir = str(Path(location).parent if location.endswith(".bin") or ".bin." in location else location)
    compute = "int8" if engine.endswith("int8") else "float32"
    model = WhisperModel(model_dir, device="cpu", compute_type=compute, cpu_threads=2, num_workers=1)
    out["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out["tokens"], out["texts"] = [], []
    for a in audios:
        if "batched" in engine:  # its defaults: Silero VAD (30 s spans, 160 ms pauses), no timestamps, one temperature
            segments, _ = BatchedInferencePipeline(model).transcribe(a, batch_size=8, beam_size=beam, language="en")
        else:
            segments, _ = model.transcribe(
                a,
                beam_size=beam or 1,
                best_of=1,
                temperature=0.0,
                language="en",
                condition_on_previous_text=True,
                without_timestamps=False,
                vad_filter=False,
            )
        segments = list(segments)  # the generator decodes as it is consumed
        out["tokens"] += [list(s.tokens) for s in segments]
        out["texts"].append("".join(s.text for s in segments))
    out["wall_s"] = time.perf_counter() - t


def run_peer(engine: str, audio_path: str, beam: int | None, peers: Path) -> dict:
    """One run of a peer outside this Python (PEER_ENGINES), as ../shared/tools/peers/wall.sh runs
    it (the same flags): its whole process timed from spawn to exit, its peak RSS from the
    kernel's account of the process and its children, and the load and transcription times it
    reports itself (OpenVINO GenAI: ov_transcribe.py's `load` and `transcribe wall`; whisper.cpp:
    whisper_print_timings' load and total, and its encoder, decoder and prompt shares)."""
    import tempfile

    if "," in audio_path:
        raise SystemExit(f"{engine}: one audio file per run; the peers outside this Python are not timed on a corpus")
    kind = engine.rsplit("-", 1)[0]  # openvino | whisper.cpp
    with tempfile.TemporaryDirectory() as tmp:
        # whispercpp.sh writes PREFIX.txt (the text) and PREFIX.log (whisper-cli's output)
        prefix = Path(tmp) / "out"
        cmd = _peer_command(engine, audio_path, beam or 1, peers, prefix)
        streams = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with streams[0].open("w") as o, streams[1].open("w") as e:
            t = time.time()
            proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=dict(os.environ, PEERS_DIR=str(peers)))
            _, status, usage = os.wait4(proc.pid, 0)  # this process and the children it waited for
            process_s = time.time() - t
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
        stdout, stderr = (f.read_text() for f in streams)
        log_file = prefix.with_suffix(".log")
        if proc.returncode != 0:
            log = log_file.read_text() if kind != "openvino" and log_file.exists() else stderr
            raise SystemExit(f"{engine} failed (exit {proc.returncode}):\n{log[-2000:]}")
        out: dict = {"engine": engine, "process_s": process_s, "peak_rss_mb": usage.ru_maxrss / 1024, "components": {}}
        if kind == "openvino":
            _openvino_report(engine, stdout, stderr, out)
        else:
            _whispercpp_report(engine, log_file.read_text(), prefix.with_suffix(".txt").read_text(), out)
    from whisper_max.runtime.audio import load_audio

    out["duration_s"] = len(load_audio(audio_path)) / 16000  # as run_engine counts it
    return out


def _peer_command(engine: str, audio_path: str, beams: int, peers: Path, prefix: Path) -> list[str]:
    """wall.sh's command line for a peer, after checking what it needs is set up."""
    kind, precision = engine.rsplit("-", 1)  # openvino | whisper.cpp, and its precision
    if kind == "openvino":
        python, model = peers / "venv-ov" / "bin" / "python", peers / "models" / "ov-tiny.en"
        need = [python, model / "openvino_decoder_model.xml"]
        script = str(PEER_TOOLS / "ov_transcribe.py")
        cmd = [str(python), script, str(model), audio_path, "--precision", precision, "--beams", str(beams)]
        cmd += ["--threads", "2", "--timestamps"]
    else:
        need = [
            peers / "whisper.cpp" / "build" / "bin" / "whisper-cli",
            peers / "whisper.cpp" / "models" / "tiny.en" / f"ggml-tiny.en-{precision}.bin",
        ]
        mode = "greedy" if beams == 1 else f"beam{beams}"
        cmd = ["bash", str(PEER_TOOLS / "whispercpp.sh"), "run", precision, audio_path, mode, str(prefix)]
    missing = [str(f) for f in need if not f.exists()]
    if missing:
        what = "openvino" if kind == "openvino" else "whispercpp MIRROR"
        raise SystemExit(
            f"{engine}: {', '.join(missing)} missing; set it up with `PEERS_DIR={peers} {PEER_TOOLS}/setup.sh "
            f"{what}` (README there)"
        )
    return cmd


def _openvino_report(engine: str, stdout: str, stderr: str, out: dict) -> None:
    import re

    m = re.search(r"load ([0-9.]+) s \| transcribe wall ([0-9.]+) s", stderr)
    if not m:
        raise SystemExit(f"{engine}: ov_transcribe.py reported no load and transcribe times:\n{stderr[-1000:]}")
    out["load_s"], out["wall_s"], out["texts"] = float(m.group(1)), float(m.group(2)), [stdout.strip()]


def _whispercpp_report(engine: str, log: str, text: str, out: dict) -> None:
    import re

    ms = {k: float(v) for k, v in re.findall(r"whisper_print_timings:\s+(\w+) time =\s+([0-9.]+) ms", log)}
    if "load" not in ms or "total" not in ms:
        raise SystemExit(f"{engine}: whisper-cli printed no load and total times:\n{log[-1000:]}")
    out["load_s"], out["wall_s"] = ms["load"] / 1000, (ms["total"] - ms["load"]) / 1000
    out["components"] = {k: v / 1000 for k, v in ms.items() if k in ("mel", "encode", "decode", "batchd", "prompt")}
    out["texts"] = [" ".join(line.strip() for line in text.splitlines())]
