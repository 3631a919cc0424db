"""Fuzzing the two loaders that read files from strangers: WAV headers (runtime.audio) and
packages (runtime.package). Whatever the bytes, the loader returns data or raises the project's
own error (AudioError, PackageError), within a bounded time per example (hypothesis `deadline`);
never another exception type, never a crash of the interpreter.

Runs derandomized (the same examples every run, so CI is reproducible); set
WHISPER_MAX_FUZZ_EXAMPLES to search longer and HYPOTHESIS_SEED-free locally."""

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
from helpers import manifest_doc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisper_max.runtime import weights as wt
from whisper_max.runtime.audio import AudioError, read_audio
from whisper_max.runtime.package import Package, PackageError

EXAMPLES = int(os.environ.get("WHISPER_MAX_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=3000,  # ms per example: a loader that loops or stalls on a header fails the test
    derandomize=EXAMPLES <= 150,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------- WAV headers


def _wav(tag, channels, rate, bits, block_align, byte_rate, data, declared_data=None, extra_chunks=b"", riff_size=None):
    fmt = struct.pack("<HHIIHH", tag, channels, rate, byte_rate, block_align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunks
    body += b"data" + struct.pack("<I", len(data) if declared_data is None else declared_data) + data
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
wav_headers = st.builds(
    _wav,
    tag=st.sampled_from([1, 3, 6, 7, 0xFFFE]) | u16,
    channels=st.sampled_from([1, 2, 6]) | u16,
    rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]) | u32,
    bits=st.sampled_from([8, 16, 24, 32, 64]) | u16,
    block_align=st.sampled_from([1, 2, 4, 12]) | u16,
    byte_rate=st.sampled_from([16000, 32000, 96000]) | u32,
    data=st.binary(max_size=2048),
    declared_data=st.none() | u32,
    extra_chunks=st.sampled_from([b"", b"LIST\x04\x00\x00\x00abcd", b"fact\x04\x00\x00\x00\x10\x00\x00\x00"])
    | st.binary(max_size=24),
    riff_size=st.none() | u32,
)


def _flip(data: bytes, edits, cut) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    return bytes(b[:cut] if cut is not None else b)


def _read_all(path):
    for block in read_audio(path):
        assert block.dtype == np.float32 and block.ndim == 1 and np.isfinite(block).all()


@FUZZ
@given(
    wav=wav_headers,
    edits=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, 100),
)
def test_any_wav_header_reads_or_raises_audio_error(tmp_path, wav, edits, cut):
    path = tmp_path / "fuzz.wav"
    path.write_bytes(_flip(wav, edits, cut))
    try:
        _read_all(path)
    except AudioError:
        pass


# ---------------------------------------------------------------- packages

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# fields of the manifest the loader reads, each a place a hostile or damaged package may put anything
MANIFEST_PATHS = [
    (),
    ("format",),
    ("format_version",),
    ("files",),
    ("files", "weights.bin"),
    ("files", "weights.bin", "sha256"),
    ("files", "weights.json", "bytes"),
    ("graphs",),
    ("graphs", "g"),
    ("graphs", "g", "weights"),
    ("graphs", "g", "weights", 0),
    ("graphs", "g", "weights", 0, "name"),
    ("graphs", "g", "weights", 0, "shape"),
    ("graphs", "g", "weights", 0, "dtype"),
    ("max_version",),
    ("target",),
    ("target", "arch"),
    ("target", "features"),
    ("target", "device"),
    ("model",),
    ("model", "dims"),
    ("model", "alignment_heads"),
    ("dtype",),
    ("rebuilt",),
]
# fields of one weights.json entry
WEIGHT_FIELDS = ["dtype", "shape", "offset", "nbytes"]


def _good_entries():
    weights = {"a.weight": np.arange(15, dtype=np.float32).reshape(3, 5), "b.bias": np.array([1, 2, 3], np.int64)}
    wj, wb = wt.pack_weights(weights)
    return {"weights.json": wj, "weights.bin": wb, "notes.txt": b"hello"}


def _manifest(files: dict[str, bytes]) -> dict:
    return manifest_doc(files={n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()})


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _zip(path: Path, entries: list[tuple[str, bytes]]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)


def _load_all(path):
    """Everything the runtime does with a package short of running its MEF."""
    try:
        pkg = Package.open(path)
        for name in pkg.names():
            pkg.read(name)
        weights = pkg.weights()
        pkg.check_weights(weights)
        pkg.check_compatible()
    except PackageError:
        pass


@FUZZ
@given(where=st.sampled_from(MANIFEST_PATHS), value=json_values)
def test_any_manifest_loads_or_raises_package_error(tmp_path, where, value):
    files = _good_entries()
    manifest = _set(_manifest(files), where, value)
    path = tmp_path / "fuzz.maxpkg"
    _zip(path, [("manifest.json", json.dumps(manifest).encode()), *files.items()])
    _load_all(path)


@FUZZ
@given(
    name=st.sampled_from(["a.weight", "b.bias", "new"]),
    field=st.sampled_from([*WEIGHT_FIELDS, None]),
    value=json_values | st.lists(st.integers(-(2**40), 2**40), max_size=4),
)
def test_any_weights_index_loads_or_raises_package_error(tmp_path, name, field, value):
    """weights.json with a manifest that vouches for it (sha256 matching: a hostile package
    sets its own hashes, so the index itself must be checked)."""
    files = _good_entries()
    index = json.loads(files["weights.json"])
    if field is None:
        index[name] = value
    else:
        index.setdefault(name, dict(index["a.weight"]))[field] = value
    files["weights.json"] = json.dumps(index).encode()
    path = tmp_path / "fuzz.maxpkg"
    _zip(path, [("manifest.json", json.dumps(_manifest(files)).encode()), *files.items()])
    _load_all(path)


@FUZZ
@given(
    names=st.lists(st.text(min_size=0, max_size=20), max_size=3),
    data=st.binary(max_size=64),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_any_zip_loads_or_raises_package_error(tmp_path, names, data, edits, cut):
    """Odd entry names (listed in the manifest, as a hostile package would), then changed bytes
    anywhere in the zip and truncation."""
    files = _good_entries()
    for n in names:
        files[n] = data
    good = tmp_path / "good.maxpkg"
    entries = [("manifest.json", json.dumps(_manifest(files)).encode()), *files.items()]
    try:
        _zip(good, entries)
    except (ValueError, UnicodeEncodeError, IndexError):  # names zipfile itself cannot write (e.g. "")
        return
    path = tmp_path / "fuzz.maxpkg"
    path.write_bytes(_flip(good.read_bytes(), edits, cut))
    _load_all(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz.maxpkg", "good.maxpkg"], "loading wrote a file"
