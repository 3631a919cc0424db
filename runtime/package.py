"""The `.maxpkg` format: one zip (stored, not compressed) that a runtime loads without torch.

Entries:
  manifest.json     format version, model dims, source and its hash, MAX version, CPU target,
                    dtype, graph signatures, sha256 of every other entry
  weights.json      name -> dtype, shape, byte offset, byte count in weights.bin
  weights.bin       raw little-endian tensors, 64-byte aligned; loading never unpickles.
                    A bfloat16 tensor is its 16-bit patterns (numpy has no bfloat16); it loads
                    as a MAX Buffer of dtype bfloat16, every other tensor as a numpy array
  model.mef         compiled MAX module with the graphs encoder, cross_kv, decoder
  ir/<graph>.onnx   the program in our IR, one ONNX model per graph; ir.txt printed
  assets/...        tokenizer vocabulary and mel filters
  parity.json, parity.md, MODEL_CARD.md
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_open
from .trust import is_trusted, record

FORMAT = "whisper-max"
# 2: decoder_step grows its caches in place (state inputs); 3: bfloat16 weights; 4: widened
# weights; 5: the select graph; 6: decoder_rows for rows of many windows; 7: float16 weights
# (exact ones) in float32 packages; 8: panel weights (`X/panels`, made at load)
FORMAT_VERSION = 8
# a format 2 package is a format 3 one whose weights are all float32; 3 has no widened weights;
# before 5 there is no select graph, before 6 decoder_rows takes the rows of one window: those
# open, the runtime refuses them with the hint, and `whisper-convert --rebuild` makes them anew
READS = (2, 3, 4, 5, 6, 7, 8)
# A graph weight named `X/widened` (float32) is the stored bfloat16 or float16 weight X widened,
# made once when the package is loaded and bound to every graph that names it (not stored in weights.bin).
WIDENED = "/widened"
# A graph weight named `X/panels` is the stored matrix X (n, k) in panels of PANEL output columns
# (to_panels), made once at load like a widened one: what the products of a few rows read.
PANELS = "/panels"
PANEL = 64
# The input of a step graph that maps each row's cached positions to the cache rows holding
# them, (rows, capacity) int32 (passes.row_lineage); the runtime keeps it (model.StepCache).
LINEAGE = "lineage"
# The input of decoder_rows naming the window each row reads, (rows,) int32 into the cross K/V
# inputs' leading dim (passes.engine_rows).
WINDOW = "window"
# The width of the select inputs' per-row `rules` (kernel whisper_max.select_tokens): four banned
# token ranges (lo, hi), then timestamp_begin (0: no timestamp rule).
SELECT_RANGES = 4
SELECT_RULES = 2 * SELECT_RANGES + 1
_ALIGN = 64
# CPU features a MEF compiled for this host may use; a package built where one is present
# cannot run where it is absent.
_TARGET_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
)


class PackageError(RuntimeError):
    pass


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


def cpu_target() -> dict:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"arch": platform.machine(), "features": [f for f in _TARGET_FEATURES if f in flags]}


def max_version() -> str:
    from importlib.metadata import version

    return version("max")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def derived_source(name: str) -> str | None:
    """The stored weight a derived one (`X/widened`, `X/panels`) is made from; None for others."""
    return widened_source(name) or panels_source(name)


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


def with_derived(weights: dict, names) -> dict:
    """`weights` plus each derived weight among `names`, made from its stored source once
    however many graphs bind it: `X/widened`, X's values as float32 (exact: a bfloat16 is a
    float32's top 16 bits, a float16 widens exactly too); `X/panels`, X in panels (to_panels)
    in X's own dtype, float32, float16 or bfloat16."""
    out = dict(weights)
    for name in names:
        if name in out:
            continue
        src = derived_source(name)
        if src is None:
            continue
        w = weights.get(src)
        kind = getattr(getattr(w, "dtype", None), "name", None)
        if panels_source(name) is not None:
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


