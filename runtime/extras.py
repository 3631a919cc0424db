"""Optional dependencies: a feature whose packages are not installed says which extra adds them.

The bare runtime (`pip install whisper-max`) transcribes a package with max, numpy, tiktoken,
soundfile and soxr; `[server]` adds whisper-serve's FastAPI, uvicorn and python-multipart, `[vad]`
onnxruntime for Silero VAD (vad_filter, the batched mode), `[ray]` Ray for whisper-batch --ray.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A feature's optional dependency is not installed; the message names the pip extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """`module` imported, or MissingExtra naming `feature` and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or module
        raise MissingExtra(
            f"{feature} needs {missing}, which is not installed: pip install 'whisper-max[{extra}]'"
        ) from None
