"""whisper-serve: OpenAI's audio transcription API, one engine per model.

    whisper-serve tiny.en base --port 8000
    curl -F file=@jfk.wav -F model=base http://127.0.0.1:8000/v1/audio/transcriptions

The app is runtime.serving's (its registry serves the models by id; whisper-1 names the first);
this is the command that resolves the models, loads them and runs the app on uvicorn until
SIGTERM. Needs the `server` extra: without it the command says which package is missing and how
to install it, in one line.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import typer

from .cliutil import ModelDir, Trust, run_app
from .extras import require
from .flags import with_flags


def serve(
    packages,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings=None,
    trust: bool = False,
    log_level: str = "info",
    model_dir: str | Path | None = None,
    log_json: bool = False,
) -> int:
    """Serve `packages` (one, or a list: names, checkpoints or .maxpkg paths; a model's id is its
    package's name) until SIGTERM or SIGINT: drain (new requests and sessions get 503, /health
    says draining), finish the requests and live sessions in flight (at most `settings.timeout` +
    5 s), exit; a second signal exits at once.
    Every package is resolved (converted once if named) and vouched for at start; the first
    `settings.max_models` are loaded then, the rest on first use. Returns the exit code: 0 after
    SIGTERM, 130 after Ctrl-C. `settings`: a serving.protocol.Settings (its defaults if None).
    Each request is a log line with its id (serving.observe), instead of uvicorn's access log;
    `log_json`: every line of the log a JSON object."""
    from .api import load
    from .serving.app import Registry, Settings, create_app  # MissingExtra without the server extra

    uvicorn = require("uvicorn", "server", "whisper-serve")
    settings = Settings() if settings is None else settings

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
            if len(self.signals) > 1:  # a second signal: exit now
                self.should_exit = self.force_exit = True
            elif not registry.draining:
                registry.drain()
                threading.Thread(target=self._drained, args=(sig,), name="whisper-serve-drain", daemon=True).start()

        def _drained(self, sig) -> None:
            deadline = time.monotonic() + settings.timeout + 5
            while not registry.idle and time.monotonic() < deadline:
                time.sleep(0.1)
            self.handle_exit(sig, None)  # uvicorn's graceful shutdown: nothing is in flight now

    registry = Registry(
        _resolve(packages if isinstance(packages, (list, tuple)) else [packages], trust, model_dir),
        lambda path: load(path, trust=True),  # vouched for above
        max_resident=settings.max_models,
        max_active=settings.max_active,
        queue_size=settings.queue_size,
        max_live=settings.max_live,
    )
    if log_json:
        from .serving.observe import json_logs

        json_logs()
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # uvicorn's look
    logging.getLogger("whisper_max").setLevel(log_level.upper())
    registry.preload()
    config = uvicorn.Config(
        create_app(registry, settings),
        host=host,
        port=port,
        log_level=log_level,
        log_config=None if log_json else uvicorn.config.LOGGING_CONFIG,
        access_log=False,  # serving.observe logs each request, with its id
        timeout_graceful_shutdown=int(settings.timeout) + 5,
    )
    server = Server(config)
    server.run()
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (see the log above)")
    return 130 if signal.SIGINT in server.signals else 0


def _resolve(models: list, trust: bool, model_dir) -> dict[str, Path]:
    """Model id -> package for each model given: converted once if named (runtime.models), its
    compiled program vouched for (runtime.trust). Two models of one id are refused."""
    from .models import resolve
    from .package import Package

    out: dict[str, Path] = {}
    for model in models:
        path = resolve(model, model_dir)
        model_id = path.name.removesuffix(".maxpkg")
        if model_id in out:
            raise ValueError(f"{model}: a second model with the id {model_id!r} ({out[model_id]}); serve each once")
        Package.open(path).check_trusted(trust)
        out[model_id] = path
    return out


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0])


@app.command()
@with_flags(("beam_size", "best_of"))
def serve_cmd(
    models: list[str] = typer.Argument(
        ...,
        help=(
            "one or more models: names (tiny.en, base, ...; converted once into the cache), .pt checkpoints, "
            "CTranslate2 folders or .maxpkg files; a request's `model` field picks one by its package's name "
            "(whisper-1: the first)"
        ),
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    api_key: str | None = typer.Option(
        None,
        "--api_key",
        envvar="WHISPER_MAX_API_KEY",
        help="require Authorization: Bearer KEY on /v1/ (also WHISPER_MAX_API_KEY)",
    ),
    max_upload_mb: float = typer.Option(
        100.0, "--max_upload_mb", min=0.001, help="largest upload accepted (413 beyond)"
    ),
    max_audio_seconds: float = typer.Option(
        3600.0, "--max_audio_seconds", min=1, help="longest audio accepted (400 beyond)"
    ),
    max_active: int = typer.Option(
        8, "--max_active", min=1, help="requests decoding at once (their rows share decoder calls)"
    ),
    queue_size: int = typer.Option(
        32, "--queue_size", min=0, help="requests waiting for a place; beyond, 429 with Retry-After"
    ),
    max_live: int = typer.Option(
        8, "--max_live", min=1, help="live streams (Realtime transcription items) at once per model; beyond, refused"
    ),
    live_min_chunk: float = typer.Option(
        1.0,
        "--live_min_chunk",
        min=0.1,
        help="seconds of new audio before a live item is decoded again (lower: sooner text, more work)",
    ),
    timeout: float = typer.Option(600.0, "--timeout", min=1, help="seconds a request may take (504 beyond)"),
    max_models: int | None = typer.Option(
        None,
        "--max_models",
        min=1,
        help=(
            "models loaded at once (default: all); others load on first use, unloading the least recently used idle one"
        ),
    ),
    model_dir: ModelDir = None,
    trust: Trust = False,
    log_level: str = typer.Option("info", "--log_level", help="uvicorn's and the request log's level"),
    log_json: bool = typer.Option(False, "--log_json", help="every log line a JSON object (request lines too)"),
    flags: dict | None = None,
) -> None:
    beams, best = flags["beam_size"], flags["best_of"]
    if any(v is not None and v < 1 for v in (beams, best)):
        raise typer.BadParameter(f"--beam_size {beams} / --best_of {best}: a positive integer or None")
    from .serving.protocol import Settings

    settings = Settings(
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_audio_seconds=max_audio_seconds,
        max_active=max_active,
        queue_size=queue_size,
        max_live=max_live,
        live_min_chunk=live_min_chunk,
        timeout=timeout,
        max_models=max_models,
        api_key=api_key or None,
        beam_size=beams,
        best_of=best,
    )
    raise typer.Exit(serve(models, host, port, settings, trust, log_level, model_dir, log_json))


def main(argv: list[str] | None = None) -> int:
    import sys

    from .package import PackageError

    return run_app(app, sys.argv[1:] if argv is None else argv, "whisper-serve", (PackageError, OSError, ValueError))


def run() -> None:
    import sys

    sys.exit(main())


if __name__ == "__main__":
    run()
