"""Long-form transcription, with openai-whisper's `transcribe()` semantics and result dict."""

from __future__ import annotations

import logging
import sys
from dataclasses import fields

import numpy as np

from .audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, pad_or_trim
from .decoding import DecodingOptions, DecodingResult, decode, detect_language
from .model import WhisperModel
from .timing import add_word_timestamps, get_end

log = logging.getLogger(__name__)

_DECODE_FIELDS = {f.name for f in fields(DecodingOptions)}


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    if seconds < 0:
        raise ValueError("non-negative timestamp expected")
    ms = round(seconds * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1_000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _clips(clip_timestamps, content_frames: int) -> list[tuple[int, int]]:
    if isinstance(clip_timestamps, str):
        clip_timestamps = [float(ts) for ts in clip_timestamps.split(",")] if clip_timestamps else []
    points = [round(ts * FRAMES_PER_SECOND) for ts in clip_timestamps] or [0]
    if len(points) % 2 == 1:
        points.append(content_frames)
    return list(zip(points[::2], points[1::2]))


def transcribe(model: WhisperModel, audio, **options) -> dict:
    """Transcribe a file path or 16 kHz mono float32 samples; returns openai-whisper's dict.
    Options are openai-whisper's `transcribe()` keywords and DecodingOptions fields."""
    return next(transcribe_many(model, [audio], batch_size=1, **options))[1]


def _say(line: str) -> None:
    print(line, flush=True)


def transcribe_many(model: WhisperModel, audios: list, *, batch_size: int = 8, say=_say, **options):
    """Transcribe several files at once, yielding (index, result) in input order as each is done.

    Up to `batch_size` files are in flight. Each runs openai-whisper's long-form loop on its own;
    the greedy (temperature 0) windows they wait on are decoded together when their decoding
    options are equal (the same prompt: in practice each file's first window, and windows after
    a prompt reset). One encoder call and one decoder call per token then serve the whole batch.
    Sampled windows (temperature > 0, the fallback) decode one by one, as they would alone.
    Verbose lines print in input order, as a sequential run prints them: the first unfinished
    file's as they come, later files' once every earlier file is done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1")
    held: list[list[str]] = [[] for _ in audios]
    shown = 0  # the file whose lines print as they come; later files' lines wait their turn
    steps, waiting, results = {}, {}, {}  # in flight: index -> generator, (segment, DecodingOptions)
    queue = iter(range(len(audios)))

    def start() -> None:
        for i in queue:
            steps[i] = _transcribe_steps(model, audios[i], say=lambda line, i=i: say(line) if i == shown else held[i].append(line), **options)
            try:
                waiting[i] = next(steps[i])
            except StopIteration as done:  # nothing to decode (an empty clip)
                del steps[i]
                results[i] = done.value
            if len(steps) >= batch_size:
                return

    start()
    while True:
        while shown in results:
            yield shown, results.pop(shown)
            shown += 1
            if shown < len(held):
                for line in held[shown]:
                    say(line)
                held[shown].clear()
        if not waiting:  # start() has taken every file
            return
        first = min(waiting)
        segment, opts = waiting[first]
        group = [first]
        if opts.temperature == 0:
            group += [i for i in sorted(waiting) if i != first and waiting[i][1] == opts]
        if len(group) == 1:
            decoded = [decode(model, segment, opts)]
        else:
            decoded = decode(model, np.stack([waiting[i][0] for i in group]), opts)
        for i, result in zip(group, decoded):
            try:
                waiting[i] = steps[i].send(result)
            except StopIteration as done:
                del waiting[i], steps[i]
                results[i] = done.value
        start()


def _transcribe_steps(
    model: WhisperModel,
    audio,
    *,
    say=_say,
    verbose: bool | None = None,
    temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: float | None = 2.4,
    logprob_threshold: float | None = -1.0,
    no_speech_threshold: float | None = 0.6,
    condition_on_previous_text: bool = True,
    initial_prompt: str | None = None,
    carry_initial_prompt: bool = False,
    word_timestamps: bool = False,
    prepend_punctuations: str = "\"'“¿([{-",
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、",
    clip_timestamps="0",
    hallucination_silence_threshold: float | None = None,
    **decode_options,
):
    """openai-whisper's long-form loop as a generator: it yields each window it needs decoded,
    (mel segment, DecodingOptions), is sent the DecodingResult, and returns the result dict.
    `say` prints its verbose lines."""
    unknown = set(decode_options) - _DECODE_FIELDS
    if unknown:
        raise TypeError(f"unknown decoding options {sorted(unknown)}")
    if isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__"):
        audio = load_audio(audio)
    mel = model.log_mel(np.asarray(audio, np.float32), padding=N_SAMPLES)
    content_frames = mel.shape[-1] - N_FRAMES
    content_duration = float(content_frames * HOP_LENGTH / SAMPLE_RATE)

    if decode_options.get("language") is None:
        if not model.is_multilingual:
            decode_options["language"] = "en"
        else:
            if verbose:
                say("Detecting language using up to the first 30 seconds. Use `--language` to specify the language")
            features = model.embed_audio(pad_or_trim(mel, N_FRAMES)[None])
            _, probs = detect_language(model, features, model.tokenizer)
            decode_options["language"] = max(probs[0], key=probs[0].get)
            if verbose is not None:
                say(f"Detected language: {model.tokenizer.languages[decode_options['language']].title()}")
    language = decode_options["language"]
    task = decode_options.get("task", "transcribe")
    tokenizer = model.tokenizer.with_language(language, task)
    language = tokenizer.language or language

    seek_clips = _clips(clip_timestamps, content_frames)
    input_stride = N_FRAMES // model.dims["n_audio_ctx"]  # mel frames per output position: 2
    time_precision = input_stride * HOP_LENGTH / SAMPLE_RATE  # 0.02 s per timestamp step

    def decode_with_fallback(segment: np.ndarray):
        temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
        result = None
        for t in temperatures:
            kwargs = dict(decode_options)
            if t > 0:
                kwargs.pop("beam_size", None)
                kwargs.pop("patience", None)
            else:
                kwargs.pop("best_of", None)
            result = yield segment, DecodingOptions(**kwargs, temperature=t)
            needs_fallback = False
            if compression_ratio_threshold is not None and result.compression_ratio > compression_ratio_threshold:
                needs_fallback = True  # too repetitive
            if logprob_threshold is not None and result.avg_logprob < logprob_threshold:
                needs_fallback = True  # average log probability too low
            if no_speech_threshold is not None and result.no_speech_prob > no_speech_threshold and logprob_threshold is not None and result.avg_logprob < logprob_threshold:
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
    bar = _progress(content_frames, verbose)
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
        mel_segment = pad_or_trim(mel[:, seek : seek + segment_size], N_FRAMES)

        if carry_initial_prompt:
            ignored = max(len(initial_prompt_tokens), prompt_reset_since)
            decode_options["prompt"] = initial_prompt_tokens + all_tokens[ignored:][-remaining_prompt_length:]
        else:
            decode_options["prompt"] = all_tokens[prompt_reset_since:]
        result = yield from decode_with_fallback(mel_segment)
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
                current_segments.append(new_segment(start=time_offset + start_pos * time_precision, end=time_offset + end_pos * time_precision, tokens=piece, result=result))
                last_slice = current
            if single_timestamp_ending:
                seek += segment_size  # no speech after the last timestamp: go to the window's end
            else:
                seek += (tokens[last_slice - 1] - tokenizer.timestamp_begin) * input_stride
        else:
            duration = segment_duration
            stamps = [t for t, ts in zip(tokens, is_ts) if ts]
            if stamps and stamps[-1] != tokenizer.timestamp_begin:
                duration = (stamps[-1] - tokenizer.timestamp_begin) * time_precision
            current_segments.append(new_segment(start=time_offset, end=time_offset + duration, tokens=tokens, result=result))
            seek += segment_size

        if word_timestamps:
            add_word_timestamps(
                segments=current_segments,
                model=model,
                tokenizer=tokenizer,
                audio_features=result.audio_features,
                num_frames=segment_size,
                prepend_punctuations=prepend_punctuations,
                append_punctuations=append_punctuations,
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

        if verbose:
            for s in current_segments:
                say(f"[{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}] {s['text']}")
        for s in current_segments:
            if s["start"] == s["end"] or s["text"].strip() == "":
                s["text"], s["tokens"], s["words"] = "", [], []
        all_segments.extend({"id": i, **s} for i, s in enumerate(current_segments, start=len(all_segments)))
        all_tokens.extend(t for s in current_segments for t in s["tokens"])
        if not condition_on_previous_text or result.temperature > 0.5:
            prompt_reset_since = len(all_tokens)  # don't condition on a text that needed a high temperature
        if bar is not None:
            bar.update(min(content_frames, seek) - previous_seek)
    if bar is not None:
        bar.close()
    log.debug("transcribed %.1f s of audio", content_duration)
    return {"text": tokenizer.decode(all_tokens[len(initial_prompt_tokens) :]), "segments": all_segments, "language": language}


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
    segments, threshold, single_timestamp_ending, time_offset, window_end_time, segment_duration, content_duration, content_frames, previous_seek, segment_size, last_speech_timestamp
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
            silence_before = segment["start"] - hal_last_end > threshold or segment["start"] < threshold or segment["start"] - time_offset < 2.0
            silence_after = hal_next_start - segment["end"] > threshold or _is_anomaly(following) or window_end_time - segment["end"] < 2.0
            if silence_before and silence_after:
                seek = round(max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                if content_duration - segment["end"] < threshold:
                    seek = content_frames
                segments[si:] = []
                break
        hal_last_end = segment["end"]
    return None if seek is None else (seek, False)


def _progress(total: int, verbose: bool | None):
    # openai-whisper shows a bar only when verbose is False (None: silent; True: prints lines)
    if verbose is not False:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="frames", file=sys.stderr)
