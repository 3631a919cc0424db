"""openai-whisper's output formats: txt, vtt, srt, tsv, json (segment level)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TextIO

from .files import atomic_open
from .transcribe import format_timestamp


def _subtitles(result: dict, always_include_hours: bool, decimal_marker: str):
    for s in result["segments"]:
        start = format_timestamp(s["start"], always_include_hours, decimal_marker)
        end = format_timestamp(s["end"], always_include_hours, decimal_marker)
        yield start, end, s["text"].strip().replace("-->", "->")


def write_txt(result: dict, file: TextIO) -> None:
    for s in result["segments"]:
        print(s["text"].strip(), file=file)


def write_vtt(result: dict, file: TextIO) -> None:
    print("WEBVTT\n", file=file)
    for start, end, text in _subtitles(result, False, "."):
        print(f"{start} --> {end}\n{text}\n", file=file)


def write_srt(result: dict, file: TextIO) -> None:
    for i, (start, end, text) in enumerate(_subtitles(result, True, ","), start=1):
        print(f"{i}\n{start} --> {end}\n{text}\n", file=file)


def write_tsv(result: dict, file: TextIO) -> None:
    # integer milliseconds: no locale can turn the decimal point into a comma
    print("start", "end", "text", sep="\t", file=file)
    for s in result["segments"]:
        print(round(1000 * s["start"]), round(1000 * s["end"]), s["text"].strip().replace("\t", " "), sep="\t", file=file)


def write_json(result: dict, file: TextIO) -> None:
    json.dump(result, file)


WRITERS: dict[str, Callable[[dict, TextIO], None]] = {"txt": write_txt, "vtt": write_vtt, "srt": write_srt, "tsv": write_tsv, "json": write_json}


def write_result(result: dict, audio_path: str | Path, output_dir: str | Path, output_format: str = "all") -> list[Path]:
    """Write `<audio basename>.<ext>` files into output_dir, each atomically; returns their paths."""
    formats = list(WRITERS) if output_format == "all" else [output_format]
    unknown = [f for f in formats if f not in WRITERS]
    if unknown:
        raise ValueError(f"output format {unknown[0]!r}: use one of {sorted(WRITERS)} or all")
    written = []
    for fmt in formats:
        path = Path(output_dir) / f"{Path(audio_path).stem}.{fmt}"
        with atomic_open(path, "w", encoding="utf-8") as f:
            WRITERS[fmt](result, f)
        written.append(path)
    return written
