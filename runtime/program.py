"""The program contract: what a package's compiled program is and how it is called.

Torch-free and MAX-light; the converter (which builds and checks the program) and the runtime
(which runs it) both import it, and nothing else of each other. It names the graphs by role
(`Role`), the graph values the runtime feeds and reads, and the calling convention of the
decoder: which graph a call runs (`decoder_call`), the in-place caches of the step graphs
(`StepCache`), the next-token choice (`select_call`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from .manifest import GraphSignature, TensorSpec

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10
    from enum import Enum

    class StrEnum(str, Enum):
        __str__ = str.__str__
        __format__ = str.__format__


class Role(StrEnum):
    """The graphs of a package's program, by role. Members are their names (str)."""

    ENCODER = "encoder"  # mel (batch, n_mels, 3000) -> encoder (batch, 1500, d)
    CROSS_KV = "cross_kv"  # encoder -> each layer's cross-attention keys and values
    DECODER = "decoder"  # tokens (batch, n) after a cache of `past` positions -> last logits, grown caches
    DECODER_STEP = "decoder_step"  # one token of one row, caches grown in place, and the choice
    DECODER_ROWS = "decoder_rows"  # one token for each of any rows: own position, cache slots (lineage), window; choice
    ALIGNMENT = "alignment"  # tokens and encoder -> logits and cross-attention weights (word timestamps)
    SELECT = "select"  # logits -> the next-token choice (after the general decoder)


# graph values the runtime feeds or reads by name
MEL, AUDIO_FEATURES, TOKENS, LOGITS, CHOICE = "mel", "encoder", "tokens", "logits", "choice"
RULES, SUPPRESS, SAMPLING, SLOTS = "rules", "suppress", "sampling", "slots"  # the choice's inputs besides the logits
STEP_GRAPHS = (Role.DECODER_STEP, Role.DECODER_ROWS)  # the graphs that grow their caches in place
# The graphs a package compiles and the runtime runs (format 10 on). The program's IR keeps the
# general decoder and decoder_step, the sources decoder_rows is made from and what the per-layer
# parity probe compiles (an older package's IR also an alignment graph); decoder_rows prefills
# prompts itself (a row per token, LOGIT_ROWS) and gives word timestamps' scores (QUERIES,
# alignment_call).
RUNTIME_GRAPHS = (Role.ENCODER, Role.CROSS_KV, Role.DECODER_ROWS, Role.SELECT)
# The input of a step graph that maps each row's cached positions to the cache rows holding
# them, (rows, capacity) int32 (passes.row_lineage); the runtime keeps it (StepCache).
LINEAGE = "lineage"
# The input of decoder_rows naming the window each row reads, (rows,) int32 into the cross K/V
# inputs' leading dim (passes.engine_rows).
WINDOW = "window"
# The input of decoder_rows naming the rows whose logits and choice it computes, (picked,) int64
# (passes.logit_rows): every row for a decoding step, the last for a prompt prefilled as rows.
LOGIT_ROWS = "logit_rows"
# decoder_rows' outputs `<a layer's cross keys input>` + QUERIES: that layer's cross-attention
# queries (rows, d), scaled as the keys are, in layer order (passes.cross_queries): word
# timestamps' scores are the alignment heads' queries times the keys (alignment_call).
QUERIES = "/queries"
# The width of the select inputs' per-row `rules` (kernel whisper_max.select_tokens): four banned
# token ranges (lo, hi), then timestamp_begin (0: no timestamp rule).
SELECT_RANGES = 4
SELECT_RULES = 2 * SELECT_RANGES + 1


def empty_cache_shape(shape, batch: int) -> list[int]:
    """A cache input's declared shape (dims `batch`, `past`, sizes) at `batch` rows and no positions."""
    out = [batch if d == "batch" else 0 if d == "past" else d for d in shape]
    if not all(isinstance(d, int) for d in out):
        raise ValueError(f"cache shape {list(shape)}: expected the dims batch and past, and sizes")
    return out


def host(x) -> np.ndarray:
    """A graph output (max.driver.Buffer) or array as numpy, without copying; a bfloat16 buffer
    (a bfloat16 package's cross keys and values) widened to float32, exactly (a copy)."""
    if not hasattr(x, "to_numpy"):
        return np.asarray(x)
    if getattr(x.dtype, "name", None) == "bfloat16":
        from .weights import from_bfloat16

        return from_bfloat16(x)
    return x.to_numpy()


