"""The Python API: a loaded package with openai-whisper's `model.transcribe` and `model.decode`.

It sits above the engine and long-form modules so that the model (runtime.model) does not
import them: dependencies point one way, model <- decoding <- stream <- engine <- transcribe <- api.
"""

from __future__ import annotations

from functools import cached_property
from os import PathLike

import numpy as np

from . import models
from .decoding import DecodingOptions
from .engine import Engine, decode
from .model import WhisperModel
from .package import Package
from .transcribe import transcribe


class Whisper(WhisperModel):
    """A package's compiled program with openai-whisper's model methods, on one engine."""

    @cached_property
    def engine(self) -> Engine:
        """The engine this model's calls decode on (its cache pool is kept between calls)."""
        return Engine(self)

    def transcribe(self, audio, **options) -> dict:
        """openai-whisper's `model.transcribe`: a path or 16 kHz samples -> result dict."""
        return transcribe(self, audio, engine=self.engine, **options)

    def detect_language(self, mel) -> tuple[np.ndarray, dict[str, float] | list[dict[str, float]]]:
        """openai-whisper's `model.detect_language`: a log-mel window (n_mels, 3000) or a batch of
        them -> the most likely language token(s) and every language's probability, decoded on
        this model's engine (<|startoftranscript|> alone)."""
        single = np.ndim(mel) == 2
        mels = np.asarray(mel)[None] if single else mel
        results = decode(self, mels, DecodingOptions(task="lang_id"), engine=self.engine)
        tokens = np.array([self.tokenizer.to_language_token(r.language) for r in results])
        probs = [r.language_probs for r in results]
        return (tokens[0], probs[0]) if single else (tokens, probs)

    def decode(self, mel, options: DecodingOptions | None = None, **kwargs):
        """openai-whisper's `model.decode`: a log-mel window (or a batch) -> DecodingResult(s)."""
        return decode(self, mel, options or DecodingOptions(), engine=self.engine, **kwargs)


def load(model: str | PathLike, trust: bool = False, model_dir: str | PathLike | None = None) -> Whisper:
    """Open a package and initialise its compiled graphs. `model` is a .maxpkg path, or a name
    (tiny.en, base, ...), .pt checkpoint or CTranslate2 folder, whose package in the cache
    (`model_dir`, runtime.models) is made on first use. A package this machine did not compile
    is refused unless `trust` (runtime.trust)."""
    return Whisper(Package.open(models.resolve(model, model_dir)), trust=trust)
