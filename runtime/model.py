"""A loaded .maxpkg as a callable Whisper: encoder, cross K/V and one decoder step."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .audio import N_FRAMES, log_mel_spectrogram
from .package import LINEAGE, SELECT_RULES, Package, PackageError
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
    """A graph signature's state inputs (written in place), and its rows' lineage if it takes
    one (package.LINEAGE), as StepCache takes them."""
    return [i for i in signature.get("inputs", []) if "state" in i or i["name"] == LINEAGE]


class StepCache:
    """Self-attention caches for a graph that grows them in place (decoder_step, decoder_rows):
    fixed-capacity buffers the graph writes each new position into, and the count of positions
    filled.

    `specs` are the graph's state inputs from the manifest (name, dtype, shape at capacity, and
    `state`: the axis it grows along and the input that carries the position), and the
    graph's LINEAGE input if it has one; a dim `batch` becomes `rows`. `graph` names the graph
    the buffers are laid out for."""

    def __init__(self, specs: list[dict], rows: int = 1, graph: str = "decoder_step"):
        from max.driver import Buffer

        lineage = any(s["name"] == LINEAGE for s in specs)
        specs = [s for s in specs if s["name"] != LINEAGE]
        shapes = {s["name"]: [rows if d == "batch" else d for d in s["shape"]] for s in specs}
        if any(d != rows for v in shapes.values() for d in v[:1]):
            raise ValueError(f"{graph}: caches of {rows} rows cannot hold shapes {sorted(map(tuple, shapes.values()))}")
        self.graph, self.rows = graph, rows
        self.arrays = {s["name"]: np.zeros(shapes[s["name"]], np.dtype(s["dtype"])) for s in specs}
        self.buffers = {k: Buffer.from_numpy(a) for k, a in self.arrays.items()}  # zero-copy views
        self.axis = {s["name"]: s["state"]["axis"] for s in specs}
        positions = {s["state"]["position"] for s in specs}
        if len(positions) != 1:
            raise ValueError(f"state inputs with positions {sorted(positions)}; expected one")
        self.position = positions.pop()
        self.capacity = min(s["shape"][s["state"]["axis"]] for s in specs)
        self.length = 0
        # with a lineage (the graph's input LINEAGE), row r's position i is in cache row
        # lineage[r, i]: reordering rewrites these ints, not the caches. Positions not yet
        # written stay the row's own (the graph writes there)
        self.lineage = np.repeat(np.arange(rows, dtype=np.int32)[:, None], self.capacity, axis=1) if lineage else None
        if lineage:
            self.buffers[LINEAGE] = Buffer.from_numpy(self.lineage)

    @classmethod
    def holding(cls, specs: list[dict], cache: dict, rows: int = 1, graph: str = "decoder_step") -> StepCache:
        """A StepCache filled with `cache` (name -> (rows, …, positions, …) from the general
        decoder, or another StepCache); a cache of one row is repeated into every row (all beams
        share the prompt)."""
        if isinstance(cache, StepCache):
            cache = cache.as_cache()
        out = cls(specs, rows, graph)
        lengths = {np.shape(cache[k])[a] for k, a in out.axis.items()}
        if len(lengths) != 1:
            raise ValueError(f"caches of lengths {sorted(lengths)}; expected one")
        out.length = lengths.pop()
        for k in out.axis:
            out._prefix(k)[...] = host(cache[k])  # broadcasts one row over all
        return out

    def _prefix(self, name: str) -> np.ndarray:
        idx = [slice(None)] * self.arrays[name].ndim
        idx[self.axis[name]] = slice(0, self.length)
        return self.arrays[name][tuple(idx)]

    def feeds(self) -> dict:
        """The graph's state inputs and the position to write at; the call fills one more."""
        if self.length >= self.capacity:
            raise ValueError(f"the text context is full ({self.capacity} positions)")
        return {**self.buffers, self.position: np.array(self.length, np.int64)}

    def reorder(self, index) -> None:
        """Row i becomes what row index[i] was (beam search), in place: only the rows that
        change, and only their filled positions, are copied."""
        index = np.asarray(index)
        moved = np.flatnonzero(index != np.arange(self.rows))
        if moved.size and self.lineage is not None:
            self.lineage[:, : self.length] = self.lineage[index, : self.length]
        elif moved.size:
            for k, a in self.arrays.items():
                dst = [moved] + [slice(None)] * (a.ndim - 1)
                src = [index[moved]] + [slice(None)] * (a.ndim - 1)
                dst[self.axis[k]] = src[self.axis[k]] = slice(0, self.length)
                a[tuple(dst)] = a[tuple(src)]  # the right side is gathered (a copy) first

    def as_cache(self) -> dict[str, np.ndarray]:
        """The filled positions as the general decoder takes them (copies)."""
        if self.lineage is None:
            return {k: np.ascontiguousarray(self._prefix(k)) for k in self.arrays}
        out = {}
        src, pos = self.lineage[:, : self.length], np.arange(self.length)[None, :]
        for k, a in self.arrays.items():
            if self.axis[k] < 1:
                raise ValueError(f"cache {k}: positions along axis {self.axis[k]}; a lineage needs them after the rows")
            # (rows, ..., positions, ...): each row's position i from row src[r, i]
            moved = np.moveaxis(a, self.axis[k], 1)[src, pos]  # (rows, positions, ...)
            out[k] = np.ascontiguousarray(np.moveaxis(moved, 1, self.axis[k]))
        return out


