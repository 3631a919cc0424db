"""Benchmark whisper-run against openai-whisper and faster-whisper on the same audio and options.

    python scripts/bench.py --package tiny.en.maxpkg [--package-bf16 tiny.en.bf16.maxpkg] [--audio FILE]
                            [--repeats 3] [--out bench.json] [--docs]

Options for every engine: greedy (beam 1; `--beam-size N` for beam search), temperature 0 without fallback, language en,
timestamps on, condition on previous text, 2 threads. Each run is its own process (one engine
per process), engines interleaved within each repeat. Reported: min/median wall time of
transcription (load excluded, reported apart), real-time factor, peak RSS, the ratio of
whisper-max to each peer from the same run, whisper-max's component split (log-mel, encoder per
window, decoder ms/token, load), and whether its tokens equal openai-whisper's.

With `--corpus`, every engine transcribes the benchmark corpus (scripts/make_corpus.py: 8 files of
2-4 minutes of real English speech, built reproducibly from ../shared/audio) and the long-form
file one after another in one process, except whisper-max, which gives them to
`transcribe_many` (up to 8 files in flight on the engine, the rows of all their windows decoded
in one call per token: continuous batching); `whisper-max-sequential` is the same package one
file at a time.

With `--batched`, faster-whisper's batched mode on one long file (or, with `--corpus`, on each
file in turn): `whisper-max-batched` (transcribe_batched: Silero VAD, chunks of up to 30 s, 8 at
once on the engine) against faster-whisper's BatchedInferencePipeline (batch 8, float32, and
int8 for reference), both with their default VAD parameters (the same), without timestamps, beam
5 unless `--beam-size`. Reported besides the times: each engine's WER on the timed audio and, in
one more run per engine, on the English dev set (references normalised by openai-whisper's
EnglishTextNormalizer).

`--package-bf16` adds `whisper-max-bfloat16`: the same runtime on a package converted with
`--dtype bfloat16` (its tokens need not equal openai-whisper's; scripts/wer.py measures the cost).

`--peers DIR` adds OpenVINO GenAI (f32, bf16) and whisper.cpp (f32, f16, q8_0), set up in DIR by
`../shared/tools/peers/setup.sh` and run with the same flags as its `wall.sh` (one file, greedy
or beam search): their own reported load and transcription times, and for every engine the
whole process from spawn to exit.

Peers are optional benchmark dependencies: `pip install faster-whisper` (CTranslate2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_AUDIO = ROOT.parent / "shared" / "audio" / "longform_lj001_0001-0032.wav"
CLIP = ROOT / "golden" / "data" / "jfk.wav"  # bundled; start-up is measured on it
ENGINES = ["whisper-max", "openai-whisper", "faster-whisper-fp32", "faster-whisper-int8"]
BATCHED_ENGINES = ["whisper-max-batched", "faster-whisper-batched", "faster-whisper-batched-int8"]
# peers outside this Python, set up and run by ../shared/tools/peers (its README): OpenVINO GenAI's
# WhisperPipeline in its own venv and whisper.cpp's whisper-cli
PEER_ENGINES = ["openvino-f32", "openvino-bf16", "whisper.cpp-f32", "whisper.cpp-f16", "whisper.cpp-q8_0"]
SHARED = ROOT.parent / "shared" / "audio"
PEER_TOOLS = ROOT.parent / "shared" / "tools" / "peers"


def machine() -> dict:
    """The CPU this run is on: model, kind (docs/benchmarks.md keeps one table per kind), cores, the
    instruction sets that matter here, and its read bandwidth as measured now."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    model, vendor = info.get("model name", "unknown CPU"), info.get("vendor_id", "")
    family, number = int(info.get("cpu family", 0)), int(info.get("model", 0))
    if (
        vendor == "AuthenticAMD"
        and family == 0x19
        and (0x10 <= number <= 0x1F or 0x60 <= number <= 0x7F or 0xA0 <= number <= 0xAF)
    ):
        kind = "AMD EPYC (Zen 4)"
    elif vendor == "AuthenticAMD" and family == 0x19 and number < 0x10:
        kind = "AMD EPYC (Zen 3)"  # Milan: AVX2, no AVX-512 (no bfloat16 packages)
    elif vendor == "AuthenticAMD" and family == 0x1A:
        kind = "AMD EPYC (Zen 5)"
    elif vendor == "GenuineIntel" and "amx_tile" in flags:
        kind = "Intel Xeon (AMX)"
    else:
        kind = f"{model} (family {family}, model {number})"
    return {
        "cpu": model,
        "kind": kind,
        "cores": len(os.sched_getaffinity(0)),
        "isa": sorted(flags & {"avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
        "read_gb_s": read_bandwidth(),
    }


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """GB/s read by two threads summing halves of a 1 GiB float32 array (numpy releases the GIL),
    in memory of the kind package weights load into (runtime.weights.huge_buffer: 2 MiB pages
    where the kernel gives them): the best of `repeats`, so the bandwidth floor it gives is the
    strictest this run saw."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from whisper_max.runtime.weights import huge_buffer

    a = np.frombuffer(huge_buffer(mib * 2**20), np.float32)  # memory of the kind weights load into
    a[:] = 1
    halves = np.array_split(a, 2)
    best = float("inf")
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.add.reduce, halves))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def package_manifest(path):
    """The package's manifest (runtime.manifest.Manifest), read without loading the program."""
    from whisper_max.runtime.package import Package

    return Package.open(path).manifest


def step_bytes(manifest) -> int:
    """Bytes one single-row decoder step must read: the weights decoder_step binds (one row of
    the positional table, and of the token table where the vocabulary product reads its panels)
    and the window's cross-attention keys and values; the self-attention caches (under 1 MB on
    average here) are left out, which makes the floor lower, not higher."""
    import numpy as np

    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    sig = manifest.graphs["decoder_step"]
    per_window = set(manifest.graphs["cross_kv"].output_names())
    names = {w.name for w in sig.weights}
    gathered = {"decoder.positional_embedding"} | {n for n in names if n + "/panels" in names}
    total = 0
    for w in sig.weights:
        shape = w.shape[1:] if w.name in gathered else w.shape
        total += int(np.prod(shape)) * size[w.dtype]
    for i in sig.inputs:
        if i.name in per_window:
            total += int(np.prod(i.shape)) * size[i.dtype]
    return total


def dev_set(shared: Path = SHARED) -> list[dict]:
    """The English clips of ../shared/audio with exact references, one encoding of each recording
    (the 7 short dev clips and the long-form file), in the manifest's order."""
    entries = json.loads((shared / "manifest.json").read_text())
    return [
        e
        for e in entries
        if e["language"] == "en" and e["reference_quality"].startswith("exact") and e["file"].endswith(".wav")
    ]


def references(paths: list[str]) -> list[str]:
    """The reference text of each file: a dev-set file's from the manifest, a corpus file's from
    corpus.json (the references of its parts, joined)."""
    by_name = {e["file"]: e["reference"] for e in json.loads((SHARED / "manifest.json").read_text())}
    refs = []
    for p in paths:
        path = Path(p)
        index = path.parent / "corpus.json"
        if path.name in by_name and path.parent == SHARED:
            refs.append(by_name[path.name])
        elif index.is_file():
            refs.append(next(f["reference"] for f in json.loads(index.read_text())["files"] if f["file"] == path.name))
        else:
            raise SystemExit(f"{p}: no reference text (neither a file of {SHARED} nor of a corpus with corpus.json)")
    return refs


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """WER % over all the files: word edits (after EnglishTextNormalizer) over reference words."""
    from whisper.normalizers import EnglishTextNormalizer

    from whisper_max.golden import word_edits

    norm = EnglishTextNormalizer()
    pairs = [(norm(r).split(), norm(h).split()) for r, h in zip(refs, hyps, strict=True)]
    return 100.0 * sum(word_edits(r, h) for r, h in pairs) / sum(len(r) for r, _ in pairs)


def corpus_files() -> list[str]:
    """The benchmark corpus's files, built (scripts/make_corpus.py) into the temp dir once."""
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_corpus

    out = Path(tempfile.gettempdir()) / f"whisper-max-corpus-{os.getuid()}"
    index = out / "corpus.json"
    if not index.is_file():
        make_corpus.build(out)
    return [str(out / e["file"]) for e in json.loads(index.read_text())["files"]]


def _startup(package: str) -> dict:
    """Runs in its own process: `whisper-run PACKAGE CLIP` with its default options on the
    bundled clip, timed from process start (the parent's clock just before spawning) to the
    first token's logits, and to the written outputs."""
    import tempfile

    from whisper_max.runtime import cli
    from whisper_max.runtime.model import WhisperModel

    spawned = float(os.environ["WHISPER_MAX_BENCH_SPAWN"])
    out: dict = {"engine": "whisper-run start-up", "clip": CLIP.name}
    step = WhisperModel.decoder_step

    def first(self, *a, **k):
        r = step(self, *a, **k)
        out.setdefault("first_token_s", time.time() - spawned)
        return r

    WhisperModel.decoder_step = first
    with tempfile.TemporaryDirectory() as tmp:
        if cli.main([package, str(CLIP), "--output_dir", tmp, "--verbose", "False"]) != 0:
            raise SystemExit("whisper-run failed on the bundled clip")
    out["end_to_end_s"] = time.time() - spawned
    return out


def _child(engine: str, package: str, audio_path: str, beam: int | None = None) -> dict:
    """Runs in its own process: load, transcribe once, report times, tokens and peak RSS.
    `beam`: beam search of that width instead of greedy decoding."""
    from whisper_max.runtime.audio import load_audio

    audios = [load_audio(p) for p in audio_path.split(",")]  # several: a corpus, one after another
    out: dict = {"engine": engine, "duration_s": sum(len(a) for a in audios) / 16000}
    t = time.perf_counter()
    if engine.startswith("whisper-max"):
        import numpy as np

        from whisper_max import runtime

        model = runtime.load(package)
        out["load_s"] = time.perf_counter() - t
        # how much of this process the kernel backs with 2 MiB pages (the weights ask for them)
        smaps = Path("/proc/self/smaps")
        out["huge_pages_mb"] = (
            sum(int(line.split()[1]) for line in smaps.read_text().splitlines() if line.startswith("AnonHugePages:"))
            / 1024
            if smaps.exists()
            else None
        )
        t0 = time.perf_counter()
        for a in audios:
            model.log_mel(np.asarray(a), padding=16000 * 30)
        out["log_mel_s"] = time.perf_counter() - t0
        model.stats.reset(durations=True)  # the graphs' calls and seconds, as the model counts them
        t = time.perf_counter()
        from whisper_max.runtime.engine import Engine
        from whisper_max.runtime.transcribe import transcribe_many

        eng = Engine(model)
        if engine.endswith(
            "batched"
        ):  # faster-whisper's batched mode: VAD chunks, 8 at once, temperature fallback as openai-whisper's
            from whisper_max.runtime.options import TranscribeOptions
            from whisper_max.runtime.transcribe import transcribe_batched

            options = TranscribeOptions.from_kwargs(
                language="en", beam_size=beam, without_timestamps=True, verbose=None
            )
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
        out["texts"] = [r["text"] for r in results]
        out["tokens"] = [s["tokens"] for r in results for s in r["segments"]]
        n_tokens = sum(len(s) for s in out["tokens"])
        graph_s, stats = dict(model.stats.seconds), model.stats
        steps = {"decoder_rows": stats.durations.get("decoder_rows", [])}  # one token for each row in flight
        out["components"] = {
            "encoder_s_per_window": graph_s.get("encoder", 0.0) / max(stats.calls.get("encoder", 0), 1),
            "windows": stats.calls.get("encoder", 0),
            "decoder_calls": eng.calls,
            "rows_per_call": eng.rows_decoded / max(eng.calls, 1),
            "decoder_ms_per_call": 1000 * graph_s.get("decoder_rows", 0.0) / max(eng.calls, 1),
            "decoder_s": graph_s.get("decoder_rows", 0.0),
            "prompts_s": sum(graph_s.get(g, 0.0) for g in ("decoder", "decoder_step", "select")),
            "tokens": n_tokens,
            "graph_s": graph_s,
            "outside_graphs_s": out["wall_s"] - sum(graph_s.values()),
            **{f"{g}_ms_median": 1000 * statistics.median(v) for g, v in steps.items() if v},
            **{f"{g}_calls": len(v) for g, v in steps.items()},
        }
    elif engine == "openai-whisper":
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
    elif engine.startswith("faster-whisper"):
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
            if (
                "batched" in engine
            ):  # its defaults: Silero VAD (30 s spans, 160 ms pauses), without timestamps, the first temperature only
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
    else:
        raise SystemExit(f"unknown engine {engine}")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _external(engine: str, audio_path: str, beam: int | None, peers: Path) -> dict:
    """One run of a peer outside this Python (PEER_ENGINES), as ../shared/tools/peers/wall.sh runs
    it (the same flags): its whole process timed from spawn to exit, its peak RSS from the
    kernel's account of the process and its children, and the load and transcription times it
    reports itself (OpenVINO GenAI: ov_transcribe.py's `load` and `transcribe wall`; whisper.cpp:
    whisper_print_timings' load and total, and its encoder, decoder and prompt shares)."""
    import re
    import tempfile

    if "," in audio_path:
        raise SystemExit(f"{engine}: one audio file per run; the peers outside this Python are not timed on a corpus")
    kind, precision = engine.rsplit("-", 1)  # openvino | whisper.cpp, and its precision
    beams = beam or 1
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PEERS_DIR=str(peers))
        if kind == "openvino":
            python, model = peers / "venv-ov" / "bin" / "python", peers / "models" / "ov-tiny.en"
            need = [python, model / "openvino_decoder_model.xml"]
            cmd = [
                str(python),
                str(PEER_TOOLS / "ov_transcribe.py"),
                str(model),
                audio_path,
                "--precision",
                precision,
                "--beams",
                str(beams),
                "--threads",
                "2",
                "--timestamps",
            ]
            text_file = log_file = None
        else:
            prefix = (
                Path(tmp) / "out"
            )  # whispercpp.sh writes PREFIX.txt (the text) and PREFIX.log (whisper-cli's output)
            need = [
                peers / "whisper.cpp" / "build" / "bin" / "whisper-cli",
                peers / "whisper.cpp" / "models" / "tiny.en" / f"ggml-tiny.en-{precision}.bin",
            ]
            cmd = [
                "bash",
                str(PEER_TOOLS / "whispercpp.sh"),
                "run",
                precision,
                audio_path,
                "greedy" if beams == 1 else f"beam{beams}",
                str(prefix),
            ]
            text_file, log_file = prefix.with_suffix(".txt"), prefix.with_suffix(".log")
        missing = [str(f) for f in need if not f.exists()]
        if missing:
            what = "openvino" if kind == "openvino" else "whispercpp MIRROR"
            raise SystemExit(
                f"{engine}: {', '.join(missing)} missing; set it up with `PEERS_DIR={peers} {PEER_TOOLS}/setup.sh "
                f"{what}` (README there)"
            )
        streams = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with streams[0].open("w") as o, streams[1].open("w") as e:
            t = time.time()
            proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env)
            _, status, usage = os.wait4(proc.pid, 0)  # this process and the children it waited for
            process_s = time.time() - t
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
        stdout, stderr = (f.read_text() for f in streams)
        if proc.returncode != 0:
            log = log_file.read_text() if log_file and log_file.exists() else stderr
            raise SystemExit(f"{engine} failed (exit {proc.returncode}):\n{log[-2000:]}")
        out: dict = {"engine": engine, "process_s": process_s, "peak_rss_mb": usage.ru_maxrss / 1024, "components": {}}
        if kind == "openvino":
            m = re.search(r"load ([0-9.]+) s \| transcribe wall ([0-9.]+) s", stderr)
            if not m:
                raise SystemExit(f"{engine}: ov_transcribe.py reported no load and transcribe times:\n{stderr[-1000:]}")
            out["load_s"], out["wall_s"], out["texts"] = float(m.group(1)), float(m.group(2)), [stdout.strip()]
        else:
            log = log_file.read_text()
            ms = {k: float(v) for k, v in re.findall(r"whisper_print_timings:\s+(\w+) time =\s+([0-9.]+) ms", log)}
            if "load" not in ms or "total" not in ms:
                raise SystemExit(f"{engine}: whisper-cli printed no load and total times:\n{log[-1000:]}")
            out["load_s"], out["wall_s"] = ms["load"] / 1000, (ms["total"] - ms["load"]) / 1000
            out["components"] = {
                k: v / 1000 for k, v in ms.items() if k in ("mel", "encode", "decode", "batchd", "prompt")
            }
            out["texts"] = [" ".join(line.strip() for line in text_file.read_text().splitlines())]
    from whisper_max.runtime.audio import load_audio

    out["duration_s"] = len(load_audio(audio_path)) / 16000  # as _child counts it
    return out


