"""Transcription clients of the long-form stream (runtime.stream): openai-whisper's
`transcribe()`, `transcribe_many`, which decodes the windows of several files together, and
`transcribe_batched`, faster-whisper's batched mode (the speech of one file in VAD chunks, each
decoded on its own, together). They print what openai-whisper prints (segment lines when
verbose, a progress bar when verbose is False) from the streams' events."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from .audio import CHUNK_LENGTH, HOP_LENGTH, N_FRAMES, SAMPLE_RATE, AudioError, pad_or_trim, samples
from .decoding import DecodingOptions
from .engine import Engine, decode
from .model import WhisperModel
from .options import TranscribeOptions
from .results import TranscriptionResult
from .stream import DetectingLanguage, LanguageDetected, Progress, SegmentDone, TranscriptionStream
from .vad import BATCHED, Speech, speech_regions


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
    Options are openai-whisper's `transcribe()` keywords and DecodingOptions fields, and
    faster-whisper's vad_filter and vad_parameters; `batched=True` (with `batch_size`, default 8)
    is faster-whisper's batched mode (transcribe_batched), where without_timestamps defaults to True."""
    engine = options.pop("engine", None)
    if options.pop("batched", False):
        batch_size = options.pop("batch_size", 8)
        options.setdefault("without_timestamps", True)
        return transcribe_batched(
            model, audio, batch_size=batch_size, options=TranscribeOptions.from_kwargs(**options), engine=engine
        ).as_openai_dict()
    if "batch_size" in options:
        raise TypeError(
            "batch_size: a transcribe() option only with batched=True (transcribe_many takes files in flight)"
        )
    return next(
        transcribe_many(model, [audio], batch_size=1, options=TranscribeOptions.from_kwargs(**options), engine=engine)
    )[1].as_openai_dict()


def _say(line: str) -> None:
    print(line, flush=True)


class Printer:
    """What openai-whisper prints for one transcription, from its stream's events: segment
    lines and the detected language when `verbose`, a tqdm bar over the audio's frames when
    verbose is False, nothing when it is None. Lines go to `say`."""

    def __init__(self, verbose: bool | None, say: Callable[[str], None] = _say):
        self.verbose, self.say = verbose, say
        self.bar, self.frames = None, 0
        self.total_frames = 0  # the audio's mel frames (10 ms each), from the first Progress event

    def __call__(self, event) -> None:
        if isinstance(event, Progress):
            self.total_frames = event.total
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


