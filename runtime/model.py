"""A loaded .maxpkg as a callable Whisper: encoder, cross K/V and one decoder step. The graphs
and how they are called are the program contract's (runtime.program)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .audio import N_FRAMES, LogMel, is_path, log_mel_spectrogram, read_audio
from .package import LINEAGE, WINDOW, Package, PackageError
from .program import AUDIO_FEATURES, CHOICE, LOGITS, MEL, RULES, SAMPLING, SLOTS, STEP_GRAPHS, SUPPRESS, TOKENS, Role, StepCache, decoder_call, empty_cache_shape, host, select_call, state_specs
from .tokenizer import Tokenizer


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
            self.mel_filters = pkg.npy("assets/mel_filters.npy")
            self._models = pkg.load_models(weights=weights, trust=trust)
            self.tokenizer = tokenizer.result()
        self._slots: dict[int, np.ndarray] = {}
        self._decoder_inputs = {i["name"] for i in self._sig[Role.DECODER]["inputs"]}
        # the in-place graphs' caches (a package may have neither: then all calls are general)
        self._steps = {g: state_specs(self._sig[g]) for g in STEP_GRAPHS if g in self._sig}
        self.num_languages: int = len(self.tokenizer.languages)
        if WINDOW not in {i["name"] for i in self._sig.get(Role.DECODER_ROWS, {}).get("inputs", [])}:
            raise PackageError(
                f"{pkg.path}: its decoder_rows graph decodes the rows of one window only (made by an older whisper-convert); "
                f"`whisper-convert --rebuild {pkg.path}` makes the one this runtime's engine needs"
            )

    def pool(self) -> RowPool:
        """Decoder state for the rows of many windows (an engine holds one)."""
        return RowPool(self)

    def _run(self, graph: str, inputs: dict) -> dict:
        sig = self._sig[graph]
        t = time.perf_counter()
        outs = self._models[graph].execute(*[inputs[i["name"]] for i in sig["inputs"]])
        self.stats.add(graph, time.perf_counter() - t)
        return {o["name"]: v for o, v in zip(sig["outputs"], outs)}

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
        window's values, shared) runs `decoder_rows`; anything else runs the
        general `decoder`. The general decoder returns caches grown by concatenation; the
        in-place graphs grow them in a StepCache. All hold the same layout, and each takes the
        others' form."""
        return decoder_call(self._run, self._steps, tokens, cache, cross)[:2]

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


def _pool_zeros(shape, dtype) -> np.ndarray:
    """Zeros for the pool's caches and windows, in ordinary 4 KiB pages. numpy asks Linux for
    transparent huge pages on every large array; where THP defragments on demand (`defrag`
    madvise, the default), the first write to each 2 MiB page may then wait while the kernel
    compacts memory to find one, and the pool's memory is first written while rows decode.
    Measured on an AMD EPYC (Zen 4), batched mode on the 231 s file (8 windows, 5 beams each):
    opening windows and spreading prompts took 0.31 + 0.43 s of a 7.1 s run in numpy's huge
    pages, 0.09 + 0.002 s in these, and the run 6.0 s (the decoder calls were no slower)."""
    import mmap

    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < (1 << 20) or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zeroed by the kernel
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype).reshape(shape)