DOCS = ROOT / "docs"


def _write_docs(table: str, command: str, block: str = "results", marker: str | None = None) -> None:
    """Replace the docs' block `block` (between its markers, in whichever page of docs/ holds
    them; `marker` names them in full) with this run's table."""
    marker = marker or f"bench.py {block}"
    BEGIN, END = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    pages = [p for p in sorted(DOCS.glob("*.md")) if BEGIN in p.read_text()]
    text = pages[0].read_text() if len(pages) == 1 else ""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(
            f"{DOCS}: expected one {BEGIN} ... {END} block in one page to replace (a machine kind measured for the "
            "first time: add that pair of lines under its own heading in docs/benchmarks.md)"
        )
    page = pages[0]
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    block = f"{BEGIN}\nGenerated by `{command}` ({time.strftime('%Y-%m-%d')}).\n\n{table}\n{END}"
    tmp = page.with_suffix(".md.tmp")
    tmp.write_text(head + block + tail)
    tmp.replace(page)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument(
        "--package-bf16", default=None, help="also run whisper-max on this package (converted with --dtype bfloat16)"
    )
    ap.add_argument("--audio", default=str(DEFAULT_AUDIO))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--out", default=None, help="write the JSON here (the Markdown goes to stdout)")
    ap.add_argument(
        "--docs",
        action="store_true",
        help="also replace this machine kind's results block in docs/benchmarks.md with this run's table",
    )
    ap.add_argument(
        "--corpus",
        action="store_true",
        help=(
            "the benchmark corpus (scripts/make_corpus.py) and the long-form file, in one process per engine; "
            "whisper-max batches them"
        ),
    )
    ap.add_argument(
        "--beam-size",
        type=int,
        default=None,
        help=(
            "beam search of this width for every engine (openai-whisper's and faster-whisper's default is 5) "
            "instead of greedy"
        ),
    )
    ap.add_argument(
        "--batched",
        action="store_true",
        help=(
            "faster-whisper's batched mode (VAD chunks, batch 8, beam 5) against its BatchedInferencePipeline, with WER"
        ),
    )
    ap.add_argument(
        "--peers",
        type=Path,
        default=None,
        help=(
            "also time OpenVINO GenAI (f32, bf16) and whisper.cpp (f32, f16, q8_0), set up in this folder by "
            "../shared/tools/peers/setup.sh (PEERS_DIR)"
        ),
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batched and not args.child:
        args.beam_size = args.beam_size or 5  # BatchedInferencePipeline's default
        if args.engines == ",".join(ENGINES):
            args.engines = ",".join(BATCHED_ENGINES)
    if args.corpus:
        args.audio = ",".join([*corpus_files(), str(DEFAULT_AUDIO)])
        if args.engines == ",".join(ENGINES):
            args.engines = ",".join(["whisper-max", "whisper-max-sequential", *ENGINES[1:]])
    ours = "whisper-max-batched" if args.batched else "whisper-max"
    ours_bf16 = "whisper-max-bfloat16-batched" if args.batched else "whisper-max-bfloat16"
    if args.package_bf16 and ours_bf16 not in args.engines.split(","):
        names = args.engines.split(",")
        names.insert(names.index(ours) + 1 if ours in names else 0, ours_bf16)
        args.engines = ",".join(names)
    if args.peers and not args.child:
        if args.corpus or args.batched:
            raise SystemExit(
                "--peers: OpenVINO GenAI and whisper.cpp are timed on one file, greedy or beam search; not with "
                "--corpus or --batched"
            )
        args.engines = ",".join(
            [*args.engines.split(","), *(e for e in PEER_ENGINES if e not in args.engines.split(","))]
        )
    if args.child:
        if args.child == "machine":
            print(json.dumps(machine()))
        else:
            print(
                json.dumps(
                    _startup(args.package)
                    if args.child == "startup"
                    else _child(args.child, args.package, args.audio, args.beam_size)
                )
            )
        return

    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    startups: list[dict] = []
    env = dict(os.environ, OMP_NUM_THREADS="2")

    def child(name: str, audio: str | None = None) -> dict:
        """One run in a new process; its clock starts just before the spawn."""
        env["WHISPER_MAX_BENCH_SPAWN"] = repr(time.time())
        package = args.package_bf16 if "bfloat16" in name else args.package
        if package is None:
            raise SystemExit(f"{name}: give its package with --package-bf16")
        beam = [] if args.beam_size is None else ["--beam-size", str(args.beam_size)]
        t = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--package", package, "--audio", audio or args.audio, *beam],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
        # the whole process, its bench bookkeeping included (one more log-mel of the audio, timing)
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.time() - t}

    # in a child: the 1 GiB it reads would otherwise count in every later child's peak RSS (Linux
    # keeps ru_maxrss across exec)
    host = child("machine")
    print(
        f"machine: {host['cpu']}, kind {host['kind']}, {host['cores']} cores, read {host['read_gb_s']:.1f} GB/s",
        file=sys.stderr,
        flush=True,
    )
    for r in range(args.repeats):
        for e in engines:  # interleaved: machine noise hits every engine alike
            runs[e].append(_external(e, args.audio, args.beam_size, args.peers) if e in PEER_ENGINES else child(e))
            print(f"repeat {r + 1}/{args.repeats} {e}: {runs[e][-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
        if "whisper-max" in engines and not args.corpus and args.beam_size is None:
            startups.append(child("startup"))

    wer: dict[str, dict[str, float]] = {}
    if args.batched:
        timed_refs = references(args.audio.split(","))
        dev = [str(SHARED / e["file"]) for e in dev_set()]
        dev_refs = references(dev)
        for e in engines:
            wer[e] = {
                "timed": word_error_rate(timed_refs, runs[e][0]["texts"]),
                "dev": word_error_rate(dev_refs, child(e, ",".join(dev))["texts"]),
            }
            print(
                f"{e}: WER {wer[e]['timed']:.2f} % on the timed audio, {wer[e]['dev']:.2f} % on the dev set",
                file=sys.stderr,
                flush=True,
            )

    duration = runs[engines[0]][0]["duration_s"]
    summary = {}
    for e, rs in runs.items():
        walls = [x["wall_s"] for x in rs]
        summary[e] = {
            "min_s": min(walls),
            "median_s": statistics.median(walls),
            "rtf": statistics.median(walls) / duration,
            "load_s": statistics.median(x["load_s"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "process_s": statistics.median(x["process_s"] for x in rs),
        }
    if startups:
        summary["whisper-run start-up"] = {
            k: statistics.median(x[k] for x in startups) for k in ("first_token_s", "end_to_end_s")
        }
    ref_tokens = runs.get("openai-whisper", [{}])[0].get("tokens")
    bf = summary.get(ours_bf16)
    files = [Path(p).name for p in args.audio.split(",")]
    together = "each batched in turn" if args.batched else "whisper-max: in flight together, batch 8"
    what = (
        f"`{files[0]}`" if len(files) == 1 else f"{len(files)} files one after another ({', '.join(files)}; {together})"
    )
    last_columns = (
        (" WER % (timed audio) | WER % (dev set) |", "---:|---:|") if wer else (" tokens = openai-whisper |", ":-:|")
    )
    lines = [
        f"Machine: {host['cpu']}, kind {host['kind']}, {host['cores']} cores, {', '.join(host['isa'])}; read "
        f"bandwidth {host['read_gb_s']:.1f} GB/s (two threads summing 1 GiB, best of 5).",
        "",
        f"Audio: {what} ({duration:.1f} s); "
        f"{'greedy' if args.beam_size is None else f'beam search, width {args.beam_size}'}, temperature 0 (no "
        "fallback), language en, timestamps, "
        f"condition on previous text, 2 threads; {args.repeats} interleaved repeats, one process per run.",
        "",
        f"| engine | min s | median s | RTF | load s | whole process s | peak RSS MB | {ours} speed-up (median) |"
        + (f" {ours_bf16} speed-up (median) |" if bf else "")
        + last_columns[0],
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if bf else "") + last_columns[1],
    ]
    if args.batched:
        lines[2] = (
            f"Audio: {what} ({duration:.1f} s); batched mode: Silero VAD with faster-whisper's batched defaults "
            "(spans up to 30 s, 160 ms pauses), "
            f"chunks of up to 30 s, batch 8, beam {args.beam_size}, without timestamps, language en, 2 threads; "
            f"{args.repeats} interleaved repeats, one process per run. "
            f"WER: EnglishTextNormalizer, word edits over reference words; dev set: {len(dev)} English clips "
            f"({', '.join(Path(d).name for d in dev)})."
        )
    mx = summary.get(ours)

    def ratio(s: dict, base: dict | None, own: bool) -> str:
        return f"{s['median_s'] / base['median_s']:.2f}x" if base and not own else "—"

    for e, s in summary.items():
        if e not in runs:
            continue
        same = (
            "—"
            if ref_tokens is None or e == "openai-whisper" or "tokens" not in runs[e][0]
            else ("yes" if runs[e][0]["tokens"] == ref_tokens else "no")
        )
        bf_col = f" {ratio(s, bf, e == ours_bf16)} |" if bf else ""
        last = f" {wer[e]['timed']:.2f} | {wer[e]['dev']:.2f} |" if wer else f" {same} |"
        lines.append(
            f"| {e} | {s['min_s']:.2f} | {s['median_s']:.2f} | {s['rtf']:.3f} | {s['load_s']:.2f} | "
            f"{s['process_s']:.2f} | {s['peak_rss_mb']:.0f} | {ratio(s, mx, e == ours)} |{bf_col}{last}"
        )
    if any(e in runs for e in PEER_ENGINES):
        lines += [
            "",
            "median s: transcription, load excluded, as each engine reports it (OpenVINO GenAI: ov_transcribe.py's "
            "`transcribe wall`; "
            "whisper.cpp: whisper_print_timings' total minus load); whole process s: spawn to exit, imports, load and "
            "audio decoding included "
            "(whisper-max's and faster-whisper's include this benchmark's bookkeeping). OpenVINO GenAI does not "
            "condition on previous text.",
        ]
        for own in (ours, ours_bf16):
            if own in summary:
                lines.append(
                    f"{own} speed-up by whole process (median): "
                    + ", ".join(
                        f"{e} {summary[e]['process_s'] / summary[own]['process_s']:.2f}x"
                        for e in runs
                        if e != own and not e.startswith("whisper-max")
                    )
                    + "."
                )
        for e in PEER_ENGINES:
            c = runs.get(e, [{}])[-1].get("components")
            if c:
                lines.append(f"{e} reports (last run): " + ", ".join(f"{k} {v:.2f} s" for k, v in c.items()) + ".")
    for e in ("whisper-max", "whisper-max-bfloat16", "whisper-max-batched", "whisper-max-bfloat16-batched"):
        if e not in runs:
            continue
        c = runs[e][-1]["components"]
        huge = ", ".join(f"{x.get('huge_pages_mb') or 0:.0f}" for x in runs[e])
        lines += [
            "",
            f"{e} components (last run): log-mel {runs[e][-1]['log_mel_s']:.2f} s, encoder "
            f"{1000 * c['encoder_s_per_window']:.0f} ms/window ({c['windows']} windows), decoder steps "
            f"{c['decoder_ms_per_call']:.2f} ms/call "
            f"({c['decoder_calls']} calls of {c['rows_per_call']:.1f} rows on average, {c['tokens']} tokens, "
            f"{c['decoder_s']:.2f} s), "
            f"prompts {c['prompts_s']:.2f} s, load {summary[e]['load_s']:.2f} s; "
            f"outside the graphs {c['outside_graphs_s']:.2f} s of {runs[e][-1]['wall_s']:.2f} s; "
            f"memory in 2 MiB pages after load {huge} MB (each run).",
        ]
        package = args.package_bf16 if "bfloat16" in e else args.package
        manifest = package_manifest(package)
        nbytes = step_bytes(manifest)
        floor_ms = nbytes / host["read_gb_s"] / 1e6
        medians = [
            x["components"]["decoder_rows_ms_median"]
            for x in runs[e]
            if x["components"].get("decoder_rows_calls", 0) >= 20
        ]
        if medians:
            ms, c = statistics.median(medians), runs[e][-1]["components"]
            lines.append(
                f"{e} decoder_rows (one token for each row in flight): median {ms:.2f} ms per call of "
                f"{c['rows_per_call']:.1f} rows on average "
                f"({c['decoder_rows_calls']} calls in the last run); the bandwidth floor of one row is {floor_ms:.2f} "
                "ms "
                f"({nbytes / 1e6:.0f} MB of weights and one window's cross K/V at {host['read_gb_s']:.1f} GB/s)."
            )
        timings = manifest.timings_s
        lines.append(
            f"{e} package: converted by whisper-max {manifest.converter.get('whisper_max', '?')} in "
            f"{sum(timings.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; "
            "the compile times depend on MAX's cache being cold or warm)."
        )
    if startups:
        st = summary["whisper-run start-up"]
        lines += [
            "",
            f"whisper-run start-up, `whisper-run PACKAGE {CLIP.name}` with its default options (medians of "
            f"{len(startups)}): "
            f"process start to the first token's logits {st['first_token_s']:.2f} s; to the written outputs "
            f"{st['end_to_end_s']:.2f} s.",
        ]
    table = "\n".join(lines)
    print(table)
    if args.docs:
        block = (
            ("batched corpus results" if args.corpus else "batched results")
            if args.batched
            else "corpus results"
            if args.corpus
            else "results"
            if args.beam_size is None
            else "beam results"
        )
        _write_docs(table, " ".join(["python scripts/bench.py", *sys.argv[1:]]), f"{block}: {host['kind']}")
    if args.out:
        kept = {e: [{k: v for k, v in x.items() if k != "tokens"} for x in rs] for e, rs in runs.items()}
        Path(args.out).write_text(json.dumps({"machine": host, "summary": summary, "wer": wer, "runs": kept}, indent=1))


if __name__ == "__main__":
    main()
