"""Runtime pieces against openai-whisper: tokenizer, log-mel, writers, audio loading."""

import io
import json

import numpy as np
import pytest
import torch
import whisper
import whisper.tokenizer as wt
import whisper.utils as wu
from helpers import shared_audio

from whisper_max.converter.convert import mel_assets, tokenizer_assets
from whisper_max.runtime.audio import N_SAMPLES, AudioError, load_audio, log_mel_spectrogram
from whisper_max.runtime.results import TranscriptionResult
from whisper_max.runtime.tokenizer import Tokenizer
from whisper_max.runtime.writers import WRITERS, write_result


@pytest.mark.parametrize(
    "multilingual, language, task",
    [(False, None, None), (True, "en", "transcribe"), (True, "de", "translate"), (True, "ja", "transcribe")],
)
def test_tokenizer_matches_openai_whisper(multilingual, language, task):
    files = tokenizer_assets(multilingual, 99 if not multilingual else 99)
    meta = json.loads(files["assets/tokenizer.json"])
    ours = Tokenizer(files[f"assets/{meta['encoding']}.tiktoken"], meta, language, task)
    ref = wt.get_tokenizer(multilingual, num_languages=99, language=language, task=task)
    for attr in [
        "eot",
        "sot",
        "transcribe",
        "translate",
        "sot_lm",
        "sot_prev",
        "no_speech",
        "no_timestamps",
        "timestamp_begin",
        "sot_sequence",
        "non_speech_tokens",
    ]:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    # openai-whisper's language-token order follows a set's hash order; the pairing is what counts
    assert dict(zip(ours.all_language_tokens, ours.all_language_codes)) == dict(
        zip(ref.all_language_tokens, ref.all_language_codes)
    )
    text = " And so my fellow Americans, ask not… ♪ ¿Qué? 日本語のテキスト"
    toks = ref.encode(text) + [ref.timestamp_begin + 7, ref.eot]
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(toks) == ref.decode(toks) and ours.decode_with_timestamps(toks) == ref.decode_with_timestamps(
        toks
    )
    assert ours.split_to_word_tokens(ref.encode(text)) == ref.split_to_word_tokens(ref.encode(text))


def test_language_names_and_errors():
    files = tokenizer_assets(True, 99)
    meta = json.loads(files["assets/tokenizer.json"])
    tk = Tokenizer(files["assets/multilingual.tiktoken"], meta, "German")
    assert tk.language == "de"
    with pytest.raises(ValueError, match="unsupported language 'klingon'"):
        tk.with_language("klingon", "transcribe")


@pytest.mark.parametrize("clip", ["jfk.wav", "jfk.flac", "ls_1221-135766-0001.wav"])
def test_log_mel_matches_openai_whisper(clip):
    # 1e-4 on log10 mel values in [-1.5, 1.5]: numpy's and torch's FFTs differ at float32 rounding
    filters = np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))
    audio = load_audio(shared_audio(clip))
    ours = log_mel_spectrogram(audio, filters, padding=N_SAMPLES)
    ref = whisper.log_mel_spectrogram(torch.from_numpy(audio), 80, padding=N_SAMPLES).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


def test_load_audio_formats(tmp_path):
    wav = load_audio(shared_audio("jfk.wav"))
    flac = load_audio(shared_audio("jfk.flac"))  # 44.1 kHz stereo: downmixed and resampled
    assert wav.dtype == flac.dtype == np.float32 and wav.shape == flac.shape
    ref = np.frombuffer(shared_audio("jfk.wav").read_bytes()[44:], np.int16).astype(np.float32) / 32768.0
    np.testing.assert_array_equal(wav, ref)  # 16-bit PCM exactly as openai-whisper's ffmpeg pipe gives it
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(bad)


def test_writers_match_openai_whisper(tmp_path):
    result = {
        "text": " Hello --> world. Second\tline.",
        "segments": [
            {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": 2.5,
                "text": " Hello --> world.",
                "tokens": [1, 2],
                "temperature": 0.0,
                "avg_logprob": -0.2,
                "compression_ratio": 1.1,
                "no_speech_prob": 0.01,
            },
            {
                "id": 1,
                "seek": 0,
                "start": 3661.04,
                "end": 3663.999,
                "text": " Second\tline.",
                "tokens": [3],
                "temperature": 0.2,
                "avg_logprob": -0.4,
                "compression_ratio": 1.3,
                "no_speech_prob": 0.02,
            },
        ],
        "language": "en",  # openai-whisper's order: text, segments, language
    }
    written = write_result(TranscriptionResult.from_openai_dict(result), "clip.wav", tmp_path / "ours", "all")
    assert sorted(p.name for p in written) == sorted(f"clip.{f}" for f in WRITERS)
    (tmp_path / "ref").mkdir()
    wu.get_writer("all", str(tmp_path / "ref"))(result, "clip.wav", {})
    for fmt in WRITERS:
        assert (tmp_path / "ours" / f"clip.{fmt}").read_text() == (tmp_path / "ref" / f"clip.{fmt}").read_text(), fmt


@pytest.mark.parametrize("shape", [(3, 5), (4, 6, 448, 64)])  # below and above the 1 MiB of its own mapping
def test_pool_arrays_are_writable_zeros_and_grow_keeping_rows(shape):
    from whisper_max.runtime.pool import _grown, _pool_zeros

    a = _pool_zeros(shape, "float32")
    assert a.shape == shape and a.dtype == np.float32 and a.flags.writeable and not a.any()
    a[...] = np.arange(a.size, dtype=np.float32).reshape(shape)
    b = _grown(a, shape[0] + 3)
    assert b.shape == (shape[0] + 3, *shape[1:]) and b.flags.writeable
    np.testing.assert_array_equal(b[: shape[0]], a)
    assert not b[shape[0] :].any()


def test_graph_stats_count_calls_and_seconds_and_keep_durations_only_when_asked():
    from whisper_max.runtime.model import GraphStats

    stats = GraphStats()
    stats.add("encoder", 0.25)
    stats.add("decoder_rows", 0.002)
    stats.add("decoder_rows", 0.003)
    assert (
        stats.calls == {"encoder": 1, "decoder_rows": 2}
        and stats.seconds["decoder_rows"] == 0.005
        and stats.durations is None
    )
    stats.reset(durations=True)
    stats.add("decoder_rows", 0.004)
    assert stats.calls == {"decoder_rows": 1} and stats.durations == {"decoder_rows": [0.004]}
