"""The .maxpkg container: weights round trip, atomic writes, integrity and compatibility checks."""

import contextlib
import io
import json
import zipfile

import numpy as np
import pytest
from helpers import manifest_doc, typed

from whisper_max.runtime import package
from whisper_max.runtime import weights as wt
from whisper_max.runtime.manifest import FORMAT_VERSION, Target
from whisper_max.runtime.package import Package, PackageError


def _manifest(**fields):
    return typed(manifest_doc(**fields))


def _files():
    weights = {"a.weight": np.arange(15, dtype=np.float32).reshape(3, 5), "b.bias": np.array([1, 2, 3], np.int64)}
    wj, wb = wt.pack_weights(weights)
    return {"weights.json": wj, "weights.bin": wb, "notes.txt": b"hello"}, weights


def test_weights_round_trip_aligned_and_writable(tmp_path):
    files, weights = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    pkg = Package.open(path)
    got = pkg.weights()
    for k, v in weights.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype and got[k].flags.writeable
    assert all(e["offset"] % 64 == 0 for e in json.loads(files["weights.json"]).values())
    assert pkg.read("notes.txt") == b"hello"
    assert pkg.manifest.format_version == FORMAT_VERSION
    with zipfile.ZipFile(path) as z:  # written and read through one typed object: a round trip
        assert json.loads(z.read("manifest.json")) == pkg.manifest.to_json()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    real = zipfile.ZipFile.writestr

    def failing(self, name, data, *a, **k):
        if name == "weights.bin":
            raise KeyboardInterrupt
        return real(self, name, data, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing)
    with pytest.raises(KeyboardInterrupt):
        package.write_package(path, _manifest(), files)
    assert list(tmp_path.iterdir()) == []


def test_existing_package_survives_a_failed_rewrite(tmp_path, monkeypatch):
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    before = path.read_bytes()
    monkeypatch.setattr(
        zipfile.ZipFile, "writestr", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    )
    with pytest.raises(PackageError, match=r"No space left on device\); nothing was written"):
        package.write_package(path, _manifest(), files)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.maxpkg"]


def _rewrite(path, edit_manifest):
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    m = json.loads(entries["manifest.json"])
    edit_manifest(m)
    entries["manifest.json"] = json.dumps(m).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, d in entries.items():
            z.writestr(n, d)


def test_integrity_and_version_checks(tmp_path):
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    _rewrite(path, lambda m: m["files"]["notes.txt"].update(sha256="0" * 64))
    with pytest.raises(PackageError, match="does not match its sha256"):
        Package.open(path).read("notes.txt")
    _rewrite(path, lambda m: m.update(format_version=99))
    with pytest.raises(PackageError, match="package format 99"):
        Package.open(path)
    (tmp_path / "junk.maxpkg").write_bytes(b"junk")
    with pytest.raises(PackageError, match="not a whisper-max package"):
        Package.open(tmp_path / "junk.maxpkg")
    with pytest.raises(PackageError, match="whisper-convert tiny.en"):
        Package.open(tmp_path / "missing.maxpkg")


def test_compatibility_check_names_the_fix(tmp_path):
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(max_version="0.0.1"), files)
    with pytest.raises(PackageError, match=r"MAX 0\.0\.1.*whisper-convert --rebuild"):
        Package.open(path).check_compatible()
    target = dict(Target.host().to_json(), features=["avx9000"])
    package.write_package(path, _manifest(target=target), files)
    with pytest.raises(PackageError, match="lacking.*avx9000"):
        Package.open(path).check_compatible()


def test_weight_shape_mismatch_is_caught(tmp_path):
    files, _ = _files()
    m = manifest_doc()
    m["graphs"]["g"]["weights"][0]["shape"] = [5, 3]
    path = tmp_path / "x.maxpkg"
    package.write_package(path, typed(m), files)
    pkg = Package.open(path)
    with pytest.raises(PackageError, match="a.weight.*float32\\[3, 5\\].*float32\\[5, 3\\]"):
        pkg.check_weights(pkg.weights())


def test_damaged_weights_are_refused(tmp_path):
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("weights.bin")
    raw = bytearray(path.read_bytes())
    start = (
        info.header_offset
        + 30
        + len(info.filename.encode())
        + int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    )
    raw[start + 7] ^= 0xFF  # one bit pattern inside a.weight
    path.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="weights.bin does not match its sha256 in the manifest: damaged"):
        Package.open(path).weights()


