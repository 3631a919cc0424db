"""The engine's decoder call for 1..M rows: how the cost of a call grows with its rows.

    python scripts/rows_bench.py --package tiny.en.maxpkg [--rows 1,5,32] [--audio FILE]

For each row count M, M different 30 s windows of the audio (the long-form file by default) are
decoded greedily on one engine, without prompts, so every call holds one row per window. Only
calls made while all M windows are running count (positions grow alike); printed: the median
time of one call (decoder_rows: one token for each row, the choice included) and its ratio to
the one-row call of the same run. Issue 27's bar: 32 rows <= 2.5x one row. The CPU is printed
first; this machine is shared, so compare only ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_AUDIO = ROOT.parent / "shared" / "audio" / "longform_lj001_0001-0032.wav"
N_FRAMES = 3000  # mel frames of one 30 s window


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def call_times(model, mels: list[np.ndarray], options) -> list[float]:
    """Seconds of each engine call made while all of `mels`' windows were decoding."""
    from whisper_max.runtime.engine import Engine

    engine = Engine(model, max_rows=max(64, len(mels)))
    done: list = []
    for m in mels:
        engine.submit_window(m, options, done.append)
    times = []
    step = engine.pool.step

    def timed(items):
        t = time.perf_counter()
        out = step(items)
        if len(items) == len(mels):
            times.append(time.perf_counter() - t)
        return out

    engine.pool.step = timed
    engine.run()
    if len(done) != len(mels):
        raise RuntimeError(f"{len(done)} of {len(mels)} windows finished")
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--rows", default="1,5,32", help="row counts, comma-separated")
    ap.add_argument("--audio", default=str(DEFAULT_AUDIO))
    ap.add_argument(
        "--repeats", type=int, default=2, help="decode each row count this many times; the calls of all count"
    )
    args = ap.parse_args(argv)

    from whisper_max import runtime
    from whisper_max.runtime.audio import load_audio
    from whisper_max.runtime.decoding import DecodingOptions

    counts = [int(r) for r in args.rows.split(",")]
    model = runtime.load(args.package)
    mel = model.log_mel(load_audio(args.audio))
    hop = max(1, (mel.shape[-1] - N_FRAMES) // max(1, max(counts) - 1))
    windows = [mel[:, i * hop : i * hop + N_FRAMES] for i in range(max(counts))]
    windows = [np.pad(w, ((0, 0), (0, N_FRAMES - w.shape[-1]))) for w in windows]
    options = DecodingOptions(language="en", temperature=0.0, without_timestamps=False)
    print(f"CPU: {cpu_name()}; package {args.package}")
    call_times(model, windows[:1], options)  # warm-up
    base = None
    for m in counts:
        times = [t for _ in range(args.repeats) for t in call_times(model, windows[:m], options)]
        med = statistics.median(times) * 1e3
        base = base or med
        print(
            f"rows {m:3d}: median {med:7.2f} ms a call ({len(times)} calls), {med / base:5.2f}x one row, "
            f"{med / m:6.3f} ms a row"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
