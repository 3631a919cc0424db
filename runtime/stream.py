"""openai-whisper's long-form loop over one audio as a stream: the window it needs decoded next,
the result fed back, events instead of printing.

    stream = TranscriptionStream(model, "audio.wav", TranscribeOptions(), on_event=print)
    while (window := stream.next_window()) is not None:
        stream.feed(decode(model, window.mel, window.options))
    stream.result  # a TranscriptionResult (as_openai_dict(): openai-whisper's result dict)

A caller may decode the windows of many streams together (runtime.transcribe.transcribe_many
batches equal options); each stream's tokens are the ones it gets alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE, LogMel, MelArray, pad_or_trim, samples
from .decoding import DecodingOptions, DecodingResult
from .model import WhisperModel
from .options import TranscribeOptions
from .results import TranscriptionResult
from .timing import add_word_timestamps, get_end
from .vad import Speech, VadOptions, speech_regions

log = logging.getLogger(__name__)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Mel frames of the audio done so far, of `total` (once at the start, then per window)."""

    frames: int
    total: int


@dataclass(frozen=True)
class DetectingLanguage:
    """No language was given: the first 30 s are looked at."""


@dataclass(frozen=True)
class LanguageDetected:
    code: str
    name: str


@dataclass(frozen=True)
class SegmentDone:
    """A segment as openai-whisper prints it (verbose), before empty ones are blanked."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Window:
    """A window the stream needs decoded: its log-mel (n_mels, 3000) and options."""

    mel: np.ndarray
    options: DecodingOptions


class TranscriptionStream:
    """The long-form transcription of one audio (a path, 16 kHz mono samples, or an
    audio.MelArray: a log-mel computed as the audio arrived, runtime.live's seam). The audio is
    read and its log-mel computed here, so a bad file fails at once; then `next_window()` and
    `feed(result)` alternate until `next_window()` returns None and `result` is the
    TranscriptionResult (openai-whisper's dict through as_openai_dict()). `on_event` gets
    Progress, DetectingLanguage, LanguageDetected and SegmentDone events.

    With `options.vad_filter`, or when `audio` is a runtime.vad.Speech, only the speech is
    transcribed (joined end to end); events and the result are in the audio's own timeline."""

    def __init__(
        self,
        model: WhisperModel,
        audio,
        options: TranscribeOptions | None = None,
        on_event: Callable[[object], None] | None = None,
        one_window: bool = False,
    ):
        self._steps = _steps(model, audio, options or TranscribeOptions(), on_event or (lambda event: None), one_window)
        self._window: Window | None = None
        self._result: TranscriptionResult | None = None
        self._advance(None)

    def _advance(self, result: DecodingResult | None) -> None:
        try:
            mel, options = self._steps.send(result) if result is not None else next(self._steps)
            self._window = Window(mel, options)
        except StopIteration as done:
            self._window, self._result = None, TranscriptionResult.from_openai_dict(done.value)

    def next_window(self) -> Window | None:
        """The window to decode next; None when the audio is done."""
        return self._window

    def feed(self, result: DecodingResult) -> None:
        """The DecodingResult of the window next_window() gave."""
        if self._window is None:
            raise RuntimeError("feed: the stream is done; it needs no more windows")
        self._advance(result)

    @property
    def done(self) -> bool:
        return self._window is None

    @property
    def result(self) -> TranscriptionResult:
        if self._result is None:
            raise RuntimeError("result: the stream still has windows to decode")
        return self._result


# --- the loop -----------------------------------------------------------------------------------


def _clips(clip_timestamps, content_frames: int) -> list[tuple[int, int]]:
    if isinstance(clip_timestamps, str):
        clip_timestamps = [float(ts) for ts in clip_timestamps.split(",")] if clip_timestamps else []
    points = [round(ts * FRAMES_PER_SECOND) for ts in clip_timestamps] or [0]
    if len(points) % 2 == 1:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2]))


