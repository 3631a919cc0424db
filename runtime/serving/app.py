"""OpenAI's audio transcription API as an ASGI app (FastAPI) on one engine: whisper-serve's.

The app reads and checks uploads, hands each request to the scheduler (runtime.scheduler: one
thread owns the model and its engine, and the windows of concurrent requests decode in the same
decoder calls) and waits for it; a request that times out or whose client goes away is cancelled
and its rows are freed. Admission is bounded: past `max_active + queue_size` requests a 429 with
Retry-After. Needs FastAPI and python-multipart (the `server` extra); any ASGI server runs it.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extras import require

require("fastapi", "server", "whisper-serve")
require("python_multipart", "server", "whisper-serve (uploads)")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from .audio import SAMPLE_RATE, AudioError, read_audio  # noqa: E402
from .options import TEMPERATURES, TranscribeOptions  # noqa: E402
from .results import TranscriptionResult  # noqa: E402
from .scheduler import Busy, Job, Scheduler  # noqa: E402
from .writers import write_srt, write_vtt  # noqa: E402

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
FIELDS = {
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
    "timestamp_granularities",
}
ALIASES = ("whisper-1",)  # the model name OpenAI's examples use; it means the loaded package here


@dataclass(frozen=True)
class Settings:
    """The server's limits and decoding defaults (whisper-run's: beam 5, best of 5, fallback)."""

    max_upload_bytes: int = 100 * 2**20
    max_audio_seconds: float = 3600.0
    max_active: int = 8  # requests decoding at once on the engine
    queue_size: int = 32  # admitted requests waiting for a place; beyond: 429
    timeout: float = 600.0  # seconds from admission to answer; beyond: 504, and the request is dropped
    api_key: str | None = None
    beam_size: int | None = 5
    best_of: int | None = 5


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

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
                "this server's model is English-only: it cannot translate; serve a multilingual package (base, small, "
                "...) for translations",
                param="model",
            )
        if language not in (None, "en", "english"):
            raise ApiError(400, f"language {language!r}: this server's model is English-only", param="language")
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


# --- the app ------------------------------------------------------------------------------------


def create_app(model, settings: Settings = Settings(), model_id: str | None = None):
    """The ASGI app serving `model` (a runtime.api.Whisper or WhisperModel)."""
    model_id = model_id or Path(str(model.package.path)).name.removesuffix(".maxpkg")
    scheduler = Scheduler(model, settings.max_active, settings.queue_size)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:  # uvicorn has waited for in-flight requests (graceful shutdown)
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="whisper-serve", lifespan=lifespan)
    app.state.scheduler = scheduler
    _error_handlers(app)
    app.add_middleware(_Guard, settings=settings)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id)]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        _check_model(name, model_id)
        return _model_card(name)

    async def audio(request: Request, task: str):
        form = await _form(request, settings.max_upload_bytes)
        _check_model(form.get("model"), model_id)
        options, fmt, granularities = options_for(model, settings, task, form)
        samples = await asyncio.to_thread(read_upload, form["file"][1], form["file"][0], settings.max_audio_seconds)
        result = await _wait(request, scheduler, _submit(scheduler, samples, options), settings.timeout)
        task = "translate" if task == "translate" else "transcribe"
        body = render(model, result, fmt, granularities, task, len(samples) / SAMPLE_RATE)
        return JSONResponse(body) if isinstance(body, dict) else PlainTextResponse(body)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio(request, "translate")

    return app


def _error_handlers(app) -> None:
    """Every error as OpenAI's error object: ours, FastAPI's HTTP errors and validation errors."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return _error(
            e.status_code,
            str(e.detail),
            "invalid_request_error" if e.status_code < 500 else "server_error",
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _error(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))


def _check_model(name: str | None, model_id: str) -> None:
    """A request's model: the served one or an alias (whisper-1), else 400 (none) or 404."""
    if not name:
        raise ApiError(
            400,
            "the form has no 'model' field; send the served model's id (see GET /v1/models) or whisper-1",
            param="model",
        )
    if name not in (model_id, *ALIASES):
        raise ApiError(
            404,
            f"model {name!r} is not served here; this server serves {model_id!r} (or whisper-1)",
            param="model",
            code="model_not_found",
        )


