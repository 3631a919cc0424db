"""Word timestamps from cross-attention alignment heads, as openai-whisper computes them.

One `alignment` graph call gives every position's logits and each layer's cross-attention scores;
the alignment heads' scores are softmaxed over the window's frames, normalised per frame over
tokens, median filtered, averaged, and aligned to tokens by dynamic time warping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import HOP_LENGTH, SAMPLE_RATE
from .decoding import log_softmax

TOKENS_PER_SECOND = SAMPLE_RATE // (2 * HOP_LENGTH)  # the conv stem halves the frame rate: 50/s


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over the last axis in a window of odd `width`, reflect-padded (torch's F.pad)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x  # reflect padding needs more samples than this
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.partition(windows, pad, axis=-1)[..., pad]


def token_probabilities(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """softmax(logits[i])[tokens[i]] for each row i, as exp(log_softmax) there, without the
    exponential of every logit of the row twice."""
    x = logits.astype(np.float32, copy=False)
    m = np.max(x, axis=-1, keepdims=True)
    total = np.sum(np.exp(x - m), axis=-1)
    picked = x[np.arange(len(tokens)), tokens] - m[:, 0]
    return np.exp(picked - np.log(total))


def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path through cost `x` (tokens, frames): (token indices, frame indices).

    Ties resolve as openai-whisper's: diagonal, then up, then left. Cells on one anti-diagonal are
    independent, so each anti-diagonal is computed at once.
    """
    x = np.asarray(x, np.float64)
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf)
    trace = np.full((n + 1, m + 1), -1, np.int8)
    cost[0, 0] = 0
    for k in range(2, n + m + 1):
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        cost[i, j] = x[i - 1, j - 1] + np.choose(t, [c0, c1, c2])
        trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        elif t == 2:
            j -= 1
        else:
            raise RuntimeError(f"dtw: unreachable cell ({i}, {j})")
    path_arr = np.array(path[::-1]).T
    return path_arr[0], path_arr[1]


def find_alignment(
    model,
    tokenizer,
    text_tokens: list[int],
    audio_features,
    num_frames: int,
    medfilt_width: int = 7,
    qk_scale: float = 1.0,
    cross: dict | None = None,
) -> list[WordTiming]:
    if not text_tokens:
        return []
    tokens = np.array([[*tokenizer.sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot]], np.int64)
    logits, weights = model.alignment(tokens, audio_features, num_frames // 2, cross)  # weights: heads, tokens, frames
    sampled = logits[0, len(tokenizer.sot_sequence) :, : tokenizer.eot]
    text_token_probs = token_probabilities(sampled[: len(text_tokens)], text_tokens).tolist()

    weights = np.exp(log_softmax(weights * qk_scale))
    mean = weights.mean(axis=-2, keepdims=True)
    std = weights.std(axis=-2, keepdims=True)
    weights = median_filter((weights - mean) / std, medfilt_width)
    matrix = weights.mean(axis=0)[len(tokenizer.sot_sequence) : -1]
    text_indices, time_indices = dtw(-matrix)

    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        return []  # only eot
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    word_probs = [np.mean(text_token_probs[i:j]) for i, j in zip(boundaries[:-1], boundaries[1:])]
    return [
        WordTiming(w, t, float(s), float(e), float(p))
        for w, t, s, e, p in zip(words, word_tokens, starts, ends, word_probs)
    ]


def merge_punctuations(alignment: list[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening punctuation to the following word and closing punctuation to the previous."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        prev, nxt = alignment[i], alignment[j]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            nxt.word, nxt.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            prev.word, prev.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, nxt = alignment[i], alignment[j]
        if not prev.word.endswith(" ") and nxt.word in appended:
            prev.word, prev.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(
    *,
    segments: list[dict],
    model,
    tokenizer,
    audio_features,
    num_frames: int,
    prepend_punctuations: str,
    append_punctuations: str,
    last_speech_timestamp: float,
    cross: dict | None = None,
) -> None:
    """Fill each segment's "words" (word, start, end, probability), adjusting segment bounds."""
    if not segments:
        return
    per_segment = [[t for t in s["tokens"] if t < tokenizer.eot] for s in segments]
    alignment = find_alignment(
        model, tokenizer, [t for ts in per_segment for t in ts], audio_features, num_frames, cross=cross
    )
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median_duration * 2

    # words at sentence boundaries are no longer than twice the median word
    if len(durations):
        marks = ".。!！?？"
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_duration:
                if alignment[i].word in marks:
                    alignment[i].end = alignment[i].start + max_duration
                elif alignment[i - 1].word in marks:
                    alignment[i].start = alignment[i].end - max_duration

    merge_punctuations(alignment, prepend_punctuations, append_punctuations)
    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    word_index = 0
    for segment, text_tokens in zip(segments, per_segment):
        saved, words = 0, []
        while word_index < len(alignment) and saved < len(text_tokens):
            timing = alignment[word_index]
            if timing.word:
                words.append(
                    {
                        "word": timing.word,
                        "start": round(time_offset + timing.start, 2),
                        "end": round(time_offset + timing.end, 2),
                        "probability": timing.probability,
                    }
                )
            saved += len(timing.tokens)
            word_index += 1
        if words:
            # the first and second word after a pause are no longer than twice the median word
            if words[0]["end"] - last_speech_timestamp > median_duration * 4 and (
                words[0]["end"] - words[0]["start"] > max_duration
                or (len(words) > 1 and words[1]["end"] - words[0]["start"] > max_duration * 2)
            ):
                if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
                    boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
                    words[0]["end"] = words[1]["start"] = boundary
                words[0]["start"] = max(0, words[0]["end"] - max_duration)
            # prefer the segment's own bounds where the first/last word runs too long
            if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
                words[0]["start"] = max(0, min(words[0]["end"] - median_duration, segment["start"]))
            else:
                segment["start"] = words[0]["start"]
            if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
                words[-1]["end"] = max(words[-1]["start"] + median_duration, segment["end"])
            else:
                segment["end"] = words[-1]["end"]
            last_speech_timestamp = segment["end"]
        segment["words"] = words


def get_end(segments: list[dict]) -> float | None:
    return next(
        (w["end"] for s in reversed(segments) for w in reversed(s["words"])), segments[-1]["end"] if segments else None
    )
