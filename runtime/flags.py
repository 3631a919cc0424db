"""The transcription flags of every CLI, generated from `TranscribeOptions` (and the
`DecodingOptions` it holds): one spelling (openai-whisper's `--beam_size 5`, booleans and "None"
as values), one parser per field type, and the defaults of openai-whisper's command line.

`with_flags(names)` adds the named flags to a typer command, which receives them parsed as
`flags: dict`; `transcribe_options(flags)` turns that dict into the checked `TranscribeOptions`.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields

import typer

from .cliutil import flag_bool, flag_optional
from .decoding import DecodingOptions
from .options import TranscribeOptions, fallback_temperatures
from .vad import VadOptions


@dataclass(frozen=True)
class Flag:
    name: str
    default: str | None  # as openai-whisper's command line spells it
    parse: Callable[[str | None], object]
    help: str


# openai-whisper's help of each flag it has, in its order, then ours; names are TranscribeOptions'
# and DecodingOptions' fields except temperature_increment_on_fallback (see transcribe_options).
HELP = {
    "verbose": "print progress and debug messages",
    "task": "transcribe, or translate to English",
    "language": "language spoken; None detects it",
    "temperature": "temperature to use for sampling",
    "best_of": "candidates when sampling with non-zero temperature",
    "beam_size": "beams in beam search, used when temperature is zero; None: greedy",
    "patience": "beam search patience factor",
    "length_penalty": "length penalty alpha; None: simple length normalisation",
    "suppress_tokens": "comma-separated token ids to suppress; -1: most special characters",
    "initial_prompt": "text to provide as a prompt for the first window",
    "carry_initial_prompt": "prepend initial_prompt to every window's prompt",
    "condition_on_previous_text": "prompt each window with the previous output",
    "fp16": "accepted for compatibility; the package's dtype decides",
    "temperature_increment_on_fallback": "temperature step when decoding fails the thresholds",
    "compression_ratio_threshold": "treat a window as failed above this gzip ratio",
    "logprob_threshold": "treat a window as failed below this average log probability",
    "no_speech_threshold": "silence when <|nospeech|> is above this and the logprob is too low",
    "word_timestamps": "word-level timestamps from cross-attention alignment",
    "prepend_punctuations": "with word timestamps, merge these with the next word",
    "append_punctuations": "with word timestamps, merge these with the previous word",
    "clip_timestamps": "start,end,start,end,... seconds of clips to process",
    "hallucination_silence_threshold": (
        "with word timestamps, skip silences longer than this (s) around a likely hallucination"
    ),
    "vad_filter": (
        "transcribe only the speech Silero VAD finds (faster-whisper's vad_filter); timestamps stay in the file's "
        "timeline; not openai-whisper's tokens"
    ),
    "vad_parameters": "faster-whisper's VadOptions as JSON, e.g. '{\"min_silence_duration_ms\": 500}'",
    "without_timestamps": "decode no timestamp tokens: one segment per window",
    "seed": "seed of the sampling at fallback temperatures (numpy's generator): the same text in every run",
}

# where openai-whisper's command line differs from transcribe()'s defaults
CLI_DEFAULTS = {"verbose": True, "best_of": 5, "beam_size": 5, "fp16": True}


def _parser(kind) -> Callable[[str | None], object]:
    """The parser of a flag whose field has type `kind` (bool, int, float, str or one of them | None)."""
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if base is bool:
        return (lambda v: flag_optional(v, flag_bool)) if optional else flag_bool
    if base in (int, float):
        return (lambda v: flag_optional(v, base)) if optional else base
    return (lambda v: flag_optional(v, str)) if optional else str


def _spell(value) -> str | None:
    return None if value is None else str(value)


def _vad_parameters(text: str | None) -> VadOptions | None:
    if flag_optional(text, str) is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{text!r}: not JSON ({e})") from e
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{text!r}: a JSON object expected")
    try:
        return VadOptions.from_dict(value)
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e


def _table() -> dict[str, Flag]:
    kinds = {**typing.get_type_hints(DecodingOptions), **typing.get_type_hints(TranscribeOptions)}
    defaults = {f.name: f.default for f in (*fields(DecodingOptions), *fields(TranscribeOptions))}
    special = {
        # one start temperature and a step, as openai-whisper's CLI takes them (see transcribe_options)
        "temperature": (float, 0.0),
        "temperature_increment_on_fallback": (lambda v: flag_optional(v, float), 0.2),
        "suppress_tokens": (str, "-1"),
        "clip_timestamps": (str, "0"),
        "vad_parameters": (_vad_parameters, None),
        # None lets a command decide (whisper-run: True with --batched)
        "without_timestamps": (lambda v: flag_optional(v, flag_bool), False),
    }
    table = {}
    for name, text in HELP.items():
        if name in special:
            parse, default = special[name]
        else:
            parse, default = _parser(kinds[name]), defaults[name]
            assert default is not MISSING, name
        table[name] = Flag(name, _spell(CLI_DEFAULTS.get(name, default)), parse, text)
    return table


FLAGS = _table()


def transcribe_options(flags: dict[str, object], **overrides) -> TranscribeOptions:
    """The checked TranscribeOptions of parsed flags (plus `overrides`, e.g. a command's own
    policy): `temperature` and `temperature_increment_on_fallback` become the fallback schedule,
    as openai-whisper's command line makes it."""
    values = dict(flags)
    if "temperature" in values or "temperature_increment_on_fallback" in values:
        start = values.pop("temperature", 0.0)
        values["temperature"] = fallback_temperatures(start, values.pop("temperature_increment_on_fallback", 0.2))
    return TranscribeOptions.from_kwargs(**{**values, **overrides})


def _parse(flag: Flag, value: str | None):
    try:
        return flag.parse(value)
    except typer.BadParameter as e:
        raise typer.BadParameter(e.message, param_hint=f"--{flag.name}") from None
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(f"{value!r}: {e}", param_hint=f"--{flag.name}") from None


def with_flags(names: tuple[str, ...], **defaults: str | None):
    """A decorator adding the flags `names` (with `defaults` replacing FLAGS' where a command has its
    own) to a typer command `fn(..., flags: dict)`, which gets them parsed."""
    chosen = {n: FLAGS[n] for n in names}

    def wrap(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.name != "flags"
        ]
        added = [
            inspect.Parameter(
                n,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(defaults.get(n, f.default), f"--{n}", help=f.help),
                annotation=str | None,
            )
            for n, f in chosen.items()
        ]

        @functools.wraps(fn)
        def command(**values):
            flags = {n: _parse(f, values.pop(n)) for n, f in chosen.items()}
            return fn(**values, flags=flags)

        command.__signature__ = inspect.Signature(own + added)
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command

    return wrap