def shape_of(x) -> tuple:
    """A graph output's or array's shape, without reading it (host() widens a bfloat16 buffer)."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def state_specs(signature: GraphSignature) -> list[TensorSpec]:
    """A graph signature's state inputs (written in place), and the inputs that say where each
    row is (the position they are written at, the rows' LINEAGE and WINDOW) where it takes
    them, as StepCache takes them."""
    inputs = signature.inputs
    positions = {i.state.position for i in inputs if i.state is not None}
    return [i for i in inputs if i.state is not None or i.name in (LINEAGE, WINDOW, LOGIT_ROWS) or i.name in positions]


class StepCache:
    """Self-attention caches for a graph that grows them in place (decoder_step, decoder_rows):
    fixed-capacity buffers the graph writes each new position into, and the count of positions
    filled.

    `specs` are the graph's state inputs from the manifest (name, dtype, shape at capacity, and
    `state`: the axis it grows along and the input that carries the position; state_specs), and the
    graph's LINEAGE input if it has one; a dim `batch` becomes `rows`. `graph` names the graph
    the buffers are laid out for."""

    def __init__(self, specs: list[TensorSpec], rows: int = 1, graph: str = Role.DECODER_STEP):
        from max.driver import Buffer

        by_name = {s.name: s for s in specs}
        lineage, window, picked = LINEAGE in by_name, WINDOW in by_name, LOGIT_ROWS in by_name
        caches = [s for s in specs if s.state is not None]
        positions = {s.state.position for s in caches}
        if len(positions) != 1:
            raise ValueError(f"state inputs with positions {sorted(positions)}; expected one")
        self.position = positions.pop()
        # one position for every row (a scalar), or one per row (passes.engine_rows): all the same here
        self.per_row = self.position in by_name and bool(by_name[self.position].shape)
        shapes = {s.name: [rows if d in ("batch", "pool") else d for d in s.shape] for s in caches}
        if any(d != rows for v in shapes.values() for d in v[:1]):
            raise ValueError(f"{graph}: caches of {rows} rows cannot hold shapes {sorted(map(tuple, shapes.values()))}")
        self.graph, self.rows = graph, rows
        self.arrays = {s.name: np.zeros(shapes[s.name], np.dtype(s.dtype)) for s in caches}
        self.buffers = {k: Buffer.from_numpy(a) for k, a in self.arrays.items()}  # zero-copy views
        self.axis = {s.name: s.state.axis for s in caches}
        self.capacity = min(s.shape[s.state.axis] for s in caches)
        self.length = 0
        # with a lineage (the graph's input LINEAGE), row r's position i is in cache row
        # lineage[r, i]: reordering rewrites these ints, not the caches. Positions not yet
        # written stay the row's own (the graph writes there)
        self.lineage = np.repeat(np.arange(rows, dtype=np.int32)[:, None], self.capacity, axis=1) if lineage else None
        if lineage:
            self.buffers[LINEAGE] = Buffer.from_numpy(self.lineage)
        if window:  # every row reads window 0: the one the caller gives
            self.buffers[WINDOW] = np.zeros(rows, np.int32)
        if picked:  # every row's logits
            self.buffers[LOGIT_ROWS] = np.arange(rows, dtype=np.int64)

    @classmethod
    def holding(cls, specs: list[TensorSpec], cache: dict, rows: int = 1, graph: str = Role.DECODER_STEP) -> StepCache:
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
        position = np.full(self.rows, self.length, np.int64) if self.per_row else np.array(self.length, np.int64)
        return {**self.buffers, self.position: position}

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
    return rows > 1 and all(shape_of(v)[0] == 1 for v in cross.values())


_NO_SUPPRESS = np.zeros(0, np.int32)
_ONE_SLOT = np.zeros(1, np.int32)


def no_selection(rows: int) -> dict:
    """select inputs that filter nothing, for calls whose choice nobody reads (parity, language
    detection): the step graphs compute one anyway."""
    return {
        RULES: np.zeros((rows, SELECT_RULES), np.int32),
        SUPPRESS: _NO_SUPPRESS,
        SAMPLING: np.zeros((rows, 2), np.float32),
        SLOTS: _ONE_SLOT,
    }


def select_call(run, logits, select: dict) -> np.ndarray:
    """The select graph's choice for `logits` (rows, n_vocab): (rows, k, 2) (token,
    log-probability) pairs, best first. `run` and `select` as decoder_call takes them."""
    return run(Role.SELECT, {LOGITS: logits, **select})[CHOICE].to_numpy()


def decoder_call(
    run,
    steps: dict[str, list[dict]],
    tokens: np.ndarray,
    cache,
    cross: dict,
    select: dict | None = None,
    general: bool = True,
):
    """One decoder call as the runtime routes it (WhisperModel.decoder_step; parity replays it).

    `run(graph, inputs)` executes a graph by name; `steps` maps the in-place graphs the program
    has (decoder_step, decoder_rows) to their state inputs. One token of one row runs
    decoder_step; one token for each of several rows that share the window's values runs
    decoder_rows; `general`: anything else runs the general decoder, else (a program without one)
    the tokens of one row run decoder_rows as rows at consecutive positions of its slot, the last
    one's logits picked (`prompt_rows`). `select`: the select graph's inputs but the logits
    (rules, suppress, sampling, slots): the step graphs choose the next tokens in the same call,
    after the general decoder the select graph does. Returns the logits, the grown cache and the
    choice (None without `select`)."""
    tokens = np.ascontiguousarray(tokens, np.int64)
    rows, n = tokens.shape
    graph = None
    if n == 1 and rows == 1 and Role.DECODER_STEP in steps:
        graph = Role.DECODER_STEP
    elif n == 1 and window_shared(cross, rows):
        if Role.DECODER_ROWS not in steps:
            raise ValueError("rows sharing one window's values need the decoder_rows graph; this package has none")
        graph = Role.DECODER_ROWS
    elif not general:
        if rows != 1 or Role.DECODER_ROWS not in steps:
            raise ValueError(f"{rows} rows of {n} tokens: this program decodes a prompt of one row (decoder_rows)")
        if not isinstance(cache, StepCache) or cache.graph != Role.DECODER_ROWS or cache.rows != 1:
            cache = StepCache.holding(steps[Role.DECODER_ROWS], cache, 1, Role.DECODER_ROWS)
        out = run(Role.DECODER_ROWS, {**prompt_rows(cache, tokens[0]), **cross, **(select or no_selection(1))})
        cache.length += n
        return out[LOGITS].to_numpy(), cache, out[CHOICE].to_numpy() if select else None
    if graph is not None:
        if not isinstance(cache, StepCache) or cache.graph != graph or cache.rows != rows:
            cache = StepCache.holding(steps[graph], cache, rows, graph)
        out = run(graph, {TOKENS: tokens, **cache.feeds(), **cross, **(select or no_selection(rows))})
        cache.length += 1
        return out[LOGITS].to_numpy(), cache, out[CHOICE].to_numpy() if select else None
    if isinstance(cache, StepCache):
        cache = cache.as_cache()
    out = run(Role.DECODER, {TOKENS: tokens, **cache, **cross})
    logits = out.pop(LOGITS).to_numpy()
    choice = select_call(run, logits, select) if select else None
    return logits, out, choice


def prompt_rows(cache: StepCache, tokens: np.ndarray) -> dict:
    """decoder_rows' inputs (but the window's values and the choice's) for the n `tokens` of
    the one row of `cache` (a decoder_rows StepCache) as n rows at its next positions, all in
    its slot, the last one's logits picked: each row's keys and values are written before any
    row attends, so the rows see each other causally, as the general decoder's prompt."""
    n = len(tokens)
    if cache.length + n > cache.capacity:
        raise ValueError(f"the text context is full ({cache.capacity} positions)")
    feeds = {**cache.feeds(), TOKENS: np.ascontiguousarray(tokens.reshape(n, 1), np.int64)}
    feeds[cache.position] = np.arange(cache.length, cache.length + n, dtype=np.int64)
    feeds[LINEAGE] = np.repeat(cache.lineage[:1], n, axis=0)  # every position of the row's slot
    feeds[WINDOW] = np.zeros(n, np.int32)
    feeds[LOGIT_ROWS] = np.array([n - 1], np.int64)
    return feeds


