"""openai-whisper's output formats: txt, vtt, srt, tsv, json (segment level)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .files import atomic_open
from .results import TranscriptionResult
from .transcribe import format_timestamp


def _subtitles(result: dict, always_include_hours: bool, decimal_marker: str, options: dict | None = None):
    """(start, end, text) cues: one per segment, or built from words (line width/count, words per
    line, highlighting) when the result has word timestamps."""
    options = options or {}
    fmt = lambda t: format_timestamp(t, always_include_hours, decimal_marker)  # noqa: E731
    segments = result["segments"]
    if not (segments and "words" in segments[0]):
        for s in segments:
            yield fmt(s["start"]), fmt(s["end"]), s["text"].strip().replace("-->", "->")
        return
    max_line_width, max_line_count = options.get("max_line_width"), options.get("max_line_count")
    highlight = options.get("highlight_words", False)
    preserve_segments = max_line_count is None or max_line_width is None
    max_line_width = max_line_width or 1000
    max_words = options.get("max_words_per_line") or 1000

    def cues():
        line_len, line_count, cue = 0, 1, []
        last = next((w["start"] for s in segments for w in s["words"]), segments[0]["start"]) if segments else 0.0
        for segment in segments:
            chunk = 0
            count = max_words
            while chunk < len(segment["words"]):
                if max_words > len(segment["words"]) - chunk:
                    count = len(segment["words"]) - chunk
                for i, original in enumerate(segment["words"][chunk : chunk + count]):
                    timing = dict(original)
                    long_pause = not preserve_segments and timing["start"] - last > 3.0
                    has_room = line_len + len(timing["word"]) <= max_line_width
                    seg_break = i == 0 and len(cue) > 0 and preserve_segments
                    if line_len > 0 and has_room and not long_pause and not seg_break:
                        line_len += len(timing["word"])  # same line
                    else:
                        timing["word"] = timing["word"].strip()
                        if (
                            len(cue) > 0
                            and max_line_count is not None
                            and (long_pause or line_count >= max_line_count)
                            or seg_break
                        ):
                            yield cue  # new cue
                            cue, line_count = [], 1
                        elif line_len > 0:
                            line_count += 1  # new line in this cue
                            timing["word"] = "\n" + timing["word"]
                        line_len = len(timing["word"].strip())
                    cue.append(timing)
                    last = timing["start"]
                chunk += max_words
        if cue:
            yield cue

    for cue in cues():
        start, end = fmt(cue[0]["start"]), fmt(cue[-1]["end"])
        text = "".join(w["word"] for w in cue)
        if not highlight:
            yield start, end, text
            continue
        last = start
        words = [w["word"] for w in cue]
        for i, w in enumerate(cue):
            w_start, w_end = fmt(w["start"]), fmt(w["end"])
            if last != w_start:
                yield last, w_start, text
            yield (
                w_start,
                w_end,
                "".join(
                    re.sub(r"^(\s*)(.*)$", r"\1<u>\2</u>", word) if j == i else word for j, word in enumerate(words)
                ),
            )
            last = w_end


def write_txt(result: dict, file: TextIO, options: dict | None = None) -> None:
    for s in result["segments"]:
        print(s["text"].strip(), file=file)


def write_vtt(result: dict, file: TextIO, options: dict | None = None) -> None:
    print("WEBVTT\n", file=file)
    for start, end, text in _subtitles(result, False, ".", options):
        print(f"{start} --> {end}\n{text}\n", file=file)


def write_srt(result: dict, file: TextIO, options: dict | None = None) -> None:
    for i, (start, end, text) in enumerate(_subtitles(result, True, ",", options), start=1):
        print(f"{i}\n{start} --> {end}\n{text}\n", file=file)


def write_tsv(result: dict, file: TextIO, options: dict | None = None) -> None:
    # integer milliseconds: no locale can turn the decimal point into a comma
    print("start", "end", "text", sep="\t", file=file)
    for s in result["segments"]:
        print(
            round(1000 * s["start"]), round(1000 * s["end"]), s["text"].strip().replace("\t", " "), sep="\t", file=file
        )


def write_json(result: dict, file: TextIO, options: dict | None = None) -> None:
    json.dump(result, file)


WRITERS: dict[str, Callable[[dict, TextIO, dict | None], None]] = {
    "txt": write_txt,
    "vtt": write_vtt,
    "srt": write_srt,
    "tsv": write_tsv,
    "json": write_json,
}


def output_formats(output_format: str) -> list[str]:
    """The formats `--output_format` names: one of WRITERS, or all of them."""
    if output_format != "all" and output_format not in WRITERS:
        raise ValueError(f"output format {output_format!r}: use one of {sorted(WRITERS)} or all")
    return list(WRITERS) if output_format == "all" else [output_format]


def write_result(
    result: TranscriptionResult,
    audio_path: str | Path,
    output_dir: str | Path,
    output_format: str = "all",
    options: dict | None = None,
    stem: str | None = None,
) -> list[Path]:
    """Write `<audio basename>.<ext>` files (or `<stem>.<ext>`) into output_dir, each atomically; returns their paths.
    `options`: max_line_width, max_line_count, max_words_per_line, highlight_words (word-level subtitles)."""
    written, result = [], result.as_openai_dict()
    for fmt in output_formats(output_format):
        path = Path(output_dir) / f"{stem or Path(audio_path).stem}.{fmt}"
        try:
            with atomic_open(path, "w", encoding="utf-8") as f:
                WRITERS[fmt](result, f, options)
        except OSError as e:  # a full disk: name the file (the write itself does not)
            raise OSError(e.errno, e.strerror, str(path)) from e
        written.append(path)
    return written
