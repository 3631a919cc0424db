"""What a package's manifest.json says, as frozen, typed objects: the one place it is written
(`Manifest.to_json`) and read (`Manifest.from_json`, which refuses any shape the converter would
not have written, with the field at fault).

Torch-free and MAX-free; the converter builds a `Manifest`, the runtime reads one. Format
history (`FORMAT_VERSION`): 2 decoder_step grows its caches in place (state inputs); 3 bfloat16
weights; 4 widened weights; 5 the select graph; 6 decoder_rows for rows of many windows; 7
float16 weights (exact ones) in float32 packages; 8 panel weights (`X/panels`, made at load); 9
`target` (device, arch, features) instead of `target_cpu` (arch, features); 10 decoder_rows takes
LOGIT_ROWS, prefills prompts and returns each layer's cross-attention queries (word
timestamps), and the MEF holds the runtime's graphs only (no general decoder, decoder_step or
alignment graph; the IR keeps the first two); 11 pair weights (`X/pairs`, made at load: the
bfloat16 steps' products on VDPBF16PS) and, in bfloat16 packages, the cross keys and values
decoder_rows reads in bfloat16. A format 2 package
is a format 3 one whose weights are all float32; before 5 there is no select graph, before 6
decoder_rows takes the rows of one window: those open, the runtime refuses them with the hint,
and `whisper-convert --rebuild` makes them anew; so does it a format 6-9 package, whose
decoder_rows has no LOGIT_ROWS.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .weights import PackageError

FORMAT = "whisper-max"
FORMAT_VERSION = 11
READS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
_TARGET_FIELD = 9  # the first format with `target`; older ones say `target_cpu`

# CPU features a MEF compiled for this host may use; a package built where one is present
# cannot run where it is absent.
TARGET_FEATURES = (
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


class _Bad(Exception):
    """A field of the manifest that is not what the converter writes (internal to from_json)."""


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str = ""):
    """d[key], which must be of `kind`; `where` names d in the message (empty: the manifest)."""
    if not isinstance(d, dict):
        raise _Bad(f"'{where}' is not a table")
    v = d.get(key)
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise _Bad(f"'{f'{where}.{key}' if where else key}' is missing or not {_kind_name(kind)}")
    return v


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


def _names(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(f, str) for f in v):
        raise _Bad(f"'{where}' is not a list of names")
    return tuple(v)


@dataclass(frozen=True)
class Target:
    """What a compiled program runs on: the device kind, the architecture, and the CPU features
    (of TARGET_FEATURES) its machine code may use."""

    device: str
    arch: str
    features: tuple[str, ...]

    @classmethod
    def host(cls) -> Target:
        """This machine's CPU, from /proc/cpuinfo's flags (Mojo cannot always tell under KVM)."""
        flags: set[str] = set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
        return cls("cpu", platform.machine(), tuple(f for f in TARGET_FEATURES if f in flags))

    def has(self, *features: str) -> bool:
        return set(features) <= set(self.features)

    def without(self, *features: str) -> Target:
        return Target(self.device, self.arch, tuple(f for f in self.features if f not in features))

    def runs_on(self, here: Target) -> bool:
        """Whether a program compiled for this target runs on `here`."""
        return self.device == here.device and self.arch == here.arch and here.has(*self.features)

    def missing_on(self, here: Target) -> list[str]:
        return sorted(set(self.features) - set(here.features))

    def __str__(self) -> str:
        return f"{self.arch} {self.device} with {', '.join(self.features) or 'no listed features'}"

    def to_json(self) -> dict:
        return {"device": self.device, "arch": self.arch, "features": list(self.features)}

    @classmethod
    def from_json(cls, d: Any, where: str = "target") -> Target:
        device = _get(d, "device", str, where) if isinstance(d, dict) and "device" in d else "cpu"
        return cls(device, _get(d, "arch", str, where), _names(d.get("features"), f"{where}.features"))


@dataclass(frozen=True)
class State:
    """An input a graph writes in place (a cache): along `axis`, at the position the input named
    `position` holds."""

    axis: int
    position: str


@dataclass(frozen=True)
class TensorSpec:
    """A graph input, output or weight: its name, dtype and shape (sizes, or the names of dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    state: State | None = None

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.state is not None:
            out["state"] = {"axis": self.state.axis, "position": self.state.position}
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> TensorSpec:
        shape = _get(d, "shape", list, where)
        if not all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in shape):
            raise _Bad(f"'{where}.shape' is not a list of sizes and dim names")
        state = None
        if "state" in d:
            s = d["state"]
            state = State(_get(s, "axis", int, f"{where}.state"), _get(s, "position", str, f"{where}.state"))
        return cls(_get(d, "name", str, where), _get(d, "dtype", str, where), tuple(shape), state)


