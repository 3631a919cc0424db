"""TranscribeOptions: openai-whisper's transcribe() defaults written once, checked once."""

import inspect

import pytest
import whisper

from whisper_max.runtime.cliutil import flag_bool, flag_optional
from whisper_max.runtime.decoding import DecodingOptions
from whisper_max.runtime.options import TEMPERATURES, TranscribeOptions, fallback_temperatures


def test_defaults_are_openai_whispers():
    ours = TranscribeOptions()
    theirs = inspect.signature(whisper.transcribe).parameters
    for name, p in theirs.items():
        if name in ("model", "audio", "decode_options"):
            continue
        want = p.default
        if name == "temperature":
            want = tuple(want)
        if name == "clip_timestamps":
            want = (0.0,)  # openai-whisper's "0", parsed
        assert getattr(ours, name) == want, name
    defaults = whisper.DecodingOptions()
    for name in (
        "task",
        "language",
        "sample_len",
        "best_of",
        "beam_size",
        "patience",
        "length_penalty",
        "prefix",
        "suppress_tokens",
        "suppress_blank",
        "without_timestamps",
        "max_initial_timestamp",
    ):
        assert getattr(ours.decode, name) == getattr(defaults, name), name


def test_temperature_schedules_are_openai_whispers():
    """transcribe()'s default tuple, and its CLI's arange (0.6000000000000001) from a start and an
    increment, or the start alone without one: what every client of ours uses."""
    import numpy as np

    assert TEMPERATURES == inspect.signature(whisper.transcribe).parameters["temperature"].default
    assert fallback_temperatures(0.0, 0.2) == tuple(np.arange(0.0, 1.0 + 1e-6, 0.2)) != TEMPERATURES
    assert fallback_temperatures(0.5, 0.25) == (0.5, 0.75, 1.0)
    assert fallback_temperatures(0.3, None) == (0.3,)


def test_flag_values_as_openai_whisper_spells_them():
    assert [flag_bool(v) for v in ("True", "false", "1", "0", "YES", "no")] == [True, False, True, False, True, False]
    with pytest.raises(Exception, match="expected True or False, got 'maybe'"):
        flag_bool("maybe")
    assert (
        flag_optional("None", int),
        flag_optional(None, int),
        flag_optional("none", float),
        flag_optional("5", int),
    ) == (None, None, None, 5)


def test_from_keywords_cli_or_json():
    o = TranscribeOptions.from_kwargs(
        temperature=0.0, beam_size=5, best_of=5, language="en", clip_timestamps="1.5,9", suppress_tokens=[1, 2]
    )
    assert o.temperature == (0.0,) and o.clip_timestamps == (1.5, 9.0)
    assert o.decode == DecodingOptions(language="en", beam_size=5, best_of=5, suppress_tokens=(1, 2))
    assert TranscribeOptions.from_kwargs(temperature=[0, 0.5], clip_timestamps=[0, 3]) == TranscribeOptions(
        temperature=(0.0, 0.5), clip_timestamps=(0.0, 3.0)
    )
    assert TranscribeOptions.from_kwargs(clip_timestamps="").clip_timestamps == ()
    # each window: beams only at temperature 0, best-of only above it; the prompt is the window's
    assert o.window(0.0, [7]) == DecodingOptions(
        language="en", beam_size=5, suppress_tokens=(1, 2), temperature=0.0, prompt=[7]
    )
    assert o.window(0.4, []) == DecodingOptions(
        language="en", best_of=5, suppress_tokens=(1, 2), temperature=0.4, prompt=[]
    )


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"beam_sise": 5}, TypeError, r"unknown transcribe options \['beam_sise'\]"),
        ({"prompt": "x"}, ValueError, "give initial_prompt"),
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": []}, ValueError, "temperature"),
        ({"beam_size": 0}, ValueError, "beam_size 0"),
        ({"best_of": 2.5}, ValueError, "best_of 2.5"),
        ({"patience": 0.0}, ValueError, "patience"),
        ({"length_penalty": 2.0}, ValueError, "length_penalty"),
        ({"task": "summarise"}, ValueError, "task 'summarise'"),
        ({"clip_timestamps": "-1"}, ValueError, "clip_timestamps"),
        ({"temperature": "hot"}, TypeError, "'hot'"),
    ],
)
def test_bad_options_are_refused_once(options, error, match):
    with pytest.raises(error, match=match):
        TranscribeOptions.from_kwargs(**options)


def test_one_english_only_policy():
    """Every client's policy for an English-only model: English, transcribed, and a note when the
    user asked for something else; a multilingual model keeps what was asked."""
    asked = TranscribeOptions.from_kwargs(language="de", task="translate")
    assert asked.for_model(True) == (asked, None)
    options, note = asked.for_model(False)
    assert (options.decode.language, options.decode.task) == ("en", "transcribe")
    assert note == "an English-only model but received language 'de' / task 'translate'; using English."
    assert TranscribeOptions.from_kwargs(language="English").for_model(False)[1] is None
    assert TranscribeOptions().for_model(False) == (TranscribeOptions.from_kwargs(language="en"), None)
