"""Audio a user may point whisper-run at: every bad input is one line naming the file and the
problem; every odd but valid one is read as openai-whisper's ffmpeg pipe reads it."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import soundfile as sf
from helpers import shared_audio

from whisper_max import golden
from whisper_max.converter.convert import mel_assets
from whisper_max.runtime.audio import AudioError, LiveMel, LogMel, load_audio, log_mel_spectrogram, read_audio

RNG = np.random.default_rng(7)


def _wav(path, samples, sr=16000, subtype="PCM_16"):
    sf.write(str(path), samples, sr, subtype=subtype)
    return path


def test_a_directory_an_empty_wav_and_garbage(tmp_path, monkeypatch):
    with pytest.raises(AudioError, match=f"{tmp_path}: is a directory"):
        load_audio(tmp_path)
    with pytest.raises(AudioError, match="empty.wav: no audio samples"):
        load_audio(_wav(tmp_path / "empty.wav", np.zeros(0, np.int16)))
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no ffmpeg to try it with
    text = tmp_path / "notes.wav"
    text.write_text("these are my notes, not audio\n")
    with pytest.raises(AudioError, match="notes.wav: cannot decode .*ffmpeg"):
        load_audio(text)
    mp3 = tmp_path / "talk.mp3"
    mp3.write_bytes(b"ID3\x04" + bytes(100))
    with pytest.raises(AudioError, match="talk.mp3: .mp3 files need ffmpeg, which is not on PATH"):
        load_audio(mp3)


def test_truncated_wav_keeps_what_is_there_truncated_flac_fails(tmp_path):
    """A WAV cut short decodes to the samples it holds (libsndfile trusts the file's length, as
    ffmpeg does); a FLAC cut short fails with where it stopped (its frames are checksummed)."""
    x = (RNG.standard_normal(32000) * 3000).astype(np.int16)
    whole = _wav(tmp_path / "whole.wav", x).read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: 44 + 2 * 20000 + 1])  # and half a sample
    np.testing.assert_array_equal(load_audio(tmp_path / "cut.wav"), x[:20000].astype(np.float32) / 32768)
    whole = _wav(tmp_path / "whole.flac", x).read_bytes()
    (tmp_path / "cut.flac").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AudioError, match=r"cut.flac: cannot decode after .* s: truncated or damaged"):
        load_audio(tmp_path / "cut.flac")


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_sample_formats_become_what_ffmpeg_gives(tmp_path, subtype):
    """ffmpeg's s16 output: integer samples truncated to their top 16 bits, float ones
    round(x * 32768) (ties to even) and clipped. Checked here against ffmpeg itself, kept as rules."""
    x = np.clip(RNG.standard_normal(16000) * 0.3, -1, 0.9999).astype(np.float64)
    x[::97] = 1.4  # clips
    x[3] = 2.5 / 32768  # a tie
    path = _wav(tmp_path / f"{subtype}.wav", x, subtype=subtype)
    stored, _ = sf.read(str(path), dtype="float64" if subtype in ("FLOAT", "DOUBLE") else "int32")
    if subtype in ("FLOAT", "DOUBLE"):
        want = np.clip(np.rint(stored * 32768), -32768, 32767)
    else:
        want = stored >> 16  # int32 holds the sample in its top bits
    np.testing.assert_array_equal(load_audio(path), want.astype(np.float32) / 32768)


def test_nan_or_inf_samples_are_refused(tmp_path):
    x = RNG.standard_normal(40000).astype(np.float32) * 0.1
    x[33000] = np.nan
    with pytest.raises(AudioError, match=r"nan.wav: sample 33000 \(2.062 s\) is NaN or infinite"):
        load_audio(_wav(tmp_path / "nan.wav", x, subtype="FLOAT"))
    x[33000] = np.inf
    with pytest.raises(AudioError, match="inf.wav: sample 33000"):
        load_audio(_wav(tmp_path / "inf.wav", x, subtype="FLOAT"))


def test_stereo_and_5_1_downmix_as_ffmpeg(tmp_path):
    """ffmpeg -ac 1 gave these for a 16000 impulse in each channel in turn (libswresample's
    default matrix, Q15, rounded half up): stereo 1/2 each; 5.1 FL FR FC LFE BL BR."""
    for channels, want in [(2, [8000, 8000]), (6, [3313, 3313, 4687, 0, 2343, 2343])]:
        x = np.zeros((100 * channels, channels), np.int16)
        for c in range(channels):
            x[100 * c : 100 * (c + 1), c] = 16000
        got = load_audio(_wav(tmp_path / f"{channels}.wav", x)) * 32768
        assert [int(got[100 * c + 50]) for c in range(channels)] == want
    halves = np.array([[1, 2], [1, 4], [-1, -2], [3, 4]], np.int16)  # ffmpeg: 2, 3, -1, 4
    assert (load_audio(_wav(tmp_path / "h.wav", halves)) * 32768).tolist() == [2, 3, -1, 4]


def test_other_rates_are_resampled(tmp_path):
    """To 16 kHz (soxr); openai-whisper's tokens on these clips are checked in test_runtime_cli."""
    for clip, sr in [("jfk_8k.wav", 8000), ("jfk_22k_s24.wav", 22050), ("jfk_48k.flac", 48000)]:
        assert sf.info(str(golden.DATA / clip)).samplerate == sr
        audio = load_audio(golden.DATA / clip)
        assert len(audio) == 176000 and audio.dtype == np.float32
        assert np.array_equal(np.rint(audio * 32768), audio * 32768)  # on the 16-bit grid, as ffmpeg's s16


