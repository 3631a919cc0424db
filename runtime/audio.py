"""Audio loading and the log-mel spectrogram, as openai-whisper computes them, in numpy."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
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
# libsndfile subtypes whose samples are integers: read as int16 they are what ffmpeg gives (it
# truncates wider samples, >> 16, as libsndfile does); any other subtype (float, double, Vorbis,
# Opus, MP3) is read as float and rounded as ffmpeg's float -> s16 conversion rounds
_INTEGER_SUBTYPES = {
    "PCM_S8",
    "PCM_U8",
    "PCM_16",
    "PCM_24",
    "PCM_32",
    "ULAW",
    "ALAW",
    "IMA_ADPCM",
    "MS_ADPCM",
    "GSM610",
    "DWVW_12",
    "DWVW_16",
    "DWVW_24",
    "DPCM_8",
    "DPCM_16",
}
# ffmpeg's `-ac 1` downmix of 16-bit audio (libswresample's default matrix for the layout it
# assumes from the channel count, in Q15, rounded half up), checked sample-exact against ffmpeg:
# stereo (L + R) / 2; 5.1 (FL FR FC LFE BL BR): FC 1, FL/FR 1/sqrt(2), BL/BR 1/2, LFE 0, over their sum
_DOWNMIX_Q15 = {2: np.array([16384, 16384]), 6: np.array([6786, 6786, 9598, 0, 4799, 4799])}
_BLOCK = 1 << 16  # samples read at a time


class AudioError(RuntimeError):
    pass


def read_audio(path: str | Path, sr: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Mono float32 samples at `sr` in blocks, as openai-whisper's ffmpeg pipe gives them
    (16-bit values / 32768), without holding the file: an hour of audio is read a block at a time.

    WAV/FLAC/OGG/AIFF are read with libsndfile (soundfile), downmixed and rounded as ffmpeg does;
    other formats, and channel counts other than 1, 2 and 6, go through ffmpeg (needed on PATH).
    Raises AudioError naming the file: not a file, empty, undecodable, NaN or infinite samples.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    total = 0
    blocks = _soundfile_blocks(path, sr) if path.suffix.lower() in _SOUNDFILE_SUFFIXES else None
    for block in blocks if blocks is not None else _ffmpeg_blocks(path, sr):
        total += len(block)
        yield block
    if total == 0:
        raise AudioError(f"{path}: no audio samples (the file holds a header and nothing to decode)")


def _soundfile_blocks(path: Path, sr: int) -> Iterator[np.ndarray] | None:
    """Blocks of `path` decoded by libsndfile; None when ffmpeg must do it (channel layout)."""
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except (RuntimeError, sf.SoundFileError) as e:  # LibsndfileError is a RuntimeError
        if shutil.which("ffmpeg"):
            return None  # a codec libsndfile lacks (MP3 in a .wav, ...): openai-whisper's own way
        raise AudioError(f"{path}: cannot decode ({e}); ffmpeg (not on PATH) may read it") from e
    if f.channels not in (1, *_DOWNMIX_Q15):
        f.close()
        return None
    return _sndfile_stream(path, f, sr)


def _sndfile_stream(path: Path, f, sr: int) -> Iterator[np.ndarray]:
    import soundfile as sf

    integer = f.subtype in _INTEGER_SUBTYPES
    resample = None
    if f.samplerate != sr:
        import soxr

        resample = soxr.ResampleStream(f.samplerate, sr, 1, dtype="float32", quality="HQ")
    with f:
        done = 0
        while True:
            try:
                block = f.read(
                    _BLOCK,
                    dtype="int16" if integer else "float64" if f.subtype == "DOUBLE" else "float32",
                    always_2d=True,
                )
            except (RuntimeError, sf.SoundFileError) as e:
                raise AudioError(
                    f"{path}: cannot decode after {done / f.samplerate:.2f} s: truncated or damaged ({e})"
                ) from e
            last = len(block) < _BLOCK
            done += len(block)
            if not integer:
                if not np.isfinite(block).all():
                    at = done - len(block) + int(np.argmin(np.isfinite(block).all(axis=1)))
                    raise AudioError(
                        f"{path}: sample {at} ({at / f.samplerate:.3f} s) is NaN or infinite; the file's float "
                        "samples must be finite"
                    )
                block = _to_int16(block)
            mono = _downmix(block)
            if resample is not None:
                mono = _to_int16(resample.resample_chunk(mono.astype(np.float32) / np.float32(32768), last=last))
            if len(mono):
                yield mono.astype(np.float32) / np.float32(32768)
            if last:
                return


def _to_int16(x: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1) to int16 as ffmpeg converts them: round(x * 32768) (half to
    even, as lrintf), clipped."""
    return np.clip(np.rint(x * np.float32(32768)), -32768, 32767).astype(np.int16)


