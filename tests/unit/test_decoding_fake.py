"""runtime.decoding on a fake engine (tests/helpers/fake_engine.py): no MAX, no package, a few seconds.

Each case decodes the same scripted logits twice: with our DecodingTask on the fake engine, and
with openai-whisper's own DecodingTask on a fake torch model. The tokens must be equal, and
avg_logprob and no_speech_prob equal to float32 rounding (1e-5: our sums are float32 as
openai-whisper's; the log-softmax is summed in a different order). The logits are random but
structured so that runs end, carry timestamps, and meet every filter (a blank first, timestamps
that outweigh text, the pairing and monotonic rules).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import whisper
from helpers.fake_engine import FakeEngine, FakePool, FakeStreamModel, scripted_logits, torch_model

from whisper_max.converter.convert import mel_assets, tokenizer_assets
from whisper_max.runtime.decoding import DecodingOptions, DecodingResult
from whisper_max.runtime.engine import Engine, decode
from whisper_max.runtime.options import TranscribeOptions
from whisper_max.runtime.stream import DetectingLanguage, LanguageDetected, TranscriptionStream
from whisper_max.runtime.tokenizer import Tokenizer

TOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    assets = tokenizer_assets(False, 99)  # tiny.en's
    return Tokenizer(assets["assets/gpt2.tiktoken"], json.loads(assets["assets/tokenizer.json"]))


@pytest.fixture(scope="module")
def reference(tokenizer):
    return torch_model(tokenizer)


CASES = {
    "greedy, three windows in one batch": ([1, 2, 3], {}),
    "greedy, no limit on the first timestamp": ([4], {"max_initial_timestamp": None}),
    "greedy, first timestamp at most 0.1 s": ([5], {"max_initial_timestamp": 0.1}),
    "greedy, without timestamps": ([1, 2], {"without_timestamps": True}),
    "greedy, prompt and prefix": ([7, 8], {"prompt": "hello there", "prefix": "So"}),
    "no suppression at all": ([9], {"suppress_tokens": "", "suppress_blank": False}),
    "a listed suppression": ([10], {"suppress_tokens": "11,13,30,262,290"}),
    "sample_len reached": ([11], {"sample_len": 6}),
    "beam 5": ([4], {"beam_size": 5}),
    "beam 5, patience 2, length penalty 0.6": ([5], {"beam_size": 5, "patience": 2.0, "length_penalty": 0.6}),
    "beam 3 without timestamps, prompt": ([6], {"beam_size": 3, "without_timestamps": True, "prompt": "a prompt"}),
}


@pytest.mark.parametrize("case", CASES)
def test_decoding_matches_openai_whisper(tokenizer, reference, case):
    ids, options = CASES[case]
    features = FakeEngine.features(ids)
    ours = decode(FakeEngine(tokenizer), features, DecodingOptions(language="en", **options))
    ref = whisper.decoding.decode(
        reference, torch.from_numpy(features), whisper.DecodingOptions(language="en", fp16=False, **options)
    )
    assert len(ours) == len(ref) == len(ids)
    for o, r in zip(ours, ref):
        assert o.tokens == r.tokens, f"{case}: window {ids}\nours {o.tokens}\nopenai-whisper {r.tokens}"
        assert o.text == r.text
        assert abs(o.avg_logprob - r.avg_logprob) <= TOL * abs(r.avg_logprob)
        assert abs(o.no_speech_prob - r.no_speech_prob) <= TOL
    if not options.get("without_timestamps"):
        assert all(sum(t >= tokenizer.timestamp_begin for t in o.tokens) >= 2 for o in ours)  # the rules had work


def test_a_batch_decodes_as_its_windows_alone(tokenizer):
    model = FakeEngine(tokenizer)
    together = decode(model, FakeEngine.features([1, 2, 3]), DecodingOptions(language="en"))
    assert model.widest == 3  # the three windows' rows went through the same calls
    alone = [decode(model, FakeEngine.features([i]), DecodingOptions(language="en"))[0] for i in (1, 2, 3)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]


def test_windows_join_and_leave_at_any_time(tokenizer):
    """Continuous batching: windows with different options (greedy, beam, a prompt, sampling)
    submitted while others decode, including from another window's completion, each give the
    tokens they give alone; the calls hold rows of several windows; max_rows is respected."""
    jobs = [
        (1, {}),
        (2, {"beam_size": 5}),
        (3, {"prompt": "hello there"}),
        (4, {"temperature": 0.5, "best_of": 3, "seed": 7}),
        (5, {"without_timestamps": True}),
        (6, {"beam_size": 2, "patience": 2.0}),
    ]
    alone = {
        i: decode(FakeEngine(tokenizer), FakeEngine.features([i]), DecodingOptions(language="en", **o))[0].tokens
        for i, o in jobs
    }
    model = FakeEngine(tokenizer)
    engine = Engine(model, max_rows=8)
    got: dict[int, list[int]] = {}

    def submit(i: int, o: dict) -> None:
        def done(result, i=i):
            got[i] = result.tokens
            if i == 1:  # a window that joins when another leaves
                submit(*jobs[5])

        engine.submit_window(FakeEngine.features([i])[0], DecodingOptions(language="en", **o), done)

    for i, o in jobs[:2]:
        submit(i, o)
    for _ in range(3):
        engine.step()
    for i, o in jobs[2:5]:  # join mid-flight
        submit(i, o)
    engine.run()
    assert got == alone
    assert 1 < model.widest <= 8


class _PoisonedPool(FakePool):
    """A decoder call that holds window 9's rows raises, as a bug one request meets would (the
    real pool gives each window of a call that raised its exception, its rows unchanged)."""

    def step(self, items) -> list:
        if any(rows.window == 9 for rows, _ in items):
            return [RuntimeError("the call with window 9 failed")] * len(items)
        return super().step(items)


class _Poisoned(FakeEngine):
    def pool(self) -> FakePool:
        return _PoisonedPool(self)


def test_a_failing_window_fails_alone(tokenizer):
    """Four windows decode together; the calls that hold window 9 raise. The engine runs each
    window's step alone when a call raises: window 9 fails (its on_error), and 1, 2 and 3 give
    the tokens they give alone. A window whose on_done raises fails the same way. Without an
    on_error the failure leaves step(), after the others have had their step."""
    options = DecodingOptions(language="en")
    alone = {i: decode(FakeEngine(tokenizer), FakeEngine.features([i]), options)[0].tokens for i in (1, 2, 3)}
    engine = Engine(_Poisoned(tokenizer))
    got, errors = {}, {}
    for i in (1, 2, 9, 3):
        on_done = (lambda r: 1 / 0) if i == 3 else (lambda r, i=i: got.__setitem__(i, r.tokens))
        engine.submit_window(
            FakeEngine.features([i])[0], options, on_done, on_error=lambda e, i=i: errors.__setitem__(i, e)
        )
    engine.run()
    assert got == {1: alone[1], 2: alone[2]}
    assert sorted(errors) == [3, 9] and isinstance(errors[3], ZeroDivisionError)
    assert str(errors[9]) == "the call with window 9 failed" and engine.failed == 2 and engine.live_rows == 0
    engine.submit_window(FakeEngine.features([9])[0], options, lambda r: None)
    engine.submit_window(FakeEngine.features([1])[0], options, lambda r: got.__setitem__("again", r.tokens))
    with pytest.raises(RuntimeError, match="window 9"):
        engine.run()
    engine.run()
    assert got["again"] == alone[1]


def test_best_of_sampling(tokenizer):
    """best_of samples at temperature > 0: reproducible with a seed, different across seeds, and
    every sample obeys the filters (a timestamp first, timestamps non-decreasing, nothing
    suppressed)."""
    engine = FakeEngine(tokenizer)
    features = FakeEngine.features([12])

    def run(seed):
        return decode(engine, features, DecodingOptions(language="en", temperature=0.7, best_of=5, seed=seed))[0]

    a, b, c = run(1), run(1), run(2)
    assert a.tokens == b.tokens and a.avg_logprob == b.avg_logprob and a.temperature == 0.7
    assert a.tokens != c.tokens
    tb = tokenizer.timestamp_begin
    banned = set(tokenizer.non_speech_tokens) | {tokenizer.no_timestamps, tokenizer.sot, tokenizer.eot}
    for r in (a, c):
        assert r.tokens[0] >= tb
        stamps = [t for t in r.tokens if t >= tb]
        assert stamps == sorted(stamps)
        assert not banned & set(r.tokens)
    with pytest.raises(ValueError, match="best_of with greedy sampling"):
        decode(engine, features, DecodingOptions(language="en", temperature=0.0, best_of=5))


def test_language_detection_is_a_window_on_the_engine():
    """A multilingual stream without a language asks the engine to decode a lang_id window (the
    first 30 s, <|startoftranscript|> alone) before its first transcription window: the model has
    no other way to run its decoder here. The language is the most likely language token of the
    logits at <|startoftranscript|>, as openai-whisper's detect_language picks it."""
    assets = tokenizer_assets(True, 99)
    tokenizer = Tokenizer(assets["assets/multilingual.tiktoken"], json.loads(assets["assets/tokenizer.json"]))
    filters = np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))
    model = FakeStreamModel(tokenizer, filters)
    engine = Engine(model)
    audio = np.random.default_rng(3).standard_normal(16000 * 3).astype(np.float32) * 0.1
    events: list = []
    stream = TranscriptionStream(model, audio, TranscribeOptions(condition_on_previous_text=False), events.append)
    first = stream.next_window()
    assert first.options.task == "lang_id" and first.options.language is None
    engine.submit(stream)
    engine.run()
    window = float(first.mel[0, 0])  # the fake's window id: the first log-mel value
    sot_logits = scripted_logits(window, [tokenizer.sot], tokenizer)
    languages = list(tokenizer.all_language_tokens)
    expected = tokenizer.all_language_codes[int(np.argmax(sot_logits[languages]))]
    assert stream.result.language == expected
    detected = [e for e in events if isinstance(e, LanguageDetected)]
    assert [type(e) for e in events if isinstance(e, (DetectingLanguage, LanguageDetected))] == [
        DetectingLanguage,
        LanguageDetected,
    ]
    assert detected[0].code == expected


