"""Silero VAD (runtime.vad), `vad_filter` and the batched mode, on real speech with known offsets.

The speech: the first four sentences of the long-form LJ Speech file (../shared/audio; its
manifest gives each sentence's start and end), with seconds of digital silence put before,
between and after them, so the speech is at known places of a longer timeline.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import SHARED_AUDIO, shared_audio

from whisper_max.golden import word_edits
from whisper_max.runtime.audio import SAMPLE_RATE, load_audio
from whisper_max.runtime.vad import BATCHED, Speech, VadOptions, speech_probabilities, speech_regions

SR = SAMPLE_RATE
SLACK = 0.5  # s: VAD pads speech by 0.4 s (speech_pad_ms), then rounds to its 32 ms windows
# s, for transcribed times: word boundaries come from cross-attention alignment, a few tenths of a
# second off, and a word that Whisper starts early in the padding before a joint of the joined
# speech lands that much early in the silence before its region (faster-whisper maps it the same
# way). Unmapped times would be off by the silences put in: 6 s and more.
TEXT_SLACK = 1.0


def _music(seconds: float = 20.0) -> np.ndarray:
    """Something like music and nothing like speech: decaying chords with harmonics and a hi-hat
    of noise bursts on every beat."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    chords = [(220.0, 261.63, 329.63), (174.61, 220.0, 261.63), (196.0, 246.94, 293.66), (164.81, 207.65, 246.94)]
    for k in range(int(seconds // 2)):
        bar = (t >= 2 * k) & (t < 2 * k + 2)
        tt = t[bar] - 2 * k
        for f in chords[k % 4]:
            for h in range(1, 5):
                out[bar] += np.exp(-1.5 * tt) * np.sin(2 * np.pi * f * h * tt) / h
    n = int(0.03 * SR)
    for beat in np.arange(0, seconds, 0.5):
        i = int(beat * SR)
        out[i : i + n] += rng.standard_normal(n) * np.exp(-np.arange(n) / 80)
    return (0.2 * out / np.abs(out).max()).astype(np.float32)


@pytest.fixture(scope="module")
def spaced():
    """(samples, parts): LJ001-0001..0004 with silence of 6 s before, 5 s after the first, 8 s
    after the third and 4 s at the end; parts are (start_s, end_s, reference) in these samples."""
    entry = next(
        e
        for e in json.loads((SHARED_AUDIO / "manifest.json").read_text())
        if e["file"] == "longform_lj001_0001-0032.wav"
    )
    source = load_audio(shared_audio(entry["file"]))
    silence_before = {0: 6.0, 1: 5.0, 3: 8.0}
    pieces, parts, at = [], [], 0.0
    for i, seg in enumerate(entry["segments"][:4]):
        gap = silence_before.get(i, 0.0)
        pieces.append(np.zeros(int(gap * SR), np.float32))
        at += gap
        # each sentence with the 0.15 s of its 0.3 s joint that is nearest to it
        a, b = int((seg["start_s"] - (0.15 if i else 0)) * SR), int((seg["end_s"] + 0.15) * SR)
        pieces.append(source[a:b])
        parts.append((at + seg["start_s"] - a / SR, at + seg["end_s"] - a / SR, seg["reference"]))
        at += (b - a) / SR
    pieces.append(np.zeros(4 * SR, np.float32))
    return np.concatenate(pieces), parts


def _inside(start: float, end: float, parts, slack: float = SLACK) -> bool:
    """Whether start..end is within speech: a sentence, or sentences 0.3 s apart (LJ's joints)."""
    blocks: list[list[float]] = []
    for s, e, _ in parts:
        if blocks and s - blocks[-1][1] < 1.0:
            blocks[-1][1] = e
        else:
            blocks.append([s, e])
    return any(s - slack <= start and end <= e + slack for s, e in blocks)


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c == " " else " " for c in text.lower()).split()


def _wer(reference: str, hypothesis: str) -> float:
    return word_edits(_words(reference), _words(hypothesis)) / len(_words(reference))


# --- the VAD alone ------------------------------------------------------------------------------


def test_regions_follow_the_probabilities():
    # windows of 512 samples (32 ms): speech over windows 10-29 and 40-44, one silent window inside
    p = np.zeros(100, np.float32)
    p[10:30] = 0.9
    p[20] = 0.1
    p[40:45] = 0.8
    n = 100 * 512
    plain = VadOptions(min_silence_duration_ms=0, speech_pad_ms=0)
    # a window below neg_threshold ends speech at once when no minimum silence is asked
    assert speech_regions(np.zeros(n), plain, p) == [(10 * 512, 20 * 512), (21 * 512, 30 * 512), (40 * 512, 45 * 512)]
    # 100 ms of silence is needed to end speech: the one-window dip (32 ms) is bridged
    assert speech_regions(np.zeros(n), VadOptions(min_silence_duration_ms=100, speech_pad_ms=0), p) == [
        (10 * 512, 30 * 512),
        (40 * 512, 45 * 512),
    ]
    # spans of 5 windows (160 ms) or shorter are dropped
    assert speech_regions(
        np.zeros(n), VadOptions(min_silence_duration_ms=100, speech_pad_ms=0, min_speech_duration_ms=200), p
    ) == [(10 * 512, 30 * 512)]
    # pads: 64 ms each side, the gap between the spans (10 windows) is wider than two pads
    assert speech_regions(np.zeros(n), VadOptions(min_silence_duration_ms=100, speech_pad_ms=64), p) == [
        (10 * 512 - 1024, 30 * 512 + 1024),
        (40 * 512 - 1024, 45 * 512 + 1024),
    ]
    # ... and a gap narrower than two pads is shared half and half
    assert speech_regions(np.zeros(n), VadOptions(min_silence_duration_ms=100, speech_pad_ms=200), p) == [
        (10 * 512 - 3200, 35 * 512),
        (35 * 512, 45 * 512 + 3200),
    ]
    # probabilities between neg_threshold and threshold continue speech but do not start it
    q = np.zeros(100, np.float32)
    q[5:10] = 0.4
    q[10:20] = 0.6
    q[20:30] = 0.4
    assert speech_regions(np.zeros(n), plain, q) == [(10 * 512, 30 * 512)]


def test_long_speech_is_split_at_max_duration():
    p = np.full(300, 0.9, np.float32)  # 9.6 s of speech, no pause
    p[100:105] = 0.1  # one pause of 160 ms (longer than the 98 ms a split may use)
    got = speech_regions(
        np.zeros(300 * 512), VadOptions(max_speech_duration_s=5, min_silence_duration_ms=2000, speech_pad_ms=0), p
    )
    assert got[0] == (0, 100 * 512)  # split at the pause, not at 5 s
    assert all(e - s <= 5 * SR for s, e in got) and got[-1][1] == 300 * 512


def test_silence_and_music_have_no_speech():
    assert speech_regions(np.zeros(20 * SR, np.float32)) == []
    music = _music()
    assert speech_probabilities(music).max() < 0.5
    assert speech_regions(music) == []


def test_regions_hold_the_known_speech(spaced):
    samples, parts = spaced
    for options in (VadOptions(), BATCHED):
        regions = speech_regions(samples, options)
        seconds = [(s / SR, e / SR) for s, e in regions]
        for start, end, _ in parts:  # every sentence is inside the speech found
            for t in np.arange(start + 0.1, end - 0.1, 0.05):
                assert any(s <= t <= e for s, e in seconds), (t, (start, end), seconds)
        assert all(_inside(s, e, parts) for s, e in seconds), seconds  # and nothing in the silences


def test_speech_maps_back_to_the_original_timeline():
    samples = np.arange(10 * SR, dtype=np.float32)
    speech = Speech.join(samples, [(SR, 3 * SR), (6 * SR, 7 * SR)])
    assert speech.seconds == 3.0 and speech.samples[0] == SR and speech.samples[2 * SR] == 6 * SR
    assert speech.original_time(0.5) == 1.5
    assert speech.original_time(2.5) == 6.5
    assert speech.original_time(2.0) == 6.0  # a start at a joint is in the later region
    assert speech.original_time(2.0, is_end=True) == 3.0  # an end there, in the earlier one
    result = {
        "segments": [{"start": 0.0, "end": 2.0}, {"start": 1.9, "end": 2.2, "words": [{"start": 1.9, "end": 2.2}]}]
    }
    speech.restore(result)
    assert (result["segments"][0]["start"], result["segments"][0]["end"]) == (1.0, 3.0)
    # a word straddling the joint moves with the region its middle is in (the second)
    assert (result["segments"][1]["start"], result["segments"][1]["end"]) == (5.9, 6.2)
    chunks = Speech.cut(samples, [(0, 10 * SR // 4), (SR * 3, SR * 4), (SR * 5, SR * 10)], max_seconds=4)
    assert [c.regions for c in chunks] == [((0, 40000), (48000, 64000)), ((80000, 160000),)]
    assert Speech.cut(samples, [], max_seconds=30) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        VadOptions(threshold=1.5)
    with pytest.raises(ValueError, match="max_speech_duration_s"):
        VadOptions(max_speech_duration_s=0)
    with pytest.raises(TypeError, match="min_silence_ms"):
        VadOptions.from_dict({"min_silence_ms": 100})
    assert VadOptions.from_dict({"threshold": 0.3}).threshold == 0.3
    assert math.isinf(VadOptions().max_speech_duration_s)


# --- with the model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_en):
    from whisper_max import runtime

    return runtime.load(tiny_en.path)


def test_vad_filter_gives_no_text_for_silence_or_music(model):
    silence = np.zeros(20 * SR, np.float32)
    assert model.transcribe(silence)["text"].strip() != ""  # what Whisper invents over silence
    for audio in (silence, _music()):
        result = model.transcribe(audio, vad_filter=True)
        assert result["text"] == "" and result["segments"] == []
        batched = model.transcribe(audio, batched=True)
        assert batched["text"] == "" and batched["segments"] == []


def test_vad_filter_keeps_the_text_in_the_original_timeline(model, spaced):
    samples, parts = spaced
    plain = model.transcribe(samples, word_timestamps=True)
    result = model.transcribe(samples, vad_filter=True, word_timestamps=True)
    reference = " ".join(r for _, _, r in parts)
    assert _wer(reference, result["text"]) <= _wer(reference, plain["text"]) + 0.05, (result["text"], plain["text"])
    segments = result["segments"]
    assert segments and all(_inside(s["start"], s["end"], parts, TEXT_SLACK) for s in segments), [
        (s["start"], s["end"]) for s in segments
    ]
    words = [w for s in segments for w in s["words"]]
    assert all(_inside(w["start"], w["end"], parts, TEXT_SLACK) for w in words)
    assert words[0]["start"] >= parts[0][0] - TEXT_SLACK and words[-1]["end"] <= parts[-1][1] + TEXT_SLACK
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts)


@pytest.mark.parametrize("word_timestamps", [False, True])
def test_batched_mode(model, spaced, word_timestamps):
    samples, parts = spaced
    result = model.transcribe(samples, batched=True, batch_size=4, word_timestamps=word_timestamps)
    reference = " ".join(r for _, _, r in parts)
    assert _wer(reference, result["text"]) <= 0.1, result["text"]
    segments = result["segments"]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    starts = [s["start"] for s in segments]
    # without timestamp tokens a segment is a chunk, the silences between its regions included:
    # its start and its end are each in speech
    assert starts == sorted(starts), starts
    assert all(
        _inside(s["start"], s["start"], parts, TEXT_SLACK) and _inside(s["end"], s["end"], parts, TEXT_SLACK)
        for s in segments
    ), [(s["start"], s["end"]) for s in segments]
    if word_timestamps:
        words = [w for s in segments for w in s["words"]]
        assert len(words) >= 0.9 * len(_words(reference)) and all(
            _inside(w["start"], w["end"], parts, TEXT_SLACK) for w in words
        )
    # each chunk decoded on its own gives what a batch of one gives
    alone = model.transcribe(samples, batched=True, batch_size=1, word_timestamps=word_timestamps)
    assert [s["tokens"] for s in alone["segments"]] == [s["tokens"] for s in segments]


def test_batched_options_are_checked(model):
    with pytest.raises(ValueError, match="clip_timestamps"):
        model.transcribe(np.zeros(SR, np.float32), batched=True, clip_timestamps="0,1")
    with pytest.raises(TypeError, match="batch_size"):
        model.transcribe(np.zeros(SR, np.float32), batch_size=4)
    with pytest.raises(TypeError, match="vad_parameters"):
        model.transcribe(np.zeros(SR, np.float32), vad_filter=True, vad_parameters={"pad": 1})


def test_whisper_run_and_whisper_batch_vad_filter(tiny_en, tmp_path):
    """The CLIs' flags: over silence, no text at all with the VAD; speech keeps its text."""
    import soundfile as sf

    from whisper_max.runtime import batch, cli

    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(20 * SR, np.float32), SR)
    speech = shared_audio("jfk.wav")
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                str(tiny_en.path),
                str(silence),
                str(speech),
                "--vad_filter",
                "True",
                "-o",
                str(out),
                "-f",
                "txt",
                "--verbose",
                "False",
            ]
        )
        == 0
    )
    assert (out / "silence.txt").read_text() == ""
    assert "ask not what your country can do for you" in (out / "jfk.txt").read_text()
    out = tmp_path / "batched"
    assert (
        cli.main(
            [
                str(tiny_en.path),
                str(silence),
                str(speech),
                "--batched",
                "True",
                "-o",
                str(out),
                "-f",
                "json",
                "--verbose",
                "False",
            ]
        )
        == 0
    )
    assert json.loads((out / "silence.json").read_text())["segments"] == []
    assert "ask not what your country can do for you" in json.loads((out / "jfk.json").read_text())["text"]
    out = tmp_path / "batch"
    assert batch.main([str(tiny_en.path), str(silence), "--out", str(out), "-f", "txt", "--vad_filter", "True"]) == 0
    assert (out / "silence.txt").read_text() == ""
