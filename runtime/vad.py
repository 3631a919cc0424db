"""Voice activity detection with Silero VAD (ONNX, run by onnxruntime), and the speech it finds
cut out of an audio with the map back to the audio's own timeline.

    regions = speech_regions(samples, VadOptions())       # [(start, end) sample spans]
    speech = Speech.join(samples, regions)                # the spans end to end, one audio
    speech.original_time(12.3)                            # seconds in `speech` -> in `samples`
    chunks = Speech.cut(samples, regions, max_seconds=30) # consecutive spans in <= 30 s pieces
    vad = LiveVad(VadOptions()); vad.push(block)          # audio as it arrives: [("start"|"stop", sample)]

The options, the algorithm that turns per-window probabilities into spans, and the model file
are faster-whisper's (runtime/assets/README.md), so both find the same speech in the same audio.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .extras import require

MODEL_PATH = Path(__file__).parent / "assets" / "silero_vad_v6.onnx"
WINDOW = 512  # samples per speech probability (32 ms)
CONTEXT = 64  # samples before each window that the model also sees
_RUN_WINDOWS = 10_000  # windows per onnxruntime call (an hour is 112,500), the LSTM state carried between calls


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's VadOptions, with its defaults.

    threshold: a window is speech from this probability up.
    neg_threshold: speech ends below this probability (None: threshold - 0.15, at least 0.01).
    min_speech_duration_ms: spans this short or shorter are dropped.
    max_speech_duration_s: longer spans are split, at the last silence of more than 98 ms if
        there was one, else just before this length.
    min_silence_duration_ms: silence shorter than this does not end a span.
    speech_pad_ms: each span is widened by this much on both sides (half the gap when two
        spans are closer than twice this).
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_duration_ms: int = 0
    max_speech_duration_s: float = math.inf
    min_silence_duration_ms: int = 2000
    speech_pad_ms: int = 400

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"vad threshold {self.threshold}: between 0 and 1 expected")
        if self.neg_threshold is not None and not 0 < self.neg_threshold <= self.threshold:
            raise ValueError(
                f"vad neg_threshold {self.neg_threshold}: between 0 and threshold ({self.threshold}) expected"
            )
        for name in ("min_speech_duration_ms", "min_silence_duration_ms", "speech_pad_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"vad {name} {getattr(self, name)}: >= 0 expected")
        if not self.max_speech_duration_s > 0:
            raise ValueError(f"vad max_speech_duration_s {self.max_speech_duration_s}: > 0 expected")

    @classmethod
    def from_dict(cls, values: dict) -> VadOptions:
        """From faster-whisper's `vad_parameters` dict; an unknown name is an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown vad_parameters {sorted(unknown)}: expected some of {sorted(known)}")
        return cls(**values)


# faster-whisper's BatchedInferencePipeline: spans of at most one window, split at short pauses
BATCHED = VadOptions(max_speech_duration_s=30, min_silence_duration_ms=160)


@functools.lru_cache(maxsize=1)
def _session():
    onnxruntime = require("onnxruntime", "vad", "Silero VAD (vad_filter, the batched mode)")

    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = (
        1  # the LSTM runs window after window: 2 threads took 0.33 s for 231 s of audio against 0.35 s
    )
    opts.log_severity_level = 3
    return onnxruntime.InferenceSession(str(MODEL_PATH), sess_options=opts, providers=["CPUExecutionProvider"])