def transcribe_many(
    model: WhisperModel,
    audios: list,
    *,
    batch_size: int = 8,
    say=_say,
    options: TranscribeOptions | None = None,
    engine: Engine | None = None,
    keep_going: bool = False,
    durations: dict | None = None,
    **kwargs,
):
    """Transcribe several files at once, yielding (index, TranscriptionResult) in input order as each is done.
    With `keep_going`, a file that cannot be read yields (index, AudioError) in its turn and the
    others go on; without, its AudioError is raised. `durations`, when given, receives each
    transcribed file's audio length in seconds (index -> s) before its result is yielded.

    Up to `batch_size` files are in flight, each openai-whisper's long-form loop (a
    TranscriptionStream) on the engine, which decodes the rows of all their windows in one
    decoder call per token (continuous batching); each file's tokens are the ones it gets alone.
    Verbose lines print in input order, as a sequential run prints them: the first unfinished
    file's as they come, later files' once every earlier file is done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1")
    if options is None:
        options = TranscribeOptions.from_kwargs(**kwargs)
    elif kwargs:
        raise TypeError(f"transcribe_many: options given both as TranscribeOptions and as keywords {sorted(kwargs)}")
    engine = engine or Engine(model)
    held: list[list[str]] = [[] for _ in audios]
    shown = 0  # the file whose lines print as they come; later files' lines wait their turn
    printers, results = {}, {}  # in flight: index -> Printer; done: index -> result
    queue = iter(range(len(audios)))

    def finish(i: int, stream: TranscriptionStream) -> None:
        results[i] = stream.result
        printer = printers.pop(i)
        printer.close()
        if durations is not None:
            durations[i] = printer.total_frames * HOP_LENGTH / SAMPLE_RATE

    def start() -> None:
        while len(printers) < batch_size:
            i = next(queue, None)
            if i is None:
                return
            printer = Printer(options.verbose, lambda line, i=i: say(line) if i == shown else held[i].append(line))
            try:
                stream = TranscriptionStream(model, audios[i], options, printer)
            except AudioError as e:
                printer.close()
                if not keep_going:
                    raise
                results[i] = e
                continue
            printers[i] = printer
            engine.submit(stream, lambda s, i=i: finish(i, s))

    start()
    while True:
        while shown in results:
            yield shown, results.pop(shown)
            shown += 1
            if shown < len(held):
                for line in held[shown]:
                    say(line)
                held[shown].clear()
        if not printers:  # start() has taken every file
            return
        engine.step()
        start()


def transcribe_batched(
    model: WhisperModel,
    audio,
    *,
    batch_size: int = 8,
    options: TranscribeOptions | None = None,
    engine: Engine | None = None,
    say=_say,
) -> TranscriptionResult:
    """faster-whisper's batched mode on the engine: Silero VAD finds the speech (`vad_parameters`,
    default vad.BATCHED; spans are split at 30 s whatever is asked), consecutive spans are joined
    into chunks of at most 30 s, and each chunk is transcribed as a stream of its own, up to
    `batch_size` at once, without the text before it as a prompt. A multilingual model without
    a language detects it once, on the first chunk. Returns openai-whisper's dict, segments in
    the audio's own timeline and in order; no speech gives no segments.

    Faster than the sequential loop on long audio, and not its parity: windows start where the
    VAD cuts, not where the previous window's last timestamp ended, and no text carries over."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1")
    options = options or TranscribeOptions()
    if options.clip_timestamps != (0.0,):
        raise ValueError("clip_timestamps: batched mode transcribes the speech the VAD finds; give one or the other")
    audio = samples(audio)
    vad = replace(options.vad_parameters or BATCHED, max_speech_duration_s=CHUNK_LENGTH)
    chunks = Speech.cut(audio, speech_regions(audio, vad), max_seconds=CHUNK_LENGTH)
    language = options.decode.language
    engine = engine or Engine(model)
    if language is None:
        if not model.is_multilingual:
            language = "en"
        elif chunks:
            if options.verbose:
                say(
                    "Detecting language using up to the first 30 seconds of speech. Use `--language` to specify the "
                    "language"
                )
            mel = model.features(chunks[0].samples)
            try:
                first = pad_or_trim(mel.read(0, N_FRAMES), N_FRAMES)
            finally:
                mel.close()
            language = decode(model, first, DecodingOptions(task="lang_id"), engine=engine).language
            if options.verbose is not None:
                say(f"Detected language: {model.tokenizer.languages[language].title()}")
    each = replace(
        options,
        verbose=True if options.verbose else None,  # segment lines from the chunks; one bar for the file, here
        condition_on_previous_text=False,
        vad_filter=False,
        decode=replace(options.decode, language=language),
    )
    d = options.decode
    engine.pool.reserve(
        rows=min(len(chunks), batch_size) * max(d.beam_size or 1, d.best_of or 1), windows=min(len(chunks), batch_size)
    )
    bar = None
    if options.verbose is False:
        from tqdm import tqdm

        bar = tqdm(total=round(sum(c.seconds for c in chunks), 2), unit="s", desc="speech", file=sys.stderr)
    segments, texts = [], []
    try:
        for i, result in transcribe_many(model, chunks, batch_size=batch_size, say=say, options=each, engine=engine):
            seek = chunks[i].regions[0][0] // HOP_LENGTH
            segments.extend(replace(s, id=len(segments) + n, seek=seek) for n, s in enumerate(result.segments))
            texts.append(result.text)
            if bar is not None:
                bar.update(round(chunks[i].seconds, 2))
    finally:
        if bar is not None:
            bar.close()
    # language None: multilingual, no speech, none given
    return TranscriptionResult("".join(texts), tuple(segments), language)