def window_shared(cross: dict, rows: int) -> bool:
    """Whether `rows` rows decode against one copy of the window's values (leading dim 1)."""
    return rows > 1 and all(host(v).shape[0] == 1 for v in cross.values())


_NO_SUPPRESS = np.zeros(0, np.int32)
_ONE_SLOT = np.zeros(1, np.int32)


def _no_selection(rows: int) -> dict:
    """select inputs that filter nothing, for calls whose choice nobody reads (parity, language
    detection): the step graphs compute one anyway."""
    return {"rules": np.zeros((rows, SELECT_RULES), np.int32), "suppress": _NO_SUPPRESS, "sampling": np.zeros((rows, 2), np.float32), "slots": _ONE_SLOT}


def select_call(run, logits, select: dict) -> np.ndarray:
    """The select graph's choice for `logits` (rows, n_vocab): (rows, k, 2) (token,
    log-probability) pairs, best first. `run` and `select` as decoder_call takes them."""
    return run("select", {"logits": logits, **select})["choice"].to_numpy()


def decoder_call(run, steps: dict[str, list[dict]], tokens: np.ndarray, cache, cross: dict, select: dict | None = None):
    """One decoder call as the runtime routes it (WhisperModel.decoder_step; parity replays it).

    `run(graph, inputs)` executes a graph by name; `steps` maps the in-place graphs the program
    has (decoder_step, decoder_rows) to their state inputs. One token of one row runs
    decoder_step; one token for each of several rows that share the window's values runs
    decoder_rows; anything else runs the general decoder. `select`: the select graph's inputs
    but the logits (rules, suppress, sampling, slots): the step graphs choose the next tokens in
    the same call, after the general decoder the select graph does. Returns the logits, the
    grown cache and the choice (None without `select`)."""
    tokens = np.ascontiguousarray(tokens, np.int64)
    rows, n = tokens.shape
    graph = None
    if n == 1 and rows == 1 and "decoder_step" in steps:
        graph = "decoder_step"
    elif n == 1 and window_shared(cross, rows):
        if "decoder_rows" not in steps:
            raise ValueError("rows sharing one window's values need the decoder_rows graph; this package has none")
        graph = "decoder_rows"
    if graph is not None:
        if not isinstance(cache, StepCache) or cache.graph != graph or cache.rows != rows:
            cache = StepCache.holding(steps[graph], cache, rows, graph)
        out = run(graph, {"tokens": tokens, **cache.feeds(), **cross, **(select or _no_selection(rows))})
        cache.length += 1
        return out["logits"].to_numpy(), cache, out["choice"].to_numpy() if select else None
    if isinstance(cache, StepCache):
        cache = cache.as_cache()
    out = run("decoder", {"tokens": tokens, **cache, **cross})
    logits = out.pop("logits").to_numpy()
    choice = select_call(run, logits, select) if select else None
    return logits, out, choice


class WhisperModel:
    def __init__(self, pkg: Package):
        self.package = pkg
        m = pkg.manifest
        self.dims: dict = m["model"]["dims"]
        self.is_multilingual: bool = m["model"]["multilingual"]
        self.alignment_heads = m["model"]["alignment_heads"]
        self._sig = m["graphs"]
        if "select" not in self._sig:
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
        self._decoder_inputs = {i["name"] for i in self._sig["decoder"]["inputs"]}
        # the in-place graphs' caches (a package may have neither: then all calls are general)
        self._steps = {g: state_specs(self._sig[g]) for g in ("decoder_step", "decoder_rows") if g in self._sig}
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
        return {"rules": rules, "suppress": suppress, "sampling": sampling, "slots": self._slots[k]}

    def select_tokens(self, logits, select: dict) -> np.ndarray:
        """The next-token choice for each row of `logits` (rows, n_vocab), by the select graph
        (kernel whisper_max.select_tokens): (rows, k, 2) (token, log-probability) pairs, best
        first. `select`: from `selection`."""
        return select_call(self._run, logits, select)

    def alignment(self, tokens: np.ndarray, audio_features) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits at every position and each layer's cross-attention scores (batch, head, n, frames)."""
        if "alignment" not in self._sig:
            raise ValueError(f"{self.package.path} has no alignment graph (made by an older whisper-convert); convert it again for word timestamps")
        out = self._run("alignment", {"tokens": np.ascontiguousarray(tokens, np.int64), "encoder": audio_features})
        n_layer = self.dims["n_text_layer"]
        return out["logits"].to_numpy(), [out[f"decoder.blocks.{i}.cross_attn.qk"].to_numpy() for i in range(n_layer)]

    @property
    def shares_window(self) -> bool:
        """Whether rows of one window (beams, best-of samples) can decode against one copy of
        its cross-attention values: the package has decoder_rows."""
        return "decoder_rows" in self._steps

    def share_rows(self, cache: dict, rows: int) -> StepCache:
        """A one-row cache repeated into `rows` rows, laid out for decoder_rows."""
        return StepCache.holding(self._steps["decoder_rows"], cache, rows, "decoder_rows")

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
