"""The engine's decoder state for rows of many windows: cache slots and windows' cross K/V in
one pool, so that one decoder_rows call decodes every running row (runtime.engine holds one,
from `WhisperModel.pool()`)."""

from __future__ import annotations

import numpy as np

from .manifest import TensorSpec
from .program import CHOICE, LINEAGE, LOGIT_ROWS, LOGITS, TOKENS, WINDOW, Role, host, no_selection


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


def _storage(dtype: str) -> np.dtype:
    """The numpy dtype the pool keeps a value of graph dtype `dtype` in: a bfloat16 package's
    cross keys and values as their bits (numpy has no bfloat16), viewed as bfloat16 again when
    bound to the graph."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def _bits(x) -> np.ndarray:
    """A cross_kv output as the pool stores it: a float32 array, or a bfloat16 buffer's bits."""
    if getattr(getattr(x, "dtype", None), "name", None) == "bfloat16":
        from max.dtype import DType

        return x.view(DType.uint16).to_numpy()
    return host(x)


def _grown(a: np.ndarray, n: int) -> np.ndarray:
    """`a` with its leading dim grown to n (the new rows zero)."""
    out = _pool_zeros((n, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


PROMPT = "decoder_rows.prompt"  # how GraphStats counts decoder_rows calls that prefill a prompt


class RowPool:
    """decoder_rows' state for rows of many windows, so that one call decodes them all: cache
    slots (each row's positions are in the slots its lineage names) and windows' cross-attention
    values (each row reads the window its WINDOW input names). Both grow on demand and are reused
    as windows close."""

    def __init__(self, model):  # a runtime.model.WhisperModel (the layer above; not imported)
        self.model = model
        sig = model._sig[Role.DECODER_ROWS]
        self._caches = [i for i in sig.inputs if i.state is not None]
        self._cross = [i for i in sig.inputs if i.shape[:1] == ("windows",)]
        self.position = self._caches[0].state.position
        self.axis = {i.name: i.state.axis for i in self._caches}
        self.capacity = min(i.shape[i.state.axis] for i in self._caches)
        self.slots: dict[str, np.ndarray] = {}
        self.windows: dict[str, np.ndarray] = {}
        self._buffers: dict = {}
        self._free_slots: list[int] = []
        self._free_windows: list[int] = []
        self._rows_index = np.zeros(0, np.int64)  # 0, 1, ...: every row's logits (LOGIT_ROWS)

    def _grow(self, arrays: dict, specs: list[TensorSpec], free: list[int], need: int, exact: bool = False) -> None:
        from max.driver import Buffer
        from max.dtype import DType

        have = len(next(iter(arrays.values()))) if arrays else 0
        n = have + need if exact else max(have * 2, have + need, 4)
        for i in specs:
            shape = [n, *i.shape[1:]]
            arrays[i.name] = _grown(arrays[i.name], n) if have else _pool_zeros(shape, _storage(i.dtype))
        for i in specs:  # zero-copy views, remade as they grow
            buffer = Buffer.from_numpy(arrays[i.name])
            self._buffers[i.name] = buffer.view(DType.bfloat16) if i.dtype == "bfloat16" else buffer
        free.extend(range(n - 1, have - 1, -1))

    def reserve(self, rows: int, windows: int) -> None:
        """Room for at least `rows` rows of `windows` windows at once, made now in one step: growing
        on demand doubles, copying what is there each time (hundreds of MB for 40 rows)."""
        for arrays, specs, free, n in (
            (self.slots, self._caches, self._free_slots, rows),
            (self.windows, self._cross, self._free_windows, windows),
        ):
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
            self.windows[i.name][w] = _bits(cross[i.name])[0]
        return PoolRows(self, w, cross)

    def step(self, items: list) -> list[np.ndarray]:
        """One decoder_rows call for the live rows of many windows: `items` (PoolRows,
        decoding.Step) pairs; each window's choice. Windows whose tokens every row suppresses
        differ (other options) are called apart; a call that raises gives its exception as the
        choice of each of its windows (their rows stay where they were)."""
        out: list = [None] * len(items)
        groups: dict[bytes, list[int]] = {}
        for j, (_, st) in enumerate(items):
            groups.setdefault(np.asarray(st.suppress, np.int32).tobytes(), []).append(j)
        for members in groups.values():
            try:
                got = self._call([items[j] for j in members])
            except Exception as e:
                got = [e] * len(members)
            for j, choice in zip(members, got):
                out[j] = choice
        return out

    def _every_row(self, n: int) -> np.ndarray:
        if len(self._rows_index) < n:
            self._rows_index = np.arange(max(n, 2 * len(self._rows_index)), dtype=np.int64)
        return self._rows_index[:n]

    def _call(self, items: list) -> list[np.ndarray]:
        steps = [st for _, st in items]
        k = max(st.slots for st in steps)
        counts = [len(st.rows) for st in steps]
        feeds = {
            TOKENS: np.ascontiguousarray(np.concatenate([st.tokens for st in steps]), np.int64),
            self.position: np.concatenate([np.full(c, rows.length, np.int64) for (rows, _), c in zip(items, counts)]),
            LINEAGE: np.ascontiguousarray(np.concatenate([rows.lineage[st.rows] for rows, st in items])),
            WINDOW: np.concatenate([np.full(c, rows.window, np.int32) for (rows, _), c in zip(items, counts)]),
            LOGIT_ROWS: self._every_row(sum(counts)),
            **self._buffers,
            **self.model.selection(
                np.concatenate([st.rules for st in steps]),
                steps[0].suppress,
                np.concatenate([st.sampling for st in steps]),
                k,
            ),
        }
        choice = self.model._run(Role.DECODER_ROWS, feeds)[CHOICE].to_numpy()
        out, at = [], 0
        for (rows, st), c in zip(items, counts):
            out.append(choice[at : at + c, : st.slots])
            at += c
            rows.length += 1
        return out


class PoolRows:
    """A window's rows in a RowPool (decoding.Rows): the prompt is prefilled by decoder_rows,
    one row per token at consecutive positions of one slot (each row's keys and values are
    written before any row attends, so the rows see each other causally); that slot becomes the
    first row's and every row's lineage shares its prompt positions; then each row writes its own slot."""

    def __init__(self, pool: RowPool, window: int, cross: dict):
        self.pool, self.window, self.cross = pool, window, cross
        self.own = np.zeros(0, np.int32)  # each row's slot (the prompt's first)
        self.lineage = np.zeros((0, pool.capacity), np.int32)
        self.length = 0

    def _prompt(self, slot: int, start: int, tokens: np.ndarray) -> np.ndarray:
        """decoder_rows on (1, n) tokens at positions start.. of `slot`: the last one's logits (1, n_vocab)."""
        pool = self.pool
        n = tokens.shape[1]
        if start + n > pool.capacity:
            raise ValueError(f"the text context is full ({pool.capacity} positions)")
        feeds = {
            TOKENS: np.ascontiguousarray(tokens.reshape(n, 1), np.int64),
            pool.position: np.arange(start, start + n, dtype=np.int64),
            LINEAGE: np.full((n, pool.capacity), slot, np.int32),
            WINDOW: np.full(n, self.window, np.int32),
            LOGIT_ROWS: np.array([n - 1], np.int64),
            **pool._buffers,
            **no_selection(1),
        }
        return pool.model._run(Role.DECODER_ROWS, feeds, counted_as=PROMPT)[LOGITS].to_numpy()

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        pool = self.pool
        if not len(self.own):
            self.own = np.array(pool._take(pool.slots, pool._caches, pool._free_slots, 1), np.int32)
        logits = self._prompt(int(self.own[0]), self.length, tokens)
        self.length += tokens.shape[1]
        return logits

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        pool = self.pool
        (slot,) = pool._take(pool.slots, pool._caches, pool._free_slots, 1)
        try:
            return self._prompt(slot, 0, tokens)
        finally:
            pool._free_slots.append(slot)

    def spread(self, n: int) -> None:
        pool = self.pool
        if self.length >= pool.capacity:
            raise ValueError(f"the text context is full ({pool.capacity} positions)")
        more = pool._take(pool.slots, pool._caches, pool._free_slots, n - len(self.own))
        self.own = np.array([*self.own, *more], np.int32)
        self.lineage = np.repeat(self.own[:, None], pool.capacity, axis=1)
        self.lineage[:, : self.length] = self.own[0]  # every row continues the one prompt

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
        self.own, self.cross = np.zeros(0, np.int32), None
