"""A loaded .maxpkg as a callable Whisper: encoder, cross K/V and one decoder step. The graphs
and how they are called are the program contract's (runtime.program)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .audio import N_FRAMES, LogMel, is_path, log_mel_spectrogram, read_audio
from .package import Package, PackageError
from .program import (
    AUDIO_FEATURES,
    LOGIT_ROWS,
    LOGITS,
    MEL,
    QUERIES,
    RULES,
    SAMPLING,
    SLOTS,
    SUPPRESS,
    TOKENS,
    WINDOW,
    Role,
    StepCache,
    alignment_call,
    host,
    select_call,
    state_specs,
)
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .pool import RowPool


@dataclass
class GraphStats:
    """What a model's graphs have done since it was loaded or `reset()`: calls and seconds per
    graph (runtime.program.Role names), and each call's seconds when `durations` is on (for
    benchmarks: a list grows per call). The engine's own counters (calls, rows) are beside it."""

    calls: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    durations: dict[str, list[float]] | None = None

    def add(self, graph: str, seconds: float) -> None:
        self.calls[graph] = self.calls.get(graph, 0) + 1
        self.seconds[graph] = self.seconds.get(graph, 0.0) + seconds
        if self.durations is not None:
            self.durations.setdefault(graph, []).append(seconds)

    def reset(self, durations: bool = False) -> None:
        """Zero the counts; keep each call's seconds from now on if `durations`."""
        self.calls, self.seconds, self.durations = {}, {}, ({} if durations else None)


class WhisperModel:
    def __init__(self, pkg: Package, trust: bool = False):
        self.package = pkg
        self.stats = GraphStats()
        m = pkg.manifest
        self.dims: dict = m.model.dims
        self.is_multilingual: bool = m.model.multilingual
        self.alignment_heads = m.model.alignment_heads
        self._sig = m.graphs
        if Role.SELECT not in self._sig:
            raise PackageError(
                f"{pkg.path} has no select graph (made by an older whisper-convert); `whisper-convert --rebuild "
                f"{pkg.path}` adds it"
            )
        with ThreadPoolExecutor(2) as pool:
            # weights.bin (most of the bytes) and the tokenizer are made in the background while
            # this thread reads and initialises the compiled graphs; file reads, CRC and MAX's
            # initialisation release the GIL
            weights = pool.submit(pkg.weights)
            tokenizer = pool.submit(Tokenizer.from_package, pkg)
            self.mel_filters = pkg.npy("assets/mel_filters.npy")
            self._models = pkg.load_models(weights=weights, trust=trust)
            self.tokenizer = tokenizer.result()
        self._slots: dict[int, np.ndarray] = {}
        self.num_languages: int = len(self.tokenizer.languages)
        rows = self._sig.get(Role.DECODER_ROWS)
        if rows is None or not {WINDOW, LOGIT_ROWS} <= set(rows.input_names()):
            raise PackageError(
                f"{pkg.path}: its decoder_rows graph decodes the rows of one window only, or cannot prefill a prompt "
                "(made by an older whisper-convert); "
                f"`whisper-convert --rebuild {pkg.path}` makes the one this runtime's engine needs"
            )
        self._decoder_inputs = set(rows.input_names())

    def pool(self) -> RowPool:
        """Decoder state for the rows of many windows (an engine holds one; a fake model in the
        tests gives a fake one)."""
        from .pool import RowPool

        return RowPool(self)

    def _run(self, graph: str, inputs: dict, counted_as: str | None = None) -> dict:
        """Execute `graph`; its time is counted under `counted_as` (default: the graph's name)."""
        sig = self._sig[graph]
        t = time.perf_counter()
        outs = self._models[graph].execute(*[inputs[i.name] for i in sig.inputs])
        self.stats.add(counted_as or graph, time.perf_counter() - t)
        return dict(zip(sig.output_names(), outs))

    def log_mel(self, audio: np.ndarray, padding: int = 0) -> np.ndarray:
        return log_mel_spectrogram(audio, self.mel_filters, padding)

    def features(self, audio) -> LogMel:
        """The log-mel of a file path (read a block at a time, never whole) or of 16 kHz mono
        samples, with N_SAMPLES of padding, as openai-whisper's transcribe computes it."""
        if is_path(audio):
            return LogMel(read_audio(os.fsdecode(audio)), self.mel_filters)
        return LogMel([np.asarray(audio, np.float32)], self.mel_filters)

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

    def alignment(
        self, tokens: np.ndarray, audio_features, frames: int, cross: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits at every position (1, n, n_vocab) of (1, n) `tokens` on one window's encoder
        output, and the cross-attention scores of the alignment heads over its first `frames`
        frames (alignment heads, n, frames): one decoder_rows call (alignment_call), or the
        alignment graph of a package that compiled one. `cross`: the window's cross_kv values when
        the caller has them (else they are computed again from `audio_features`)."""
        tokens = np.ascontiguousarray(tokens, np.int64)
        if Role.ALIGNMENT in self._sig:
            out = self._run(Role.ALIGNMENT, {TOKENS: tokens, AUDIO_FEATURES: audio_features})
            qks = {layer: out[f"decoder.blocks.{layer}.cross_attn.qk"].to_numpy() for layer, _ in self.alignment_heads}
            scores = np.stack([qks[layer][0, head, :, :frames] for layer, head in self.alignment_heads])
            return out[LOGITS].to_numpy(), scores
        queries = [o for o in self._sig[Role.DECODER_ROWS].output_names() if o.endswith(QUERIES)]
        if len(queries) != self.dims["n_text_layer"]:
            raise PackageError(
                f"{self.package.path}: neither an alignment graph nor decoder_rows' cross-attention queries (made by "
                f"an older whisper-convert); `whisper-convert --rebuild {self.package.path}` adds them"
            )
        rows = state_specs(self._sig[Role.DECODER_ROWS])
        run = lambda graph, inputs: self._run(graph, inputs, counted_as="decoder_rows.alignment")  # noqa: E731
        cross = self.cross_kv(audio_features) if cross is None else cross
        return alignment_call(run, rows, tokens, cross, queries, self.alignment_heads, frames)

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
