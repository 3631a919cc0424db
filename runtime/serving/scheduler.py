"""The request scheduler of whisper-serve: one thread owns a model and its engine.

Every admitted request is a long-form stream (runtime.stream) on that engine, so the windows of
concurrent requests decode their next token in the same decoder call (continuous batching),
each getting the tokens it gets alone. `submit()` is thread-safe and bounded (Busy beyond
`max_active + queue_size`); `cancel()` frees a request's rows before the engine's next step.
A request whose window fails (its audio, or a bug its decoding meets) fails alone, with the
error, and the others go on (runtime.engine). Nothing here is HTTP: the server (serving.app, one
scheduler per resident model of its registry) and anything else that queues requests on one
engine use it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..engine import Engine
from ..live import LiveOptions, LiveTranscription
from ..options import TranscribeOptions
from ..stream import TranscriptionStream

# the engine's counts a scheduler publishes (stats() name: Engine attribute), summed over its engines
_ENGINE_COUNTS = {
    "decoder_calls": "calls",
    "rows_decoded": "rows_decoded",
    "windows": "windows",
    "failed_windows": "failed",
}


class DecodingFailed(RuntimeError):
    """A request's or live stream's decoding raised `cause` (a bug it met, not its audio)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"decoding failed: {cause!r}")
        self.cause = cause


class Busy(Exception):
    """The admission queue is full: `capacity` requests are admitted; one takes about `latency` s."""

    def __init__(self, capacity: int, latency: float):
        super().__init__(f"{capacity} requests admitted")
        self.capacity, self.latency = capacity, latency


@dataclass(eq=False)
class Job:
    """One admitted request: its samples (until its stream starts), options and result."""

    samples: np.ndarray
    options: TranscribeOptions
    future: Future
    stream: TranscriptionStream | None = None
    admitted: float = 0.0
    on_event: Callable[[object], None] | None = None  # the stream's events, in the scheduler's thread


