"""Live transcription's bookkeeping (runtime.live) on scripted decodes: when it decodes, what two
decodes must agree on, what it confirms at the end, where it cuts the buffer."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from whisper_max.converter.convert import mel_assets
from whisper_max.runtime import live as live_mod
from whisper_max.runtime.audio import load_audio
from whisper_max.runtime.live import (
    Behind,
    Confirmed,
    Finished,
    LiveOptions,
    LiveTranscription,
    Partial,
    SpeechStarted,
    SpeechStopped,
    Turn,
)
from whisper_max.runtime.options import TranscribeOptions
from whisper_max.runtime.results import Segment, TranscriptionResult, Word
from whisper_max.runtime.vad import LiveVad, VadOptions, speech_probabilities, speech_regions

SR = 16000


@pytest.fixture
def made(monkeypatch):
    """LiveTranscription on a stand-in model whose decodes the test scripts: next_update gives
    a record of what it would decode (its options and log-mel), update reads `.result`."""
    filters = np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))
    model = SimpleNamespace(mel_filters=filters)
    monkeypatch.setattr(
        live_mod,
        "TranscriptionStream",
        lambda m, mel, options, one_window: SimpleNamespace(mel=mel, options=options, one_window=one_window),
    )

    def make(**options):
        events: list = []
        return LiveTranscription(model, LiveOptions(**options), on_event=events.append), events

    return make


def words(*spec) -> tuple[Word, ...]:
    """("word", start, end), ... -> Words (buffer time)."""
    return tuple(Word(f" {w}", s, e, 0.9) for w, s, e in spec)


def decoded(stream, *segments) -> SimpleNamespace:
    """`stream` with a result of segments, each (end, words...)."""
    segs = tuple(
        Segment(i, 0, ws[0].start if ws else 0.0, end, "".join(w.word for w in ws), (), 0.0, -0.1, 1.0, 0.0, ws)
        for i, (end, ws) in enumerate(segments)
    )
    stream.result = TranscriptionResult("".join(s.text for s in segs), segs, "en")
    return stream


def texts(events, kind):
    return [" ".join(w.word.strip() for w in e.words) for e in events if isinstance(e, kind)]


def test_words_are_confirmed_when_two_decodes_agree(made):
    live, events = made()
    live.append(np.zeros(SR // 2, np.float32))
    assert live.next_update() is None  # under min_chunk of new audio
    live.append(np.zeros(SR // 2, np.float32))
    s1 = live.next_update()
    assert s1 is not None and s1.options.word_timestamps and s1.options.initial_prompt is None and s1.one_window
    assert s1.mel.content_frames == SR // 160  # the buffer's log-mel, as LiveMel computes it
    live.append(np.zeros(2 * SR, np.float32))
    assert live.next_update() is None  # one update in flight at a time
    live.update(decoded(s1, (1.0, words(("and", 0.1, 0.3), ("so", 0.3, 0.6), ("my", 0.7, 0.9)))))
    assert texts(events, Confirmed) == [] and texts(events, Partial) == ["and so my"]
    s2 = live.next_update()
    live.update(decoded(s2, (3.0, words(("and", 0.1, 0.3), ("so", 0.3, 0.6), ("my", 0.7, 0.9), ("fellow", 1.0, 1.4)))))
    live.append(np.zeros(SR, np.float32))
    s3 = live.next_update()
    live.update(decoded(s3, (4.0, words(("and", 0.1, 0.3), ("so", 0.3, 0.6), ("my", 0.7, 0.9), ("fellows", 1.0, 1.5)))))
    assert texts(events, Confirmed) == ["and so my"]  # "fellow" / "fellows" disagree
    assert texts(events, Partial)[-1] == "fellows"
    confirmed = [e for e in events if isinstance(e, Confirmed)]
    assert confirmed[0].audio_time == 3.0  # the audio received when the confirming decode was made


def test_the_end_confirms_everything_and_says_the_whole_text(made):
    live, events = made(min_chunk=0.5)
    live.append(np.zeros(SR, np.float32))
    s1 = live.next_update()
    live.update(decoded(s1, (1.0, words(("ask", 0.1, 0.3), ("not", 0.4, 0.6)))))
    live.append(np.zeros(SR // 4, np.float32))
    live.finish()
    with pytest.raises(RuntimeError, match="finished"):
        live.append(np.zeros(10, np.float32))
    s2 = live.next_update()  # the rest of the audio, though under min_chunk: the last decode
    assert s2 is not None
    live.update(decoded(s2, (1.2, words(("ask", 0.1, 0.3), ("not", 0.4, 0.6), ("what", 0.8, 1.1)))))
    assert texts(events, Confirmed) == ["ask not what"]  # the last decode confirms all it says
    assert events[-1] == Finished("ask not what") and live.finished
    assert live.next_update() is None


def test_a_stream_ending_right_after_an_update_confirms_its_hypothesis(made):
    live, events = made()
    live.append(np.zeros(SR, np.float32))
    s1 = live.next_update()
    live.update(decoded(s1, (1.0, words(("hello", 0.1, 0.5)))))
    live.finish()
    assert live.next_update() is None  # nothing new to decode
    assert texts(events, Confirmed) == ["hello"] and events[-1] == Finished("hello")


def test_a_repeated_head_is_dropped_and_the_buffer_is_cut_at_a_confirmed_segment_end(made):
    live, events = made(trim=5.0, max_buffer=10.0)
    said = words(("one", 0.5, 1.0), ("two", 1.5, 2.0), ("three", 2.5, 3.0))
    live.append(np.zeros(6 * SR, np.float32))
    s1 = live.next_update()
    live.update(decoded(s1, (2.2, said[:2]), (3.0, said[2:])))
    live.append(np.zeros(SR, np.float32))
    s2 = live.next_update()
    live.update(decoded(s2, (2.2, said[:2]), (3.0, said[2:]), (6.5, words(("four", 4.0, 4.5)))))
    assert texts(events, Confirmed) == ["one two three"]
    # 7 s of buffer > trim: cut at the last segment end within what is confirmed (3.0 s)
    assert live.offset == 3.0 and len(live._buffer) == 4 * SR
    live.append(np.zeros(SR, np.float32))
    s3 = live.next_update()
    assert s3.options.initial_prompt == " one two three"  # the confirmed text before the buffer
    assert s3.mel.content_frames == 5 * SR // 160
    # the decode of the cut buffer says "three" again just after its confirmed end: dropped
    live.update(decoded(s3, (4.0, words(("three", 0.0, 0.1), ("four", 0.8, 1.3), ("five", 1.5, 2.0)))))
    live.append(np.zeros(SR, np.float32))
    s4 = live.next_update()
    live.update(decoded(s4, (4.0, words(("four", 0.8, 1.3), ("five", 1.5, 2.0), ("six", 2.5, 3.0)))))
    # "four" was the hypothesis before the cut (it agrees with s3), "five" agrees in s4
    assert texts(events, Confirmed) == ["one two three", "four", "five"]
    later = [w for e in events if isinstance(e, Confirmed) for w in e.words][3:]
    assert [(w.start, w.end) for w in later] == [(3.8, 4.3), (4.5, 5.0)]  # in the stream's time


def test_a_long_silence_is_cut_without_anything_confirmed(made):
    live, events = made(trim=5.0, max_buffer=8.0)
    for _ in range(9):
        live.append(np.zeros(SR, np.float32))
        s = live.next_update()
        live.update(decoded(s))
    assert live.offset > 0 and len(live._buffer) / SR <= 8.0
    assert texts(events, Confirmed) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="max_buffer"):
        LiveOptions(trim=20, max_buffer=10)
    with pytest.raises(ValueError, match="max_buffer"):
        LiveOptions(max_buffer=31)


def test_a_confirmed_tail_said_again_with_earlier_times_is_dropped_through_its_match(made):
    """A later decode places the confirmed "ask not" earlier (timings move between decodes) and
    "what" before the confirmed end: "what" is what follows, not dropped for its time (jfk.wav
    lost it so); with no match, a word is new when its middle is past the confirmed end."""
    live, events = made()
    live.append(np.zeros(6 * SR, np.float32))
    s1 = live.next_update()
    live.update(decoded(s1, (5.0, words(("ask", 2.3, 3.9), ("not", 3.9, 4.7)))))
    live.append(np.zeros(SR, np.float32))
    s2 = live.next_update()
    live.update(decoded(s2, (5.0, words(("ask", 2.3, 3.9), ("not", 3.9, 4.7), ("what", 4.7, 5.5)))))
    assert texts(events, Confirmed) == ["ask not"] and texts(events, Partial)[-1] == "what"
    live.append(np.zeros(SR, np.float32))
    s3 = live.next_update()
    live.update(decoded(s3, (6.0, words(("ask", 2.3, 3.8), ("not", 3.8, 4.5), ("what", 4.5, 5.2), ("your", 5.2, 5.6)))))
    assert texts(events, Confirmed) == ["ask not", "what"] and texts(events, Partial)[-1] == "your"
    live.append(np.zeros(SR, np.float32))
    s4 = live.next_update()
    live.update(decoded(s4, (7.0, words(("what?", 4.6, 5.0), ("your", 5.3, 5.6), ("country", 5.7, 6.2)))))
    # no match of "what" ("what?" is another word): "what?" ends before the confirmed end (5.2)
    # and its middle is before it too, so it goes; "your" agrees
    assert texts(events, Confirmed)[-1] == "your"


def test_a_decode_starting_on_more_than_behind_seconds_of_new_audio_says_so_once(made):
    live, events = made(behind=5.0)
    live.append(np.zeros(5 * SR, np.float32))
    s1 = live.next_update()
    assert not [e for e in events if isinstance(e, Behind)]  # 5 s is not more than 5 s
    live.append(np.zeros(6 * SR, np.float32))
    live.update(decoded(s1))
    s2 = live.next_update()
    assert [e for e in events if isinstance(e, Behind)] == [Behind(6.0, 11.0)]
    live.append(np.zeros(7 * SR, np.float32))
    live.update(decoded(s2))
    live.next_update()
    assert len([e for e in events if isinstance(e, Behind)]) == 1


def test_with_vad_silence_is_not_decoded_and_a_turn_ends_confirmed(made):
    """jfk.wav after a second of silence, then 3 s of silence: Silero (min silence 1.5 s) hears
    speech from 1.044 s to 11.852 s. Nothing is decoded before the speech or in the silence
    after; the update that follows the stop confirms every word the turn said (no second decode
    to agree with), the words after its end stay unconfirmed, and the silence leaves the buffer."""
    vad = VadOptions(min_silence_duration_ms=1500, speech_pad_ms=300)
    live, events = made(transcribe=TranscribeOptions(vad_filter=True, vad_parameters=vad))
    speech = load_audio(Path(__file__).parents[2] / "golden" / "data" / "jfk.wav")
    live.append(np.zeros(SR, np.float32))
    assert live.next_update() is None and events == []  # silence
    live.append(speech[: 2 * SR])
    s1 = live.next_update()
    assert events == [SpeechStarted(1.044)] and s1 is not None
    live.update(decoded(s1, (2.0, words(("and", 1.2, 1.5)))))
    live.append(speech[2 * SR :])
    live.append(np.zeros(3 * SR, np.float32))
    s2 = live.next_update()  # the turn's last update, whatever min_chunk says
    assert SpeechStopped(11.852) in events
    said = words(("and", 1.2, 1.5), ("so", 1.6, 1.9), ("my", 2.0, 2.3), ("late", 12.5, 12.8))
    live.update(decoded(s2, (13.0, said)))
    assert texts(events, Confirmed) == ["and so my"] and texts(events, Partial)[-1] == "late"
    turn = next(e for e in events if isinstance(e, Turn))
    assert (turn.text, turn.start, turn.end) == ("and so my", 1.044, 11.852)
    assert live.next_update() is None  # silence: no decode, the buffer keeps the pad only
    assert live.offset == pytest.approx(15.0 - 0.3, abs=0.01) and len(live._buffer) < 0.31 * SR
    live.finish()
    assert live.next_update() is None
    assert events[-1] == Finished("and so my") and live.finished


def test_live_vad_hears_what_speech_regions_hears_in_pieces():
    """LiveVad over pieces of any size: Silero's probabilities bit for bit as over the whole
    audio, and the spans speech_regions finds (the last one still open)."""
    speech = load_audio(Path(__file__).parents[2] / "golden" / "data" / "jfk.wav")
    audio = np.concatenate([np.zeros(SR, np.float32), speech, np.zeros(3 * SR, np.float32), speech])
    options = VadOptions(min_silence_duration_ms=500, speech_pad_ms=0)  # spans as found, not widened
    rng = np.random.default_rng(0)
    vad, probs, transitions, i = LiveVad(options), [], [], 0
    while i < len(audio):
        n = int(rng.integers(1, 4000))
        probs.append(vad.probabilities(audio[i : i + n]))
        i += n
    probs = np.concatenate(probs)
    assert np.array_equal(probs, speech_probabilities(audio)[: len(probs)])
    vad, i = LiveVad(options), 0
    while i < len(audio):
        n = int(rng.integers(1, 4000))
        transitions += vad.push(audio[i : i + n])
        i += n
    spans = speech_regions(audio, options)
    assert transitions[::2] == [("start", s) for s, _ in spans]
    assert transitions[1::2] == [("stop", e) for _, e in spans[:-1]]
