"""Weights as a package stores and the graphs bind them: weights.json + weights.bin (each tensor
64-byte aligned, read zero-copy), bfloat16 as its bits, and the weights made from stored ones at
load (`X/widened`, `X/panels`, `X/pairs`), once however many graphs bind them."""

from __future__ import annotations

import io
import json
import os

import numpy as np


class PackageError(RuntimeError):
    """A package (or its weights) that cannot be opened, read or used here; the message says why
    and what to do. Defined here, the lowest layer that raises it; runtime.package exports it."""


# A graph weight named `X/widened` (float32) is the stored bfloat16 or float16 weight X widened,
# made once when the package is loaded and bound to every graph that names it (not stored in weights.bin).
WIDENED = "/widened"
# A graph weight named `X/panels` is the stored matrix X (n, k) in panels of PANEL output columns
# (to_panels), made once at load like a widened one: what the products of a few rows read.
PANELS = "/panels"
# A graph weight named `X/pairs` is the stored bfloat16 matrix X (n, k) in pair panels (to_pairs),
# made once at load: what the bfloat16 products of a few rows on VDPBF16PS read.
PAIRS = "/pairs"
PANEL = 64
_ALIGN = 64


def huge_buffer(size: int):
    """A writable zeroed buffer of `size` bytes that the kernel may back with 2 MiB pages
    (transparent huge pages, asked for with madvise, private anonymous memory; where THP is
    off it is ordinary memory). A decoder step streams every weight once: with 4 KiB pages
    that is a TLB miss every 4 KiB. On an AMD EPYC (Zen 4) the tiny.en one-row step went from
    4.3-4.8 to 3.2-3.4 ms (when the kernel found the huge pages), five rows from 6.7-7.9 to
    6.2-6.3 ms. WHISPER_MAX_NO_HUGE=1 turns it off (for comparisons)."""
    import mmap

    if os.environ.get("WHISPER_MAX_NO_HUGE") or size < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return bytearray(size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def to_bfloat16(a: np.ndarray):
    """float32 values rounded to the nearest bfloat16 (ties to even), as a MAX Buffer."""
    a = np.ascontiguousarray(a, np.float32)
    if not np.isfinite(a).all():
        raise ValueError("to_bfloat16: the tensor has inf or nan values")
    u = a.view(np.uint32)
    return _bfloat16_buffer(((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16))


def from_bfloat16(buffer) -> np.ndarray:
    """A bfloat16 Buffer's values as float32, exactly (a bfloat16 is a float32's top 16 bits)."""
    from max.dtype import DType

    wide = buffer.view(DType.uint16).to_numpy().astype(np.uint32)
    wide <<= 16  # in place: one array of the float32 size, not two
    return wide.view(np.float32)


def _bfloat16_buffer(bits: np.ndarray):
    """uint16 bit patterns as a MAX bfloat16 Buffer over the same memory."""
    from max.driver import Buffer
    from max.dtype import DType

    return Buffer.from_numpy(bits).view(DType.bfloat16)


def widened_source(name: str) -> str | None:
    """X for a widened weight's name `X/widened`; None for any other name."""
    return name[: -len(WIDENED)] if name.endswith(WIDENED) else None


def panels_source(name: str) -> str | None:
    """X for a panel-packed weight's name `X/panels`; None for any other name."""
    return name[: -len(PANELS)] if name.endswith(PANELS) else None


def pairs_source(name: str) -> str | None:
    """X for a pair-packed weight's name `X/pairs`; None for any other name."""
    return name[: -len(PAIRS)] if name.endswith(PAIRS) else None


def derived_source(name: str) -> str | None:
    """The stored weight a derived one (`X/widened`, `X/panels`, `X/pairs`) is made from; None
    for others."""
    return widened_source(name) or panels_source(name) or pairs_source(name)


def to_panels(w: np.ndarray) -> np.ndarray:
    """w (n, k) as (ceil(n / PANEL), k, PANEL): panel p holds columns p * PANEL ... of w^T, k
    rows of PANEL contiguous values, the last panel padded with zero columns. The layout in
    which the products of a few rows (whisper_max.linear_panels) read each weight: one pass over
    contiguous memory, PANEL output columns of several rows summed in registers."""
    w = np.asarray(w)
    n, k = w.shape
    panels = -(-n // PANEL)
    out = np.zeros((panels * PANEL, k), w.dtype)
    out[:n] = w
    return np.ascontiguousarray(out.reshape(panels, PANEL, k).transpose(0, 2, 1))


def to_pairs(bits: np.ndarray) -> np.ndarray:
    """bits (n, k) (a bfloat16 matrix's uint16 bits, k even) as (ceil(n / PANEL), k / 2, PANEL, 2):
    panel p holds columns p * PANEL ... of w^T as k / 2 rows of PANEL pairs, the values of a
    column at k = 2i and 2i + 1 adjacent (the operand layout of VDPBF16PS, which multiplies pairs
    and adds both products into one float32 sum), the last panel padded with zero columns."""
    bits = np.asarray(bits)
    n, k = bits.shape
    if k % 2:
        raise ValueError(f"to_pairs: a matrix of {k} columns; pairs need an even number")
    panels = -(-n // PANEL)
    out = np.zeros((panels * PANEL, k), bits.dtype)
    out[:n] = bits
    return np.ascontiguousarray(out.reshape(panels, PANEL, k // 2, 2).transpose(0, 2, 1, 3))


def with_derived(weights: dict, names) -> dict:
    """`weights` plus each derived weight among `names`, made from its stored source once
    however many graphs bind it: `X/widened`, X's values as float32 (exact: a bfloat16 is a
    float32's top 16 bits, a float16 widens exactly too); `X/panels`, X in panels (to_panels)
    in X's own dtype, float32, float16 or bfloat16; `X/pairs`, a bfloat16 X in pair panels
    (to_pairs)."""
    out = dict(weights)
    for name in names:
        if name in out:
            continue
        src = derived_source(name)
        if src is None:
            continue
        w = weights.get(src)
        kind = getattr(getattr(w, "dtype", None), "name", None)
        if pairs_source(name) is not None:
            rank = len(getattr(w, "shape", ()))
            if kind != "bfloat16" or rank != 2 or w.shape[1] % 2:
                raise PackageError(
                    f"pair weight {name!r}: its source {src!r} is "
                    f"{'missing' if w is None else f'{kind} of shape {list(w.shape)}'}, not a stored bfloat16 matrix "
                    "of an even number of columns"
                )
            from max.dtype import DType

            out[name] = _bfloat16_buffer(to_pairs(w.view(DType.uint16).to_numpy()))
        elif panels_source(name) is not None:
            rank = len(getattr(w, "shape", ()))  # a numpy array, or a MAX Buffer (bfloat16)
            if kind not in ("float32", "float16", "bfloat16") or rank != 2:
                raise PackageError(
                    f"panel weight {name!r}: its source {src!r} is "
                    f"{'missing' if w is None else f'{kind} of rank {rank}'}, not a stored float32, float16 or "
                    "bfloat16 matrix"
                )
            if kind == "bfloat16":  # a MAX Buffer: its bits in panels, viewed as bfloat16 again
                from max.dtype import DType

                out[name] = _bfloat16_buffer(to_panels(w.view(DType.uint16).to_numpy()))
            else:
                out[name] = to_panels(w)
        elif kind == "bfloat16":
            out[name] = from_bfloat16(w)
        elif kind == "float16":
            out[name] = np.asarray(w, np.float32)
        else:
            raise PackageError(
                f"widened weight {name!r}: its source {src!r} is {'missing' if w is None else w.dtype}, not a stored "
                "bfloat16 or float16 weight"
            )
    return out


def pack_weights(weights: dict) -> tuple[bytes, bytes]:
    """(weights.json, weights.bin) for numpy arrays and bfloat16 Buffers (to_bfloat16), names
    sorted, 64-byte aligned."""
    index, buf = {}, io.BytesIO()
    for name in sorted(weights):
        w = weights[name]
        if getattr(w.dtype, "name", None) == "bfloat16":
            from max.dtype import DType

            dtype, a = "bfloat16", np.ascontiguousarray(w.view(DType.uint16).to_numpy())
        else:
            a = np.ascontiguousarray(w)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            dtype = a.dtype.name
        pad = (-buf.tell()) % _ALIGN
        buf.write(b"\0" * pad)
        index[name] = {"dtype": dtype, "shape": list(a.shape), "offset": buf.tell(), "nbytes": a.nbytes}
        buf.write(a.tobytes())
    return json.dumps(index, indent=1, sort_keys=True).encode(), buf.getvalue()


# the dtypes weights.bin may hold (no object or structured dtypes: plain numbers only)
_WEIGHT_DTYPES = (
    "float32",
    "float16",
    "float64",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "uint16",
    "bool",
)


def _count(x) -> bool:
    return type(x) is int and x >= 0


def unpack_weights(index_json: bytes, blob: bytes | bytearray) -> dict:
    """Views into `blob` (pass a bytearray for writable arrays); checks every extent. bfloat16
    tensors come back as MAX Buffers over the same bytes."""
    try:
        index = json.loads(index_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"weights.json is not JSON ({e})") from e
    if not isinstance(index, dict):
        raise PackageError("weights.json is not a name -> entry table")
    out = {}
    for name, e in index.items():
        ok = (
            isinstance(e, dict)
            and e.get("dtype") in _WEIGHT_DTYPES
            and isinstance(e.get("shape"), list)
            and all(map(_count, e["shape"]))
        )
        if not ok or not _count(e.get("offset")) or not _count(e.get("nbytes")):
            raise PackageError(
                f"weights.json: entry {name!r} is not {{dtype, shape, offset, nbytes}} of a plain numeric tensor"
            )
        bf16 = e["dtype"] == "bfloat16"
        dtype = np.dtype(np.uint16 if bf16 else e["dtype"])
        count = 1
        for d in e["shape"]:
            count *= d  # Python ints: a hostile shape cannot wrap around
        if e["nbytes"] != count * dtype.itemsize or e["offset"] + e["nbytes"] > len(blob):
            raise PackageError(f"weights.json: entry {name!r} does not fit weights.bin")
        a = np.frombuffer(blob, dtype, count, e["offset"]).reshape(e["shape"])
        out[name] = _bfloat16_buffer(a) if bf16 else a
    return out