@pytest.mark.parametrize("one_window", [False, True])
def test_one_window_keeps_the_text_after_the_last_timestamps(one_window):
    """openai-whisper leaves the text after a window's last pair of timestamps to a next window
    that starts there; a live update (one_window) decodes its buffer once and keeps that text as
    a last segment ending where the audio ends (the next update decodes those seconds again)."""
    assets = tokenizer_assets(True, 99)
    tokenizer = Tokenizer(assets["assets/multilingual.tiktoken"], json.loads(assets["assets/tokenizer.json"]))
    filters = np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))
    model = FakeStreamModel(tokenizer, filters)
    audio = np.random.default_rng(4).standard_normal(16000 * 20).astype(np.float32) * 0.1
    options = TranscribeOptions(decode=DecodingOptions(language="en"))
    stream = TranscriptionStream(model, audio, options, one_window=one_window)
    tb = tokenizer.timestamp_begin
    first, rest = tokenizer.encode(" Said and done."), tokenizer.encode(" And then")
    tokens = [tb, *first, tb + 100, tb + 100, *rest]  # 0.00-2.00, then text with no closing timestamp
    window = stream.next_window()
    stream.feed(DecodingResult(None, "en", tokens=tokens, avg_logprob=-0.1, no_speech_prob=0.0, temperature=0.0))
    if not one_window:
        assert stream.next_window() is not None  # openai-whisper's next window, from 2.00 s
        assert [s.text for s in _fed_segments(stream, tokenizer)] == [" Said and done.", " And then"]
        return
    assert window.mel.shape[-1] == 3000 and stream.done
    segments = stream.result.segments
    assert [(s.start, s.end, s.text) for s in segments] == [(0.0, 2.0, " Said and done."), (2.0, 20.0, " And then")]


def _fed_segments(stream, tokenizer):
    """Feed the second window a closed segment (0.00-1.00 of it) and return the result's segments."""
    tb = tokenizer.timestamp_begin
    tokens = [tb, *tokenizer.encode(" And then"), tb + 50]
    stream.feed(DecodingResult(None, "en", tokens=tokens, avg_logprob=-0.1, no_speech_prob=0.0, temperature=0.0))
    assert stream.done
    return stream.result.segments