def _downmix(block: np.ndarray) -> np.ndarray:
    """(samples, channels) int16 -> (samples,) int16 mono, as ffmpeg's `-ac 1`."""
    if block.shape[1] == 1:
        return block[:, 0]
    mixed = (block.astype(np.int64) @ _DOWNMIX_Q15[block.shape[1]] + 16384) >> 15
    return np.clip(mixed, -32768, 32767).astype(np.int16)


def _ffmpeg_blocks(path: Path, sr: int) -> Iterator[np.ndarray]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(
            f"{path}: {path.suffix or 'this'} files need ffmpeg, which is not on PATH; install it (e.g. `apt-get "
            "install ffmpeg`) or convert the file to WAV/FLAC/OGG"
        )
    cmd = [
        ffmpeg,
        "-nostdin",
        "-threads",
        "0",
        "-loglevel",
        "error",
        "-i",
        str(path),
        "-f",
        "s16le",
        "-ac",
        "1",
        "-acodec",
        "pcm_s16le",
        "-ar",
        str(sr),
        "-",
    ]
    with tempfile.TemporaryFile() as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err) as proc:
        try:
            pending = b""
            while chunk := proc.stdout.read(2 * _BLOCK):
                chunk, pending = pending + chunk, b""
                if len(chunk) % 2:
                    chunk, pending = chunk[:-1], chunk[-1:]
                yield np.frombuffer(chunk, np.int16).astype(np.float32) / np.float32(32768)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.wait() != 0:
            err.seek(0)
            raise AudioError(f"{path}: ffmpeg cannot decode it: {err.read().decode(errors='replace').strip()[-500:]}")


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The whole of `path` as mono float32 samples at `sr` (read_audio's blocks, joined)."""
    return np.concatenate(list(read_audio(path, sr)))


def is_path(audio) -> bool:
    """Whether `audio` names a file (str, bytes, os.PathLike) rather than holding samples."""
    return isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__")


def samples(audio) -> np.ndarray:
    """A file path's whole audio (load_audio), or given 16 kHz mono samples, as float32."""
    return load_audio(os.fsdecode(audio)) if is_path(audio) else np.asarray(audio, np.float32)


def pad_or_trim(array: np.ndarray, length: int, axis: int = -1) -> np.ndarray:
    if array.shape[axis] > length:
        array = array.take(indices=range(length), axis=axis)
    if array.shape[axis] < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - array.shape[axis])
        array = np.pad(array, widths)
    return array


_MEL_BLOCK = 2048  # frames per block (20 s of audio; ~3 MB of spectrum)


def _hann() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


