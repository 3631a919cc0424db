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
from .weights import PackageError, _count, huge_buffer, unpack_weights, with_derived

FORMAT = "whisper-max"
# 2: decoder_step grows its caches in place (state inputs); 3: bfloat16 weights; 4: widened
# weights; 5: the select graph; 6: decoder_rows for rows of many windows; 7: float16 weights
# (exact ones) in float32 packages; 8: panel weights (`X/panels`, made at load)
FORMAT_VERSION = 8
# a format 2 package is a format 3 one whose weights are all float32; 3 has no widened weights;
# before 5 there is no select graph, before 6 decoder_rows takes the rows of one window: those
# open, the runtime refuses them with the hint, and `whisper-convert --rebuild` makes them anew
READS = (2, 3, 4, 5, 6, 7, 8)
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
