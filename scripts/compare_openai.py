"""whisper-run vs openai-whisper on the dev set: tokens per segment equal?, and the time of each run.

    python scripts/compare_openai.py tiny.en.maxpkg [--model tiny.en] [--clips a.wav,b.wav] [--beam 5]

The reference is openai-whisper (PyTorch fp32, 2 threads) on the weights the package came from;
both engines get the same samples. Prints a Markdown table and writes it as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import whisper

from whisper_max import runtime
from whisper_max.converter.sources import resolve
from whisper_max.converter.trace import model_from_state_dict
from whisper_max.runtime.audio import load_audio

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "audio"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--model", help="source of the package's weights (default: the manifest's name)")
    ap.add_argument("--clips", help="comma-separated files in ../shared/audio (default: every WAV)")
    ap.add_argument("--beam", type=int, default=None, help="beam_size (and best_of) for both engines")
    ap.add_argument("--temperature", default="fallback", help="0 for greedy without fallback, or 'fallback'")
    ap.add_argument("--language", default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()

    torch.set_num_threads(2)
    ours = runtime.load(args.package)
    name = args.model or ours.package.manifest.model.name
    src = resolve(name)
    ref = model_from_state_dict(src.dims, src.state_dict, src.alignment_heads)
    clips = args.clips.split(",") if args.clips else sorted(p.name for p in SHARED.glob("*.wav"))
    options = {} if args.temperature == "fallback" else {"temperature": float(args.temperature)}
    if args.beam:
        options.update(beam_size=args.beam, best_of=args.beam)
    if args.language or not ours.is_multilingual:
        options["language"] = args.language or "en"
    rows = []
    print("| file | tokens equal | timestamps equal | text equal | language | whisper-max s | openai-whisper s |")
    print("|---|---|---|---|---|---:|---:|")
    for clip in clips:
        audio = load_audio(SHARED / clip)
        t = time.perf_counter()
        a = ours.transcribe(audio, **options)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        b = whisper.transcribe(ref, audio, fp16=False, **options)
        t_ref = time.perf_counter() - t
        row = {
            "file": clip,
            "tokens_equal": [s["tokens"] for s in a["segments"]] == [s["tokens"] for s in b["segments"]],
            "timestamps_equal": [(s["start"], s["end"]) for s in a["segments"]]
            == [(s["start"], s["end"]) for s in b["segments"]],
            "text_equal": a["text"] == b["text"],
            "language": f"{a['language']}/{b['language']}",
            "whisper_max_s": round(t_ours, 2),
            "openai_whisper_s": round(t_ref, 2),
            "fallback_used": any(s["temperature"] > 0 for s in b["segments"]),
        }
        rows.append(row)
        yn = lambda v: "yes" if v else "**no**"  # noqa: E731
        print(
            f"| {clip} | {yn(row['tokens_equal'])} | {yn(row['timestamps_equal'])} | {yn(row['text_equal'])} | "
            f"{row['language']} | {t_ours:.2f} | {t_ref:.2f} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"package": args.package, "options": options, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