def _steps(
    model: WhisperModel, audio, options: TranscribeOptions, emit: Callable[[object], None], one_window: bool = False
):
    """openai-whisper's long-form loop as a generator: it yields each window it needs decoded,
    (mel segment, DecodingOptions), is sent the DecodingResult, and returns the result dict.
    What openai-whisper prints becomes events given to `emit`."""
    if isinstance(audio, MelArray):  # a log-mel computed as the audio arrived (runtime.live)
        if options.vad_filter:
            raise ValueError("vad_filter: a log-mel given as the audio has no samples for VAD to look at")
        mel, speech = audio, None
    else:
        speech = audio if isinstance(audio, Speech) else _speech(audio, options) if options.vad_filter else None
        mel = model.features(
            audio if speech is None else speech.samples
        )  # read and transformed here, so a bad file fails at once
    try:
        if speech is None:
            return (yield from _loop(model, mel, options, emit, one_window))
        result = yield from _loop(model, mel, options, _in_original_time(speech, emit), one_window)
        return speech.restore(result)
    finally:
        mel.close()


def _speech(audio, options: TranscribeOptions) -> Speech:
    """The speech in `audio` (a path or samples), as Silero VAD finds it with the options' parameters."""
    audio = samples(audio)
    speech = Speech.join(audio, speech_regions(audio, options.vad_parameters or VadOptions()))
    log.debug("VAD kept %.1f s of %.1f s in %d regions", speech.seconds, len(audio) / SAMPLE_RATE, len(speech.regions))
    return speech


def _in_original_time(speech: Speech, emit: Callable[[object], None]) -> Callable[[object], None]:
    """`emit` for events of a transcription of `speech.samples`: segment times and progress in
    the original audio's timeline."""
    total = speech.source_samples // HOP_LENGTH

    def mapped(event) -> None:
        if isinstance(event, SegmentDone):
            event = SegmentDone(
                speech.original_time(event.start), speech.original_time(event.end, is_end=True), event.text
            )
        elif isinstance(event, Progress):
            done = (
                total
                if event.frames >= event.total
                else round(speech.original_time(event.frames / FRAMES_PER_SECOND, is_end=True) * FRAMES_PER_SECOND)
            )
            event = Progress(min(done, total), total)
        emit(event)

    return mapped


