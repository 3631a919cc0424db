"""whisper-serve: OpenAI's audio transcription API on one engine.

    whisper-serve tiny.en.maxpkg --port 8000
    curl -F file=@jfk.wav -F model=whisper-1 http://127.0.0.1:8000/v1/audio/transcriptions

One thread (the Scheduler) owns the model and its engine: every admitted request is a long-form
stream (runtime.stream) on that engine, so the windows of concurrent requests decode their next
token in the same decoder call (continuous batching), each getting the tokens it gets alone.
The HTTP side (FastAPI on uvicorn) reads and checks uploads, hands streams to the scheduler and
waits for them; a request that times out or whose client goes away is cancelled and its rows
are freed. Admission is bounded: past `max_active + queue_size` requests a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import queue
import signal
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .audio import SAMPLE_RATE, AudioError, read_audio
from .engine import Engine
from .options import TranscribeOptions
from .stream import TranscriptionStream
from .writers import write_srt, write_vtt

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]", "timestamp_granularities"}
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


class Busy(Exception):
    """The admission queue is full."""


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


# --- the scheduler: one thread owns the model and the engine ------------------------------------


@dataclass(eq=False)
class _Request:
    samples: np.ndarray
    options: TranscribeOptions
    future: Future
    stream: TranscriptionStream | None = None
    admitted: float = 0.0


class Scheduler:
    """Runs admitted requests on one engine in its own thread. `submit()` is thread-safe and
    returns a Future of the result dict; `cancel()` drops a request (its rows are freed before
    the engine's next step)."""

    def __init__(self, model, max_active: int = 8, queue_size: int = 32, max_rows: int = 64):
        self.model, self.max_active, self.capacity = model, max_active, max_active + queue_size
        self.engine = Engine(model, max_rows=max_rows)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # submitted and not yet answered
        self._waiting: deque[_Request] = deque()
        self._active: dict[_Request, TranscriptionStream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="whisper-engine", daemon=True)
        self.latency = 5.0  # seconds a request takes, smoothed: the Retry-After estimate
        self.served = 0
        self._stats: dict = {}
        self._publish()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still admitted fail with RuntimeError."""
        self._stop.set()
        self._inbox.put(None)
        self._thread.join()

    def submit(self, samples: np.ndarray, options: TranscribeOptions) -> _Request:
        """Admit 16 kHz mono samples (float32, or int16 values to divide by 32768); Busy when
        `max_active + queue_size` requests are admitted already."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise Busy()
            self._admitted += 1
        request = _Request(samples, options, Future(), admitted=time.monotonic())
        self._inbox.put(("start", request))
        return request

    def cancel(self, request: _Request) -> None:
        self._inbox.put(("cancel", request))

    def stats(self) -> dict:
        """Counts as of the scheduler's last step (the engine is only read in its own thread)."""
        with self._lock:
            return {"admitted": self._admitted, **self._stats}

    def _publish(self) -> None:
        e = self.engine
        stats = {"active": len(self._active), "live_rows": e.live_rows, "decoder_calls": e.calls, "rows_decoded": e.rows_decoded, "served": self.served}
        with self._lock:
            self._stats = stats

    # --- the thread ---

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=not self.engine.busy and not self._waiting)
            self._admit()
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as e:  # a bug in decoding: fail what was running, keep serving
                    for request in list(self._active):
                        self._done(request, error=RuntimeError(f"decoding failed: {e!r}"))
                    self.engine = Engine(self.model, max_rows=self.engine.max_rows)
            self._publish()
        for request in [*self._active, *self._waiting]:
            self._done(request, error=RuntimeError("the server is shutting down"))

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    kind, request = item
                    if kind == "start":
                        self._waiting.append(request)
                    else:
                        self._drop(request)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_active:
            request = self._waiting.popleft()
            try:
                samples = request.samples
                if samples.dtype == np.int16:  # read_upload's: 16-bit values, as read_audio's / 32768
                    samples = samples.astype(np.float32) / np.float32(32768)
                stream = TranscriptionStream(self.model, samples, request.options)
            except Exception as e:
                self._done(request, error=e)
                continue
            request.samples = None  # the stream holds its log-mel
            self._active[request] = stream
            self.engine.submit(stream, lambda s, r=request: self._done(r, result=s.result))

    def _drop(self, request: _Request) -> None:
        if request in self._waiting:
            self._waiting.remove(request)
        elif request in self._active:
            self.engine.cancel(self._active[request])
        else:
            return  # already answered
        self._done(request, error=asyncio.CancelledError())

    def _done(self, request: _Request, result: dict | None = None, error: BaseException | None = None) -> None:
        self._active.pop(request, None)
        with self._lock:
            self._admitted -= 1
        if error is None:
            self.served += 1
            self.latency = 0.8 * self.latency + 0.2 * (time.monotonic() - request.admitted)
            request.future.set_result(result)
        elif not request.future.done():
            request.future.set_exception(error)


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
                    raise ApiError(400, f"{filename}: the audio is longer than this server takes ({max_seconds:g} s, --max_audio_seconds)", param="file")
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
        raise ApiError(400, f"timestamp_granularities {sorted(granularities)}: use segment and/or word", param="timestamp_granularities[]")
    if granularities and fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities needs response_format verbose_json", param="timestamp_granularities[]")
    language = form.get("language") or None
    if not model.is_multilingual:
        if task == "translate":
            raise ApiError(400, "this server's model is English-only: it cannot translate; serve a multilingual package (base, small, ...) for translations", param="model")
        if language not in (None, "en", "english"):
            raise ApiError(400, f"language {language!r}: this server's model is English-only", param="language")
    elif language is not None:
        try:
            language = model.tokenizer.language_code(language)
        except ValueError as e:
            raise ApiError(400, str(e), param="language") from None
    temperature = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # OpenAI's 0 and openai-whisper's default: fallback
    if form.get("temperature") not in (None, ""):
        try:
            t = float(form["temperature"])
        except ValueError:
            raise ApiError(400, f"temperature {form['temperature']!r}: a number between 0 and 1", param="temperature") from None
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
    if not model.is_multilingual:
        options = options.english_only()
    return options, fmt, granularities


