"""whisper-convert's progress: the expected compile time from this machine's last cold compile,
ticking lines during a long stage, the progress file, and a waiting process following it."""

import io
import threading
import time

from filelock import FileLock

from whisper_max.converter import progress
from whisper_max.runtime import models


def test_expected_compile_is_this_machines_last_cold_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("WHISPER_MAX_CACHE", str(tmp_path))
    key = progress.compile_key("26.7.0", "float32", "tiny.en")
    assert progress.expected_compile(key) is None and progress.about(None) == "minutes the first time on a machine"
    progress.record_compile(key, 3.0)  # a MAX cache hit: says nothing of the rate
    assert progress.expected_compile(key) is None
    progress.record_compile(key, 162.4)
    assert progress.expected_compile(key) == 162.4
    assert progress.about(162.4) == "about 2.7 minutes on this machine the first time"
    # another model on the same CPU, MAX and dtype: the slowest record stands in
    assert progress.expected_compile(progress.compile_key("26.7.0", "float32", "base")) == 162.4
    assert progress.expected_compile(progress.compile_key("26.7.0", "bfloat16", "base")) is None


def test_a_long_stage_ticks_into_the_stream_and_the_progress_file(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "TICK_TTY", 0.01)
    monkeypatch.setattr(progress, "TICK_LINES", 0.05)
    out, file = io.StringIO(), tmp_path / "p.progress"
    stages = progress.Stages(progress_file=file, stream=out)
    stages("compiling 7 graphs", expect=100)
    time.sleep(0.3)
    stages("writing the package")
    stages.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] compiling 7 graphs") and lines[-1].endswith("] writing the package")
    ticks = [line for line in lines[1:-1] if "of about 100 s" in line]
    assert ticks and len(ticks) == len(lines) - 2  # every line between is a tick (not a terminal: new lines)
    assert file.read_text().splitlines() == lines


def test_a_waiting_process_shows_the_converting_ones_progress(tmp_path):
    target = tmp_path / "tiny.en.maxpkg"
    lock_path, file = str(target) + ".lock", models._progress_file(target)
    held, released = threading.Event(), threading.Event()

    def convert():  # the converting process: holds the lock while its progress file grows
        holder = FileLock(lock_path)
        with holder:
            file.write_text("whisper-convert [   1.0s] reading the weights\nwhisper-convert [   2.0s] trac")
            held.set()
            time.sleep(1.5)
            with open(file, "a") as f:
                f.write("ing\n")
            time.sleep(1.5)
        released.set()

    threading.Thread(target=convert).start()
    assert held.wait(10)
    shown = []
    waiter = FileLock(lock_path)
    models._follow(file, waiter, shown.append)
    assert released.is_set() and waiter.is_locked
    waiter.release()
    assert shown == ["whisper-convert [   1.0s] reading the weights", "whisper-convert [   2.0s] tracing"]