def _loop(
    model: WhisperModel,
    mel: LogMel | MelArray,
    options: TranscribeOptions,
    emit: Callable[[object], None],
    one_window: bool = False,
):
    """openai-whisper's transcribe() loop over the windows. With `one_window` (runtime.live: audio
    of at most a window whose end is still being spoken) only the first window is decoded, and the
    text after its last pair of timestamps, which openai-whisper leaves for the next window, is
    kept as a last segment ending where the audio ends: the next window would cost a second
    encoder run on the same seconds that the next live update decodes again anyway."""
    o = options
    (
        compression_ratio_threshold,
        logprob_threshold,
        no_speech_threshold,
        initial_prompt,
        word_timestamps,
        hallucination_silence_threshold,
    ) = (
        o.compression_ratio_threshold,
        o.logprob_threshold,
        o.no_speech_threshold,
        o.initial_prompt,
        o.word_timestamps,
        o.hallucination_silence_threshold,
    )
    content_frames = mel.content_frames
    content_duration = float(content_frames * HOP_LENGTH / SAMPLE_RATE)

    emit(Progress(0, content_frames))
    language = o.decode.language
    if language is None:
        if not model.is_multilingual:
            language = "en"
        else:
            emit(DetectingLanguage())
            # a window of its own, decoded where the others are (the engine): openai-whisper's
            # detect_language on the first 30 s
            detected = yield pad_or_trim(mel.read(0, N_FRAMES), N_FRAMES), DecodingOptions(task="lang_id")
            language = detected.language
            emit(LanguageDetected(language, model.tokenizer.languages[language]))
    o = replace(o, decode=replace(o.decode, language=language))
    tokenizer = model.tokenizer.with_language(language, o.decode.task)
    language = tokenizer.language or language

    seek_clips = _clips(o.clip_timestamps, content_frames)
    input_stride = N_FRAMES // model.dims["n_audio_ctx"]  # mel frames per output position: 2
    time_precision = input_stride * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp step

    def decode_with_fallback(segment: np.ndarray, prompt: list[int]):
        result = None
        for t in o.temperature:
            result = yield segment, o.window(t, prompt)
            needs_fallback = False
            if compression_ratio_threshold is not None and result.compression_ratio > compression_ratio_threshold:
                needs_fallback = True  # too repetitive
            if logprob_threshold is not None and result.avg_logprob < logprob_threshold:
                needs_fallback = True  # average log probability too low
            if (
                no_speech_threshold is not None
                and result.no_speech_prob > no_speech_threshold
                and logprob_threshold is not None
                and result.avg_logprob < logprob_threshold
            ):
                needs_fallback = False  # silence
            if not needs_fallback:
                break
        return result

    clip_idx = 0
    seek = seek_clips[clip_idx][0]
    all_tokens: list[int] = []
    all_segments: list[dict] = []
    prompt_reset_since = 0
    remaining_prompt_length = model.dims["n_text_ctx"] // 2 - 1
    initial_prompt_tokens = tokenizer.encode(" " + initial_prompt.strip()) if initial_prompt is not None else []
    all_tokens.extend(initial_prompt_tokens)
    remaining_prompt_length -= len(initial_prompt_tokens)

    def new_segment(*, start: float, end: float, tokens: list[int], result: DecodingResult) -> dict:
        return {
            "seek": seek,
            "start": start,
            "end": end,
            "text": tokenizer.decode([t for t in tokens if t < tokenizer.eot]),
            "tokens": tokens,
            "temperature": result.temperature,
            "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio,
            "no_speech_prob": result.no_speech_prob,
        }

    last_speech_timestamp = 0.0
    while clip_idx < len(seek_clips):
        clip_start, clip_end = seek_clips[clip_idx]
        seek = max(seek, clip_start)
        if seek >= clip_end:
            clip_idx += 1
            if clip_idx < len(seek_clips):
                seek = seek_clips[clip_idx][0]
            continue
        time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
        segment_size = min(N_FRAMES, content_frames - seek, clip_end - seek)
        segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        mel_segment = pad_or_trim(mel.read(seek, seek + segment_size), N_FRAMES)

        if o.carry_initial_prompt:
            ignored = max(len(initial_prompt_tokens), prompt_reset_since)
            prompt = initial_prompt_tokens + all_tokens[ignored:][-remaining_prompt_length:]
        else:
            prompt = all_tokens[prompt_reset_since:]
        result = yield from decode_with_fallback(mel_segment, prompt)
        tokens = result.tokens

        if no_speech_threshold is not None:
            should_skip = result.no_speech_prob > no_speech_threshold
            if logprob_threshold is not None and result.avg_logprob > logprob_threshold:
                should_skip = False  # don't skip if the logprob is high enough despite no_speech
            if should_skip:
                seek += segment_size
                continue

        previous_seek = seek
        window_end_time = float((seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE)
        current_segments: list[dict] = []
        is_ts = [t >= tokenizer.timestamp_begin for t in tokens]
        single_timestamp_ending = is_ts[-2:] == [False, True]
        consecutive = [i + 1 for i in range(len(is_ts) - 1) if is_ts[i] and is_ts[i + 1]]
        if consecutive:
            slices = consecutive + ([len(tokens)] if single_timestamp_ending else [])
            last_slice = 0
            for current in slices:
                piece = tokens[last_slice:current]
                start_pos = piece[0] - tokenizer.timestamp_begin
                end_pos = piece[-1] - tokenizer.timestamp_begin
                current_segments.append(
                    new_segment(
                        start=time_offset + start_pos * time_precision,
                        end=time_offset + end_pos * time_precision,
                        tokens=piece,
                        result=result,
                    )
                )
                last_slice = current
            tail = tokens[last_slice:]
            if one_window and not single_timestamp_ending and any(t < tokenizer.eot for t in tail):
                current_segments.append(
                    new_segment(
                        start=time_offset + (tail[0] - tokenizer.timestamp_begin) * time_precision,
                        end=time_offset + segment_duration,
                        tokens=tail,
                        result=result,
                    )
                )
            if single_timestamp_ending:
                seek += segment_size  # no speech after the last timestamp: go to the window's end
            else:
                seek += (tokens[last_slice - 1] - tokenizer.timestamp_begin) * input_stride
        else:
            duration = segment_duration
            stamps = [t for t, ts in zip(tokens, is_ts) if ts]
            if stamps and stamps[-1] != tokenizer.timestamp_begin:
                duration = (stamps[-1] - tokenizer.timestamp_begin) * time_precision
            current_segments.append(
                new_segment(start=time_offset, end=time_offset + duration, tokens=tokens, result=result)
            )
            seek += segment_size

        if word_timestamps:
            add_word_timestamps(
                segments=current_segments,
                model=model,
                tokenizer=tokenizer,
                audio_features=result.audio_features,
                cross=result.cross,
                num_frames=segment_size,
                prepend_punctuations=o.prepend_punctuations,
                append_punctuations=o.append_punctuations,
                last_speech_timestamp=last_speech_timestamp,
            )
            if not single_timestamp_ending:
                last_word_end = get_end(current_segments)
                if last_word_end is not None and last_word_end > time_offset:
                    seek = round(last_word_end * FRAMES_PER_SECOND)
            if hallucination_silence_threshold is not None:
                skip_to = _skip_hallucinations(
                    current_segments,
                    hallucination_silence_threshold,
                    single_timestamp_ending,
                    time_offset,
                    window_end_time,
                    segment_duration,
                    content_duration,
                    content_frames,
                    previous_seek,
                    segment_size,
                    last_speech_timestamp,
                )
                if skip_to is not None:
                    seek, restart = skip_to
                    if restart:
                        continue
            last_word_end = get_end(current_segments)
            if last_word_end is not None:
                last_speech_timestamp = last_word_end

        for s in current_segments:
            emit(SegmentDone(s["start"], s["end"], s["text"]))
        for s in current_segments:
            if s["start"] == s["end"] or s["text"].strip() == "":
                s["text"], s["tokens"], s["words"] = "", [], []
        all_segments.extend({"id": i, **s} for i, s in enumerate(current_segments, start=len(all_segments)))
        all_tokens.extend(t for s in current_segments for t in s["tokens"])
        if not o.condition_on_previous_text or result.temperature > 0.5:
            prompt_reset_since = len(all_tokens)  # don't condition on a text that needed a high temperature
        emit(Progress(min(content_frames, seek), content_frames))
        if one_window:
            break
    log.debug("transcribed %.1f s of audio", content_duration)
    return {
        "text": tokenizer.decode(all_tokens[len(initial_prompt_tokens) :]),
        "segments": all_segments,
        "language": language,
    }


_PUNCTUATION = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"


def _word_anomaly(word: dict) -> float:
    probability = word.get("probability", 0.0)
    duration = word["end"] - word["start"]
    score = 0.0
    if probability < 0.15:
        score += 1.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def _is_anomaly(segment: dict | None) -> bool:
    if segment is None or not segment["words"]:
        return False
    words = [w for w in segment["words"] if w["word"] not in _PUNCTUATION][:8]
    score = sum(_word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def _next_words_segment(segments: list[dict]) -> dict | None:
    return next((s for s in segments if s["words"]), None)


def _skip_hallucinations(
    segments,
    threshold,
    single_timestamp_ending,
    time_offset,
    window_end_time,
    segment_duration,
    content_duration,
    content_frames,
    previous_seek,
    segment_size,
    last_speech_timestamp,
):
    """openai-whisper's hallucination_silence_threshold: a new seek, and whether to redo the window.
    Drops anomalous segments surrounded by silence from `segments` in place; None keeps the seek."""
    seek = None
    if not single_timestamp_ending:
        last_word_end = get_end(segments)
        if last_word_end is not None and last_word_end > time_offset:
            remaining = window_end_time - last_word_end
            seek = round(last_word_end * FRAMES_PER_SECOND) if remaining > threshold else previous_seek + segment_size
    first = _next_words_segment(segments)
    if first is not None and _is_anomaly(first):
        gap = first["start"] - time_offset
        if gap > threshold:
            return previous_seek + round(gap * FRAMES_PER_SECOND), True
    hal_last_end = last_speech_timestamp
    for si in range(len(segments)):
        segment = segments[si]
        if not segment["words"]:
            continue
        if _is_anomaly(segment):
            following = _next_words_segment(segments[si + 1 :])
            hal_next_start = following["words"][0]["start"] if following is not None else time_offset + segment_duration
            silence_before = (
                segment["start"] - hal_last_end > threshold
                or segment["start"] < threshold
                or segment["start"] - time_offset < 2.0
            )
            silence_after = (
                hal_next_start - segment["end"] > threshold
                or _is_anomaly(following)
                or window_end_time - segment["end"] < 2.0
            )
            if silence_before and silence_after:
                seek = round(max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                if content_duration - segment["end"] < threshold:
                    seek = content_frames
                segments[si:] = []
                break
        hal_last_end = segment["end"]
    return None if seek is None else (seek, False)