def write_package(path: Path, manifest: dict, files: dict[str, bytes]) -> dict:
    """Write atomically: a temp file beside `path`, renamed over it only when complete. Returns
    the manifest written (with format and per-file sha256)."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in sorted(files.items())}
    try:
        with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
            for name, data in sorted(files.items()):
                z.writestr(name, data)
    except OSError as e:  # a full disk, a file size limit: the temp file is gone, `path` untouched
        raise PackageError(
            f"{path}: cannot write the package ({e.strerror or e}); nothing was written, any earlier file there is "
            "unchanged"
        ) from e
    return manifest


def _check_entries(path: Path, z: zipfile.ZipFile) -> None:
    """Refuse a zip that write_package would not have made, before anything in it is read:
    names that are not plain relative paths (absolute, `..`, backslashes), the same name twice,
    symlinks, and entries that are compressed or declare more bytes than the file holds (a zip
    bomb). Packages are read in place and never extracted; these make a hostile file fail early
    and say why."""
    size = path.stat().st_size
    seen: set[str] = set()
    for info in z.infolist():
        name = info.filename
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise PackageError(
                f"{path}: entry {name!r} is not a plain relative name; not a package whisper-convert wrote"
            )
        if name.lower().endswith(_PICKLE_SUFFIXES):
            raise PackageError(
                f"{path}: entry {name!r} is in a format that can hold a pickle (code run on loading); a package holds "
                "none"
            )
        if name in seen:
            raise PackageError(f"{path}: entry {name!r} appears twice; not a package whisper-convert wrote")
        seen.add(name)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise PackageError(f"{path}: entry {name!r} is a symlink; not a package whisper-convert wrote")
        if (
            info.compress_type != zipfile.ZIP_STORED
            or info.file_size != info.compress_size
            or info.header_offset + info.compress_size > size
        ):
            raise PackageError(
                f"{path}: entry {name!r} is compressed or declares {info.file_size} bytes the file does not hold; not "
                "a package whisper-convert wrote"
            )


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the manifest's shape (the fields the loader reads), or None."""
    files = m.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and _count(e.get("bytes")) for e in files.values()
    ):
        return "'files' is not a table of name -> {sha256, bytes}"
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or not all(
        isinstance(g, dict) and isinstance(g.get("weights"), list) for g in graphs.values()
    ):
        return "'graphs' is not a table of name -> {weights: [...]}"
    for g in graphs.values():
        for w in g["weights"]:
            if not (
                isinstance(w, dict)
                and isinstance(w.get("name"), str)
                and isinstance(w.get("dtype"), str)
                and isinstance(w.get("shape"), list)
            ):
                return "a graph's 'weights' entry is not {name, dtype, shape}"
    target = m.get("target_cpu")
    if (
        not isinstance(m.get("max_version"), str)
        or not isinstance(target, dict)
        or not isinstance(target.get("arch"), str)
    ):
        return "lacks 'max_version' or 'target_cpu'"
    if not isinstance(target.get("features"), list) or not all(isinstance(f, str) for f in target["features"]):
        return "'target_cpu.features' is not a list of names"
    return None


_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".npz", ".ckpt")


