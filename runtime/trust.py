"""Which compiled programs this machine runs without asking.

A package's model.mef is machine code: loading it runs code its maker chose, unlike a ggml or
CTranslate2 file, which is data. So a MEF runs only when this machine made it (whisper-convert
and --rebuild record its sha256 here) or when the user said to trust it (--trust; then it is
recorded too). Any other package is refused with the two ways out: rebuild it here from its IR
and weights (data only, read without running anything), or trust it.

The list is one line per MEF, `sha256 path-it-was-recorded-for`, appended (O_APPEND: concurrent
writers do not interleave short lines) to `trusted-mef.txt` in the cache directory:
$WHISPER_MAX_CACHE, else $XDG_CACHE_HOME/whisper-max, else ~/.cache/whisper-max.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_FILE = "trusted-mef.txt"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    """whisper-max's cache directory (the trust list; converted models by name)."""
    given = os.environ.get("WHISPER_MAX_CACHE")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whisper-max"


def is_trusted(sha256: str) -> bool:
    try:
        text = (cache_dir() / _FILE).read_text()
    except FileNotFoundError:
        return False
    return any(line.split(" ", 1)[0] == sha256 for line in text.splitlines())


def record(sha256: str, path: str | os.PathLike) -> None:
    """Trust the MEF with this sha256 from now on (`path`: where it was, for the reader)."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"record: {sha256!r} is not a sha256 hex digest")
    if is_trusted(sha256):
        return
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    line = f"{sha256} {os.fsdecode(Path(path).resolve())}".replace("\n", " ") + "\n"
    fd = os.open(folder / _FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
