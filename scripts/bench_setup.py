"""What scripts/bench.py measures on and with: the machine (CPU kind, cores, read bandwidth), a
package's manifest and the bytes of its one-row step, the English dev set and the benchmark corpus
with their references, and the word error rate."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "audio"
DEFAULT_AUDIO = SHARED / "longform_lj001_0001-0032.wav"
CLIP = ROOT / "golden" / "data" / "jfk.wav"  # bundled; start-up is measured on it
PEER_TOOLS = ROOT.parent / "shared" / "tools" / "peers"


def machine() -> dict:
    """The CPU this run is on: model, kind (docs/benchmarks.md keeps one table per kind), cores, the
    instruction sets that matter here, and its read bandwidth as measured now."""
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    model, vendor = info.get("model name", "unknown CPU"), info.get("vendor_id", "")
    family, number = int(info.get("cpu family", 0)), int(info.get("model", 0))
    if (
        vendor == "AuthenticAMD"
        and family == 0x19
        and (0x10 <= number <= 0x1F or 0x60 <= number <= 0x7F or 0xA0 <= number <= 0xAF)
    ):
        kind = "AMD EPYC (Zen 4)"
    elif vendor == "AuthenticAMD" and family == 0x19 and number < 0x10:
        kind = "AMD EPYC (Zen 3)"  # Milan: AVX2, no AVX-512 (no bfloat16 packages)
    elif vendor == "AuthenticAMD" and family == 0x1A:
        kind = "AMD EPYC (Zen 5)"
    elif vendor == "GenuineIntel" and "amx_tile" in flags:
        kind = "Intel Xeon (AMX)"
    else:
        kind = f"{model} (family {family}, model {number})"
    return {
        "cpu": model,
        "kind": kind,
        "cores": len(os.sched_getaffinity(0)),
        "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
        "read_gb_s": read_bandwidth(),
    }


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """GB/s read by two threads summing halves of a 1 GiB float32 array (numpy releases the GIL),
    in memory of the kind package weights load into (runtime.weights.huge_buffer: 2 MiB pages
    where the kernel gives them): the best of `repeats`, so the bandwidth floor it gives is the
    strictest this run saw."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from whisper_max.runtime.weights import huge_buffer

    a = np.frombuffer(huge_buffer(mib * 2**20), np.float32)  # memory of the kind weights load into
    a[:] = 1
    halves = np.array_split(a, 2)
    best = float("inf")
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.add.reduce, halves))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def package_manifest(path):
    """The package's manifest (runtime.manifest.Manifest), read without loading the program."""
    from whisper_max.runtime.package import Package

    return Package.open(path).manifest


def step_bytes(manifest) -> int:
    """Bytes one single-row decoder step must read: the weights decoder_rows binds (one row of
    the positional table, and of the token table where the vocabulary product reads its panels or pairs)
    and the window's cross-attention keys and values; the self-attention caches (under 1 MB on
    average here) are left out, which makes the floor lower, not higher."""
    import numpy as np

    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    sig = manifest.graphs["decoder_rows"]
    # one window's cross keys and values: decoder_rows' inputs of many windows, without that
    # dimension (cross_kv also gives the unsplit K/V, which only word timestamps read)
    per_window = {i.name: i for i in sig.inputs if i.shape[:1] == ("windows",)}
    names = {w.name for w in sig.weights}
    gathered = {"decoder.positional_embedding"} | {n for n in names if n + "/panels" in names or n + "/pairs" in names}
    total = 0
    for w in sig.weights:
        shape = w.shape[1:] if w.name in gathered else w.shape
        total += int(np.prod(shape)) * size[w.dtype]
    for o in per_window.values():
        total += int(np.prod(o.shape[1:])) * size[o.dtype]
    return total


def dev_set(shared: Path = SHARED) -> list[dict]:
    """The English clips of ../shared/audio with exact references, one encoding of each recording
    (the 7 short dev clips and the long-form file), in the manifest's order."""
    entries = json.loads((shared / "manifest.json").read_text())
    return [
        e
        for e in entries
        if e["language"] == "en" and e["reference_quality"].startswith("exact") and e["file"].endswith(".wav")
    ]


def references(paths: list[str]) -> list[str]:
    """The reference text of each file: a dev-set file's from the manifest, a corpus file's from
    corpus.json (the references of its parts, joined)."""
    by_name = {e["file"]: e["reference"] for e in json.loads((SHARED / "manifest.json").read_text())}
    refs = []
    for p in paths:
        path = Path(p)
        index = path.parent / "corpus.json"
        if path.name in by_name and path.parent == SHARED:
            refs.append(by_name[path.name])
        elif index.is_file():
            refs.append(next(f["reference"] for f in json.loads(index.read_text())["files"] if f["file"] == path.name))
        else:
            raise SystemExit(f"{p}: no reference text (neither a file of {SHARED} nor of a corpus with corpus.json)")
    return refs


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """WER % over all the files: word edits (after EnglishTextNormalizer) over reference words."""
    from whisper.normalizers import EnglishTextNormalizer

    from whisper_max.golden import word_edits

    norm = EnglishTextNormalizer()
    pairs = [(norm(r).split(), norm(h).split()) for r, h in zip(refs, hyps, strict=True)]
    return 100.0 * sum(word_edits(r, h) for r, h in pairs) / sum(len(r) for r, _ in pairs)


def corpus_files() -> list[str]:
    """The benchmark corpus's files, built (scripts/make_corpus.py) into the temp dir once."""
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_corpus

    out = Path(tempfile.gettempdir()) / f"whisper-max-corpus-{os.getuid()}"
    index = out / "corpus.json"
    if not index.is_file():
        make_corpus.build(out)
    return [str(out / e["file"]) for e in json.loads(index.read_text())["files"]]
