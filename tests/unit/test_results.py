"""Typed results: openai-whisper's result dict in and out, unchanged, keys in its order."""

import json

import pytest

from whisper_max.runtime.results import Segment, TranscriptionResult, Word

SEGMENT = {
    "id": 0,
    "seek": 0,
    "start": 0.0,
    "end": 2.5,
    "text": " Hello there.",
    "tokens": [50363, 2425, 612, 13],
    "temperature": 0.0,
    "avg_logprob": -0.25,
    "compression_ratio": 0.8,
    "no_speech_prob": 0.01,
}
WORDS = [{"word": " Hello", "start": 0.0, "end": 0.6, "probability": 0.9}]


def test_openai_dict_round_trip_keeps_values_and_key_order():
    d = {"text": " Hello there.", "segments": [SEGMENT, {**SEGMENT, "id": 1, "words": WORDS}], "language": "en"}
    result = TranscriptionResult.from_openai_dict(d)
    assert result.segments[0].words is None and result.segments[1].words == (Word(" Hello", 0.0, 0.6, 0.9),)
    assert result.segments[0].tokens == (50363, 2425, 612, 13)
    back = result.as_openai_dict()
    assert back == d and json.dumps(back) == json.dumps(d)  # the JSON writer's bytes: same keys, same order
    assert "words" not in back["segments"][0] and isinstance(back["segments"][0]["tokens"], list)


def test_results_are_frozen_and_refuse_unknown_keys():
    segment = Segment.from_openai_dict(SEGMENT)
    with pytest.raises(AttributeError):
        segment.text = "changed"
    with pytest.raises(ValueError, match=r"unknown keys \['speaker'\]"):
        Segment.from_openai_dict({**SEGMENT, "speaker": 1})
