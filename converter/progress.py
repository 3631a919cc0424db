"""whisper-convert's stage lines: elapsed time, how long a compile will take on this machine (its
last cold compile, recorded in the whisper-max cache), a line that ticks while a long stage
runs, and a copy of every line in a progress file that a process waiting for this conversion
shows (runtime.models)."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

from ..runtime import trust
from ..runtime.files import atomic_open

COLD = 20.0  # seconds: a compile this long missed MAX's cache, so it measures this machine's rate
TICK_TTY, TICK_LINES = 1.0, 30.0  # seconds between ticks: on a terminal (one rewritten line), else new lines


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _history_path() -> Path:
    return trust.cache_dir() / "compile_times.json"


def _history() -> dict:
    try:
        return json.loads(_history_path().read_text())
    except (OSError, ValueError):
        return {}


def compile_key(max_version: str, dtype: str, model: str) -> str:
    return f"{_cpu()} | MAX {max_version} | {dtype} | {model}"


def expected_compile(key: str) -> float | None:
    """Seconds the last cold compile of this key took on this CPU; else of the same CPU, MAX
    and dtype for another model (the slowest); None when this machine has no record."""
    history = _history()
    if key in history:
        return float(history[key])
    prefix = key.rsplit(" | ", 1)[0] + " | "
    others = [float(v) for k, v in history.items() if k.startswith(prefix)]
    return max(others) if others else None


def record_compile(key: str, seconds: float) -> None:
    """Remember a cold compile's time (a warm one, a MAX cache hit, says nothing of the rate)."""
    if seconds < COLD:
        return
    history = {**_history(), key: round(seconds, 1)}
    try:
        _history_path().parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(_history_path(), "w", encoding="utf-8") as f:
            json.dump(history, f, indent=1)
    except OSError:
        pass  # only the next estimate is lost


def about(seconds: float | None) -> str:
    if seconds is None:
        return "minutes the first time on a machine"
    if seconds < 90:
        return f"about {seconds:.0f} s on this machine the first time"
    return f"about {seconds / 60:.1f} minutes on this machine the first time"


class Stages:
    """Called with each stage's message (and, for a long one, the seconds it is expected to
    take): prints `whisper-convert [  12.3s] message` to stderr, appends it to `progress_file`,
    and until the next stage ticks: on a terminal one line rewritten every second, else (and in
    the progress file) a line every 30 s."""

    def __init__(self, quiet: bool = False, progress_file: Path | None = None, stream=None) -> None:
        self.quiet, self.progress_file = quiet, progress_file
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str, expect: float | None = None) -> None:
        self.close()
        self._line(f"whisper-convert [{self.elapsed():6.1f}s] {message}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, args=(time.perf_counter(), expect, self._stop), daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _tick(self, since: float, expect: float | None, stop: threading.Event) -> None:
        shown = 0.0  # when a line was last written (not on a terminal)
        while not stop.wait(TICK_TTY):
            spent = time.perf_counter() - since
            of = f" of about {expect:.0f} s" if expect else ""
            text = f"whisper-convert [{self.elapsed():6.1f}s]   ... {spent:.0f} s{of}"
            if self.tty and not self.quiet:
                self.stream.write(f"\r{text}\x1b[K")
                self.stream.flush()
            if spent - shown >= TICK_LINES:
                shown = spent
                self._line(text, echo=not self.tty)
        if self.tty and not self.quiet:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _line(self, text: str, echo: bool = True) -> None:
        if echo and not self.quiet:
            print(text, file=self.stream, flush=True)
        if self.progress_file is not None:
            try:
                with open(self.progress_file, "a", encoding="utf-8") as f:
                    f.write(text + "\n")
            except OSError:
                pass  # a waiting process sees less; the conversion goes on
