"""A loaded .maxpkg as a callable Whisper: encoder, cross K/V and one decoder step. The graphs
and how they are called are the program contract's (runtime.program)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .audio import N_FRAMES, log_mel_spectrogram
from .package import Package, PackageError
from .program import AUDIO_FEATURES, LOGITS, MEL, RULES, SAMPLING, SLOTS, STEP_GRAPHS, SUPPRESS, TOKENS, Role, StepCache, decoder_call, empty_cache_shape, host, select_call, state_specs
from .tokenizer import Tokenizer


class WhisperModel:
    def __init__(self, pkg: Package):
        self.package = pkg
        m = pkg.manifest
        self.dims: dict = m["model"]["dims"]
        self.is_multilingual: bool = m["model"]["multilingual"]
        self.alignment_heads = m["model"]["alignment_heads"]
        self._sig = m["graphs"]
        if Role.SELECT not in self._sig:
            raise PackageError(f"{pkg.path} has no select graph (made by an older whisper-convert); `whisper-convert --rebuild {pkg.path}` adds it")
        with ThreadPoolExecutor(2) as pool:
            # weights.bin (most of the bytes) and the tokenizer are made in the background while
            # this thread reads and initialises the compiled graphs; file reads, CRC and MAX's
            # initialisation release the GIL
            weights = pool.submit(pkg.weights)
            tokenizer = pool.submit(Tokenizer.from_package, pkg)
            self.mel_filters = np.load(io.BytesIO(pkg.read("assets/mel_filters.npy")), allow_pickle=False)
            self._models = pkg.load_models(weights=weights)
            self.tokenizer = tokenizer.result()
        self._slots: dict[int, np.ndarray] = {}
        self._decoder_inputs = {i["name"] for i in self._sig[Role.DECODER]["inputs"]}
        # the in-place graphs' caches (a package may have neither: then all calls are general)
        self._steps = {g: state_specs(self._sig[g]) for g in STEP_GRAPHS if g in self._sig}
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
        return self._run(Role.ENCODER, {MEL: np.ascontiguousarray(mel, np.float32)})[AUDIO_FEATURES]

    def cross_kv(self, audio_features) -> dict:
        """The per-window values the decoder reads (cross_kv's other outputs, the unsplit K/V
        that parity compares, are dropped: beam search copies what it is given per beam)."""
        out = self._run(Role.CROSS_KV, {AUDIO_FEATURES: audio_features})
        return {k: v for k, v in out.items() if k in self._decoder_inputs}

    def self_cache_names(self) -> list[str]:
        return [o["name"] for o in self._sig[Role.DECODER]["outputs"] if o["name"] != LOGITS]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length self-attention caches, in the layout the decoder declares for them
        (the converter may store them head-major; the runtime treats them as opaque state)."""
        shapes = {i["name"]: i for i in self._sig[Role.DECODER]["inputs"]}
        cache = {}
        for name in self.self_cache_names():
            sig = shapes[name]
            cache[name] = np.zeros(empty_cache_shape(sig["shape"], batch), np.dtype(sig["dtype"]))
        return cache

    def decoder_step(self, tokens: np.ndarray, cache: dict, cross: dict) -> tuple[np.ndarray, dict]:
        """Logits (batch, n_vocab) for the last of `tokens` and the cache grown by len(tokens).

        One token of one sequence runs `decoder_step`, the graph specialised to that shape, when
        the package has it; one token for each of several rows whose `cross` has one row (the
        window's values, shared: see `shares_window`) runs `decoder_rows`; anything else runs the
        general `decoder`. The general decoder returns caches grown by concatenation; the
        in-place graphs grow them in a StepCache. All hold the same layout, and each takes the
        others' form."""
        return decoder_call(self._run, self._steps, tokens, cache, cross)[:2]

    def decoder_choose(self, tokens: np.ndarray, cache: dict, cross: dict, select: dict) -> tuple[np.ndarray, dict]:
        """decoder_step and then the next-token choice (see select_tokens) in one graph call
        where the package fuses them (decoder_step, decoder_rows): the choice and the cache."""
        _, cache, choice = decoder_call(self._run, self._steps, tokens, cache, cross, select)
        return choice, cache

    def selection(self, rules: np.ndarray, suppress: np.ndarray, sampling: np.ndarray, k: int) -> dict:
        """The inputs of a next-token choice besides the logits: each row's `rules` and the
        tokens every row suppresses (decoding.TokenRules), (temperature, u) per row, and k the
        number of (token, log-probability) pairs per row to return."""
        if k not in self._slots:
            self._slots[k] = np.zeros(k, np.int32)
        return {RULES: rules, SUPPRESS: suppress, SAMPLING: sampling, SLOTS: self._slots[k]}

    def select_tokens(self, logits, select: dict) -> np.ndarray:
        """The next-token choice for each row of `logits` (rows, n_vocab), by the select graph
        (kernel whisper_max.select_tokens): (rows, k, 2) (token, log-probability) pairs, best
        first. `select`: from `selection`."""
        return select_call(self._run, logits, select)

    def alignment(self, tokens: np.ndarray, audio_features) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits at every position and each layer's cross-attention scores (batch, head, n, frames)."""
        if Role.ALIGNMENT not in self._sig:
            raise ValueError(f"{self.package.path} has no alignment graph (made by an older whisper-convert); convert it again for word timestamps")
        out = self._run(Role.ALIGNMENT, {TOKENS: np.ascontiguousarray(tokens, np.int64), AUDIO_FEATURES: audio_features})
        n_layer = self.dims["n_text_layer"]
        return out[LOGITS].to_numpy(), [out[f"decoder.blocks.{i}.cross_attn.qk"].to_numpy() for i in range(n_layer)]

    @property
    def shares_window(self) -> bool:
        """Whether rows of one window (beams, best-of samples) can decode against one copy of
        its cross-attention values: the package has decoder_rows."""
        return Role.DECODER_ROWS in self._steps

    def share_rows(self, cache: dict, rows: int) -> StepCache:
        """A one-row cache repeated into `rows` rows, laid out for decoder_rows."""
        return StepCache.holding(self._steps[Role.DECODER_ROWS], cache, rows, Role.DECODER_ROWS)

    @staticmethod
    def select(state, index):
        """Rows `index` of every batch-major buffer (beam reordering, repeating per beam). A
        StepCache given a permutation of its rows is reordered in place and returned."""
        if isinstance(state, StepCache):
            if len(index) == state.rows:
                state.reorder(index)
                return state
            state = state.as_cache()
        return {k: np.ascontiguousarray(host(v)[index]) for k, v in state.items()}
