"""Word error rate of packages on the English dev set, e.g. a bfloat16 package against float32,
or of one package's modes: openai-whisper's loop, with the VAD filter, batched.

    python scripts/wer.py tiny.en.maxpkg tiny.en.bf16.maxpkg [--clips a.wav,b.wav] [--json out.json] [--docs]
    python scripts/wer.py tiny.en.maxpkg --modes default,vad_filter,batched

Every package transcribes every clip with openai-whisper's transcribe() defaults (greedy with
temperature fallback, condition on previous text), language en. Hypotheses and references are
normalised with openai-whisper's EnglishTextNormalizer (as in its evaluation), and WER is word
edits over reference words, summed over the dev set. The first package is the baseline: the table
gives each package's WER, its difference from the baseline in points, and on how many clips its
tokens equal the baseline's. `--modes` runs each package in each mode (default: transcribe()'s
defaults; vad_filter: the same with vad_filter=True; batched: batched=True, batch 8, beam 5 as
faster-whisper's batched default), the first package's first mode the baseline. Prints
Markdown; --json writes the rows too; --docs replaces the wer.py block in docs/ (or, with
--modes, its wer.py modes block) with the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from whisper.normalizers import EnglishTextNormalizer

from whisper_max import runtime
from whisper_max.golden import word_edits
from whisper_max.runtime.audio import load_audio

sys.path.insert(0, str(Path(__file__).parent))
from bench import write_docs  # noqa: E402 (scripts/ is not a package)
from bench_setup import SHARED, dev_set  # noqa: E402 (scripts/ is not a package)

MODES = {
    "default": {},
    "vad_filter": {"vad_filter": True},
    "batched": {"batched": True, "batch_size": 8, "beam_size": 5},
}
MODE_NOTE = (
    "default, openai-whisper's loop; vad_filter, the same on the speech Silero VAD finds; batched, "
    "transcribe(batched=True), batch 8, beam 5, no timestamps"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("packages", nargs="+", help="packages to compare; the first is the baseline")
    ap.add_argument("--clips", help="comma-separated files in ../shared/audio (default: the English dev set)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--modes", default="default", help="comma-separated: default, vad_filter, batched")
    ap.add_argument("--docs", action="store_true", help="also replace the wer.py block in docs/ with this table")
    args = ap.parse_args()

    clips = dev_set()
    if args.clips:
        wanted = args.clips.split(",")
        clips = [e for e in clips if e["file"] in wanted]
        if len(clips) != len(wanted):
            raise SystemExit(f"--clips: not all of {wanted} are English dev clips with exact references")
    norm = EnglishTextNormalizer()
    audio = {e["file"]: load_audio(str(SHARED / e["file"])) for e in clips}
    refs = {e["file"]: norm(e["reference"]).split() for e in clips}
    n_words = sum(len(r) for r in refs.values())

    rows = []
    baseline_tokens = None
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        raise SystemExit(f"--modes: {sorted(set(modes) - set(MODES))} unknown; use some of {', '.join(MODES)}")
    for path, mode in ((p, m) for p in args.packages for m in modes):
        model = runtime.load(path)
        edits, tokens, seconds = {}, {}, 0.0
        for e in clips:
            t = time.perf_counter()
            result = model.transcribe(audio[e["file"]], language="en", **MODES[mode])
            seconds += time.perf_counter() - t
            edits[e["file"]] = word_edits(refs[e["file"]], norm(result["text"]).split())
            tokens[e["file"]] = [tok for s in result["segments"] for tok in s["tokens"]]
        same = None if baseline_tokens is None else sum(tokens[f] == baseline_tokens[f] for f in tokens)
        baseline_tokens = baseline_tokens or tokens
        rows.append(
            {
                "package": path,
                "mode": mode,
                "dtype": model.package.manifest.dtype,
                "words": n_words,
                "edits": sum(edits.values()),
                "wer": 100.0 * sum(edits.values()) / n_words,
                "edits_per_clip": edits,
                "clips_with_baseline_tokens": same,
                "transcribe_s": seconds,
            }
        )
    base = rows[0]["wer"]
    lines = [
        f"English dev set: {len(clips)} clips, {n_words} reference words ({', '.join(e['file'] for e in clips)}); "
        "transcribe() defaults, language en, EnglishTextNormalizer"
        + (f"; modes: {MODE_NOTE}." if modes != ["default"] else "."),
        "",
        "| package | mode | dtype | WER % | vs first (points) | word edits | clips with the first's tokens | "
        "transcribe s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = "—" if r["clips_with_baseline_tokens"] is None else f"{r['clips_with_baseline_tokens']}/{len(clips)}"
        lines.append(
            f"| {Path(r['package']).name} | {r['mode']} | {r['dtype']} | {r['wer']:.2f} | {r['wer'] - base:+.2f} | "
            f"{r['edits']} | {same} | {r['transcribe_s']:.1f} |"
        )
    print("\n".join(lines))
    if args.docs:
        write_docs(
            "\n".join(lines),
            " ".join(["python scripts/wer.py", *sys.argv[1:]]),
            marker="wer.py modes" if modes != ["default"] else "wer.py",
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
