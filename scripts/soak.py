"""Soak test of whisper-serve on loopback: thousands of short requests, memory and latency over time.

    python scripts/soak.py PACKAGE [--requests 2000] [--clients 8] [--seconds 4] [--beam_size None]
                                   [--json soak.json]

Starts `whisper-serve PACKAGE` (a subprocess on a free 127.0.0.1 port, scripts/load_test.py's
Server), takes each English dev clip's first `--seconds` seconds as a short request, asks each
once alone for its answer, then sends `--requests` requests from `--clients` threads with the
official openai client, every answer checked against that clip's answer. A sampler reads the
server's RSS (/proc) and its /health (rows in flight, requests admitted) every second.

Checked (exit 1 if any fails), after a warm-up of the first 5% of the requests:
- memory: the server's largest RSS in the last tenth of the run (by time) is < 5% over its largest
  in the first tenth after the warm-up;
- leaks: 0 rows in flight and 0 requests admitted once idle, and /metrics counts every request;
- drift: the p99 latency of the last 10% of the requests (in completion order) is within 1.2x
  of the first 10%'s (after the warm-up);
- correctness: every answer is its clip's answer alone.
Printed: the CPU, RSS and latency over time in tenths of the run, throughput, and the checks.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import machine  # noqa: E402
from load_test import Server, dev_clips, percentile  # noqa: E402


def short_requests(seconds: float) -> list[tuple[str, bytes]]:
    """Each dev clip's first `seconds` seconds as a 16-bit WAV (name, bytes)."""
    from whisper_max.runtime.audio import load_audio

    out = []
    for clip in dev_clips():
        audio = load_audio(clip)[: int(16000 * seconds)]
        buf = io.BytesIO()
        sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
        out.append((clip.name, buf.getvalue()))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Sampler(threading.Thread):
    """The server's RSS and /health every `every` seconds: (time, rss MB, live_rows, admitted)."""

    def __init__(self, server: Server, every: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.every, self.samples = server, every, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            h = self.server.health()
            self.samples.append((time.monotonic(), rss_mb(self.server.proc.pid), h["live_rows"], h["admitted"]))


def served_total(server: Server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "whisper_served_total"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of each dev clip a request sends")
    ap.add_argument("--beam_size", default="None", help="the server's --beam_size (None: greedy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cpu = machine()  # before the server starts: it reads 1 GiB to measure the bandwidth
    requests = short_requests(args.seconds)
    server = Server(args.package, "--beam_size", args.beam_size, "--max_active", str(args.clients))
    failures: list[str] = []
    try:
        client = server.client
        want = {
            name: client.audio.transcriptions.create(file=(name, data), model="whisper-1").text
            for name, data in requests
        }
        done: list[tuple[float, int, float, bool]] = []  # (finished at, index, latency, right)
        lock = threading.Lock()

        def ask(i: int) -> None:
            name, data = requests[i % len(requests)]
            t0 = time.perf_counter()
            text = client.audio.transcriptions.create(file=(name, data), model="whisper-1").text
            latency = time.perf_counter() - t0
            with lock:
                done.append((time.monotonic(), i, latency, text == want[name]))

        sampler = Sampler(server)
        sampler.start()
        start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            for f in [pool.submit(ask, i) for i in range(args.requests)]:
                f.result()
        wall = time.monotonic() - start
        time.sleep(2.0)  # idle
        sampler.done.set()
        sampler.join()
        idle = server.health()
        served = served_total(server)
    finally:
        server.stop()

    done.sort()
    warm = max(1, args.requests // 20)
    warm_end = done[warm - 1][0]
    after = [d for d in done[warm:]]
    tenth = max(1, len(after) // 10)
    first, last = [d[2] for d in after[:tenth]], [d[2] for d in after[-tenth:]]
    span = (done[-1][0] - warm_end) / 10
    rss_first = max(s[1] for s in sampler.samples if warm_end <= s[0] <= warm_end + span)
    rss_last = max(s[1] for s in sampler.samples if s[0] >= done[-1][0] - span)
    growth = rss_last / rss_first - 1
    drift = percentile(last, 99) / percentile(first, 99)
    wrong = sum(not d[3] for d in done)
    checks = {
        "rss_growth_after_warmup < 5%": growth < 0.05,
        "0 rows in flight and 0 admitted at idle": idle["live_rows"] == 0 and idle["admitted"] == 0,
        "/metrics served_total counts every request": served == args.requests + len(requests),
        "p99 of the last 10% <= 1.2x the first 10%'s": drift <= 1.2,
        "every answer is its clip's answer alone": wrong == 0,
    }
    failures += [name for name, ok in checks.items() if not ok]

    cpu = machine()
    print(
        f"CPU: {cpu['cpu']} ({cpu['kind']}); {args.requests} requests of {args.seconds:g} s, "
        f"{args.clients} clients, beam_size {args.beam_size}"
    )
    print(f"wall {wall:.1f} s, {args.requests / wall:.2f} requests/s")
    print("tenth  requests  p50 s  p99 s  RSS MB (max in the tenth)  rows in flight (max)")
    t_end = done[-1][0]
    for k in range(10):
        lo, hi = start + k * (t_end - start) / 10, start + (k + 1) * (t_end - start) / 10
        lat = [d[2] for d in done if lo <= d[0] < hi or (k == 9 and d[0] == hi)]
        smp = [s for s in sampler.samples if lo <= s[0] < hi]
        if lat and smp:
            print(
                f"{k + 1:5d}  {len(lat):8d}  {percentile(lat, 50):5.2f}  {percentile(lat, 99):5.2f}  "
                f"{max(s[1] for s in smp):24.0f}  {max(s[2] for s in smp):20d}"
            )
    print(
        f"RSS (largest) in the first tenth after the warm-up {rss_first:.0f} MB, in the last {rss_last:.0f} MB "
        f"({growth * 100:+.1f} %); p99 first / last tenth {percentile(first, 99):.2f} / "
        f"{percentile(last, 99):.2f} s ({drift:.2f}x); at idle {idle['live_rows']} rows, {idle['admitted']} admitted; "
        f"served_total {served:.0f}; wrong answers {wrong}"
    )
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        report = {
            "machine": cpu,
            "args": vars(args),
            "wall_s": wall,
            "rss_mb": [(round(t - start, 1), round(r, 1), rows, adm) for t, r, rows, adm in sampler.samples],
            "latency_s": [(round(t - start, 2), i, round(lat, 3), ok) for t, i, lat, ok in done],
            "rss_growth": growth,
            "p99_drift": drift,
            "checks": checks,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
    if failures:
        print("failed: " + "; ".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
