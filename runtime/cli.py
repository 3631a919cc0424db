"""whisper-run: transcribe audio with a compiled .maxpkg (openai-whisper's flags and outputs)."""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import typer

from .cliutil import ModelDir, Trust, flag_bool
from .flags import FLAGS, transcribe_options, with_flags

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__)


TRANSCRIBE = tuple(FLAGS)  # every transcription flag, openai-whisper's and faster-whisper's VAD


@app.command()
@with_flags(TRANSCRIBE, without_timestamps=None)
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
    highlight_words: str = typer.Option(
        "False", "--highlight_words", help="underline each word as it is spoken in srt and vtt"
    ),
    max_line_width: int | None = typer.Option(
        None, "--max_line_width", help="characters in a subtitle line before a break"
    ),
    max_line_count: int | None = typer.Option(None, "--max_line_count", help="lines in a subtitle cue"),
    max_words_per_line: int | None = typer.Option(None, "--max_words_per_line", help="words in a subtitle line"),
    batched: str = typer.Option(
        "False",
        "--batched",
        help=(
            "faster-whisper's batched mode: VAD chunks of up to 30 s, --batch_size at once, no text carried "
            "between them (and --without_timestamps True unless given)"
        ),
    ),
    live: str = typer.Option(
        "False",
        "--live",
        help=(
            "transcribe audio as it arrives and print the text as it is confirmed; AUDIO is - for 16 kHz mono "
            "16-bit PCM on standard input (ffmpeg -i talk.mp3 -f s16le -ar 16000 -ac 1 - | whisper-run tiny.en - "
            "--live True) or one file; with --vad_filter True silence is not decoded and each turn is a line"
        ),
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
    flags: dict | None = None,
) -> None:
    from . import load
    from .transcribe import transcribe_many
    from .writers import WRITERS

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if output_format not in (*WRITERS, "all"):
        raise typer.BadParameter(f"--output_format {output_format!r}: use {', '.join(WRITERS)} or all")
    writer_options = _writer_options(
        flags["word_timestamps"], flag_bool(highlight_words), max_line_width, max_line_count, max_words_per_line
    )
    is_batched = flag_bool(batched)
    if flags["without_timestamps"] is None:
        flags["without_timestamps"] = is_batched
    options = transcribe_options(flags)  # checked before anything is loaded
    if is_batched and options.clip_timestamps != (0.0,):
        raise typer.BadParameter(
            "--clip_timestamps: --batched transcribes the speech the VAD finds; give one or the other"
        )
    is_live = flag_bool(live)
    if is_live and (len(audio) != 1 or is_batched):
        raise typer.BadParameter("--live: one audio (- for standard input), without --batched")
    if not is_live:
        _check_writable(output_dir)  # before any work
    package = model
    model = load(package, trust=trust, model_dir=model_dir)
    options, note = options.for_model(model.is_multilingual)
    if note:
        print(f"{package} is {note}", file=sys.stderr)
    if is_live:
        return _live(model, audio[0], options)
    # each file is read when it starts (transcribe_many keeps at most batch_size in flight)
    results = (
        _batched(model, audio, batch_size, options)
        if is_batched
        else transcribe_many(model, audio, batch_size=batch_size, options=options, keep_going=True)
    )
    failed = _write_all(results, audio, output_dir, output_format, writer_options)
    if failed:
        if len(audio) > 1:
            print(f"whisper-run: {len(failed)} of {len(audio)} files failed, the others were written:", file=sys.stderr)
            for e in failed:
                print(f"  {e}", file=sys.stderr)
        raise typer.Exit(1)


def _live(model, audio: Path, options) -> None:
    """--live: confirmed text printed as it comes (stdout), from standard input or one file."""
    import threading

    from .audio import read_audio
    from .engine import Engine
    from .live import Confirmed, LiveOptions, LiveTranscription, Turn, read_pcm16, run_live

    def show(event) -> None:
        if isinstance(event, Confirmed):
            print(event.text, end="", flush=True)
        elif isinstance(event, Turn) and event.words:  # --vad_filter: a line a turn
            print(flush=True)

    stream = LiveTranscription(model, LiveOptions(transcribe=options), on_event=show)

    def feed() -> None:
        try:
            if str(audio) == "-":
                read_pcm16(sys.stdin.buffer, stream)
            else:
                for block in read_audio(audio):
                    stream.append(block)
                stream.finish()
        except BaseException as e:  # the main thread reports it; the stream ends with what came
            errors.append(e)
            stream.finish()

    errors: list[BaseException] = []
    reader = threading.Thread(target=feed, name="whisper-run-live-audio", daemon=True)
    reader.start()
    run_live(Engine(model), [stream])
    print(flush=True)
    if errors:
        raise errors[0]


def _writer_options(words: bool, highlight_words: bool, max_line_width, max_line_count, max_words_per_line) -> dict:
    """The subtitle writers' options, checked as openai-whisper's command line checks them."""
    writer_options = {
        "highlight_words": highlight_words,
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
    return writer_options


def _write_all(results, audio: list[Path], output_dir: Path, output_format: str, writer_options: dict) -> list:
    """Write each (index, result) as it comes; returns the files' AudioErrors, each said at once."""
    from .audio import AudioError
    from .writers import write_result

    failed = []
    for i, result in results:
        if isinstance(result, AudioError):
            print(f"whisper-run: error: {result}", file=sys.stderr)
            failed.append(result)
        else:
            _write(result, audio[i], output_dir, output_format, writer_options, write_result)
    return failed


def _write(result, path: Path, output_dir: Path, output_format: str, writer_options: dict, write_result) -> None:
    try:
        write_result(result, path, output_dir, output_format, writer_options)
    except OSError as e:  # a full disk mid-run: the file being written was not renamed into place
        raise OutputError(
            f"{e.filename}: cannot write ({e.strerror or e}); stopped here: outputs written before it stay, it "
            "and later ones were not written"
        ) from e


def _batched(model, audio: list[Path], batch_size: int, options):
    """(index, result or AudioError) of each file in batched mode, one file after another."""
    from .audio import AudioError
    from .transcribe import transcribe_batched

    for i, path in enumerate(audio):
        try:
            yield i, transcribe_batched(model, path, batch_size=batch_size, options=options)
        except AudioError as e:
            yield i, e


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
