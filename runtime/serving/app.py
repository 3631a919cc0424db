"""OpenAI's audio API as an ASGI app (FastAPI): whisper-serve's.

The app reads and checks uploads (serving.protocol), finds the model a request names in the
registry (serving.registry: several models, each loaded on first use, its own engine and request
scheduler), hands the request to that model's scheduler (serving.scheduler: the windows of
concurrent requests decode in the same decoder calls) and waits for it; a request that times out
or whose client goes away is cancelled and its rows are freed. Admission is bounded: past
`max_active + queue_size` requests on a model, a 429 with Retry-After. Needs FastAPI and
python-multipart (the `server` extra); any ASGI server runs it. `/metrics` is Prometheus', and
every HTTP request gets an id and a log line (serving.observe).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from ..extras import require

require("fastapi", "server", "whisper-serve")
require("python_multipart", "server", "whisper-serve (uploads)")
from fastapi import FastAPI, Request, WebSocket  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402

from ..audio import SAMPLE_RATE, AudioError  # noqa: E402
from ..stream import SegmentDone  # noqa: E402
from .observe import Metrics, Observe  # noqa: E402
from .protocol import (  # noqa: E402
    FIELDS,
    ApiError,
    Settings,
    delta_event,
    done_event,
    error_body,
    model_card,
    options_for,
    read_upload,
    render,
    sse,
    wants_stream,
)
from .realtime import serve_session  # noqa: E402
from .registry import AllBusy, Registry, UnknownModel  # noqa: E402
from .scheduler import Busy, Job, Scheduler  # noqa: E402

# --- the app ------------------------------------------------------------------------------------


def create_app(models, settings: Settings = Settings(), model_id: str | None = None):
    """The ASGI app serving `models`: a serving.registry.Registry, or one loaded model (a
    runtime.api.Whisper or WhisperModel; `model_id` names it, by default its package's name)."""
    if isinstance(models, Registry):
        registry = models
    else:
        model_id = model_id or Path(str(models.package.path)).name.removesuffix(".maxpkg")
        registry = Registry.of(
            models,
            model_id,
            max_active=settings.max_active,
            queue_size=settings.queue_size,
            max_live=settings.max_live,
        )

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:  # uvicorn has waited for in-flight requests (graceful shutdown)
            await asyncio.to_thread(registry.stop)

    app = FastAPI(title="whisper-serve", lifespan=lifespan)
    app.state.registry = registry
    app.state.metrics = metrics = Metrics(registry)
    _error_handlers(app)
    app.add_middleware(_Guard, settings=settings, registry=registry)
    app.add_middleware(Observe, metrics=metrics)  # outermost: it sees the guard's answers too

    @app.get("/health")
    async def health():
        if registry.draining:  # a load balancer takes the server out of rotation
            return JSONResponse({"status": "draining", **registry.stats()}, status_code=503)
        return {"status": "ok", **registry.stats()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = await asyncio.to_thread(metrics.scrape)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models_list():
        return {"object": "list", "data": [model_card(i) for i in registry.ids]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        return model_card(_model_id(registry, name))

    async def audio(request: Request, task: str):
        form = await _form(request, settings.max_upload_bytes)
        model_id = _model_id(registry, form.get("model"))
        request.state.model = model_id
        model = await asyncio.to_thread(_loaded, registry, model_id)
        options, fmt, granularities = options_for(model, settings, task, form)
        streamed = wants_stream(form, fmt, task)
        samples = await asyncio.to_thread(read_upload, form["file"][1], form["file"][0], settings.max_audio_seconds)
        request.state.audio_seconds = len(samples) / SAMPLE_RATE
        if streamed:
            return await _streamed(registry, model_id, samples, options, settings.timeout)
        job, scheduler = await asyncio.to_thread(_submit, registry, model_id, samples, options)
        result = await _wait(request, scheduler, job, settings.timeout)
        task = "translate" if task == "translate" else "transcribe"
        body = render(model, result, fmt, granularities, task, len(samples) / SAMPLE_RATE)
        return JSONResponse(body) if isinstance(body, dict) else PlainTextResponse(body)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio(request, "translate")

    @app.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket):
        await serve_session(websocket, registry, settings)

    return app


def _error_handlers(app) -> None:
    """Every error as OpenAI's error object: ours, FastAPI's HTTP errors and validation errors."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        request.state.error_code = e.code or e.type
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        request.state.error_code = "http_error"
        return _error(
            e.status_code,
            str(e.detail),
            "invalid_request_error" if e.status_code < 500 else "server_error",
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _error(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))


def _model_id(registry: Registry, name: str | None) -> str:
    """The served model a request names (an id or an alias: whisper-1), else 400 (none) or 404."""
    if not name:
        raise ApiError(
            400,
            "the form has no 'model' field; send a served model's id (see GET /v1/models) or whisper-1",
            param="model",
        )
    try:
        return registry.resolve(name)
    except UnknownModel:
        served = ", ".join(repr(i) for i in registry.ids)
        raise ApiError(
            404,
            f"model {name!r} is not served here; this server serves {served} (or whisper-1 for the first)",
            param="model",
            code="model_not_found",
        ) from None


def _loaded(registry: Registry, model_id: str):
    """The model (loaded now if it is not resident), or 503 when it cannot be loaded now."""
    try:
        return registry.model(model_id)
    except AllBusy as e:
        raise _all_busy(e, model_id) from None
    except Exception as e:  # a package that no longer loads (moved, not trusted, ...), or shutting down
        raise ApiError(503, f"{model_id} cannot be loaded: {e}", "server_error", code="model_unavailable") from None


def _submit(registry: Registry, model_id: str, samples, options, on_event=None) -> tuple[Job, Scheduler]:
    """The request admitted on its model's scheduler, or 429 with Retry-After when that is full."""
    try:
        return registry.submit(model_id, samples, options, on_event)
    except Busy as e:
        retry = max(1, math.ceil(e.latency))
        raise ApiError(
            429,
            f"the server is busy ({e.capacity} requests admitted on {model_id}); retry in {retry} s",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        ) from None
    except AllBusy as e:
        raise _all_busy(e, model_id) from None


def _all_busy(e: AllBusy, model_id: str) -> ApiError:
    return ApiError(
        503,
        f"{model_id} is not loaded and the {len(e.resident)} models resident ({', '.join(e.resident)}) all have "
        "requests in flight (--max_models); retry shortly",
        "server_error",
        code="models_busy",
        headers={"Retry-After": "5"},
    )


class _Guard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from
    the endpoint): a server that is draining (SIGTERM), the API key on /v1/, and a declared
    upload size over the limit, answered before the body is read."""

    def __init__(self, app, settings: Settings, registry: Registry):
        self.app, self.settings, self.registry = app, settings, registry

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            key, limit = self.settings.api_key, self.settings.max_upload_bytes
            length = headers.get("content-length", "")
            if self.registry.draining and scope["path"].startswith("/v1/"):
                scope.setdefault("state", {})["error_code"] = "shutting_down"
                message = "the server is shutting down: it finishes the requests in flight and takes no more"
                return await _error(503, message, "server_error", code="shutting_down", headers={"Retry-After": "1"})(
                    scope, receive, send
                )
            if key and scope["path"].startswith("/v1/") and headers.get("authorization") != f"Bearer {key}":
                scope.setdefault("state", {})["error_code"] = "invalid_api_key"
                response = _error(
                    401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key"
                )
                return await response(scope, receive, send)
            if length.isdigit() and int(length) > limit:
                message = f"the upload is {int(length)} bytes; this server takes at most {limit} (--max_upload_mb)"
                scope.setdefault("state", {})["error_code"] = "upload_too_large"
                return await _error(413, message, code="upload_too_large", headers={"Connection": "close"})(
                    scope, receive, send
                )
        await self.app(scope, receive, send)


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


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


async def _streamed(registry: Registry, model_id: str, samples, options, timeout: float) -> StreamingResponse:
    """stream=true: the request is admitted (a 429 or 503 is still an HTTP error), then answered
    with server-sent events, OpenAI's: a transcript.text.delta per segment as the long-form loop
    decodes it, then transcript.text.done with the whole text; an error after the first byte
    is an `error` event. A client that goes away, or the timeout, cancels the request (its rows
    are freed)."""
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue = asyncio.Queue()

    def on_event(event) -> None:  # the scheduler's thread
        if isinstance(event, SegmentDone) and event.text.strip() and event.start != event.end:
            loop.call_soon_threadsafe(deltas.put_nowait, event.text)

    job, scheduler = await asyncio.to_thread(_submit, registry, model_id, samples, options, on_event)

    async def body():
        future = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + timeout
        try:
            while True:
                get = asyncio.ensure_future(deltas.get())
                done, _ = await asyncio.wait(
                    {get, future}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
                )
                if get in done:
                    yield sse(delta_event(get.result()))
                    continue
                get.cancel()
                if future not in done:
                    message = f"the transcription took longer than {timeout:g} s (--timeout); it was stopped"
                    yield sse({"type": "error", **error_body(message, "timeout_error", None, "timeout")})
                    return
                while not deltas.empty():
                    yield sse(delta_event(deltas.get_nowait()))
                try:
                    result = future.result()
                except Exception as e:  # noqa: BLE001 - after the first byte an error is an event
                    kind = "invalid_request_error" if isinstance(e, AudioError) else "server_error"
                    yield sse({"type": "error", **error_body(str(e), kind, None, None)})
                    return
                yield sse(done_event(result))
                return
        finally:
            if not job.future.done():
                scheduler.cancel(job)

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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