def _submit(scheduler: Scheduler, samples, options):
    """The scheduler's job for a request, or 429 with Retry-After when it is full."""
    try:
        return scheduler.submit(samples, options)
    except Busy:
        retry = max(1, math.ceil(scheduler.latency))
        raise ApiError(
            429,
            f"the server is busy ({scheduler.capacity} requests admitted); retry in {retry} s",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        ) from None


class _Guard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from
    the endpoint): the API key on /v1/, and a declared upload size over the limit, answered
    before the body is read."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            key, limit = self.settings.api_key, self.settings.max_upload_bytes
            length = headers.get("content-length", "")
            if key and scope["path"].startswith("/v1/") and headers.get("authorization") != f"Bearer {key}":
                response = _error(
                    401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key"
                )
                return await response(scope, receive, send)
            if length.isdigit() and int(length) > limit:
                message = f"the upload is {int(length)} bytes; this server takes at most {limit} (--max_upload_mb)"
                return await _error(413, message, code="upload_too_large", headers={"Connection": "close"})(
                    scope, receive, send
                )
        await self.app(scope, receive, send)


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "whisper-max"}


async def _form(request, max_bytes: int) -> dict:
    """The multipart form: {"file": (filename, bytes), other fields: str, timestamp_granularities:
    list}. ApiError 400 for anything else, 413 past `max_bytes`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the request as multipart/form-data with the audio in a field named 'file'")
    try:
        form = await request.form(max_files=1, max_fields=32, max_part_size=max_bytes)
    except Exception as e:  # python-multipart's errors: a malformed body
        raise ApiError(400, f"the form cannot be read: {getattr(e, 'detail', e)}") from None
    try:
        unknown = sorted(set(form.keys()) - FIELDS)
        if unknown:
            raise ApiError(
                400, f"unknown form field(s) {unknown}; this endpoint takes {sorted(FIELDS)}", param=unknown[0]
            )
        upload = form.get("file")
        if upload is None:
            raise ApiError(
                400, "the form has no 'file' field; send the audio as a file in a field named 'file'", param="file"
            )
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400, "'file' is a text field; send the audio as a file (multipart with a filename)", param="file"
            )
        size = upload.file.seek(0, os.SEEK_END)  # spooled to disk past 1 MB: measured before it is read in
        if size > max_bytes:  # a chunked upload declares no length; it is caught here
            raise ApiError(
                413,
                f"the upload is {size} bytes; this server takes at most {max_bytes} (--max_upload_mb)",
                code="upload_too_large",
            )
        upload.file.seek(0)
        data = await upload.read()
        out = {k: v for k, v in form.items() if isinstance(v, str) and not k.startswith("timestamp_granularities")}
        out["timestamp_granularities"] = [
            *form.getlist("timestamp_granularities[]"),
            *form.getlist("timestamp_granularities"),
        ]
        out["file"] = (upload.filename or "", data)
        return out
    finally:
        await form.close()


async def _wait(request, scheduler: Scheduler, job: Job, timeout: float) -> dict:
    """The job's result; it is cancelled (rows freed) if the client goes away or time runs out."""
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=min(0.25, max(0.0, deadline - time.monotonic())))
            if done:
                return future.result()
            if time.monotonic() >= deadline:
                raise ApiError(
                    504,
                    f"the transcription took longer than {timeout:g} s (--timeout); it was stopped",
                    "timeout_error",
                    code="timeout",
                )
            if await request.is_disconnected():
                raise asyncio.CancelledError()
    except asyncio.CancelledError:
        scheduler.cancel(job)
        raise
    except ApiError:
        scheduler.cancel(job)
        raise
    except AudioError as e:
        raise ApiError(400, str(e), param="file") from None
    except RuntimeError as e:
        raise ApiError(500, str(e), "server_error") from None