def alignment_call(
    run,
    specs: list[TensorSpec],
    tokens: np.ndarray,
    cross: dict,
    queries: list[str],
    heads: Sequence[tuple[int, int]],
    frames: int,
):
    """Word timestamps' inputs for (1, n) `tokens` on one window (`cross`: its decoder_rows values):
    every position's logits (1, n, n_vocab) and the cross-attention scores of `heads` ((layer,
    head) pairs) over the first `frames` frames, (len(heads), n, frames), as openai-whisper's
    alignment pass takes them. One decoder_rows call (`specs`: its state inputs), a row per token
    from an empty slot with every row's logits; a head's scores are its queries (the layer's
    output in `queries`, in layer order) times its keys, summed here in float32."""
    tokens = np.ascontiguousarray(tokens, np.int64)
    n = tokens.shape[1]
    cache = StepCache(specs, 1, Role.DECODER_ROWS)
    feeds = {**prompt_rows(cache, tokens[0]), **cross, **no_selection(n)}
    feeds[LOGIT_ROWS] = np.arange(n, dtype=np.int64)
    out = run(Role.DECODER_ROWS, feeds)
    scores = np.empty((len(heads), n, frames), np.float32)
    layer_keys: dict[str, np.ndarray] = {}  # each layer's keys as float32 once (a bfloat16 package's widened)
    for i, (layer, head) in enumerate(heads):
        name = queries[layer]
        if name not in layer_keys:
            layer_keys[name] = host(cross[name.removesuffix(QUERIES)])[0]
        keys = layer_keys[name]  # (heads, hd, frames), scaled
        hd = keys.shape[1]
        q = host(out[name]).reshape(n, -1, hd)[:, head]  # (n, hd), scaled
        np.matmul(q, keys[head, :, :frames], out=scores[i])
    return host(out[LOGITS])[None], scores