def test_changed_weights_are_refused_even_with_a_good_crc(tmp_path):
    """weights.bin with one byte changed and the zip rewritten around it (so its CRC matches):
    the manifest's sha256 catches it, for weights.bin and for any other entry read."""
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    changed = bytearray(entries["weights.bin"])
    changed[7] ^= 0x01
    entries["weights.bin"] = bytes(changed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(PackageError, match="weights.bin does not match its sha256"):
        Package.open(path).weights()


def test_bfloat16_weights_round_to_nearest_even_and_round_trip(tmp_path):
    import torch
    from max.dtype import DType

    rng = np.random.default_rng(0)
    a = (rng.standard_normal((4, 64)) * 10).astype(np.float32)
    a[0, :4] = [1.00390625, 1.01171875, -3.0e-5, 65504.0]  # exact ties round to even
    b = wt.to_bfloat16(a)
    bits = b.view(DType.uint16).to_numpy()
    np.testing.assert_array_equal(
        bits, torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    )
    np.testing.assert_array_equal(wt.from_bfloat16(b), torch.from_numpy(a).to(torch.bfloat16).float().numpy())
    with pytest.raises(ValueError, match="inf or nan"):
        wt.to_bfloat16(np.array([np.inf], np.float32))
    wj, wb = wt.pack_weights({"m.weight": b, "m.bias": a[0]})
    assert json.loads(wj)["m.weight"] == {"dtype": "bfloat16", "shape": [4, 64], "offset": 256, "nbytes": 512}
    m = manifest_doc()
    m["graphs"]["g"]["weights"] = [
        {"name": "m.weight", "dtype": "bfloat16", "shape": [4, 64]},
        {"name": "m.bias", "dtype": "float32", "shape": [64]},
    ]
    path = tmp_path / "x.maxpkg"
    package.write_package(path, typed(m), {"weights.json": wj, "weights.bin": wb})
    pkg = Package.open(path)
    got = pkg.weights()
    assert got["m.weight"].dtype == DType.bfloat16 and got["m.weight"].shape == (4, 64)
    np.testing.assert_array_equal(got["m.weight"].view(DType.uint16).to_numpy(), bits)
    pkg.check_weights(got)
    m["graphs"]["g"]["weights"][0]["dtype"] = "float32"  # a float32 graph given bfloat16 weights
    package.write_package(path, typed(m), {"weights.json": wj, "weights.bin": wb})
    with pytest.raises(PackageError, match=r"m.weight.*bfloat16\[4, 64\].*float32\[4, 64\]"):
        Package.open(path).check_weights(got)


def test_widened_weights_are_made_once_at_load_from_their_bfloat16_source(tmp_path):
    """A graph weight `X/widened` is not stored: loading makes it from the stored bfloat16 X,
    exactly, one array however many graphs bind it; a widened weight without a bfloat16 source
    is refused by name."""
    from max.dtype import DType

    a = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    wj, wb = wt.pack_weights({"m.weight": wt.to_bfloat16(a), "m.bias": a[0]})
    assert set(json.loads(wj)) == {"m.weight", "m.bias"}
    m = manifest_doc()
    widened = {"name": "m.weight" + wt.WIDENED, "dtype": "float32", "shape": [4, 64]}
    m["graphs"]["g"]["weights"] = [{"name": "m.weight", "dtype": "bfloat16", "shape": [4, 64]}, widened]
    m["graphs"]["h"] = {
        "inputs": [],
        "outputs": [],
        "weights": [widened, {"name": "m.bias", "dtype": "float32", "shape": [64]}],
    }
    path = tmp_path / "x.maxpkg"
    package.write_package(path, typed(m), {"weights.json": wj, "weights.bin": wb})
    pkg = Package.open(path)
    got = pkg.weights()
    w = got["m.weight/widened"]
    assert isinstance(w, np.ndarray) and w.dtype == np.float32 and w.flags.c_contiguous
    np.testing.assert_array_equal(w, wt.from_bfloat16(got["m.weight"]))
    assert got["m.weight"].dtype == DType.bfloat16
    pkg.check_weights(got)
    assert wt.widened_source("m.weight/widened") == "m.weight" and wt.widened_source("m.weight") is None
    with pytest.raises(PackageError, match=r"'m.bias/widened'.*'m.bias'.*float32"):
        wt.with_derived(got, ["m.bias/widened"])
    with pytest.raises(PackageError, match=r"'x/widened'.*missing"):
        wt.with_derived(got, ["x/widened"])


def test_panels_are_the_weight_transposed_in_blocks_of_64_columns():
    """`X/panels` (made at load): X (n, k) as (ceil(n / 64), k, 64), zero columns after n, in X's
    dtype; refused for a bfloat16 or missing source with the weight's name."""
    w = np.arange(130 * 3, dtype=np.float16).reshape(130, 3)
    got = wt.with_derived({"w": w, "b": np.zeros(5, np.float32)}, ["w/panels", "w"])
    p = got["w/panels"]
    assert p.shape == (3, 3, 64) and p.dtype == np.float16 and p.flags.c_contiguous
    for j in range(192):
        np.testing.assert_array_equal(p[j // 64, :, j % 64], w[j] if j < 130 else 0)
    assert wt.panels_source("w/panels") == "w" and wt.derived_source("w/widened") == "w"
    with pytest.raises(PackageError, match=r"'b/panels'.*rank 1"):
        wt.with_derived(got, ["b/panels"])
    with pytest.raises(PackageError, match=r"'x/panels'.*missing"):
        wt.with_derived(got, ["x/panels"])


def test_pairs_are_a_bfloat16_weight_in_pair_panels():
    """`X/pairs` (made at load): a bfloat16 X (n, k) as (ceil(n / 64), k / 2, 64, 2), the values
    of a column at k = 2i and 2i + 1 adjacent, zero columns after n, still bfloat16; refused
    for a source that is not a bfloat16 matrix of an even number of columns, with its name."""
    w = (np.arange(130 * 4) % 251 - 125).astype(np.float32).reshape(130, 4)  # exact in bfloat16
    got = wt.with_derived({"w": wt.to_bfloat16(w), "f": w, "odd": wt.to_bfloat16(w[:, :3])}, ["w/pairs"])
    p = wt.from_bfloat16(got["w/pairs"])
    assert p.shape == (3, 2, 64, 2)
    for j in range(192):
        for i in range(2):
            np.testing.assert_array_equal(p[j // 64, i, j % 64], w[j, 2 * i : 2 * i + 2] if j < 130 else 0)
    assert wt.pairs_source("w/pairs") == "w" and wt.derived_source("w/pairs") == "w"
    with pytest.raises(PackageError, match=r"'f/pairs'.*float32"):
        wt.with_derived(got, ["f/pairs"])
    with pytest.raises(PackageError, match=r"'odd/pairs'.*\[130, 3\].*even"):
        wt.with_derived(got, ["odd/pairs"])


def _zip_with(path, entries, compress=zipfile.ZIP_STORED, symlink=None):
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compress
            if name == symlink:
                info.external_attr = 0o120777 << 16
            z.writestr(info, data)


@pytest.mark.parametrize(
    ("name", "mangle", "match"),
    [
        ("traversal", lambda e: e + [("../evil.txt", b"x")], "not a plain relative name"),
        ("absolute", lambda e: e + [("/etc/evil", b"x")], "not a plain relative name"),
        ("backslash", lambda e: e + [("..\\evil", b"x")], "not a plain relative name"),
        ("duplicate", lambda e: e + [e[1]], "appears twice"),
        (
            "pickle",
            lambda e: e + [("model.pkl", b"\x80\x04K\x01.")],
            "'model.pkl' is in a format that can hold a pickle",
        ),
        ("unlisted", lambda e: e + [("extra.bin", b"x")], r"not listed: \['extra.bin'\]"),
        ("missing", lambda e: [x for x in e if x[0] != "notes.txt"], r"missing: \['notes.txt'\]"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v and "\\" not in v else "",
)
def test_hostile_zips_are_refused_before_use(tmp_path, name, mangle, match):
    """A package is read in place, never extracted, but a zip whisper-convert would not have
    written (odd names, duplicates, entries the manifest does not list) is refused at open."""
    files, _ = _files()
    good = tmp_path / "good.maxpkg"
    package.write_package(good, _manifest(), files)
    with zipfile.ZipFile(good) as z:
        entries = [(n, z.read(n)) for n in z.namelist()]
    path = tmp_path / f"{name}.maxpkg"
    with pytest.warns(UserWarning) if name == "duplicate" else contextlib.nullcontext():
        _zip_with(path, mangle(entries))
    with pytest.raises(PackageError, match=match):
        Package.open(path)


def test_symlinks_compression_and_zip_bombs_are_refused(tmp_path):
    files, _ = _files()
    good = tmp_path / "good.maxpkg"
    package.write_package(good, _manifest(), files)
    with zipfile.ZipFile(good) as z:
        entries = [(n, z.read(n)) for n in z.namelist()]
    link = tmp_path / "link.maxpkg"
    _zip_with(link, entries, symlink="notes.txt")
    with pytest.raises(PackageError, match="'notes.txt' is a symlink"):
        Package.open(link)
    deflated = tmp_path / "deflated.maxpkg"
    _zip_with(deflated, entries, zipfile.ZIP_DEFLATED)
    with pytest.raises(PackageError, match="is compressed or declares"):
        Package.open(deflated)
    # a member whose declared size runs past the end of the file (as a zip bomb's would)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("weights.bin")
    pos = raw.find(b"weights.bin", raw.find(b"PK\x01\x02"))  # the name in its central directory record
    record = raw.rfind(b"PK\x01\x02", 0, pos)
    assert record >= 0
    for off in (20, 24):  # compressed and uncompressed sizes
        raw[record + off : record + off + 4] = (info.file_size + 10**9).to_bytes(4, "little")
    bomb = tmp_path / "bomb.maxpkg"
    bomb.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="'weights.bin' is compressed or declares 10000"):
        Package.open(bomb)


def test_an_npy_holding_a_pickle_is_refused(tmp_path):
    files, _ = _files()
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    files["assets/mel_filters.npy"] = buf.getvalue()
    path = tmp_path / "pickled.maxpkg"
    package.write_package(path, _manifest(), files)
    with pytest.raises(PackageError, match="mel_filters.npy is not a plain .npy array .*no pickles"):
        Package.open(path).npy("assets/mel_filters.npy")


def test_format_8_packages_are_read_with_their_target_cpu(tmp_path):
    """Formats before 9 name the target `target_cpu` (arch, features; the device was always the
    CPU), and a rebuilt one `from_target_cpu`: they open as a Target, and are written back as 9."""
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    here = Target.host()
    old = {"arch": here.arch, "features": list(here.features)}

    def as_format_8(m):
        del m["target"]
        m.update(format_version=8, target_cpu=old, rebuilt={"from_max_version": "26.6.0", "from_target_cpu": old})

    _rewrite(path, as_format_8)
    pkg = Package.open(path)
    assert pkg.manifest.format_version == 8 and pkg.manifest.target == here
    assert pkg.manifest.rebuilt.from_target == here and pkg.manifest.rebuilt.from_max_version == "26.6.0"
    pkg.check_compatible()
    out = tmp_path / "y.maxpkg"
    package.write_package(out, pkg.manifest, {n: pkg.read(n) for n in pkg.names()})
    doc = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert doc["format_version"] == FORMAT_VERSION and doc["target"] == here.to_json() and "target_cpu" not in doc
    assert doc["rebuilt"]["from_target"] == here.to_json()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("target"), "'target' is missing or not a table"),
        (lambda m: m["target"].update(features="avx2"), "'target.features' is not a list of names"),
        (lambda m: m["model"].update(dims={"n_mels": "80"}), "'model.dims' is not a table of name -> integer"),
        (lambda m: m["graphs"]["g"]["weights"][0].update(shape=[3, None]), r"'graphs.g.weights\[0\].shape' is not"),
        (lambda m: m.update(dtype=16), "'dtype' is missing or not a string"),
    ],
)
def test_a_manifest_field_out_of_shape_is_named(tmp_path, edit, match):
    files, _ = _files()
    path = tmp_path / "x.maxpkg"
    package.write_package(path, _manifest(), files)
    _rewrite(path, edit)
    with pytest.raises(PackageError, match=f"x.maxpkg: manifest.json {match}.*not a package whisper-convert wrote"):
        Package.open(path)
