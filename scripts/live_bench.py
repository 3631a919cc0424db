"""Live transcription through whisper-serve's Realtime WebSocket: latency and WER on the dev set.

    python scripts/live_bench.py --package tiny.en.maxpkg [--streams 6] [--speed 1.0] [--clips N] [--min_chunk 1.0]
                                 [--json out.json]

Starts whisper-serve's app in this process (uvicorn on a loopback port) and replays the English
dev set's short clips (bench_setup.dev_set, the 231 s long-form file left out unless --long) through
`/v1/realtime?intent=transcription`, each clip one item of a session sending 24 kHz PCM16 in
0.1 s pieces at `--speed` times real time, `--streams` sessions at once (each takes the clips in
turn, starting at a different one). Measured, per confirmed word: latency = the wall time its
delta arrived - the wall time the end of the word (its `words` times, whisper-serve's extension
of the delta event) was sent, at the replay's pace. Printed: the CPU, median and p90 latency
over all words and each stream's median, the WER of the confirmed transcripts, the WER of the
same package's offline transcribe() on the same clips (both against the manifest's references,
openai-whisper's EnglishTextNormalizer), and the decoder's rows per call while the streams ran.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_setup import SHARED, dev_set, machine, references, word_error_rate  # noqa: E402

PIECE = 0.1  # seconds of audio per append
RATE = 24000


def pcm24(path: Path) -> bytes:
    import soxr

    from whisper_max.runtime.audio import load_audio

    audio = soxr.resample(load_audio(path), 16000, RATE)
    return np.round(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def run_stream(client, clips: list[tuple[Path, bytes]], speed: float, out: dict) -> None:
    """One session: every clip an item, replayed at `speed`; `out` gets transcripts and latencies."""
    step = int(PIECE * RATE) * 2
    with client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        conn.recv()  # session.created
        session = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}}}}
        conn.send({"type": "session.update", "session": session})
        conn.recv()
        for path, pcm in clips:
            done = threading.Event()
            latencies, transcript = [], {}
            start = time.monotonic()

            def receive(path=path, start=start, latencies=latencies, transcript=transcript, done=done) -> None:
                while True:
                    event = conn.recv()
                    now = time.monotonic()
                    if event.type == "conversation.item.input_audio_transcription.delta":
                        for w in getattr(event, "words", None) or []:
                            latencies.append(now - (start + w["end"] / speed))
                    elif event.type == "conversation.item.input_audio_transcription.completed":
                        transcript["text"] = event.transcript
                        done.set()
                        return
                    elif event.type == "error":
                        raise SystemExit(f"{path.name}: {event.error}")

            reader = threading.Thread(target=receive, daemon=True)
            reader.start()
            for i in range(0, len(pcm), step):
                conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
                delay = start + (i + step) / 2 / RATE / speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            conn.send({"type": "input_audio_buffer.commit"})
            if not done.wait(600):
                raise SystemExit(f"{path.name}: no completed event in 600 s")
            reader.join()
            out.setdefault("latencies", []).extend(latencies)
            out.setdefault("transcripts", {})[str(path)] = transcript["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--speed", type=float, default=1.0, help="times real time (CI: faster)")
    ap.add_argument("--clips", type=int, default=None, help="the first N dev clips only")
    ap.add_argument("--long", action="store_true", help="also the 231 s long-form file")
    ap.add_argument("--min_chunk", type=float, default=1.0, help="whisper-serve's --live_min_chunk")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import openai
    import uvicorn

    from whisper_max import runtime
    from whisper_max.runtime.serving.app import Settings, create_app

    paths = [SHARED / e["file"] for e in dev_set() if args.long or not e["file"].startswith("longform")]
    paths = paths[: args.clips] if args.clips else paths
    clips = [(p, pcm24(p)) for p in paths]
    model = runtime.load(args.package)
    offline = {str(p): model.transcribe(str(p), language="en")["text"] for p in paths}
    app = create_app(model, Settings(max_live=max(8, args.streams), live_min_chunk=args.min_chunk))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="x", max_retries=0)
    scheduler = app.state.registry.scheduler(app.state.registry.ids[0])
    calls0, rows0 = scheduler.engine.calls, scheduler.engine.rows_decoded
    outs = [{} for _ in range(args.streams)]
    threads = [
        threading.Thread(
            target=run_stream, args=(client, clips[i % len(clips) :] + clips[: i % len(clips)], args.speed, outs[i])
        )
        for i in range(args.streams)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    calls, rows = scheduler.engine.calls - calls0, scheduler.engine.rows_decoded - rows0
    server.should_exit = True

    refs = references([str(p) for p in paths])
    live_wer = [word_error_rate(refs, [o["transcripts"][str(p)] for p in paths]) for o in outs]
    offline_wer = word_error_rate(refs, [offline[str(p)] for p in paths])
    lat = np.array([x for o in outs for x in o["latencies"]])
    per_stream = [float(np.median(o["latencies"])) for o in outs]
    audio_seconds = sum(len(pcm) / 2 / RATE for _, pcm in clips)
    result = {
        "machine": machine(),
        "package": args.package,
        "streams": args.streams,
        "speed": args.speed,
        "min_chunk": args.min_chunk,
        "clips": len(paths),
        "audio_seconds_per_stream": audio_seconds,
        "wall_seconds": wall,
        "latency_median": float(np.median(lat)),
        "latency_p90": float(np.percentile(lat, 90)),
        "latency_median_per_stream": per_stream,
        "wer_live_per_stream": live_wer,
        "wer_offline": offline_wer,
        "rows_per_call": rows / max(1, calls),
        "decoder_calls": calls,
        "transcripts": {
            str(p): {"reference": r, "offline": offline[str(p)], "live": [o["transcripts"][str(p)] for o in outs]}
            for p, r in zip(paths, refs)
        },
    }
    m = result["machine"]
    print(
        f"CPU: {m['cpu']} ({m['kind']}); {args.streams} streams at {args.speed}x real time, "
        f"{len(paths)} clips each, a decode per {args.min_chunk:g} s of new audio"
    )
    print(
        f"latency, end of word to its confirmation: median {result['latency_median']:.2f} s, "
        f"p90 {result['latency_p90']:.2f} s; each stream's median " + ", ".join(f"{x:.2f}" for x in per_stream) + " s"
    )
    live = ", ".join(f"{w:.2f}" for w in live_wer)
    print(f"WER live: {live} % (each stream); offline transcribe(): {offline_wer:.2f} %")
    print(
        f"decoder calls {calls}, rows per call {result['rows_per_call']:.2f}; wall {wall:.1f} s for "
        f"{audio_seconds:.1f} s of audio per stream"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