def _grown(a: np.ndarray, n: int) -> np.ndarray:
    """`a` with its leading dim grown to n (the new rows zero)."""
    out = _pool_zeros((n, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


class RowPool:
    """decoder_rows' state for rows of many windows, so that one call decodes them all: cache
    slots (each row's positions are in the slots its lineage names) and windows' cross-attention
    values (each row reads the window its WINDOW input names). Both grow on demand and are reused
    as windows close."""

    def __init__(self, model: WhisperModel):
        self.model = model
        sig = model._sig[Role.DECODER_ROWS]
        self._caches = [i for i in sig["inputs"] if "state" in i]
        self._cross = [i for i in sig["inputs"] if i["shape"][:1] == ["windows"]]
        self.position = self._caches[0]["state"]["position"]
        self.axis = {i["name"]: i["state"]["axis"] for i in self._caches}
        self.capacity = min(i["shape"][i["state"]["axis"]] for i in self._caches)
        self.slots: dict[str, np.ndarray] = {}
        self.windows: dict[str, np.ndarray] = {}
        self._buffers: dict = {}
        self._free_slots: list[int] = []
        self._free_windows: list[int] = []

    def _grow(self, arrays: dict, specs: list[dict], free: list[int], need: int, exact: bool = False) -> None:
        from max.driver import Buffer

        have = len(next(iter(arrays.values()))) if arrays else 0
        n = have + need if exact else max(have * 2, have + need, 4)
        for i in specs:
            shape = [n, *i["shape"][1:]]
            arrays[i["name"]] = _grown(arrays[i["name"]], n) if have else _pool_zeros(shape, i["dtype"])
        for name in (i["name"] for i in specs):
            self._buffers[name] = Buffer.from_numpy(arrays[name])  # zero-copy views, remade as they grow
        free.extend(range(n - 1, have - 1, -1))

    def reserve(self, rows: int, windows: int) -> None:
        """Room for at least `rows` rows of `windows` windows at once, made now in one step: growing
        on demand doubles, copying what is there each time (hundreds of MB for 40 rows)."""
        for arrays, specs, free, n in ((self.slots, self._caches, self._free_slots, rows), (self.windows, self._cross, self._free_windows, windows)):
            if len(free) < n:
                self._grow(arrays, specs, free, n - len(free), exact=True)

    def _take(self, arrays: dict, specs: list[dict], free: list[int], k: int) -> list[int]:
        if len(free) < k:
            self._grow(arrays, specs, free, k - len(free))
        return [free.pop() for _ in range(k)]

    def open(self, cross: dict) -> PoolRows:
        """Rows for a window whose cross_kv outputs are `cross` (one window, leading dim 1)."""
        (w,) = self._take(self.windows, self._cross, self._free_windows, 1)
        for i in self._cross:
            self.windows[i["name"]][w] = host(cross[i["name"]])[0]
        return PoolRows(self, w, cross)

    def step(self, items: list) -> list[np.ndarray]:
        """One decoder_rows call for the live rows of many windows: `items` (PoolRows,
        decoding.Step) pairs; each window's choice. Windows whose tokens every row suppresses
        differ (other options) are called apart."""
        out: list = [None] * len(items)
        groups: dict[bytes, list[int]] = {}
        for j, (_, st) in enumerate(items):
            groups.setdefault(np.asarray(st.suppress, np.int32).tobytes(), []).append(j)
        for members in groups.values():
            for j, choice in zip(members, self._call([items[j] for j in members])):
                out[j] = choice
        return out

    def _call(self, items: list) -> list[np.ndarray]:
        steps = [st for _, st in items]
        k = max(st.slots for st in steps)
        counts = [len(st.rows) for st in steps]
        feeds = {
            TOKENS: np.ascontiguousarray(np.concatenate([st.tokens for st in steps]), np.int64),
            self.position: np.concatenate([np.full(c, rows.length, np.int64) for (rows, _), c in zip(items, counts)]),
            LINEAGE: np.ascontiguousarray(np.concatenate([rows.lineage[st.rows] for rows, st in items])),
            WINDOW: np.concatenate([np.full(c, rows.window, np.int32) for (rows, _), c in zip(items, counts)]),
            **self._buffers,
            **self.model.selection(np.concatenate([st.rules for st in steps]), steps[0].suppress, np.concatenate([st.sampling for st in steps]), k),
        }
        choice = self.model._run(Role.DECODER_ROWS, feeds)[CHOICE].to_numpy()
        out, at = [], 0
        for (rows, st), c in zip(items, counts):
            out.append(choice[at : at + c, : st.slots])
            at += c
            rows.length += 1
        return out


class PoolRows:
    """A window's rows in a RowPool (decoding.Rows): the prompt is prefilled by the general
    decoder into one slot that every row's lineage shares; then each row writes its own slot."""

    def __init__(self, pool: RowPool, window: int, cross: dict):
        self.pool, self.window, self.cross = pool, window, cross
        self.cache: dict | StepCache | None = None  # the prompt's, while prefilling
        self.own = np.zeros(0, np.int32)  # each row's slot
        self.lineage = np.zeros((0, pool.capacity), np.int32)
        self.length = 0

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        model = self.pool.model
        cache = model.empty_cache(1) if self.cache is None else self.cache
        logits, self.cache = model.decoder_step(tokens, cache, self.cross)
        self.length += tokens.shape[1]
        return logits

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        model = self.pool.model
        return model.decoder_step(tokens, model.empty_cache(1), self.cross)[0]

    def spread(self, n: int) -> None:
        pool = self.pool
        if self.length >= pool.capacity:
            raise ValueError(f"the text context is full ({pool.capacity} positions)")
        self.own = np.array(pool._take(pool.slots, pool._caches, pool._free_slots, n), np.int32)
        cache = self.cache.as_cache() if isinstance(self.cache, StepCache) else self.cache
        first = self.own[0]
        for name, a in pool.slots.items():
            idx = [first] + [slice(None)] * (a.ndim - 1)
            idx[pool.axis[name]] = slice(0, self.length)
            a[tuple(idx)] = host(cache[name])[0]
        self.cache = None
        self.lineage = np.repeat(self.own[:, None], pool.capacity, axis=1)
        self.lineage[:, : self.length] = first  # every row continues the one prompt

    def reorder(self, sources) -> None:
        sources = np.asarray(sources)
        if (sources != np.arange(len(self.own))).any():
            self.lineage[:, : self.length] = self.lineage[sources, : self.length]

    def select(self, logits, rules, suppress, sampling, slots: int) -> np.ndarray:
        model = self.pool.model
        return model.select_tokens(logits, model.selection(rules, suppress, sampling, slots))

    def close(self) -> None:
        self.pool._free_slots.extend(int(s) for s in self.own)
        self.pool._free_windows.append(self.window)
        self.own, self.cache, self.cross = np.zeros(0, np.int32), None, None
