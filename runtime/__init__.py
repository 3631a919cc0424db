"""whisper-max runtime: transcribe with a compiled .maxpkg; needs neither torch nor the converter.

from whisper_max import runtime
model = runtime.load("tiny.en.maxpkg")
result = model.transcribe("audio.wav")  # openai-whisper's result dict
"""

from __future__ import annotations

from os import PathLike


def load(path: str | PathLike, trust: bool = False):
    """Open a package and initialise its compiled graphs (no compilation happens here): a
    runtime.api.Whisper, with openai-whisper's `transcribe` and `decode` methods. Its compiled
    program is machine code: one this machine did not make is refused unless `trust=True`
    (or rebuilt here with `whisper-convert --rebuild`)."""
    from .api import load

    return load(path, trust=trust)
