"""The `.maxpkg` format: one zip (stored, not compressed) that a runtime loads without torch.

Entries:
  manifest.json     format version, model dims, source and its hash, MAX version, target,
                    dtype, graph signatures, sha256 of every other entry (runtime.manifest)
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
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .files import atomic_open
from .manifest import FORMAT_VERSION, FileEntry, Manifest, Target
from .trust import is_trusted, record
from .weights import PackageError, huge_buffer, unpack_weights, with_derived


def max_version() -> str:
    from importlib.metadata import version

    return version("max")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_package(path: Path, manifest: Manifest, files: dict[str, bytes]) -> Manifest:
    """Write atomically: a temp file beside `path`, renamed over it only when complete. Returns
    the manifest written (with the current format and every entry's sha256 and size)."""
    entries = {name: FileEntry(_sha256(data), len(data)) for name, data in files.items()}
    manifest = replace(manifest, files=entries, format_version=FORMAT_VERSION)
    try:
        with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr("manifest.json", json.dumps(manifest.to_json(), indent=2, sort_keys=True))
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


_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".npz", ".ckpt")


@dataclass
class Package:
    path: Path
    manifest: Manifest
    _zip: zipfile.ZipFile

    @classmethod
    def open(cls, path: str | os.PathLike) -> Package:
        path = Path(path)
        if not path.is_file():
            raise PackageError(f"{path}: no such package; create one with `whisper-convert tiny.en --out {path}`")
        try:
            z = zipfile.ZipFile(path)
            _check_entries(path, z)
            raw = json.loads(z.read("manifest.json"))
        except (
            zipfile.BadZipFile,
            KeyError,
            json.JSONDecodeError,
            UnicodeDecodeError,
            OSError,
            EOFError,
            NotImplementedError,  # a central directory asking for a zip version or method zipfile lacks
        ) as e:
            raise PackageError(f"{path}: not a whisper-max package ({e})") from e
        try:
            manifest = Manifest.from_json(raw)
        except PackageError as e:
            raise PackageError(f"{path}: {e}") from None
        listed = set(manifest.files) | {"manifest.json"}
        if listed != set(z.namelist()):
            extra, missing = sorted(set(z.namelist()) - listed), sorted(listed - set(z.namelist()))
            raise PackageError(
                f"{path}: the zip's entries and the manifest's differ (not listed: {extra[:5]}; missing: "
                f"{missing[:5]}); convert the model again"
            )
        return cls(path, manifest, z)

    def names(self) -> list[str]:
        return sorted(self.manifest.files)

    def read(self, name: str, verify: bool = True) -> bytes:
        entry = self.manifest.files.get(name)
        if entry is None:
            raise PackageError(f"{self.path}: no entry {name!r} (has {self.names()})")
        try:
            data = self._zip.read(name)  # zipfile checks the CRC
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
            raise PackageError(
                f"{self.path}: {name} cannot be read ({e}): the file is damaged; convert the model again"
            ) from e
        if verify and _sha256(data) != entry.sha256:
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
        return with_derived(stored, self.manifest.weight_names())

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
        entry = self.manifest.files.get(name)
        if entry is None or _sha256(buf) != entry.sha256:
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
        want, have = self.manifest.max_version, max_version()
        if want != have:
            raise PackageError(
                f"{self.path}: compiled with MAX {want}, this is MAX {have}; a MEF runs only on the build that made "
                f"it. Install max=={want}, or {redo}"
            )
        target, here = self.manifest.target, Target.host()
        if not target.runs_on(here):
            raise PackageError(
                f"{self.path}: compiled for {target}; this CPU is {here.arch} {here.device} lacking "
                f"{target.missing_on(here)}; {redo}"
            )

    def check_trusted(self, trust: bool = False) -> None:
        """Refuse a compiled program (machine code) this machine did not make and the user did not
        vouch for (runtime.trust); `trust=True` vouches, and records it."""
        mef = self.manifest.files["model.mef"].sha256 if "model.mef" in self.manifest.files else ""
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
        for g in self.manifest.graphs.values():
            for w in g.weights:
                a = weights.get(w.name)
                if a is None:
                    raise PackageError(f"{self.path}: weight {w.name!r} missing from weights.bin")
                if list(a.shape) != list(w.shape) or a.dtype.name != w.dtype:
                    raise PackageError(
                        f"{self.path}: weight {w.name!r} is {a.dtype.name}{list(a.shape)}, the graphs want "
                        f"{w.dtype}{list(w.shape)}"
                    )