class MelFrames:
    """log10 of the mel power (clamped at 1e-10), (frames, n_mels) float32 per block of
    _MEL_BLOCK frames, computed as samples arrive: openai-whisper's STFT (periodic Hann, centre
    reflect-padded, the last frame dropped). Frame f is samples [f*HOP - N_FFT/2, f*HOP + N_FFT/2)
    of the padded signal, reflected at both ends.

    `push(samples)` returns the blocks no later sample can change; `end(padding)` the rest, as
    if the audio ended there and `padding` zeros followed; `tail(padding)` the same without
    ending (more samples may follow). A block's every float operation depends only on its own
    samples and its frame count, not on how the samples were cut into pushes, so the frames are
    the bits of the whole signal computed at once (LiveMel relies on it)."""

    def __init__(self, filters: np.ndarray):
        self._filters = filters
        self._window = _hann()
        self._x = np.zeros(0, np.float32)  # the reflect-padded signal from the next block's first frame
        self._head: np.ndarray | None = np.zeros(0, np.float32)  # the signal's start, until it can be reflected

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        half, step = N_FFT // 2, _MEL_BLOCK * HOP_LENGTH  # samples between block starts
        block = np.asarray(samples, np.float32).reshape(-1)
        if self._head is not None:
            head = np.concatenate([self._head, block])
            if len(head) <= half:
                self._head = head
                return []
            block, self._head = np.concatenate([head[half:0:-1], head]), None  # x[half - i] = signal[i]
        x, out = np.concatenate([self._x, block]), []
        while len(x) >= step + N_FFT - HOP_LENGTH:  # a whole block's frames, and more frames after
            out.append(_mel_block(x, _MEL_BLOCK, self._window, self._filters))
            x = x[step:]
        self._x = x
        return out

    def end(self, padding: int = 0) -> list[np.ndarray]:
        half, step = N_FFT // 2, _MEL_BLOCK * HOP_LENGTH
        out = self.push(np.zeros(padding, np.float32))
        if self._head is not None:
            raise ValueError(f"{len(self._head)} samples with their padding: too short for a {N_FFT}-point STFT")
        x = np.concatenate([self._x, self._x[-2 : -2 - half : -1]])  # x[half + n - 1 + i] = signal[n - 1 - i]
        remaining = (len(x) - N_FFT) // HOP_LENGTH  # openai-whisper drops the last frame
        while remaining > 0:
            count = min(_MEL_BLOCK, remaining)
            out.append(_mel_block(x, count, self._window, self._filters))
            x, remaining = x[step:], remaining - count
        self._x = x[:0]
        return out

    def tail(self, padding: int = 0) -> list[np.ndarray]:
        """What end(padding) would return now, leaving this object able to take more samples."""
        other = MelFrames.__new__(MelFrames)
        other._filters, other._window, other._x, other._head = self._filters, self._window, self._x, self._head
        return other.end(padding)


def _log10_mel_blocks(blocks: Iterable[np.ndarray], filters: np.ndarray, padding: int) -> Iterator[np.ndarray]:
    """MelFrames' blocks of the samples in `blocks` followed by `padding` zeros."""
    frames = MelFrames(filters)
    for block in blocks:
        yield from frames.push(block)
    yield from frames.end(padding)


def _mel_block(x: np.ndarray, count: int, window: np.ndarray, filters: np.ndarray) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x[: (count - 1) * HOP_LENGTH + N_FFT], N_FFT)[::HOP_LENGTH]
    spec = np.fft.rfft(frames * window, axis=-1)
    mel = filters @ (spec.real**2 + spec.imag**2).astype(np.float32).T
    np.maximum(mel, np.float32(1e-10), out=mel)
    np.log10(mel, out=mel)
    return np.ascontiguousarray(mel.T)


def _floor(top: float) -> np.float32:
    """openai-whisper's floor of a log-mel: 8 below its maximum `top`."""
    return np.float32(top) - np.float32(8.0)


def _scaled(mel: np.ndarray, floor: np.float32) -> np.ndarray:
    """log10 mel frames (a float32 array of our own) floored at `floor` and scaled to (x + 4) / 4,
    in place, as openai-whisper's log_mel_spectrogram ends."""
    np.maximum(mel, floor, out=mel)
    mel += np.float32(4.0)
    mel /= np.float32(4.0)
    return mel