@dataclass
class Package:
    path: Path
    manifest: dict
    _zip: zipfile.ZipFile

    @classmethod
    def open(cls, path: str | os.PathLike) -> Package:
        path = Path(path)
        if not path.is_file():
            raise PackageError(f"{path}: no such package; create one with `whisper-convert tiny.en --out {path}`")
        try:
            z = zipfile.ZipFile(path)
            _check_entries(path, z)
            manifest = json.loads(z.read("manifest.json"))
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
            raise PackageError(f"{path}: not a whisper-max package ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise PackageError(
                f"{path}: not a whisper-max package (format "
                f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
            )
        if type(manifest.get("format_version")) is not int or manifest["format_version"] not in READS:
            raise PackageError(
                f"{path}: package format {manifest.get('format_version')!r}, this runtime reads formats {READS[0]} to "
                f"{READS[-1]}; convert the model again with this version's whisper-convert"
            )
        problem = _manifest_problem(manifest)
        if problem:
            raise PackageError(f"{path}: manifest.json {problem}; not a package whisper-convert wrote")
        listed = set(manifest["files"]) | {"manifest.json"}
        if listed != set(z.namelist()):
            extra, missing = sorted(set(z.namelist()) - listed), sorted(listed - set(z.namelist()))
            raise PackageError(
                f"{path}: the zip's entries and the manifest's differ (not listed: {extra[:5]}; missing: "
                f"{missing[:5]}); convert the model again"
            )
        return cls(path, manifest, z)

    def names(self) -> list[str]:
        return sorted(self.manifest["files"])

    def read(self, name: str, verify: bool = True) -> bytes:
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise PackageError(f"{self.path}: no entry {name!r} (has {self.names()})")
        try:
            data = self._zip.read(name)  # zipfile checks the CRC
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise PackageError(
                f"{self.path}: {name} cannot be read ({e}): the file is damaged; convert the model again"
            ) from e
        if verify and _sha256(data) != entry["sha256"]:
            raise PackageError(
                f"{self.path}: {name} does not match its sha256 in the manifest: damaged, or changed after "
                "conversion; convert the model again"
            )
        return data

    def weights(self) -> dict:
        """Every weight a graph binds: those in weights.bin, and the derived ones (widened,
        panels) made from them."""
        # the zip's CRC covers weights.bin; a bytearray keeps the arrays writable for MAX
        stored = unpack_weights(self.read("weights.json"), self._read_stored("weights.bin"))
        return with_derived(stored, (w["name"] for g in self.manifest["graphs"].values() for w in g["weights"]))

    def _read_stored(self, name: str) -> bytearray:
        """A stored (uncompressed) member read straight into one writable buffer, checked against
        the manifest's sha256: one read instead of zipfile's read, CRC check and copy (0.2 s for
        tiny.en)."""
        info = self._zip.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            return bytearray(self.read(name))
        buf = huge_buffer(info.file_size)
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                raise PackageError(f"{self.path}: {name} has a damaged zip header")
            f.seek(
                info.header_offset
                + 30
                + int.from_bytes(header[26:28], "little")
                + int.from_bytes(header[28:30], "little")
            )
            if f.readinto(buf) != info.file_size:
                raise PackageError(f"{self.path}: {name} is truncated")
        # the manifest's sha256, not the zip's CRC (which a re-zipped change passes), says the bytes
        # are the ones converted; it also catches what the CRC would, so the CRC is not computed
        entry = self.manifest["files"].get(name)
        if entry is None or _sha256(buf) != entry["sha256"]:
            raise PackageError(
                f"{self.path}: {name} does not match its sha256 in the manifest: damaged, or changed after "
                "conversion; convert the model again"
            )
        return buf

    def npy(self, name: str) -> np.ndarray:
        """An .npy entry's array; never unpickles (an object array is refused)."""
        try:
            return np.load(io.BytesIO(self.read(name)), allow_pickle=False)
        except ValueError as e:
            raise PackageError(
                f"{self.path}: {name} is not a plain .npy array ({e}); a package holds no pickles"
            ) from e

    def json(self, name: str):
        return json.loads(self.read(name))

    def check_compatible(self) -> None:
        """Raise if this package's compiled artifact cannot run here (other MAX build or CPU)."""
        redo = f"rebuild it here from its own IR and weights: `whisper-convert --rebuild {self.path}`"
        want, have = self.manifest["max_version"], max_version()
        if want != have:
            raise PackageError(
                f"{self.path}: compiled with MAX {want}, this is MAX {have}; a MEF runs only on the build that made "
                f"it. Install max=={want}, or {redo}"
            )
        here = cpu_target()
        target = self.manifest["target_cpu"]
        missing = sorted(set(target["features"]) - set(here["features"]))
        if target["arch"] != here["arch"] or missing:
            raise PackageError(
                f"{self.path}: compiled for {target['arch']} with {target['features']}; this CPU is {here['arch']} "
                f"lacking {missing}; {redo}"
            )

    def check_trusted(self, trust: bool = False) -> None:
        """Refuse a compiled program (machine code) this machine did not make and the user did not
        vouch for (runtime.trust); `trust=True` vouches, and records it."""
        mef = self.manifest["files"].get("model.mef", {}).get("sha256", "")
        if is_trusted(mef):
            return
        if not trust:
            raise PackageError(
                f"{self.path}: its compiled program (model.mef, machine code) was not made on this machine, and "
                "loading it would run it. "
                f"Rebuild it here from its IR and weights, which are data: `whisper-convert --rebuild {self.path}`; "
                f"or, if you trust where it came from, pass --trust (Python: load(path, trust=True)) once"
            )
        record(mef, self.path)

    def load_models(self, session=None, weights=None, trust: bool = False) -> dict:
        """The compiled graphs, initialised with this package's weights; never compiles. The MEF
        is loaded only if trusted (check_trusted).

        `weights` may be a future of `self.weights()` started by the caller: reading and
        CRC-checking weights.bin releases the GIL, so it overlaps the MEF read here."""
        from max import engine
        from max.engine import InferenceSession

        self.check_compatible()
        self.check_trusted(trust)
        session = session or InferenceSession()
        compiled = engine.read(io.BytesIO(self._read_stored("model.mef")))  # CRC-checked, like weights.bin
        weights = self.weights() if weights is None else weights.result()
        self.check_weights(weights)
        models = session.init_all(compiled, weights_registry=weights)
        models["_weights"] = weights  # MAX binds these zero-copy: keep them alive with the models
        return models

    def check_weights(self, weights: dict) -> None:
        # MAX does not check a bound weight's shape or dtype; the manifest says what each graph wants
        for g in self.manifest["graphs"].values():
            for w in g["weights"]:
                a = weights.get(w["name"])
                if a is None:
                    raise PackageError(f"{self.path}: weight {w['name']!r} missing from weights.bin")
                if list(a.shape) != w["shape"] or a.dtype.name != w["dtype"]:
                    raise PackageError(
                        f"{self.path}: weight {w['name']!r} is {a.dtype.name}{list(a.shape)}, the graphs want "
                        f"{w['dtype']}{w['shape']}"
                    )
