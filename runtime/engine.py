"""The engine: one loaded program that decodes the windows of any number of streams, the rows of
all of them in one decoder call per token (continuous batching).

    engine = Engine(model)
    engine.submit(stream, on_done=lambda s: print(s.result.text))   # any time, any number
    while engine.busy:
        engine.step()

A window joins when it is submitted (its encoder and prompt run at once, then its rows wait
for the next call) and leaves at end-of-text; rows of different windows are at different
positions, with different prompts and options. Beams and best-of samples of one window share
its cross-attention values. Each row computes exactly what it computes alone: the decoder_rows
graph (passes.engine_rows) runs every row's sums over its own positions and window in the
same order whatever else is in the call.

A window that fails (its encoder, its decoding, what its stream does with the result) fails
alone: its stream's `on_error` gets the exception and the others go on. When the shared decoder
call itself raises, each window's step runs again alone (a row computes the same either way),
so only the windows that fail alone fail. Without an `on_error` the exception leaves step(),
after every other window has had its step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .decoding import DecodingOptions, DecodingResult, DecodingTask, Rows, Step


@dataclass(eq=False)
class _Job:
    """One window in the engine: its task (options), its rows once started, the Step it waits on."""

    mel: np.ndarray
    task: DecodingTask
    on_done: Callable[[DecodingResult], None]
    owner: object = None  # what cancel(owner) drops: the stream it decodes for
    on_error: Callable[[Exception], None] | None = None
    rows: Rows | None = None
    steps: object = None  # the task's window generator
    step: Step | None = None


class Engine:
    """Decodes windows submitted by any number of callers; `step()` does the next unit of work:
    starts the windows waiting (encoder, cross K/V, prompt; while there are rows to spare),
    then one decoder call for every running window's live rows. `max_rows` bounds the rows in
    one call (a window's beams or samples count each); windows beyond it wait their turn."""

    def __init__(self, model, max_rows: int = 64):
        if max_rows < 1:
            raise ValueError(f"max_rows {max_rows}: expected at least 1")
        self.model = model
        self.max_rows = max_rows
        self.pool = model.pool()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self.calls = 0  # decoder calls made for running rows
        self.rows_decoded = 0  # rows those calls decoded (rows per call = rows_decoded / calls)
        self.windows = 0  # windows started (encoder runs)
        self.failed = 0  # windows that failed
        self._errors: list[Exception] = []  # failures without an on_error, raised by step()

    # --- submitting ---

    def submit_window(
        self,
        mel: np.ndarray,
        options: DecodingOptions,
        on_done: Callable[[DecodingResult], None],
        owner: object = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Decode one (n_mels, 3000) log-mel window with `options`; `on_done(result)` is called
        from step() when it is done (it may submit more); `on_error(exception)` if it fails.
        `owner` tags it for cancel()."""
        task = DecodingTask(self.model, options)  # checks the options now, not at its turn
        self._waiting.append(_Job(np.asarray(mel, np.float32), task, on_done, owner, on_error))

    def submit(
        self,
        stream,
        on_done: Callable[[object], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Transcribe a runtime.stream.TranscriptionStream: each window it needs is decoded here
        and fed back, until it is done; then `on_done(stream)`. If a window fails, or the stream
        fails on its result, `on_error(exception)` and the stream is dropped (without `on_error`
        the exception leaves step())."""

        def fed(result: DecodingResult) -> None:
            stream.feed(result)
            follow()

        def follow() -> None:
            window = stream.next_window()
            if window is None:
                if on_done is not None:
                    on_done(stream)
            else:
                self.submit_window(window.mel, window.options, fed, owner=stream, on_error=on_error)

        follow()

    def cancel(self, owner: object) -> int:
        """Drop the windows of `owner` (a stream given to submit()): waiting ones leave the queue,
        running ones free their rows now; their on_done is never called. Call it between steps.
        Returns the number of windows dropped."""
        waiting = [j for j in self._waiting if j.owner is owner]
        for job in waiting:
            self._waiting.remove(job)
        running = [j for j in self._running if j.owner is owner]
        for job in running:
            self._finish(job)
            job.steps.close()
        return len(waiting) + len(running)

    @property
    def live_rows(self) -> int:
        """Rows of the running windows (each beam or sample is one)."""
        return sum(len(j.step.rows) for j in self._running)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def run(self) -> None:
        """Step until everything submitted (and submitted meanwhile) is done."""
        while self.busy:
            self.step()

    # --- working ---

    def step(self) -> None:
        while self._waiting and (not self._running or self.live_rows + self._waiting[0].task.n_group <= self.max_rows):
            self._start(self._waiting.popleft())
        if self._running:
            jobs = list(self._running)
            for job, choice in zip(jobs, self._choices(jobs)):
                if isinstance(choice, Exception):
                    self._fail(job, choice)
                else:
                    self._advance(job, choice)
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error

    def _choices(self, jobs: list[_Job]) -> list:
        """One decoder call for the jobs' rows (pool.step); the jobs of a call that raised run
        their step again alone: each gets its choice or the exception it raises alone."""
        choices = self.pool.step([(j.rows, j.step) for j in jobs])
        self.calls += 1
        if len(jobs) > 1:
            for i, job in enumerate(jobs):
                if isinstance(choices[i], Exception):
                    choices[i] = self.pool.step([(job.rows, job.step)])[0]
        self.rows_decoded += sum(len(j.step.rows) for j, c in zip(jobs, choices) if not isinstance(c, Exception))
        return choices

    def _start(self, job: _Job) -> None:
        self.windows += 1
        try:
            features = self.model.embed_audio(job.mel[None])
            cross = self.model.cross_kv(features)
            job.rows = self.pool.open(cross)
        except Exception as e:
            return self._fail(job, e)
        job.steps = job.task.window(job.rows, features, cross)
        self._running.append(job)
        self._advance(job, None)

    def _advance(self, job: _Job, choice: np.ndarray | None) -> None:
        try:
            job.step = next(job.steps) if choice is None else job.steps.send(choice)
        except StopIteration as done:
            self._finish(job)
            try:
                job.on_done(done.value)
            except Exception as e:  # the stream failed on the result: its error, not the engine's
                self._fail(job, e)
        except Exception as e:
            self._fail(job, e)
        except BaseException:
            self._finish(job)
            raise

    def _fail(self, job: _Job, error: Exception) -> None:
        """The job's window failed: its rows are freed, and its on_error told (or step() raises)."""
        self.failed += 1
        if job in self._running:
            self._finish(job)
        if job.steps is not None:
            job.steps.close()
        if job.on_error is not None:
            job.on_error(error)
        else:
            self._errors.append(error)

    def _finish(self, job: _Job) -> None:
        self._running.remove(job)
        job.rows.close()
        job.step = None


def decode(
    model, mel: np.ndarray, options: DecodingOptions = DecodingOptions(), engine: Engine | None = None, **kwargs
):
    """openai-whisper's `decode`: (n_mels, frames) or (batch, n_mels, frames) windows -> one
    DecodingResult or a list. The windows of a batch decode together, each as it would alone."""
    if kwargs:
        options = replace(options, **kwargs)
    single = mel.ndim == 2
    mels = mel[None] if single else mel
    engine = engine or Engine(model)
    results: list = [None] * len(mels)
    for i, m in enumerate(mels):
        engine.submit_window(m, options, lambda r, i=i: results.__setitem__(i, r))
    engine.run()
    return results[0] if single else results