def _run(windows: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model over (n, CONTEXT + WINDOW) windows in order, from LSTM state (h, c): the
    probabilities (n,) and the state after the last window."""
    session = _session()
    out = []
    for i in range(0, len(windows), _RUN_WINDOWS):
        probs, h, c = session.run(None, {"input": windows[i : i + _RUN_WINDOWS], "h": h, "c": c})
        out.append(probs.reshape(-1))
    return np.concatenate(out), h, c


def _state() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32)


def speech_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero's speech probability of each 512-sample window of 16 kHz mono `samples`: (windows,).
    The audio is zero-padded to one window more than whole windows, as faster-whisper pads it."""
    samples = np.asarray(samples, np.float32)
    n = len(samples) // WINDOW + 1
    padded = np.zeros(n * WINDOW, np.float32)
    padded[: len(samples)] = samples
    windows = np.zeros((n, CONTEXT + WINDOW), np.float32)
    windows[:, CONTEXT:] = padded.reshape(n, WINDOW)
    windows[1:, :CONTEXT] = windows[:-1, -CONTEXT:]  # each window's context: the end of the one before
    return _run(windows, *_state())[0]


def speech_regions(
    samples: np.ndarray, options: VadOptions = VadOptions(), probabilities: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """The speech in 16 kHz mono `samples` as (start, end) sample spans, in order, padded and
    not overlapping: Silero's hysteresis over the window probabilities (speech from `threshold`
    up, until `min_silence_duration_ms` below `neg_threshold`), long spans split, short dropped."""
    probs = speech_probabilities(samples) if probabilities is None else probabilities
    total = len(samples)
    ms = SAMPLE_RATE // 1000
    pad = options.speech_pad_ms * ms
    min_speech = options.min_speech_duration_ms * ms
    min_silence = options.min_silence_duration_ms * ms
    max_speech = SAMPLE_RATE * options.max_speech_duration_s - WINDOW - 2 * pad
    split_silence = 98 * ms  # a pause this long is where an over-long span may be split
    low = options.neg_threshold if options.neg_threshold is not None else max(options.threshold - 0.15, 0.01)

    spans: list[list[int]] = []
    start: int | None = None  # the open span's start
    silence_from = 0  # where the silence inside the open span began (0: none)
    last_pause = 0  # end of speech before the latest long-enough pause: a split point
    resume = 0  # where speech resumed after that pause
    for i, p in enumerate(probs):
        at = i * WINDOW
        if p >= options.threshold and silence_from:
            silence_from = 0
            if resume < last_pause:
                resume = at
        if p >= options.threshold and start is None:
            start = at
            continue
        if start is not None and at - start > max_speech:
            if last_pause:
                spans.append([start, last_pause])
                start = resume if resume >= last_pause else None
                last_pause = resume = silence_from = 0
            else:
                spans.append([start, at])
                start = None
                last_pause = resume = silence_from = 0
                continue
        if p < low and start is not None:
            if not silence_from:
                silence_from = at
            if at - silence_from > split_silence:
                last_pause = silence_from
            if at - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                spans.append([start, silence_from])
            start = None
            last_pause = resume = silence_from = 0
    if start is not None and total - start > min_speech:
        spans.append([start, total])

    # widen each span by the pad, sharing a gap narrower than two pads half and half
    for i, span in enumerate(spans):
        if i == 0:
            span[0] = max(0, span[0] - pad)
        if i + 1 < len(spans):
            following = spans[i + 1]
            gap = following[0] - span[1]
            if gap < 2 * pad:
                span[1] += gap // 2
                following[0] = max(0, following[0] - gap // 2)
            else:
                span[1] = min(total, span[1] + pad)
                following[0] = max(0, following[0] - pad)
        else:
            span[1] = min(total, span[1] + pad)
    return [(s, e) for s, e in spans]


class LiveVad:
    """Speech starts and stops in audio that arrives in pieces (runtime.live): Silero's
    probability of each whole 512-sample window as it completes (the values speech_probabilities
    gives for the same windows of the whole audio), and speech_regions' hysteresis over them:
    speech from `threshold` up, until `min_silence_duration_ms` below `neg_threshold`. A start is
    reported `speech_pad_ms` before its first window; a stop where the silence began, plus the
    pad. Spans are not split or dropped by length: the caller decides what a turn is."""

    def __init__(self, options: VadOptions):
        self.options = options
        self._h, self._c = _state()
        self._context = np.zeros(CONTEXT, np.float32)
        self._rest = np.zeros(0, np.float32)  # samples of the window not yet whole
        self.windows = 0  # windows seen
        self.speaking = False
        self._silence_from: int | None = None  # where the silence inside the open span began
        ms = SAMPLE_RATE // 1000
        self._pad, self._min_silence = options.speech_pad_ms * ms, options.min_silence_duration_ms * ms
        t = options.threshold
        self._low = options.neg_threshold if options.neg_threshold is not None else max(t - 0.15, 0.01)

    def probabilities(self, samples: np.ndarray) -> np.ndarray:
        """The probabilities of the windows `samples` completes (the rest waits for more)."""
        data = np.concatenate([self._rest, np.asarray(samples, np.float32).reshape(-1)])
        n = len(data) // WINDOW
        self._rest = data[n * WINDOW :]
        if n == 0:
            return np.zeros(0, np.float32)
        windows = np.empty((n, CONTEXT + WINDOW), np.float32)
        windows[:, CONTEXT:] = data[: n * WINDOW].reshape(n, WINDOW)
        windows[0, :CONTEXT] = self._context
        windows[1:, :CONTEXT] = windows[:-1, -CONTEXT:]
        self._context = windows[-1, -CONTEXT:].copy()
        probs, self._h, self._c = _run(windows, self._h, self._c)
        return probs

    def push(self, samples: np.ndarray) -> list[tuple[str, int]]:
        """The ("start" | "stop", sample) transitions in the windows `samples` completes, sample
        positions counted from the first sample pushed."""
        out: list[tuple[str, int]] = []
        for p in self.probabilities(samples):
            at = self.windows * WINDOW
            self.windows += 1
            if p >= self.options.threshold:
                self._silence_from = None
                if not self.speaking:
                    self.speaking = True
                    out.append(("start", max(0, at - self._pad)))
            elif self.speaking and p < self._low:
                if self._silence_from is None:
                    self._silence_from = at
                if at - self._silence_from >= self._min_silence:
                    self.speaking = False
                    out.append(("stop", self._silence_from + self._pad))
                    self._silence_from = None
        return out


@dataclass(frozen=True, eq=False)
class Speech:
    """Spans of an audio joined end to end: `samples`, and `regions`, the (start, end) sample
    spans of the original audio (`source_samples` long) they came from, in order. A time in
    `samples` maps back to the original timeline with original_time()."""

    samples: np.ndarray
    regions: tuple[tuple[int, int], ...]
    source_samples: int

    @classmethod
    def join(cls, samples: np.ndarray, regions: list[tuple[int, int]]) -> Speech:
        joined = np.concatenate([samples[s:e] for s, e in regions]) if regions else np.zeros(0, np.float32)
        return cls(np.asarray(joined, np.float32), tuple(regions), len(samples))

    @classmethod
    def cut(cls, samples: np.ndarray, regions: list[tuple[int, int]], max_seconds: float) -> list[Speech]:
        """Consecutive regions joined into pieces of at most `max_seconds` (a region longer than
        that is a piece of its own), in order; none when there are no regions."""
        limit = max_seconds * SAMPLE_RATE
        pieces: list[list[tuple[int, int]]] = []
        length = 0
        for s, e in regions:
            if not pieces or length + (e - s) > limit:
                pieces.append([])
                length = 0
            pieces[-1].append((s, e))
            length += e - s
        return [cls.join(samples, piece) for piece in pieces]

    @functools.cached_property
    def _ends(self) -> list[int]:
        """Where each region ends in `samples`."""
        ends, at = [], 0
        for s, e in self.regions:
            at += e - s
            ends.append(at)
        return ends

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def region_index(self, t: float, is_end: bool = False) -> int:
        """The region time `t` (s, in `samples`) falls in; a `t` exactly at a region's end is in
        that region when it is an end time, else in the next."""
        at = int(t * SAMPLE_RATE)
        ends = self._ends
        i = bisect.bisect_left(ends, at) if is_end else bisect.bisect_right(ends, at)
        return min(i, len(ends) - 1)

    def original_time(self, t: float, index: int | None = None, is_end: bool = False) -> float:
        """Time `t` (s, in `samples`) in the original audio, in region `index` (default: the one
        it falls in), rounded to the millisecond."""
        if not self.regions:
            return t
        i = self.region_index(t, is_end) if index is None else index
        start, end = self.regions[i]
        skipped = start - (self._ends[i] - (end - start))  # original samples left out before region i
        return round(t + skipped / SAMPLE_RATE, 3)

    def restore(self, result: dict) -> dict:
        """Segments and words of a transcription of `samples` moved to the original timeline, in
        place: each word by the region its middle falls in (its start and end move together), a
        segment with words spans them, one without is mapped by its own start and end."""
        for segment in result["segments"]:
            words = segment.get("words")
            if words:
                for w in words:
                    i = self.region_index((w["start"] + w["end"]) / 2)
                    w["start"], w["end"] = self.original_time(w["start"], i), self.original_time(w["end"], i)
                segment["start"], segment["end"] = words[0]["start"], words[-1]["end"]
            else:
                segment["start"], segment["end"] = (
                    self.original_time(segment["start"]),
                    self.original_time(segment["end"], is_end=True),
                )
        return result
