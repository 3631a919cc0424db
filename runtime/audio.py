"""Audio loading and the log-mel spectrogram, as openai-whisper computes them, in numpy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

# audio hyperparameters fixed by Whisper's front end
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH

_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif"}


class AudioError(RuntimeError):
    pass


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at `sr`, quantised to 16 bits as openai-whisper's ffmpeg pipe does.

    WAV/FLAC/OGG are read with libsndfile (soundfile); other formats need ffmpeg on PATH.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
        import soundfile as sf

        try:
            pcm, file_sr = sf.read(str(path), dtype="int16", always_2d=True)
        except RuntimeError as e:  # soundfile raises LibsndfileError(RuntimeError)
            raise AudioError(f"{path}: cannot decode ({e})") from e
        audio = pcm.astype(np.float32) / 32768.0
        if audio.shape[1] > 1:
            audio = audio.mean(axis=1, dtype=np.float32, keepdims=True)
        audio = audio[:, 0]
        if file_sr != sr:
            import soxr

            audio = soxr.resample(audio, file_sr, sr, quality="HQ").astype(np.float32)
        return np.ascontiguousarray(audio)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"{path}: {path.suffix or 'this'} files need ffmpeg, which is not on PATH; install it (e.g. `apt-get install ffmpeg`) or convert the file to WAV/FLAC/OGG")
    cmd = [ffmpeg, "-nostdin", "-threads", "0", "-i", str(path), "-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(sr), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise AudioError(f"{path}: ffmpeg failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0


def pad_or_trim(array: np.ndarray, length: int, axis: int = -1) -> np.ndarray:
    if array.shape[axis] > length:
        array = array.take(indices=range(length), axis=axis)
    if array.shape[axis] < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - array.shape[axis])
        array = np.pad(array, widths)
    return array


_MEL_BLOCK = 2048  # frames per block (20 s of audio; ~3 MB of spectrum)


def log_mel_spectrogram(audio: np.ndarray, filters: np.ndarray, padding: int = 0) -> np.ndarray:
    """(n_mels, n_frames) float32: |STFT|² (periodic Hann, centre reflect-padded) through the
    mel filters, log10 clamped at 1e-10, floored 8 below the maximum, scaled to (x + 4) / 4.

    The maximum is over the whole (padded) input, so a long file is transformed in one piece, in
    blocks of frames: each block's spectrum is reduced to mel bands while it is in cache, instead
    of materialising (and page-faulting) the spectrum of the whole file. The result is identical.
    """
    # the audio, `padding` zeros, then N_FFT // 2 reflected at each end, made in one buffer
    # (two np.pads of a long file cost ~0.1 s, mostly page faults of the copies)
    audio = np.asarray(audio, np.float32)
    half = N_FFT // 2
    n = len(audio) + padding
    if n <= half:
        raise ValueError(f"{len(audio)} samples and {padding} of padding: too short for a {N_FFT}-point STFT")
    x = np.empty(n + 2 * half, np.float32)
    x[half : half + len(audio)] = audio
    x[half + len(audio) : half + n] = 0
    x[:half] = x[2 * half : half : -1]  # reflect: x[half - i] = signal[i]
    x[half + n :] = x[half + n - 2 : n - 2 : -1]  # x[half + n - 1 + i] = signal[n - 1 - i]
    n_frames = (len(x) - N_FFT) // HOP_LENGTH  # the last frame is dropped, as openai-whisper does
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    mel = np.empty((filters.shape[0], n_frames), np.float32)
    for start in range(0, n_frames, _MEL_BLOCK):
        stop = min(start + _MEL_BLOCK, n_frames)
        spec = np.fft.rfft(frames[start:stop] * window, axis=-1)
        mel[:, start:stop] = filters @ (spec.real**2 + spec.imag**2).astype(np.float32).T
    # in place (the same float32 operations): each temporary of a long file is page faults
    np.maximum(mel, np.float32(1e-10), out=mel)
    np.log10(mel, out=mel)
    np.maximum(mel, mel.max() - np.float32(8.0), out=mel)
    mel += np.float32(4.0)
    mel /= np.float32(4.0)
    return mel
