"""whisper-max runtime: transcribe with a compiled .maxpkg; needs neither torch nor the converter.

from whisper_max import runtime
model = runtime.load("tiny.en")  # a name converts once into the cache; or a .maxpkg path
result = model.transcribe("audio.wav")  # openai-whisper's result dict
"""

from __future__ import annotations

from os import PathLike


def load(model: str | PathLike, trust: bool = False, model_dir: str | PathLike | None = None):
    """A runtime.api.Whisper, with openai-whisper's `transcribe` and `decode` methods. `model`:
    a .maxpkg path (loaded as it is; no compilation happens), or a model name (tiny.en, base,
    ...), .pt checkpoint or CTranslate2 folder, converted once into the cache (`model_dir`, else
    $XDG_CACHE_HOME/whisper-max/models) and loaded from there later. A compiled program is
    machine code: one this machine did not make is refused unless `trust=True` (or rebuilt here
    with `whisper-convert --rebuild`)."""
    from .api import load

    return load(model, trust=trust, model_dir=model_dir)