def render(model, result: dict, fmt: str, granularities: set[str], task: str, duration: float):
    """The response body for `fmt`: a dict (JSON) or text."""
    if fmt == "json":
        return {"text": result["text"]}
    if fmt == "text":
        return result["text"]
    if fmt in ("srt", "vtt"):
        out = io.StringIO()
        (write_srt if fmt == "srt" else write_vtt)(result, out)
        return out.getvalue()
    keys = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob")
    body = {
        "task": task,
        "language": model.tokenizer.languages.get(result["language"], result["language"]),
        "duration": duration,
        "text": result["text"],
    }
    if not granularities or "segment" in granularities:
        body["segments"] = [{k: s[k] for k in keys} for s in result["segments"]]
    if "word" in granularities:
        body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"], "probability": w["probability"]} for s in result["segments"] for w in s.get("words", [])]
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

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error", headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _error(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

    app.add_middleware(_Guard, settings=settings)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id)]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name not in (model_id, *ALIASES):
            raise ApiError(404, f"model {name!r} is not served here; this server serves {model_id!r}", param="model", code="model_not_found")
        return _model_card(name)

    async def audio(request: Request, task: str):
        form = await _form(request, settings.max_upload_bytes)
        name = form.get("model")
        if not name:
            raise ApiError(400, "the form has no 'model' field; send the served model's id (see GET /v1/models) or whisper-1", param="model")
        if name not in (model_id, *ALIASES):
            raise ApiError(404, f"model {name!r} is not served here; this server serves {model_id!r} (or whisper-1)", param="model", code="model_not_found")
        options, fmt, granularities = options_for(model, settings, task, form)
        samples = await asyncio.to_thread(read_upload, form["file"][1], form["file"][0], settings.max_audio_seconds)
        try:
            job = scheduler.submit(samples, options)
        except Busy:
            retry = max(1, math.ceil(scheduler.latency))
            raise ApiError(
                429, f"the server is busy ({scheduler.capacity} requests admitted); retry in {retry} s", "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)}
            ) from None
        result = await _wait(request, scheduler, job, settings.timeout)
        body = render(model, result, fmt, granularities, "translate" if task == "translate" else "transcribe", len(samples) / SAMPLE_RATE)
        return JSONResponse(body) if isinstance(body, dict) else PlainTextResponse(body)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio(request, "translate")

    return app


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
                response = _error(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
                return await response(scope, receive, send)
            if length.isdigit() and int(length) > limit:
                message = f"the upload is {int(length)} bytes; this server takes at most {limit} (--max_upload_mb)"
                return await _error(413, message, code="upload_too_large", headers={"Connection": "close"})(scope, receive, send)
        await self.app(scope, receive, send)


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status, headers=headers)


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
            raise ApiError(400, f"unknown form field(s) {unknown}; this endpoint takes {sorted(FIELDS)}", param=unknown[0])
        upload = form.get("file")
        if upload is None:
            raise ApiError(400, "the form has no 'file' field; send the audio as a file in a field named 'file'", param="file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "'file' is a text field; send the audio as a file (multipart with a filename)", param="file")
        size = upload.file.seek(0, os.SEEK_END)  # spooled to disk past 1 MB: measured before it is read in
        if size > max_bytes:  # a chunked upload declares no length; it is caught here
            raise ApiError(413, f"the upload is {size} bytes; this server takes at most {max_bytes} (--max_upload_mb)", code="upload_too_large")
        upload.file.seek(0)
        data = await upload.read()
        out = {k: v for k, v in form.items() if isinstance(v, str) and not k.startswith("timestamp_granularities")}
        out["timestamp_granularities"] = [*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities")]
        out["file"] = (upload.filename or "", data)
        return out
    finally:
        await form.close()


async def _wait(request, scheduler: Scheduler, job: _Request, timeout: float) -> dict:
    """The job's result; it is cancelled (rows freed) if the client goes away or time runs out."""
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=min(0.25, max(0.0, deadline - time.monotonic())))
            if done:
                return future.result()
            if time.monotonic() >= deadline:
                raise ApiError(504, f"the transcription took longer than {timeout:g} s (--timeout); it was stopped", "timeout_error", code="timeout")
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


# --- the command --------------------------------------------------------------------------------


def serve(package: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: Settings = Settings(), trust: bool = False, log_level: str = "info", model_dir: str | Path | None = None) -> int:
    """Load `package` and serve it until SIGTERM or SIGINT: stop accepting, finish the requests in
    flight, exit. Returns the exit code: 0 after SIGTERM, 130 after Ctrl-C."""
    import uvicorn

    from . import load

    class Server(uvicorn.Server):
        signals: list[int] = []

        @contextmanager
        def capture_signals(self):  # uvicorn's re-raises the signal after shutdown: exit 0 instead
            previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _stop(self, sig, frame):
            self.signals.append(sig)
            self.handle_exit(sig, frame)  # a second Ctrl-C forces the exit

    model = load(package, trust=trust, model_dir=model_dir)
    config = uvicorn.Config(create_app(model, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(settings.timeout) + 5)
    server = Server(config)
    server.run()
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (see the log above)")
    return 130 if signal.SIGINT in server.signals else 0


def main(argv: list[str] | None = None) -> int:
    import sys

    import typer

    from .cliutil import run_app
    from .package import PackageError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])

    @app.command()
    def serve_cmd(
        package: str = typer.Argument(..., help="a model name (tiny.en, base, ...; converted once into the cache), a .pt checkpoint, a CTranslate2 folder, or a .maxpkg"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default)"),
        port: int = typer.Option(8000, "--port", help="port to listen on"),
        api_key: str | None = typer.Option(None, "--api-key", envvar="WHISPER_MAX_API_KEY", help="require Authorization: Bearer KEY on /v1/ (also WHISPER_MAX_API_KEY)"),
        max_upload_mb: float = typer.Option(100.0, "--max_upload_mb", min=0.001, help="largest upload accepted (413 beyond)"),
        max_audio_seconds: float = typer.Option(3600.0, "--max_audio_seconds", min=1, help="longest audio accepted (400 beyond)"),
        max_active: int = typer.Option(8, "--max_active", min=1, help="requests decoding at once (their rows share decoder calls)"),
        queue_size: int = typer.Option(32, "--queue_size", min=0, help="requests waiting for a place; beyond, 429 with Retry-After"),
        timeout: float = typer.Option(600.0, "--timeout", min=1, help="seconds a request may take (504 beyond)"),
        beam_size: str = typer.Option("5", "--beam_size", help="beams at temperature 0 (whisper-run's default); None: greedy"),
        best_of: str = typer.Option("5", "--best_of", help="samples at temperature > 0; None: one"),
        model_dir: Path | None = typer.Option(None, "--model_dir", help="where packages made from model names are kept (default: $XDG_CACHE_HOME/whisper-max/models)"),
        trust: bool = typer.Option(False, "--trust", help="run a package compiled elsewhere (its model.mef is machine code)"),
        log_level: str = typer.Option("info", "--log_level", help="uvicorn's log level"),
    ) -> None:
        beams, best = (None if v.lower() == "none" else int(v) for v in (beam_size, best_of))
        if any(v is not None and v < 1 for v in (beams, best)):
            raise typer.BadParameter(f"--beam_size {beam_size} / --best_of {best_of}: a positive integer or None")
        settings = Settings(
            max_upload_bytes=int(max_upload_mb * 2**20),
            max_audio_seconds=max_audio_seconds,
            max_active=max_active,
            queue_size=queue_size,
            timeout=timeout,
            api_key=api_key or None,
            beam_size=beams,
            best_of=best,
        )
        raise typer.Exit(serve(package, host, port, settings, trust, log_level, model_dir))

    return run_app(app, sys.argv[1:] if argv is None else argv, "whisper-serve", (PackageError, OSError, ValueError))


def run() -> None:
    import sys

    sys.exit(main())


if __name__ == "__main__":
    run()
