"""whisper-run: transcribe audio with a compiled .maxpkg (openai-whisper's flags and outputs)."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import typer

from .cliutil import ModelDir, Trust, flag_bool, flag_optional

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)


@app.command()
def run_cmd(
    model: str = typer.Argument(
        ...,
        help=(
            "a model name (tiny.en, base, ...; converted once into the cache), a .pt checkpoint, a CTranslate2 "
            "folder, or a .maxpkg"
        ),
    ),
    audio: list[Path] = typer.Argument(..., help="audio file(s) to transcribe"),
    output_dir: Path = typer.Option(Path("."), "--output_dir", "-o", help="directory to save the outputs"),
    output_format: str = typer.Option("all", "--output_format", "-f", help="txt, vtt, srt, tsv, json or all"),
    verbose: str = typer.Option("True", "--verbose", help="print progress and debug messages"),
    task: str = typer.Option("transcribe", "--task", help="transcribe, or translate to English"),
    language: str | None = typer.Option(None, "--language", help="language spoken; None detects it"),
    temperature: float = typer.Option(0.0, "--temperature", help="temperature to use for sampling"),
    best_of: str = typer.Option("5", "--best_of", help="candidates when sampling with non-zero temperature"),
    beam_size: str = typer.Option("5", "--beam_size", help="beams in beam search, used when temperature is zero"),
    patience: str | None = typer.Option(None, "--patience", help="beam search patience factor"),
    length_penalty: str | None = typer.Option(
        None, "--length_penalty", help="length penalty alpha; None: simple length normalisation"
    ),
    suppress_tokens: str = typer.Option(
        "-1", "--suppress_tokens", help="comma-separated token ids to suppress; -1: most special characters"
    ),
    initial_prompt: str | None = typer.Option(
        None, "--initial_prompt", help="text to provide as a prompt for the first window"
    ),
    carry_initial_prompt: str = typer.Option(
        "False", "--carry_initial_prompt", help="prepend initial_prompt to every window's prompt"
    ),
    condition_on_previous_text: str = typer.Option(
        "True", "--condition_on_previous_text", help="prompt each window with the previous output"
    ),
    fp16: str = typer.Option("True", "--fp16", help="accepted for compatibility; the package's dtype decides"),
    temperature_increment_on_fallback: str | None = typer.Option(
        "0.2", "--temperature_increment_on_fallback", help="temperature step when decoding fails the thresholds"
    ),
    compression_ratio_threshold: str | None = typer.Option(
        "2.4", "--compression_ratio_threshold", help="treat a window as failed above this gzip ratio"
    ),
    logprob_threshold: str | None = typer.Option(
        "-1.0", "--logprob_threshold", help="treat a window as failed below this average log probability"
    ),
    no_speech_threshold: str | None = typer.Option(
        "0.6", "--no_speech_threshold", help="silence when <|nospeech|> is above this and the logprob is too low"
    ),
    word_timestamps: str = typer.Option(
        "False", "--word_timestamps", help="word-level timestamps from cross-attention alignment"
    ),
    prepend_punctuations: str = typer.Option(
        "\"'“¿([{-", "--prepend_punctuations", help="with word timestamps, merge these with the next word"
    ),
    append_punctuations: str = typer.Option(
        "\"'.。,，!！?？:：”)]}、",
        "--append_punctuations",
        help="with word timestamps, merge these with the previous word",
    ),
    highlight_words: str = typer.Option(
        "False", "--highlight_words", help="underline each word as it is spoken in srt and vtt"
    ),
    max_line_width: int | None = typer.Option(
        None, "--max_line_width", help="characters in a subtitle line before a break"
    ),
    max_line_count: int | None = typer.Option(None, "--max_line_count", help="lines in a subtitle cue"),
    max_words_per_line: int | None = typer.Option(None, "--max_words_per_line", help="words in a subtitle line"),
    clip_timestamps: str = typer.Option(
        "0", "--clip_timestamps", help="start,end,start,end,... seconds of clips to process"
    ),
    hallucination_silence_threshold: float | None = typer.Option(
        None,
        "--hallucination_silence_threshold",
        help="with word timestamps, skip silences longer than this (s) around a likely hallucination",
    ),
    vad_filter: str = typer.Option(
        "False",
        "--vad_filter",
        help=(
            "transcribe only the speech Silero VAD finds (faster-whisper's vad_filter); timestamps stay in the "
            "file's timeline"
        ),
    ),
    vad_parameters: str | None = typer.Option(
        None, "--vad_parameters", help="faster-whisper's VadOptions as JSON, e.g. '{\"min_silence_duration_ms\": 500}'"
    ),
    batched: str = typer.Option(
        "False",
        "--batched",
        help=(
            "faster-whisper's batched mode: VAD chunks of up to 30 s, --batch_size at once, no text carried "
            "between them"
        ),
    ),
    without_timestamps: str | None = typer.Option(
        None,
        "--without_timestamps",
        help="decode no timestamp tokens: one segment per window (default: True with --batched, else False)",
    ),
    model_dir: ModelDir = None,
    trust: Trust = False,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an error"),
    batch_size: int = typer.Option(
        8,
        "--batch_size",
        min=1,
        help=(
            "files in flight at once, decoded together (1: one file after another); with --batched, chunks of one file"
        ),
    ),
) -> None:
    from . import load
    from .audio import AudioError
    from .options import TranscribeOptions, fallback_temperatures
    from .transcribe import transcribe_many
    from .writers import WRITERS, write_result

    is_verbose = flag_bool(verbose)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if output_format not in (*WRITERS, "all"):
        raise typer.BadParameter(f"--output_format {output_format!r}: use {', '.join(WRITERS)} or all")
    words = flag_bool(word_timestamps)
    writer_options = {
        "highlight_words": flag_bool(highlight_words),
        "max_line_width": max_line_width,
        "max_line_count": max_line_count,
        "max_words_per_line": max_words_per_line,
    }
    if not words:
        for name, value in writer_options.items():
            if value:
                raise typer.BadParameter(f"--{name} requires --word_timestamps True")
    if max_line_count and not max_line_width:
        print("--max_line_count has no effect without --max_line_width", file=sys.stderr)
    if max_words_per_line and max_line_width:
        print("--max_words_per_line has no effect with --max_line_width", file=sys.stderr)
    is_batched = flag_bool(batched)
    no_timestamps = flag_optional(without_timestamps, flag_bool)
    increment = flag_optional(temperature_increment_on_fallback, float)
    options = TranscribeOptions.from_kwargs(  # checked before anything is loaded
        verbose=is_verbose,
        temperature=fallback_temperatures(temperature, increment),
        task=task,
        language=language,
        best_of=flag_optional(best_of, int),
        beam_size=flag_optional(beam_size, int),
        patience=flag_optional(patience, float),
        length_penalty=flag_optional(length_penalty, float),
        suppress_tokens=suppress_tokens,
        initial_prompt=initial_prompt,
        carry_initial_prompt=flag_bool(carry_initial_prompt),
        condition_on_previous_text=flag_bool(condition_on_previous_text),
        fp16=flag_bool(fp16),
        compression_ratio_threshold=flag_optional(compression_ratio_threshold, float),
        logprob_threshold=flag_optional(logprob_threshold, float),
        no_speech_threshold=flag_optional(no_speech_threshold, float),
        word_timestamps=words,
        prepend_punctuations=prepend_punctuations,
        append_punctuations=append_punctuations,
        clip_timestamps=clip_timestamps,
        hallucination_silence_threshold=hallucination_silence_threshold,
        vad_filter=flag_bool(vad_filter),
        vad_parameters=_vad_options(vad_parameters),
        without_timestamps=is_batched if no_timestamps is None else no_timestamps,
    )
    if is_batched and options.clip_timestamps != (0.0,):
        raise typer.BadParameter(
            "--clip_timestamps: --batched transcribes the speech the VAD finds; give one or the other"
        )
    _check_writable(output_dir)  # before any work
    package = model
    model = load(package, trust=trust, model_dir=model_dir)
    if not model.is_multilingual and (language not in (None, "en", "English") or task == "translate"):
        print(
            f"{package} is an English-only model but received language {language!r} / task {task!r}; using English.",
            file=sys.stderr,
        )
        options = options.english_only()
    # each file is read when it starts (transcribe_many keeps at most batch_size in flight)
    failed = []
    results = (
        _batched(model, audio, batch_size, options)
        if is_batched
        else transcribe_many(model, audio, batch_size=batch_size, options=options, keep_going=True)
    )
    for i, result in results:
        if isinstance(result, AudioError):
            print(f"whisper-run: error: {result}", file=sys.stderr)
            failed.append(result)
            continue
        try:
            write_result(result, audio[i], output_dir, output_format, writer_options)
        except OSError as e:  # a full disk mid-run: the file being written was not renamed into place
            raise OutputError(
                f"{e.filename}: cannot write ({e.strerror or e}); stopped here: outputs written before it stay, it "
                "and later ones were not written"
            ) from e
    if failed:
        if len(audio) > 1:
            print(f"whisper-run: {len(failed)} of {len(audio)} files failed, the others were written:", file=sys.stderr)
            for e in failed:
                print(f"  {e}", file=sys.stderr)
        raise typer.Exit(1)


def _batched(model, audio: list[Path], batch_size: int, options):
    """(index, result or AudioError) of each file in batched mode, one file after another."""
    from .audio import AudioError
    from .transcribe import transcribe_batched

    for i, path in enumerate(audio):
        try:
            yield i, transcribe_batched(model, path, batch_size=batch_size, options=options)
        except AudioError as e:
            yield i, e


def _vad_options(text: str | None):
    from .vad import VadOptions

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--vad_parameters {text!r}: not JSON ({e})") from e
    if not isinstance(value, dict):
        raise typer.BadParameter(f"--vad_parameters {text!r}: a JSON object expected")
    try:
        return VadOptions.from_dict(value)
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(f"--vad_parameters: {e}") from e


def _check_writable(output_dir: Path) -> None:
    """Output files go to `output_dir`: make it, and write a file there, or fail before any work."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise OutputError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e})") from e


class OutputError(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    from .audio import AudioError
    from .cliutil import run_app
    from .package import PackageError

    argv = sys.argv[1:] if argv is None else argv
    expected = () if "--debug" in argv else (PackageError, AudioError, OutputError, ValueError)
    return run_app(app, argv, "whisper-run", expected)


def run() -> None:
    sys.exit(main(sys.argv[1:]))
