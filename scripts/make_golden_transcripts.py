"""Store openai-whisper's transcripts of the bundled clips, for the runtime's torch-free test.
Needs ffmpeg on PATH (openai-whisper reads audio with it).

python scripts/make_golden_transcripts.py    # rewrites golden/transcripts.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import whisper

from whisper_max import golden
from whisper_max.converter.sources import resolve
from whisper_max.converter.trace import model_from_state_dict
from whisper_max.runtime.audio import load_audio

CASES = [
    ("greedy", {"temperature": 0.0, "language": "en"}),
    ("fallback", {"language": "en"}),
    ("beam5", {"beam_size": 5, "best_of": 5, "language": "en"}),
]
RESAMPLED = ["jfk_8k.wav", "jfk_22k_s24.wav", "jfk_48k.flac"]  # made from jfk.wav by ffmpeg (golden/data/README.md)


def main() -> None:
    torch.set_num_threads(2)
    src = resolve("tiny.en")
    model = model_from_state_dict(src.dims, src.state_dict, src.alignment_heads)
    audio = load_audio(golden.JFK_WAV)
    cases = []
    for name, options in CASES:
        result = whisper.transcribe(model, audio, fp16=False, **options)
        segments = [
            {"tokens": s["tokens"], "start": s["start"], "end": s["end"], "text": s["text"]} for s in result["segments"]
        ]
        cases.append({"name": name, "clip": golden.JFK_WAV.name, "options": options, "segments": segments})
    # files at other rates, read by openai-whisper's own loader (ffmpeg): our reader resamples them
    # (soxr, not ffmpeg's resampler) and must still give these tokens
    for clip in RESAMPLED:
        result = whisper.transcribe(model, str(golden.DATA / clip), fp16=False, temperature=0.0, language="en")
        segments = [
            {"tokens": s["tokens"], "start": s["start"], "end": s["end"], "text": s["text"]} for s in result["segments"]
        ]
        cases.append(
            {
                "name": f"resampled:{clip}",
                "clip": clip,
                "options": {"temperature": 0.0, "language": "en"},
                "segments": segments,
            }
        )
    out = {"tiny.en": {"source_sha256": src.sha256, "openai_whisper": whisper.__version__, "cases": cases}}
    path = Path(golden.__file__).parent / "transcripts.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
