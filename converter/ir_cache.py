"""A cache of optimised programs: a second conversion of one architecture skips tracing.

Tracing with torch.export and the recipe's passes take ~6 s of a conversion (tiny.en, 2 cores)
and make the same program for every checkpoint of one architecture. What they read of a
checkpoint is its dims, its tensors' names, dtypes and shapes and, for a
recipe that stores exact float16 weights, which tensors float16 holds exactly. The cache keeps
the optimised program in the package's own form of the IR (onnx_io: one ONNX file per graph)
under a key of those, the recipe, the target's features and the versions of what makes the
program (whisper-max's Python sources, torch, openai-whisper). A warm first use (MAX's cache
holding the graphs: a deleted package, another checkpoint of the same shape) reads it in well
under a second.

Entries are zip files in `ir/` of whisper-max's cache directory (runtime.trust.cache_dir),
written under a temporary name and renamed (runtime.files.atomic_open). An entry that cannot be read is traced again and
replaced, with a warning: it is a cache, and what it holds is checked like any traced program
(the conversion's parity check runs on every conversion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ..runtime.files import atomic_open
from ..runtime.trust import cache_dir
from . import ir, onnx_io

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parents[1]  # the whisper_max package: converter/, runtime/
_FORMAT = 1


def directory() -> Path:
    return cache_dir() / "ir"


@cache
def _sources_digest() -> str:
    """The converter's and runtime's Python sources (what traces, optimises and names the IR)."""
    h = hashlib.sha256()
    for sub in ("converter", "runtime"):
        for p in sorted((_ROOT / sub).rglob("*.py")):
            h.update(str(p.relative_to(_ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "none"


def key(dims: dict, state_dict: dict, recipe, target, exact: frozenset[str] | None) -> str:
    """The entry's name for a conversion: a digest of everything tracing and the recipe's passes
    read (the module docstring). `exact` is the set of tensors float16 holds exactly, for a
    recipe whose passes read it, else None."""
    described = {
        "format": _FORMAT,
        "sources": _sources_digest(),
        "torch": _version("torch"),
        "openai-whisper": _version("openai-whisper"),
        "dims": dict(sorted(dims.items())),
        "tensors": sorted((k, str(np.asarray(v).dtype), list(np.shape(v))) for k, v in state_dict.items()),
        "recipe": [recipe.family, recipe.precision, recipe.pass_names],
        "target": [target.device, target.arch, sorted(target.features)],
        "exact": None if exact is None else sorted(exact),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def load(name: str) -> ir.Program | None:
    """The program cached under `name`, or None (no entry; an unreadable one is logged)."""
    path = directory() / f"{name}.zip"
    try:
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist()}
        return onnx_io.from_onnx_files(files)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - any damage to a cache entry means: trace again
        log.warning("the cached IR %s is unreadable (%s: %s); tracing again", path, type(e).__name__, e)
        return None


def store(name: str, program: ir.Program) -> None:
    """Keep `program` under `name`; a cache that cannot be written is logged, not an error."""
    d = directory()
    try:
        with atomic_open(d / f"{name}.zip") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for n, data in onnx_io.to_onnx_files(program).items():
                z.writestr(n, data)
    except OSError as e:
        log.warning("cannot cache the IR in %s (%s); the next conversion traces again", d, e)
