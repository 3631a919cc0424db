"""Build the benchmark corpus: 8 files of 2-4 minutes of real English speech, reproducibly.

    python scripts/make_corpus.py --out corpus/        # corpus_00.wav ... corpus_07.wav, corpus.json

The parts are the English clips of ../shared/audio with exact references (LibriSpeech, LJ Speech,
the JFK clip, the MFA spontaneous clip) and the 32 sentences of the long-form file (its manifest
entry gives each one's start and end). Each file takes a different random selection and order
of parts (no part twice in a file), joined with 0.3-1.0 s of digital silence, until it reaches
its drawn length in [120, 240] s, never past 240 s. The random generator is seeded, the inputs are checked against
the manifest's sha256, and corpus.json records each file's parts, offsets, duration and
reference (the parts' references joined), so the same command gives the same bytes anywhere.
Licences: those of the parts (see ../shared/audio/README.md); all allow this use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "audio"
SR = 16000
LONG = "longform_lj001_0001-0032.wav"


def parts(shared: Path = SHARED) -> list[dict]:
    """Every part: (name, samples, reference), short clips first, then the long-form sentences."""
    entries = json.loads((shared / "manifest.json").read_text())
    out = []
    for e in entries:
        if e["language"] != "en" or not e["file"].endswith(".wav") or not e["reference_quality"].startswith("exact"):
            continue
        data = (shared / e["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise SystemExit(
                f"{shared / e['file']}: sha256 differs from the manifest's; the corpus would not be the reference one"
            )
        audio, sr = sf.read(shared / e["file"], dtype="float32")
        if sr != SR or audio.ndim != 1:
            raise SystemExit(f"{e['file']}: expected 16 kHz mono, got {sr} Hz, shape {audio.shape}")
        if e["file"] == LONG:
            for i, seg in enumerate(e["segments"]):
                lo, hi = round(seg["start_s"] * SR), round(seg["end_s"] * SR)
                out.append({"name": f"{LONG}#{i:02d}", "audio": audio[lo:hi], "reference": seg["reference"]})
        else:
            out.append({"name": e["file"], "audio": audio, "reference": e["reference"]})
    return out


def build(out_dir: Path, files: int = 8, seed: int = 2026, shared: Path = SHARED) -> list[dict]:
    pool = parts(shared)
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for f in range(files):
        target = rng.uniform(120.0, 240.0)
        order = rng.permutation(len(pool))
        pieces, layout, t = [], [], 0.0
        for k in order:
            if t >= target:
                break
            p = pool[k]
            gap = np.zeros(round(rng.uniform(0.3, 1.0) * SR) if pieces else 0, np.float32)
            if t + (len(gap) + len(p["audio"])) / SR > 240.0:
                continue  # a part that would pass 4 minutes: try the next one
            if pieces:
                pieces.append(gap)
                t += len(gap) / SR
            layout.append({"part": p["name"], "start_s": round(t, 4), "end_s": round(t + len(p["audio"]) / SR, 4)})
            pieces.append(p["audio"])
            t += len(p["audio"]) / SR
        if t < 120.0:
            raise SystemExit(f"file {f}: only {t:.1f} s of parts; the pool is too small for 2 minutes")
        name = f"corpus_{f:02d}.wav"
        tmp = out_dir / f".{name}.tmp"
        sf.write(tmp, np.concatenate(pieces), SR, subtype="PCM_16", format="WAV")
        os.replace(tmp, out_dir / name)
        refs = {p["name"]: p["reference"] for p in pool}
        index.append(
            {
                "file": name,
                "duration_s": round(t, 3),
                "parts": layout,
                "reference": " ".join(refs[x["part"]] for x in layout),
            }
        )
    tmp = out_dir / ".corpus.json.tmp"
    tmp.write_text(json.dumps({"seed": seed, "files": index}, indent=1, ensure_ascii=False))
    os.replace(tmp, out_dir / "corpus.json")
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    index = build(args.out, args.files, args.seed)
    total = sum(e["duration_s"] for e in index)
    for e in index:
        print(f"{e['file']}: {e['duration_s']:.1f} s, {len(e['parts'])} parts")
    print(f"{len(index)} files, {total / 60:.1f} min in {args.out}")


if __name__ == "__main__":
    main()