class Scheduler:
    """Runs admitted requests on one engine in its own thread. `submit()` is thread-safe and
    returns a Future of the result dict; `cancel()` drops a request (its rows are freed before
    the engine's next step). Live streams (runtime.live) opened with `open_live()` decode their
    updates on the same engine, beside the requests."""

    def __init__(self, model, max_active: int = 8, queue_size: int = 32, max_rows: int = 64, max_live: int = 8):
        self.model, self.max_active, self.capacity = model, max_active, max_active + queue_size
        self.max_live = max_live
        self._lives: dict[LiveTranscription, TranscriptionStream | None] = {}  # the thread's: update in flight
        self._live_count = 0  # opened and not closed (under the lock)
        self._recheck = False  # a live stream's update ended: look at its audio before waiting
        self.engine = Engine(model, max_rows=max_rows)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # submitted and not yet answered
        self._waiting: deque[Job] = deque()
        self._active: dict[Job, TranscriptionStream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="whisper-engine", daemon=True)
        self.latency = 5.0  # seconds a request takes, smoothed: the Retry-After estimate
        self.served = 0
        self.failed = 0  # requests and live streams answered with an error
        self._retired = dict.fromkeys(_ENGINE_COUNTS, 0)  # the counts of engines replaced after a failure
        self._stats: dict = {}
        self._publish()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still admitted fail with RuntimeError."""
        self._stop.set()
        self._inbox.put(None)
        self._thread.join()

    def submit(
        self, samples: np.ndarray, options: TranscribeOptions, on_event: Callable[[object], None] | None = None
    ) -> Job:
        """Admit 16 kHz mono samples (float32, or int16 values to divide by 32768); Busy when
        `max_active + queue_size` requests are admitted already. `on_event` gets the stream's
        events (runtime.stream: SegmentDone as each segment is decoded, ...) in this scheduler's
        thread."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise Busy(self.capacity, self.latency)
            self._admitted += 1
        request = Job(samples, options, Future(), admitted=time.monotonic(), on_event=on_event)
        self._inbox.put(("start", request))
        return request

    def cancel(self, request: Job) -> None:
        self._inbox.put(("cancel", request))

    def open_live(self, options: LiveOptions, on_event: Callable[[object], None]) -> LiveTranscription:
        """A live stream decoded on this engine; `on_event` gets its events in this scheduler's
        thread, and an Exception event if it fails. Busy when `max_live` are open. Call
        `wake()` after appending audio and `close_live()` when its client is gone."""
        with self._lock:
            if self._live_count >= self.max_live:
                raise Busy(self.max_live, self.latency)
            self._live_count += 1
        live = LiveTranscription(self.model, options, on_event)
        self._inbox.put(("live", live))
        return live

    def close_live(self, live: LiveTranscription) -> None:
        self._inbox.put(("close_live", live))

    def wake(self) -> None:
        """New audio for a live stream: look at it before waiting again."""
        self._inbox.put(("wake", None))

    def stats(self) -> dict:
        """Counts as of the scheduler's last step (the engine is only read in its own thread)."""
        with self._lock:
            return {"admitted": self._admitted, "live_streams": self._live_count, **self._stats}

    def _publish(self) -> None:
        e = self.engine
        stats = {
            "active": len(self._active),
            "waiting": len(self._waiting),
            "live_rows": e.live_rows,
            **{name: getattr(e, attr) + self._retired[name] for name, attr in _ENGINE_COUNTS.items()},
            "served": self.served,
            "failed": self.failed,
        }
        with self._lock:
            self._stats = stats

    # --- the thread ---

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(block=not self.engine.busy and not self._waiting and not self._recheck)
            self._admit()
            self._live_updates()
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as e:  # not any one window's (each has its on_error): fail all, keep serving
                    for request in list(self._active):
                        self._done(request, error=DecodingFailed(e))
                    for live in list(self._lives):
                        self._live_failed(live, DecodingFailed(e))
                    for name, attr in _ENGINE_COUNTS.items():
                        self._retired[name] += getattr(self.engine, attr)
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
                    elif kind == "cancel":
                        self._drop(request)
                    elif kind == "live":
                        self._lives[request] = None
                    elif kind == "close_live":
                        self._close_live(request)
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
                stream = TranscriptionStream(self.model, samples, request.options, request.on_event)
            except Exception as e:
                self._done(request, error=e)
                continue
            request.samples = None  # the stream holds its log-mel
            self._active[request] = stream
            self.engine.submit(
                stream,
                lambda s, r=request: self._done(r, result=s.result),
                lambda e, r=request: self._done(r, error=DecodingFailed(e)),
            )

    def _live_updates(self) -> None:
        """Each live stream's next update, on the engine, when it has enough new audio."""
        self._recheck = False
        for live, in_flight in list(self._lives.items()):
            if in_flight is not None:
                continue
            try:
                update = live.next_update()
            except Exception as e:  # its audio (NaN samples): that stream alone ends
                self._live_failed(live, e)
                continue
            if live.finished:
                self._close_live(live)
            elif update is not None:
                self._lives[live] = update
                self.engine.submit(
                    update,
                    lambda s, live=live: self._live_done(live, s),
                    lambda e, live=live: self._live_failed(live, DecodingFailed(e)),
                )

    def _live_done(self, live: LiveTranscription, stream: TranscriptionStream) -> None:
        if live in self._lives:
            self._lives[live] = None
            self._recheck = True  # audio that came meanwhile may make its next update
            live.update(stream)
            if live.finished:
                self._close_live(live)

    def _live_failed(self, live: LiveTranscription, error: Exception) -> None:
        """That live stream alone ends, its client told."""
        if live not in self._lives:
            return  # closed meanwhile
        self._lives[live] = None  # its update is over (failed), nothing to cancel
        self.failed += 1
        live.fail(error)
        self._close_live(live)

    def _close_live(self, live: LiveTranscription) -> None:
        if live not in self._lives:
            return
        in_flight = self._lives.pop(live)
        if in_flight is not None:
            self.engine.cancel(in_flight)
        with self._lock:
            self._live_count -= 1

    def _drop(self, request: Job) -> None:
        if request in self._waiting:
            self._waiting.remove(request)
        elif request in self._active:
            self.engine.cancel(self._active[request])
        else:
            return  # already answered
        self._done(request, error=asyncio.CancelledError())

    def _done(self, request: Job, result: dict | None = None, error: BaseException | None = None) -> None:
        self._active.pop(request, None)
        with self._lock:
            self._admitted -= 1
        if error is None:
            self.served += 1
            self.latency = 0.8 * self.latency + 0.2 * (time.monotonic() - request.admitted)
            request.future.set_result(result)
        elif not request.future.done():
            if not isinstance(error, asyncio.CancelledError):
                self.failed += 1
            request.future.set_exception(error)
