"""Transcription clients of the long-form stream (runtime.stream): openai-whisper's
`transcribe()`, and `transcribe_many`, which decodes the windows of several files together.
They print what openai-whisper prints (segment lines when verbose, a progress bar when verbose
is False) from the streams' events."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from .decoding import decode
from .model import WhisperModel
from .options import TranscribeOptions
from .stream import DetectingLanguage, LanguageDetected, Progress, SegmentDone, TranscriptionStream


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    if seconds < 0:
        raise ValueError("non-negative timestamp expected")
    ms = round(seconds * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1_000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def transcribe(model: WhisperModel, audio, **options) -> dict:
    """Transcribe a file path or 16 kHz mono float32 samples; returns openai-whisper's dict.
    Options are openai-whisper's `transcribe()` keywords and DecodingOptions fields."""
    return next(transcribe_many(model, [audio], batch_size=1, options=TranscribeOptions.from_kwargs(**options)))[1]


def _say(line: str) -> None:
    print(line, flush=True)


class Printer:
    """What openai-whisper prints for one transcription, from its stream's events: segment
    lines and the detected language when `verbose`, a tqdm bar over the audio's frames when
    verbose is False, nothing when it is None. Lines go to `say`."""

    def __init__(self, verbose: bool | None, say: Callable[[str], None] = _say):
        self.verbose, self.say = verbose, say
        self.bar, self.frames = None, 0

    def __call__(self, event) -> None:
        if isinstance(event, SegmentDone) and self.verbose:
            self.say(f"[{format_timestamp(event.start)} --> {format_timestamp(event.end)}] {event.text}")
        elif isinstance(event, DetectingLanguage) and self.verbose:
            self.say("Detecting language using up to the first 30 seconds. Use `--language` to specify the language")
        elif isinstance(event, LanguageDetected) and self.verbose is not None:
            self.say(f"Detected language: {event.name.title()}")
        elif isinstance(event, Progress) and self.verbose is False:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event.total, unit="frames", file=sys.stderr)
            self.bar.update(event.frames - self.frames)
            self.frames = event.frames

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def transcribe_many(model: WhisperModel, audios: list, *, batch_size: int = 8, say=_say, options: TranscribeOptions | None = None, **kwargs):
    """Transcribe several files at once, yielding (index, result) in input order as each is done.

    Up to `batch_size` files are in flight. Each runs openai-whisper's long-form loop on its own;
    the greedy (temperature 0) windows they wait on are decoded together when their decoding
    options are equal (the same prompt: in practice each file's first window, and windows after
    a prompt reset). One encoder call and one decoder call per token then serve the whole batch.
    Sampled windows (temperature > 0, the fallback) decode one by one, as they would alone.
    Verbose lines print in input order, as a sequential run prints them: the first unfinished
    file's as they come, later files' once every earlier file is done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1")
    if options is None:
        options = TranscribeOptions.from_kwargs(**kwargs)
    elif kwargs:
        raise TypeError(f"transcribe_many: options given both as TranscribeOptions and as keywords {sorted(kwargs)}")
    held: list[list[str]] = [[] for _ in audios]
    shown = 0  # the file whose lines print as they come; later files' lines wait their turn
    streams, printers, results = {}, {}, {}  # in flight: index -> TranscriptionStream, Printer
    queue = iter(range(len(audios)))

    def finish(i: int) -> None:
        results[i] = streams.pop(i).result
        printers.pop(i).close()

    def start() -> None:
        for i in queue:
            printers[i] = Printer(options.verbose, lambda line, i=i: say(line) if i == shown else held[i].append(line))
            streams[i] = TranscriptionStream(model, audios[i], options, printers[i])
            if streams[i].done:  # nothing to decode (an empty clip)
                finish(i)
            if len(streams) >= batch_size:
                return

    start()
    while True:
        while shown in results:
            yield shown, results.pop(shown)
            shown += 1
            if shown < len(held):
                for line in held[shown]:
                    say(line)
                held[shown].clear()
        if not streams:  # start() has taken every file
            return
        first = min(streams)
        window = streams[first].next_window()
        group = [first]
        if window.options.temperature == 0:
            group += [i for i in sorted(streams) if i != first and streams[i].next_window().options == window.options]
        if len(group) == 1:
            decoded = [decode(model, window.mel, window.options)]
        else:
            decoded = decode(model, np.stack([streams[i].next_window().mel for i in group]), window.options)
        for i, result in zip(group, decoded):
            streams[i].feed(result)
            if streams[i].done:
                finish(i)
        start()
