"""A loaded .maxpkg as a callable Whisper: encoder, cross K/V and one decoder step."""

from __future__ import annotations

import io

import numpy as np

from .audio import N_FRAMES, log_mel_spectrogram
from .package import Package
from .tokenizer import Tokenizer


def empty_cache_shape(shape, batch: int) -> list[int]:
    """A cache input's declared shape (dims `batch`, `past`, sizes) at `batch` rows and no positions."""
    out = [batch if d == "batch" else 0 if d == "past" else d for d in shape]
    if not all(isinstance(d, int) for d in out):
        raise ValueError(f"cache shape {list(shape)}: expected the dims batch and past, and sizes")
    return out


class WhisperModel:
    def __init__(self, pkg: Package):
        self.package = pkg
        m = pkg.manifest
        self.dims: dict = m["model"]["dims"]
        self.is_multilingual: bool = m["model"]["multilingual"]
        self.alignment_heads = m["model"]["alignment_heads"]
        self._sig = m["graphs"]
        self._models = pkg.load_models()
        self._has_step = "decoder_step" in self._sig
        self.mel_filters = np.load(io.BytesIO(pkg.read("assets/mel_filters.npy")), allow_pickle=False)
        self.tokenizer = Tokenizer.from_package(pkg)
        self.num_languages: int = len(self.tokenizer.languages)

    def _run(self, graph: str, inputs: dict) -> dict:
        sig = self._sig[graph]
        outs = self._models[graph].execute(*[inputs[i["name"]] for i in sig["inputs"]])
        return {o["name"]: v for o, v in zip(sig["outputs"], outs)}

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        return log_mel_spectrogram(audio, self.mel_filters, padding)

    def embed_audio(self, mel: np.ndarray):
        """(batch, n_mels, N_FRAMES) log-mel -> encoder output, kept as a device buffer."""
        if mel.ndim == 2:
            mel = mel[None]
        if mel.shape[1:] != (self.dims["n_mels"], N_FRAMES):
            raise ValueError(f"mel of shape {mel.shape}; the encoder takes (batch, {self.dims['n_mels']}, {N_FRAMES})")
        return self._run("encoder", {"mel": np.ascontiguousarray(mel, np.float32)})["encoder"]

    def cross_kv(self, audio_features) -> dict:
        return self._run("cross_kv", {"encoder": audio_features})

    def self_cache_names(self) -> list[str]:
        return [o["name"] for o in self._sig["decoder"]["outputs"] if o["name"] != "logits"]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length self-attention caches, in the layout the decoder declares for them
        (the converter may store them head-major; the runtime treats them as opaque state)."""
        shapes = {i["name"]: i for i in self._sig["decoder"]["inputs"]}
        cache = {}
        for name in self.self_cache_names():
            sig = shapes[name]
            cache[name] = np.zeros(empty_cache_shape(sig["shape"], batch), np.dtype(sig["dtype"]))
        return cache

    def decoder_step(self, tokens: np.ndarray, cache: dict, cross: dict) -> tuple[np.ndarray, dict]:
        """Logits (batch, n_vocab) for the last of `tokens` and the cache grown by len(tokens).

        One token of one sequence runs `decoder_step`, the graph specialised to that shape, when
        the package has it; anything else runs the general `decoder`. Both read and write the
        same cache layout."""
        tokens = np.ascontiguousarray(tokens, np.int64)
        graph = "decoder_step" if tokens.shape == (1, 1) and self._has_step else "decoder"
        out = self._run(graph, {"tokens": tokens, **cache, **cross})
        logits = out.pop("logits").to_numpy()
        return logits, out

    def alignment(self, tokens: np.ndarray, audio_features) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits at every position and each layer's cross-attention scores (batch, head, n, frames)."""
        if "alignment" not in self._sig:
            raise ValueError(f"{self.package.path} has no alignment graph (made by an older whisper-convert); convert it again for word timestamps")
        out = self._run("alignment", {"tokens": np.ascontiguousarray(tokens, np.int64), "encoder": audio_features})
        n_layer = self.dims["n_text_layer"]
        return out["logits"].to_numpy(), [out[f"decoder.blocks.{i}.cross_attn.qk"].to_numpy() for i in range(n_layer)]

    def transcribe(self, audio, **options) -> dict:
        """openai-whisper's `model.transcribe`: a path or 16 kHz samples -> result dict."""
        from .transcribe import transcribe

        return transcribe(self, audio, **options)

    def decode(self, mel, options=None, **kwargs):
        from .decoding import DecodingOptions, decode

        return decode(self, mel, options or DecodingOptions(), **kwargs)

    @staticmethod
    def select(state: dict, index) -> dict[str, np.ndarray]:
        """Rows `index` of every batch-major buffer (beam reordering, repeating per beam)."""
        return {k: np.ascontiguousarray((v.to_numpy() if hasattr(v, "to_numpy") else v)[index]) for k, v in state.items()}

