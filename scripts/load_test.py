"""Load test of whisper-serve on loopback, with the official openai client.

    python scripts/load_test.py PACKAGE [--requests 32] [--clients 8] [--beam_size 5|None] [--out load.json]

Starts `whisper-serve PACKAGE` on a free 127.0.0.1 port (a subprocess), then:

1. one at a time: every request sent alone, in turn (the peer, same run, same server);
2. concurrent: the same requests from `--clients` threads; every answer must equal the
   one-at-a-time answer for its clip; p50/p95 latency, requests/s, and the ratio to (1);
3. flood: a server with a small admission queue (--max_active 2 --queue_size 2) gets the
   requests from 16 threads at once, without retries: each answer is the right text or a 429
   with Retry-After, none is lost; the 429s are then retried after Retry-After until done;
4. SIGTERM under load: SIGTERM while requests decode; each request in flight is answered
   correctly, the server exits 0.

The clips are the dev set's short English clips in ../shared/audio (the manifest's kind
"short", language en), cycled. The CPU is recorded: compare runs on the same kind only.
Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "audio"
sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import machine  # noqa: E402


def dev_clips() -> list[Path]:
    manifest = json.loads((SHARED / "manifest.json").read_text())
    return [
        SHARED / m["file"]
        for m in manifest
        if m["kind"] == "short" and m["language"] == "en" and m["file"].endswith(".wav")
    ]


class Server:
    """whisper-serve as a subprocess on a free loopback port."""

    def __init__(self, package: str, *flags: str):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "whisper_max.runtime.serve",
            package,
            "--port",
            str(self.port),
            "--log_level",
            "warning",
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"whisper-serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise SystemExit("whisper-serve did not answer /health in 300 s")
            try:
                httpx.get(f"{self.url}/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="load-test", max_retries=0, timeout=600)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def ask(client, clip: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    text = client.audio.transcriptions.create(file=(clip.name, clip.read_bytes()), model="whisper-1").text
    return text, time.perf_counter() - t0


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def _throughput(package: str, flags: tuple, work: list[Path], clients: int, report: dict, failures: list) -> dict:
    """One request at a time, then `clients` at once: the same texts, and the throughput ratio;
    returns each clip's text alone."""
    server = Server(package, *flags)
    try:
        ask(server.client, work[0])  # warm-up
        t0 = time.perf_counter()
        alone = [ask(server.client, c) for c in work]
        sequential = time.perf_counter() - t0
        want = {c.name: text for c, (text, _) in zip(work, alone)}
        before = server.health()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            together = list(pool.map(lambda c: ask(server.client, c), work))
        concurrent = time.perf_counter() - t0
        after = server.health()
    finally:
        server.stop()
    wrong = [c.name for c, (text, _) in zip(work, together) if text != want[c.name]]
    if wrong:
        failures.append(f"concurrent answers differ from one-at-a-time ones: {wrong}")
    latencies = [t for _, t in together]
    calls = after["decoder_calls"] - before["decoder_calls"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    report["one_at_a_time"] = {
        "seconds": round(sequential, 2),
        "requests_per_s": round(len(work) / sequential, 3),
        "p50_s": round(percentile([t for _, t in alone], 50), 3),
    }
    report["concurrent"] = {
        "seconds": round(concurrent, 2),
        "requests_per_s": round(len(work) / concurrent, 3),
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "all_correct": not wrong,
        "rows_per_decoder_call": round(rows / calls, 2),
    }
    speedup = sequential / concurrent
    report["throughput_ratio"] = round(speedup, 2)
    if speedup < 1.5:
        failures.append(f"concurrent throughput is {speedup:.2f}x one at a time (target 1.5x)")
    print(json.dumps({k: report[k] for k in ("one_at_a_time", "concurrent", "throughput_ratio")}), flush=True)
    return want


def _flood(package: str, flags: tuple, work: list[Path], want: dict, report: dict, failures: list) -> None:
    """16 clients against 2 active and 2 queued: 429s with Retry-After, and every request answered
    right once retried."""
    flood = Server(package, *flags, "--max_active", "2", "--queue_size", "2")
    try:

        def attempt(clip):
            try:
                text, _ = ask(flood.client, clip)
                return clip, text, None
            except openai.APIStatusError as e:
                return clip, None, e

        with ThreadPoolExecutor(16) as pool:
            first = list(pool.map(attempt, work))
        ok = [(c, t) for c, t, e in first if e is None]
        refused = [(c, e) for c, t, e in first if e is not None]
        bad = [
            e.status_code
            for _, e in refused
            if e.status_code != 429 or int(e.response.headers.get("retry-after", 0)) < 1
        ]
        wrong = [c.name for c, t in ok if t != want[c.name]]
        retried = 0
        pending = [c for c, _ in refused]
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            clip = pending.pop(0)
            c, text, e = attempt(clip)
            if e is not None and e.status_code == 429:
                time.sleep(int(e.response.headers["retry-after"]))
                pending.append(clip)
            elif e is not None or text != want[clip.name]:
                wrong.append(clip.name)
            else:
                retried += 1
    finally:
        flood.stop()
    report["flood"] = {
        "answered_first_time": len(ok),
        "refused_429": len(refused),
        "other_errors": bad,
        "wrong": wrong,
        "answered_on_retry": retried,
    }
    if not refused:
        failures.append("the flood got no 429: the admission queue did not fill")
    if bad or wrong or pending or len(ok) + retried != len(work):
        failures.append(f"flood: {report['flood']}, {len(pending)} never answered")
    print(json.dumps({"flood": report["flood"]}), flush=True)


def _sigterm(package: str, flags: tuple, work: list[Path], clients: int, want: dict, report: dict, failures) -> None:
    """SIGTERM with requests in flight: each is answered right and the server exits 0."""
    server = Server(package, *flags)
    try:
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(ask, server.client, c) for c in work[:clients]]
            deadline = time.monotonic() + 120
            while server.health()["active"] < min(4, clients) and time.monotonic() < deadline:
                time.sleep(0.02)
            in_flight = server.health()["admitted"]
            server.proc.send_signal(signal.SIGTERM)
            answers = []
            for c, f in zip(work, futures):
                try:
                    answers.append(f.result()[0] == want[c.name])
                except Exception as e:  # noqa: BLE001 - reported below
                    answers.append(repr(e))
        code = server.proc.wait(120)
    finally:
        server.stop()
    report["sigterm"] = {
        "in_flight_at_signal": in_flight,
        "answered_correctly": sum(a is True for a in answers),
        "errors": [a for a in answers if a is not True],
        "exit_code": code,
    }
    if code != 0 or any(a is not True for a in answers):
        failures.append(f"SIGTERM under load: {report['sigterm']}")
    print(json.dumps({"sigterm": report["sigterm"]}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--beam_size", default="5", help="the server's --beam_size (None: greedy)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    clips = dev_clips()
    work = [clips[i % len(clips)] for i in range(args.requests)]
    report: dict = {
        "machine": machine(),
        "requests": args.requests,
        "clients": args.clients,
        "clips": [c.name for c in clips],
        "beam_size": args.beam_size,
    }
    failures: list[str] = []
    print(
        f"CPU: {report['machine']['cpu']} ({report['machine']['kind']}), {len(os.sched_getaffinity(0))} cores",
        flush=True,
    )
    flags = ("--beam_size", args.beam_size)
    want = _throughput(args.package, flags, work, args.clients, report, failures)
    _flood(args.package, flags, work, want, report, failures)
    _sigterm(args.package, flags, work, args.clients, want, report, failures)
    report["failures"] = failures
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