@dataclass(frozen=True)
class Dim:
    """A symbolic dim of a graph and the sizes it was compiled for (max None: no bound)."""

    name: str
    min: int
    max: int | None


@dataclass(frozen=True)
class GraphSignature:
    """What a runtime needs to call one compiled graph: inputs, outputs and weights, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...] = ()

    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def to_json(self) -> dict:
        return {
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "weights": [w.to_json() for w in self.weights],
            "dims": [{"name": d.name, "min": d.min, "max": d.max} for d in self.dims],
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> GraphSignature:
        def specs(key: str) -> tuple[TensorSpec, ...]:
            items = d.get(key, []) if isinstance(d, dict) and key != "weights" else _get(d, key, list, where)
            if not isinstance(items, list):
                raise _Bad(f"'{where}.{key}' is not a list")
            return tuple(TensorSpec.from_json(x, f"{where}.{key}[{i}]") for i, x in enumerate(items))

        inputs, outputs, weights = specs("inputs"), specs("outputs"), specs("weights")
        dims = d.get("dims", [])
        if not isinstance(dims, list):
            raise _Bad(f"'{where}.dims' is not a list")
        return cls(
            inputs,
            outputs,
            weights,
            tuple(
                Dim(
                    _get(x, "name", str, f"{where}.dims"),
                    _get(x, "min", int, f"{where}.dims"),
                    None if isinstance(x, dict) and x.get("max", 0) is None else _get(x, "max", int, f"{where}.dims"),
                )
                for x in dims
            ),
        )


@dataclass(frozen=True)
class ModelInfo:
    """The model a package holds: its name, openai-whisper's ModelDimensions, whether it is
    multilingual, and its alignment heads (layer, head) for word timestamps."""

    name: str
    dims: dict[str, int]
    multilingual: bool
    alignment_heads: tuple[tuple[int, int], ...]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dims": dict(self.dims),
            "multilingual": self.multilingual,
            "alignment_heads": [list(h) for h in self.alignment_heads],
        }

    @classmethod
    def from_json(cls, d: Any) -> ModelInfo:
        dims = _get(d, "dims", dict, "model")
        if not all(isinstance(k, str) and type(v) is int for k, v in dims.items()):
            raise _Bad("'model.dims' is not a table of name -> integer")
        heads = _get(d, "alignment_heads", list, "model")
        if not all(isinstance(h, list) and len(h) == 2 and all(type(x) is int for x in h) for h in heads):
            raise _Bad("'model.alignment_heads' is not a list of (layer, head) pairs")
        name = d.get("name", "")
        return cls(
            name if isinstance(name, str) else "",
            dims,
            _get(d, "multilingual", bool, "model"),
            tuple((h[0], h[1]) for h in heads),
        )


@dataclass(frozen=True)
class Source:
    """Where the weights came from: kind (openai, ctranslate2), location, sha256 of the file."""

    kind: str
    location: str
    sha256: str


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Rebuilt:
    """A package recompiled here from its IR and weights (`whisper-convert --rebuild`)."""

    from_max_version: str
    from_target: Target
    at_utc: str
    note: str


@dataclass(frozen=True)
class Manifest:
    """manifest.json. `files` is filled in by package.write_package (the sha256 and size of every
    other entry); `parity`, `converter` and `timings_s` are records for people (the model card,
    benchmarks), free-form tables the runtime does not read."""

    model: ModelInfo
    max_version: str
    target: Target
    graphs: dict[str, GraphSignature]
    dtype: str = "float32"
    source: Source | None = None
    parity: dict = field(default_factory=dict)
    skip_check: bool = False
    converter: dict = field(default_factory=dict)
    created_utc: str = ""
    timings_s: dict = field(default_factory=dict)
    rebuilt: Rebuilt | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def weight_names(self) -> list[str]:
        """Every weight any graph binds, each once, in graph order."""
        return list(dict.fromkeys(w.name for g in self.graphs.values() for w in g.weights))

    def to_json(self) -> dict:
        out: dict = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_json(),
            "max_version": self.max_version,
            "target": self.target.to_json(),
            "dtype": self.dtype,
            "graphs": {name: g.to_json() for name, g in self.graphs.items()},
            "parity": self.parity,
            "skip_check": self.skip_check,
            "converter": self.converter,
            "created_utc": self.created_utc,
            "timings_s": self.timings_s,
            "files": {name: {"sha256": e.sha256, "bytes": e.bytes} for name, e in sorted(self.files.items())},
        }
        if self.source is not None:
            out["source"] = {"kind": self.source.kind, "location": self.source.location, "sha256": self.source.sha256}
        if self.rebuilt is not None:
            r = self.rebuilt
            out["rebuilt"] = {
                "from_max_version": r.from_max_version,
                "from_target": r.from_target.to_json(),
                "at_utc": r.at_utc,
                "note": r.note,
            }
        return out

    @classmethod
    def from_json(cls, m: Any) -> Manifest:
        """The manifest `m` (parsed JSON) describes; PackageError saying what is wrong when it is
        not one the converter wrote (the format checked first, so an older runtime's message for
        a newer package names the versions)."""
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise PackageError(
                f"not a whisper-max package (format {m.get('format') if isinstance(m, dict) else None!r})"
            )
        version = m.get("format_version")
        if type(version) is not int or version not in READS:
            raise PackageError(
                f"package format {version!r}, this runtime reads formats {READS[0]} to {READS[-1]}; convert the model "
                "again with this version's whisper-convert"
            )
        try:
            return cls._fields(m, version)
        except _Bad as e:
            raise PackageError(f"manifest.json {e}; not a package whisper-convert wrote") from None

    @classmethod
    def _fields(cls, m: dict, version: int) -> Manifest:
        files = _get(m, "files", dict)
        entries = {}
        for name, e in files.items():
            sha, size = (e.get("sha256"), e.get("bytes")) if isinstance(e, dict) else (None, None)
            if not isinstance(sha, str) or type(size) is not int or size < 0:
                raise _Bad("'files' is not a table of name -> {sha256, bytes}")
            entries[name] = FileEntry(sha, size)
        graphs = _get(m, "graphs", dict)
        sigs = {name: GraphSignature.from_json(g, f"graphs.{name}") for name, g in graphs.items()}
        target_key = "target" if version >= _TARGET_FIELD else "target_cpu"
        target = Target.from_json(_get(m, target_key, dict), target_key)
        src = m.get("source")
        source = (
            Source(
                _get(src, "kind", str, "source"),
                _get(src, "location", str, "source"),
                _get(src, "sha256", str, "source"),
            )
            if src is not None
            else None
        )
        r = m.get("rebuilt")
        rebuilt = None
        if r is not None:
            old = "from_target" if "from_target" in (r if isinstance(r, dict) else {}) else "from_target_cpu"
            rebuilt = Rebuilt(
                _get(r, "from_max_version", str, "rebuilt"),
                Target.from_json(_get(r, old, dict, "rebuilt"), f"rebuilt.{old}"),
                r.get("at_utc", ""),
                r.get("note", ""),
            )
        records = {k: m.get(k, {}) for k in ("parity", "converter", "timings_s")}
        for k, v in records.items():
            if not isinstance(v, dict):
                raise _Bad(f"'{k}' is not a table")
        return cls(
            model=ModelInfo.from_json(_get(m, "model", dict)),
            max_version=_get(m, "max_version", str),
            target=target,
            graphs=sigs,
            dtype=_get(m, "dtype", str) if "dtype" in m else "float32",
            source=source,
            skip_check=bool(m.get("skip_check", False)),
            created_utc=str(m.get("created_utc", "")),
            rebuilt=rebuilt,
            files=entries,
            format_version=version,
            **records,
        )
