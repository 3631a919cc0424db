"""OpenAI's audio API as whisper-serve speaks it, without HTTP: the form fields it takes, the
options a request decodes with, the response bodies of each format, and errors in OpenAI's
shape. The app (serving.app) maps routes onto these; nothing here needs FastAPI.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, AudioError, read_audio
from ..options import TEMPERATURES, TranscribeOptions
from ..results import TranscriptionResult
from ..writers import write_srt, write_vtt

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
FIELDS = {
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "stream",
    "temperature",
    "timestamp_granularities[]",
    "timestamp_granularities",
}
ALIASES = ("whisper-1",)  # the model name OpenAI's examples use; it means the server's first model


@dataclass(frozen=True)
class Settings:
    """The server's limits and decoding defaults (whisper-run's: beam 5, best of 5, fallback)."""

    max_upload_bytes: int = 100 * 2**20
    max_audio_seconds: float = 3600.0
    max_active: int = 8  # requests decoding at once on a model's engine
    queue_size: int = 32  # admitted requests waiting for a place, per model; beyond: 429
    max_live: int = 8  # live streams (Realtime sessions' items) decoding at once, per model; beyond: refused
    live_min_chunk: float = 1.0  # seconds of new audio before a live item is decoded again
    max_models: int | None = None  # models resident at once (None: every one served)
    timeout: float = 600.0  # seconds from admission to answer; beyond: 504, and the request is dropped
    api_key: str | None = None
    beam_size: int | None = 5
    best_of: int | None = 5


class ApiError(Exception):
    """An error answered in OpenAI's shape (`body()`): {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type_,
            param,
            code,
            headers,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "whisper-max"}


# --- requests -----------------------------------------------------------------------------------


def read_upload(data: bytes, filename: str, max_seconds: float) -> np.ndarray:
    """The upload's samples (16 kHz mono), read as whisper-run reads a file; ApiError 400 when it
    is not audio, empty or longer than `max_seconds`. They are kept as the int16 values
    read_audio divides by 32768 (exactly), half the memory of float32 while a request waits."""
    suffix = Path(filename or "").suffix.lower()
    if not data:
        raise ApiError(400, f"{filename or 'file'}: the upload is empty", param="file")
    with tempfile.TemporaryDirectory(prefix="whisper-serve-") as tmp:
        path = Path(tmp) / f"upload{suffix or _sniff(data)}"
        path.write_bytes(data)
        limit = int(max_seconds * SAMPLE_RATE)
        blocks, total = [], 0
        try:
            for block in read_audio(path):
                total += len(block)
                if total > limit:
                    raise ApiError(
                        400,
                        f"{filename}: the audio is longer than this server takes ({max_seconds:g} s, "
                        "--max_audio_seconds)",
                        param="file",
                    )
                blocks.append(np.rint(block * np.float32(32768)).astype(np.int16))
        except AudioError as e:
            raise ApiError(400, str(e).replace(str(path), filename or "file"), param="file") from None
    return np.concatenate(blocks)


def _sniff(data: bytes) -> str:
    """A suffix for an upload sent without a file name: libsndfile's formats by their magic."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return ".wav"
    return {b"fLaC": ".flac", b"OggS": ".ogg", b"FORM": ".aiff"}.get(data[:4], ".bin")


def options_for(model, settings: Settings, task: str, form: dict) -> tuple[TranscribeOptions, str, set[str]]:
    """TranscribeOptions for one request's form fields; also its response_format and
    timestamp granularities. ApiError 400 names a bad field."""
    fmt = form.get("response_format") or "json"
    if fmt not in FORMATS:
        raise ApiError(400, f"response_format {fmt!r}: use one of {', '.join(FORMATS)}", param="response_format")
    granularities = set(form.get("timestamp_granularities") or [])
    if granularities - {"segment", "word"}:
        raise ApiError(
            400,
            f"timestamp_granularities {sorted(granularities)}: use segment and/or word",
            param="timestamp_granularities[]",
        )
    if granularities and fmt != "verbose_json":
        raise ApiError(
            400, "timestamp_granularities needs response_format verbose_json", param="timestamp_granularities[]"
        )
    language = form.get("language") or None
    if not model.is_multilingual:
        if task == "translate":
            raise ApiError(
                400,
                "this model is English-only: it cannot translate; ask for a multilingual model (base, small, ...) for "
                "translations",
                param="model",
            )
        if language not in (None, "en", "english"):
            raise ApiError(400, f"language {language!r}: this model is English-only", param="language")
    elif language is not None:
        try:
            language = model.tokenizer.language_code(language)
        except ValueError as e:
            raise ApiError(400, str(e), param="language") from None
    temperature = TEMPERATURES  # OpenAI's 0 and openai-whisper's default: fallback
    if form.get("temperature") not in (None, ""):
        try:
            t = float(form["temperature"])
        except ValueError:
            raise ApiError(
                400, f"temperature {form['temperature']!r}: a number between 0 and 1", param="temperature"
            ) from None
        if not 0 <= t <= 1:
            raise ApiError(400, f"temperature {t}: between 0 and 1", param="temperature")
        if t > 0:
            temperature = (t,)
    options = TranscribeOptions.from_kwargs(
        temperature=temperature,
        task=task,
        language=language,
        initial_prompt=form.get("prompt") or None,
        word_timestamps="word" in granularities,
        beam_size=settings.beam_size,
        best_of=settings.best_of,
    )
    options, _ = options.for_model(model.is_multilingual)  # a translation was refused above
    return options, fmt, granularities


def wants_stream(form: dict, fmt: str, task: str) -> bool:
    """The form's `stream` (OpenAI's: server-sent transcript.text.delta events, then
    transcript.text.done); for transcriptions in json or text. ApiError 400 otherwise."""
    value = (form.get("stream") or "false").strip().lower()
    if value not in ("true", "false"):
        raise ApiError(400, f"stream {form.get('stream')!r}: true or false", param="stream")
    if value == "false":
        return False
    if task != "transcribe":
        raise ApiError(400, "stream: translations are not streamed; send stream=false", param="stream")
    if fmt not in ("json", "text"):
        raise ApiError(400, f"stream: response_format {fmt!r} is not streamed; use json or text", param="stream")
    return True


def sse(event: dict) -> bytes:
    """One server-sent event carrying `event` as JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def delta_event(text: str) -> dict:
    return {"type": "transcript.text.delta", "delta": text}


def done_event(result: TranscriptionResult) -> dict:
    return {"type": "transcript.text.done", "text": result.text}


def render(model, result: TranscriptionResult, fmt: str, granularities: set[str], task: str, duration: float):
    """The response body for `fmt`: a dict (JSON) or text."""
    if fmt == "json":
        return {"text": result.text}
    if fmt == "text":
        return result.text
    if fmt in ("srt", "vtt"):
        out = io.StringIO()
        (write_srt if fmt == "srt" else write_vtt)(result.as_openai_dict(), out)
        return out.getvalue()
    body = {
        "task": task,
        "language": model.tokenizer.languages.get(result.language, result.language),
        "duration": duration,
        "text": result.text,
    }
    if not granularities or "segment" in granularities:
        body["segments"] = [{k: v for k, v in s.as_openai_dict().items() if k != "words"} for s in result.segments]
    if "word" in granularities:
        body["words"] = [w.as_openai_dict() for s in result.segments for w in s.words or ()]
    return body
