"""A loaded .maxpkg as a callable Whisper: encoder, cross K/V and one decoder step."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

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


def host(x) -> np.ndarray:
    """A graph output (max.driver.Buffer) or array as numpy, without copying."""
    return x.to_numpy() if hasattr(x, "to_numpy") else np.asarray(x)


def state_specs(signature: dict) -> list[dict]:
    """A graph signature's state inputs (written in place), as StepCache takes them."""
    return [i for i in signature.get("inputs", []) if "state" in i]


class StepCache:
    """Self-attention caches for a step graph that grows them in place: fixed-capacity buffers
    the graph writes each new position into, and the count of positions filled.

    `specs` are the graph's state inputs from the manifest (name, dtype, shape at capacity, and
    `state`: the axis it grows along and the input that carries the position)."""

    def __init__(self, specs: list[dict]):
        from max.driver import Buffer

        self.arrays = {s["name"]: np.zeros(s["shape"], np.dtype(s["dtype"])) for s in specs}
        self.buffers = {k: Buffer.from_numpy(a) for k, a in self.arrays.items()}  # zero-copy views
        self.axis = {s["name"]: s["state"]["axis"] for s in specs}
        positions = {s["state"]["position"] for s in specs}
        if len(positions) != 1:
            raise ValueError(f"state inputs with positions {sorted(positions)}; expected one")
        self.position = positions.pop()
        self.capacity = min(s["shape"][s["state"]["axis"]] for s in specs)
        self.length = 0

    @classmethod
    def holding(cls, specs: list[dict], cache: dict) -> "StepCache":
        """A StepCache filled with `cache` (name -> (…, positions, …) from the general decoder)."""
        out = cls(specs)
        lengths = {np.shape(cache[k])[a] for k, a in out.axis.items()}
        if len(lengths) != 1:
            raise ValueError(f"caches of lengths {sorted(lengths)}; expected one")
        out.length = lengths.pop()
        for k in out.axis:
            out._prefix(k)[...] = host(cache[k])
        return out

    def _prefix(self, name: str) -> np.ndarray:
        idx = [slice(None)] * self.arrays[name].ndim
        idx[self.axis[name]] = slice(0, self.length)
        return self.arrays[name][tuple(idx)]

    def feeds(self) -> dict:
        """The step graph's state inputs and the position to write at; the call fills one more."""
        if self.length >= self.capacity:
            raise ValueError(f"the text context is full ({self.capacity} positions)")
        return {**self.buffers, self.position: np.array(self.length, np.int64)}

    def as_cache(self) -> dict[str, np.ndarray]:
        """The filled positions as the general decoder takes them (copies)."""
        return {k: np.ascontiguousarray(self._prefix(k)) for k in self.arrays}


def decoder_call(run, step_state: list[dict], tokens: np.ndarray, cache, cross: dict):
    """One decoder call as the runtime routes it (WhisperModel.decoder_step; parity replays it).

    `run(graph, inputs)` executes a graph by name; `step_state` lists decoder_step's state
    inputs (none: the program has no step graph). Returns the logits and the grown cache."""
    tokens = np.ascontiguousarray(tokens, np.int64)
    if tokens.shape == (1, 1) and step_state:
        if not isinstance(cache, StepCache):
            cache = StepCache.holding(step_state, cache)
        logits = run("decoder_step", {"tokens": tokens, **cache.feeds(), **cross})["logits"].to_numpy()
        cache.length += 1
        return logits, cache
    if isinstance(cache, StepCache):
        cache = cache.as_cache()
    out = run("decoder", {"tokens": tokens, **cache, **cross})
    logits = out.pop("logits").to_numpy()
    return logits, out


class WhisperModel:
    def __init__(self, pkg: Package):
        self.package = pkg
        m = pkg.manifest
        self.dims: dict = m["model"]["dims"]
        self.is_multilingual: bool = m["model"]["multilingual"]
        self.alignment_heads = m["model"]["alignment_heads"]
        self._sig = m["graphs"]
        with ThreadPoolExecutor(2) as pool:
            # weights.bin (most of the bytes) and the tokenizer are made in the background while
            # this thread reads and initialises the compiled graphs; file reads, CRC and MAX's
            # initialisation release the GIL
            weights = pool.submit(pkg.weights)
            tokenizer = pool.submit(Tokenizer.from_package, pkg)
            self.mel_filters = np.load(io.BytesIO(pkg.read("assets/mel_filters.npy")), allow_pickle=False)
            self._models = pkg.load_models(weights=weights)
            self.tokenizer = tokenizer.result()
        self._decoder_inputs = {i["name"] for i in self._sig["decoder"]["inputs"]}
        # the step graph's caches, which it grows in place (empty: no step graph, all calls general)
        self._step_state = state_specs(self._sig.get("decoder_step", {}))
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
        """The per-window values the decoder reads (cross_kv's other outputs, the unsplit K/V
        that parity compares, are dropped: beam search copies what it is given per beam)."""
        out = self._run("cross_kv", {"encoder": audio_features})
        return {k: v for k, v in out.items() if k in self._decoder_inputs}

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
        the package has it; anything else runs the general `decoder`. The general decoder returns
        caches grown by concatenation; the step graph grows them in place, in a StepCache. Both
        hold the same layout, and each takes the other's form."""
        return decoder_call(self._run, self._step_state, tokens, cache, cross)

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
        if isinstance(state, StepCache):
            state = state.as_cache()
        return {k: np.ascontiguousarray(host(v)[index]) for k, v in state.items()}