def test_log_mel_is_the_same_read_whole_or_a_block_at_a_time():
    """LogMel keeps the spectrogram out of memory; every frame equals the whole-array transform."""
    filters = np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))
    audio = load_audio(shared_audio("longform_lj001_0001-0032.wav"))[: 16000 * 75]
    whole = log_mel_spectrogram(audio, filters, padding=480000)
    mel = LogMel([audio[i : i + 12345] for i in range(0, len(audio), 12345)], filters, spool_bytes=1 << 20)
    assert mel.frames == whole.shape[1] and mel.content_frames == whole.shape[1] - 3000
    for start in (0, 2047, 2048, 3001, mel.frames - 3000):
        np.testing.assert_array_equal(mel.read(start, start + 3000), whole[:, start : start + 3000])
    mel.close()
    for n in (201, 5000):  # short signals: the reflection at both ends
        x = RNG.standard_normal(n).astype(np.float32)
        assert log_mel_spectrogram(x, filters, padding=0).shape == (80, n // 160)
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(np.zeros(100, np.float32), filters)


def test_live_mel_is_the_batch_log_mel_of_what_arrived_so_far():
    """Samples arriving in chunks of any size (one sample, under a hop, under the STFT's half
    window, a block and more): at every point LiveMel's spectrogram is the batch one of the same
    samples with the same padding, bit for bit, across the 2048-frame blocks the whole frames are
    kept in; with no padding the first 200 samples make no frame yet, as in the batch."""
    filters = np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))
    audio = load_audio(shared_audio("longform_lj001_0001-0032.wav"))[: 16000 * 45]
    sizes = iter(np.random.default_rng(3).choice([1, 7, 150, 160, 199, 401, 3000, 16000, 70000], 10_000))
    live, at, checked = LiveMel(filters), 0, 0
    while at < len(audio):
        n = int(next(sizes))
        live.extend(audio[at : at + n])
        at = min(len(audio), at + n)
        if at < 2000 or checked < at // 96_000:  # every few seconds, and often at the start
            checked = max(checked, at // 96_000)
            assert live.samples == at
            np.testing.assert_array_equal(live.mel(), log_mel_spectrogram(audio[:at], filters, padding=480000), f"{at}")
    assert at > 2 * 2048 * 160  # past two whole blocks
    np.testing.assert_array_equal(live.mel(), log_mel_spectrogram(audio, filters, padding=480000))
    bare = LiveMel(filters, padding=0)
    bare.extend(audio[:200])
    with pytest.raises(ValueError, match="too short"):
        bare.mel()
    bare.extend(audio[200:5000])
    np.testing.assert_array_equal(bare.mel(), log_mel_spectrogram(audio[:5000], filters))
    with pytest.raises(AudioError, match="NaN or infinite"):
        bare.extend(np.array([0.0, np.nan], np.float32))


def test_read_audio_streams_blocks():
    blocks = list(read_audio(shared_audio("longform_lj001_0001-0032.wav")))
    assert len(blocks) > 10 and max(len(b) for b in blocks) <= 1 << 16
