"""Transcription options: openai-whisper's `transcribe()` keywords with its defaults, written once
and checked once, however they arrive (Python keywords, CLI flags, a JSON request).

`TranscribeOptions.decode` holds the DecodingOptions fields that apply to every window (task,
language, beam_size, ...); the long-form loop (runtime.stream) sets each window's temperature
and prompt itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .decoding import DecodingOptions
from .vad import VadOptions

TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # transcribe()'s default schedule, openai-whisper's
_PER_WINDOW = {"temperature", "prompt"}  # DecodingOptions fields the long-form loop sets
_DECODE_FIELDS = {f.name for f in fields(DecodingOptions)} - _PER_WINDOW


@dataclass(frozen=True)
class TranscribeOptions:
    verbose: bool | None = None  # True: segment lines; False: a progress bar; None: silent
    temperature: tuple[float, ...] = TEMPERATURES  # tried in order while a window fails
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    initial_prompt: str | None = None
    carry_initial_prompt: bool = False
    word_timestamps: bool = False
    prepend_punctuations: str = "\"'“¿([{-"
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"
    clip_timestamps: tuple[float, ...] = (0.0,)  # start, end, start, ... seconds; an odd count runs to the end
    hallucination_silence_threshold: float | None = None
    vad_filter: bool = False  # faster-whisper's: transcribe only the speech Silero VAD finds
    vad_parameters: VadOptions | None = None  # None: VadOptions() (batched mode: vad.BATCHED)
    decode: DecodingOptions = field(default_factory=DecodingOptions)

    def __post_init__(self) -> None:
        if not self.temperature or any(t < 0 for t in self.temperature):
            raise ValueError(f"temperature {self.temperature}: one or more values >= 0 expected")
        if any(t < 0 for t in self.clip_timestamps):
            raise ValueError(f"clip_timestamps {self.clip_timestamps}: seconds >= 0 expected")
        d = self.decode
        if d.task not in ("transcribe", "translate"):
            raise ValueError(f"task {d.task!r}: transcribe or translate")
        for name in ("beam_size", "best_of"):
            value = getattr(d, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} {value!r}: a positive integer or None expected")
        if d.patience is not None and d.patience <= 0:
            raise ValueError(f"patience {d.patience}: > 0 expected")
        if d.length_penalty is not None and not 0 <= d.length_penalty <= 1:
            raise ValueError(f"length_penalty {d.length_penalty}: between 0 and 1 expected")

    @classmethod
    def from_kwargs(cls, **options) -> TranscribeOptions:
        """From openai-whisper's `transcribe(model, audio, **options)` keywords: its own and
        DecodingOptions fields, plain Python or JSON values (lists for tuples; a number or a
        list for temperature; clip_timestamps as "start,end,..." or a list), and
        faster-whisper's vad_filter and vad_parameters (a dict or VadOptions)."""
        mine = {f.name for f in fields(cls)} - {"decode"}
        unknown = set(options) - mine - _DECODE_FIELDS
        if "prompt" in unknown:
            raise ValueError(
                "prompt: the long-form loop prompts each window with the previous text; give initial_prompt"
            )
        if unknown:
            raise TypeError(f"unknown transcribe options {sorted(unknown)}")
        own = {k: v for k, v in options.items() if k in mine}
        if "temperature" in own:
            own["temperature"] = _floats(own["temperature"])
        if "clip_timestamps" in own:
            clips = own["clip_timestamps"]
            own["clip_timestamps"] = _floats(
                [float(t) for t in clips.split(",") if t.strip()] if isinstance(clips, str) else clips
            )
        if isinstance(own.get("vad_parameters"), dict):
            own["vad_parameters"] = VadOptions.from_dict(own["vad_parameters"])
        decode = {k: v for k, v in options.items() if k in _DECODE_FIELDS}
        if isinstance(decode.get("suppress_tokens"), list):
            decode["suppress_tokens"] = tuple(decode["suppress_tokens"])
        return cls(**own, decode=DecodingOptions(**decode))

    def for_model(self, multilingual: bool) -> tuple[TranscribeOptions, str | None]:
        """These options for a model, the one English-only policy of every client: unchanged for a
        multilingual model; English, transcribed, for an English-only one, with a note (for the
        user) when something else was asked."""
        if multilingual:
            return self, None
        d = self.decode
        asked = d.language not in (None, "en", "English") or d.task == "translate"
        note = f"an English-only model but received language {d.language!r} / task {d.task!r}; using English."
        return self.english_only(), note if asked else None

    def english_only(self) -> TranscribeOptions:
        """These options for an English-only model: English, transcribed, whatever was asked
        (openai-whisper's CLI does the same)."""
        return replace(self, decode=replace(self.decode, language="en", task="transcribe"))

    def window(self, temperature: float, prompt) -> DecodingOptions:
        """The DecodingOptions of one window decoded at `temperature` after `prompt`: beams only
        at temperature 0 and best-of only above it, as openai-whisper's fallback does."""
        if temperature > 0:
            return replace(self.decode, temperature=temperature, prompt=prompt, beam_size=None, patience=None)
        return replace(self.decode, temperature=temperature, prompt=prompt, best_of=None)


def fallback_temperatures(start: float = 0.0, increment: float | None = 0.2) -> tuple[float, ...]:
    """openai-whisper's command-line schedule: start, start + increment, ... up to 1.0 as numpy's
    arange makes them (its CLI's values: 0.6000000000000001, not transcribe()'s 0.6), or start
    alone without an increment."""
    if increment is None:
        return (float(start),)
    return tuple(float(t) for t in np.arange(start, 1.0 + 1e-6, increment))


def _floats(value) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return tuple(float(v) for v in value)
    raise TypeError(f"{value!r}: a number or a sequence of numbers expected")
