"""What whisper-serve is doing: Prometheus metrics at /metrics and a log line per request.

`Observe` is plain ASGI middleware (it sees the whole response, streamed or not, and hides no
client disconnect from the endpoint). Each HTTP request gets an id: the client's `X-Request-Id`
when it sends a usable one, else a new one; it is returned in the response's `X-Request-Id` and
written in the request's log line (logger `whisper_max.serve.access`) with the method, path,
status, duration, model and audio seconds; `--log_json` makes every line a JSON object
(python-json-logger). The endpoints tell the middleware the model and audio length through the
request's state (`model`, `audio_seconds`, `error_code`).

Metrics (prometheus-client, a registry per app):
- from the requests: `whisper_requests_total` {endpoint, model, status},
  `whisper_request_duration_seconds` {endpoint, model}, `whisper_request_audio_seconds` {model},
  `whisper_request_real_time_factor` {model} (seconds taken per second of audio, answered
  requests), `whisper_request_errors_total` {endpoint, model, code} (OpenAI's error code, else
  the error type);
- read from each model's scheduler at scrape time: `whisper_model_loaded` {model}, and for a
  loaded model `whisper_queue_depth` (admitted, waiting for a slot), `whisper_active_requests`,
  `whisper_rows_in_flight`, `whisper_live_streams`, `whisper_decoder_calls_total`,
  `whisper_decoder_rows_total` (rows per call = rows / calls), `whisper_encoder_windows_total`,
  `whisper_failed_windows_total`, `whisper_served_total`, `whisper_failed_total`; and the
  registry's `whisper_model_loads_total` and `whisper_model_evictions_total`. A model's counts
  start again from 0 when it is evicted and loaded again (a counter reset, which Prometheus'
  rate() allows for).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from ..extras import require

require("prometheus_client", "server", "whisper-serve (/metrics)")
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402

from .registry import Registry  # noqa: E402

log = logging.getLogger("whisper_max.serve.access")

_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # a client's request id that is safe to log and return
_AUDIO_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """The app's Prometheus registry: request metrics observed by Observe, engine metrics read
    from `registry` at each scrape."""

    def __init__(self, registry: Registry):
        self.prom = CollectorRegistry()
        self.requests = Counter(
            "whisper_requests", "HTTP requests answered", ["endpoint", "model", "status"], registry=self.prom
        )
        self.duration = Histogram(
            "whisper_request_duration_seconds",
            "seconds from a request's arrival to the end of its answer",
            ["endpoint", "model"],
            buckets=_SECONDS_BUCKETS,
            registry=self.prom,
        )
        self.audio = Histogram(
            "whisper_request_audio_seconds",
            "seconds of audio a request sent",
            ["model"],
            buckets=_AUDIO_BUCKETS,
            registry=self.prom,
        )
        self.rtf = Histogram(
            "whisper_request_real_time_factor",
            "seconds a request took per second of its audio (answered requests)",
            ["model"],
            buckets=_RTF_BUCKETS,
            registry=self.prom,
        )
        self.errors = Counter(
            "whisper_request_errors",
            "requests answered with an error, by OpenAI's error code (else its type)",
            ["endpoint", "model", "code"],
            registry=self.prom,
        )
        self.prom.register(_Engines(registry))

    def scrape(self) -> tuple[bytes, str]:
        return generate_latest(self.prom), CONTENT_TYPE_LATEST


class _Engines:
    """A collector of each model's scheduler counts, read when scraped."""

    GAUGES = {
        "queue_depth": ("waiting", "requests admitted and waiting for a slot"),
        "active_requests": ("active", "requests decoding"),
        "rows_in_flight": ("live_rows", "decoder rows of the running windows"),
        "live_streams": ("live_streams", "live streams open"),
    }
    COUNTERS = {
        "decoder_calls": ("decoder_calls", "decoder calls"),
        "decoder_rows": ("rows_decoded", "rows those decoder calls decoded"),
        "encoder_windows": ("windows", "30 s windows encoded"),
        "failed_windows": ("failed_windows", "windows whose decoding failed"),
        "served": ("served", "requests answered with a transcript"),
        "failed": ("failed", "requests and live streams that failed"),
    }

    def __init__(self, registry: Registry):
        self.registry = registry

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        stats = self.registry.stats()
        loaded = GaugeMetricFamily("whisper_model_loaded", "1 when the model is resident", labels=["model"])
        gauges = {n: GaugeMetricFamily(f"whisper_{n}", doc, labels=["model"]) for n, (_, doc) in self.GAUGES.items()}
        counters = {
            n: CounterMetricFamily(f"whisper_{n}", doc, labels=["model"]) for n, (_, doc) in self.COUNTERS.items()
        }
        for model, counts in stats["models"].items():
            loaded.add_metric([model], 1.0 if counts["loaded"] else 0.0)
            if not counts["loaded"]:
                continue
            for n, (key, _) in self.GAUGES.items():
                gauges[n].add_metric([model], counts[key])
            for n, (key, _) in self.COUNTERS.items():
                counters[n].add_metric([model], counts[key])
        yield loaded
        yield from gauges.values()
        yield from counters.values()
        yield CounterMetricFamily("whisper_model_loads", "models loaded (at start and on first use)", stats["loads"])
        yield CounterMetricFamily("whisper_model_evictions", "resident models unloaded for another", stats["evictions"])


class Observe:
    """ASGI middleware: the request id, the log line and the request metrics of every HTTP request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        status, recorded = [500], [False]

        def record() -> None:
            if not recorded[0]:
                recorded[0] = True
                self._record(scope, state, request_id, status[0], time.monotonic() - start)

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the client has the whole answer: a scrape after it counts it
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            record()  # no whole answer was sent (the client went away, or an error)

    def _record(self, scope, state: dict, request_id: str, status: int, seconds: float) -> None:
        path = scope["path"]
        model, audio = state.get("model", ""), state.get("audio_seconds")
        log.info(
            "%s %s %s %d %.3f s model=%s audio=%s",
            request_id,
            scope["method"],
            path,
            status,
            seconds,
            model or "-",
            "-" if audio is None else f"{audio:.2f}",
            extra={
                "request_id": request_id,
                "method": scope["method"],
                "path": path,
                "status": status,
                "duration_s": round(seconds, 4),
                "model": model or None,
                "audio_s": None if audio is None else round(audio, 3),
            },
        )
        if not path.startswith("/v1/audio/"):
            return
        m = self.metrics
        m.requests.labels(path, model, str(status)).inc()
        m.duration.labels(path, model).observe(seconds)
        if audio is not None:
            m.audio.labels(model).observe(audio)
            if status == 200 and audio > 0:
                m.rtf.labels(model).observe(seconds / audio)
        if status >= 400:
            m.errors.labels(path, model, state.get("error_code") or str(status)).inc()


def json_logs() -> None:
    """Every log line of the process as one JSON object (python-json-logger), on standard error."""
    require("pythonjsonlogger", "server", "whisper-serve --log_json")
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{", timestamp=False))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