class LogMel:
    """The log-mel spectrogram of an audio and N_SAMPLES of padding, as openai-whisper's
    `log_mel_spectrogram(audio, padding=N_SAMPLES)`, computed once as the audio is read and kept
    out of memory: frames are stored (before the floor, which needs the maximum of them all) in
    a spooled temporary file that moves to disk past `spool_bytes`, and `read` returns a range
    with the floor (maximum - 8) and scaling applied. Memory stays flat with the audio's length."""

    def __init__(
        self, samples: Iterable[np.ndarray], filters: np.ndarray, padding: int = N_SAMPLES, spool_bytes: int = 32 << 20
    ):
        self.n_mels = filters.shape[0]
        self._store = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
        self.frames, top = 0, -np.inf
        try:
            for block in _log10_mel_blocks(samples, filters, padding):
                self._store.write(block.tobytes())
                self.frames += len(block)
                top = max(top, float(block.max()))
        except BaseException:
            self._store.close()
            raise
        self._floor = _floor(top)
        self.content_frames = self.frames - padding // HOP_LENGTH

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) as (n_mels, stop - start) float32."""
        start, stop = max(0, start), min(stop, self.frames)
        count = max(0, stop - start)
        self._store.seek(start * self.n_mels * 4)
        data = self._store.read(count * self.n_mels * 4)
        if len(data) != count * self.n_mels * 4:
            raise OSError(f"log-mel store: frames {start}..{stop} could not be read back")
        return _scaled(np.frombuffer(data, np.float32).reshape(count, self.n_mels).T.copy(), self._floor)

    def close(self) -> None:
        self._store.close()


class MelArray:
    """A log-mel already in memory, read as LogMel is: (n_mels, frames), of which the first
    `content_frames` are the audio's (the rest its padding)."""

    def __init__(self, mel: np.ndarray, content_frames: int):
        self._mel, self.frames, self.content_frames = mel, mel.shape[1], content_frames
        self.n_mels = mel.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._mel[:, max(0, start) : min(stop, self.frames)].copy()

    def close(self) -> None:
        pass


class LiveMel:
    """The log-mel spectrogram of audio that is still arriving (a live stream's buffer):
    `extend(samples)` as they come; `mel()` at any moment is what
    `log_mel_spectrogram(every sample so far, padding=padding)` gives, bit for bit. The frames of
    whole blocks no later sample reaches are computed once (MelFrames.push); only the ones since
    the last whole block, which the audio's end and its padding reach, are computed again on
    each `mel()`; the floor (maximum - 8) is over them all, as in the batch computation."""

    def __init__(self, filters: np.ndarray, padding: int = N_SAMPLES):
        self.n_mels, self.padding = filters.shape[0], padding
        self._frames = MelFrames(filters)
        self._blocks: list[np.ndarray] = []
        self._top = -np.inf
        self.samples = 0  # samples taken so far

    def extend(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        if not np.isfinite(samples).all():
            raise AudioError("live audio: NaN or infinite samples")
        for block in self._frames.push(samples):
            self._blocks.append(block)
            self._top = max(self._top, float(block.max()))
        self.samples += len(samples)

    def features(self) -> MelArray:
        """mel() as the long-form loop reads a log-mel (runtime.stream takes it for audio)."""
        mel = self.mel()
        return MelArray(mel, mel.shape[1] - self.padding // HOP_LENGTH)

    def mel(self) -> np.ndarray:
        """(n_mels, frames) float32 of every sample so far and the padding."""
        tail = self._frames.tail(self.padding)
        top = max([self._top, *(float(b.max()) for b in tail)])
        return _scaled(np.concatenate([*self._blocks, *tail]).T.copy(), _floor(top))


def log_mel_spectrogram(audio: np.ndarray, filters: np.ndarray, padding: int = 0) -> np.ndarray:
    """(n_mels, n_frames) float32: |STFT|² (periodic Hann, centre reflect-padded) through the
    mel filters, log10 clamped at 1e-10, floored 8 below the maximum, scaled to (x + 4) / 4;
    openai-whisper's `log_mel_spectrogram`, whole (LogMel keeps a long one out of memory)."""
    mel = LogMel([np.asarray(audio, np.float32)], filters, padding, spool_bytes=1 << 62)
    try:
        return mel.read(0, mel.frames)
    finally:
        mel.close()
