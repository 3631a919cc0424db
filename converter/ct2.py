"""CTranslate2 (faster-whisper) Whisper models -> openai-whisper names and dims.

`model.bin` layout (binary version 6, little endian): u32 version; string spec name; u32 spec
revision; u32 variable count, then per variable: string name, u8 rank, u32 x rank dims, u8 dtype,
u32 byte count, raw row-major bytes; u32 alias count, then per alias: string alias, string target.
A string is a u16 length counting a trailing NUL, then that many bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BF16 = 5
_SUPPORTED_VERSION = 6


class CT2FormatError(ValueError):
    pass


@dataclass(frozen=True)
class CT2Model:
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    config: dict
    used: set[str] = field(default_factory=set)

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise CT2FormatError(f"model.bin has no variable {name!r}")
        self.used.add(name)
        return self.variables[name]


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CT2FormatError(f"{self.source}: truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        raw = self.take(self.u16())
        if not raw.endswith(b"\0"):
            raise CT2FormatError(f"{self.source}: string at byte {self.pos} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def read_model_bin(data: bytes, source: str = "model.bin") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    r = _Reader(data, source)
    version = r.u32()
    if version != _SUPPORTED_VERSION:
        raise CT2FormatError(f"{source}: CTranslate2 binary version {version}; only {_SUPPORTED_VERSION} is read")
    spec = r.string()
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{source}: spec {spec!r} is not a Whisper model (expected 'WhisperSpec')")
    r.u32()  # spec revision: the variable names below are what we check
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.u32()):
        name = r.string()
        shape = tuple(r.u32() for _ in range(r.u8()))
        code = r.u8()
        nbytes = r.u32()
        raw = r.take(nbytes)
        if code == _BF16:
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif code in _DTYPES:
            arr = np.frombuffer(raw, _DTYPES[code])
        else:
            raise CT2FormatError(f"{source}: variable {name!r} has unknown dtype code {code}")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise CT2FormatError(f"{source}: variable {name!r} has {arr.size} values for shape {shape}")
        variables[name] = arr.reshape(shape)
    aliases = {}
    for _ in range(r.u32()):
        alias = r.string()
        aliases[alias] = r.string()
    if r.pos != len(data):
        raise CT2FormatError(f"{source}: {len(data) - r.pos} trailing bytes after the alias table")
    return variables, aliases


def load_ct2_dir(path: Path, model_bin: bytes | None = None) -> CT2Model:
    """Read a CTranslate2 model folder; `model_bin` overrides the file (e.g. joined parts)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CT2FormatError(f"{path}: no config.json (a CTranslate2 model folder has model.bin + config.json)")
    if model_bin is None:
        bin_path = path / "model.bin"
        if not bin_path.is_file():
            raise CT2FormatError(f"{path}: no model.bin")
        model_bin = bin_path.read_bytes()
    variables, aliases = read_model_bin(model_bin, str(path / "model.bin"))
    return CT2Model(variables, aliases, json.loads(config_path.read_text()))


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _layer_count(m: CT2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in m.variables:
        n += 1
    if n == 0:
        raise CT2FormatError(f"model.bin has no {prefix}/layer_0: not a Whisper model")
    return n


def _scalar(m: CT2Model, name: str) -> int:
    return int(np.asarray(m.get(name)).reshape(()))


def _ln(sd: dict, dst: str, m: CT2Model, src: str) -> None:
    sd[f"{dst}.weight"] = _f32(m.get(f"{src}/gamma"))
    sd[f"{dst}.bias"] = _f32(m.get(f"{src}/beta"))


def _linear(sd: dict, dst: str, m: CT2Model, src: str) -> None:
    sd[f"{dst}.weight"] = _f32(m.get(f"{src}/weight"))
    sd[f"{dst}.bias"] = _f32(m.get(f"{src}/bias"))


def _split(weight: np.ndarray, bias: np.ndarray, parts: int, names: list[str], sd: dict, prefix: str) -> None:
    """Split a fused projection stacked along the output dim; the key part has no bias in whisper."""
    ws = np.split(_f32(weight), parts, axis=0)
    bs = np.split(_f32(bias), parts, axis=0)
    for name, w, b in zip(names, ws, bs):
        sd[f"{prefix}.{name}.weight"] = w
        if name == "key":
            if np.any(b != 0):
                raise CT2FormatError(f"{prefix}.key: fused key bias is not zero; whisper's key has no bias")
        else:
            sd[f"{prefix}.{name}.bias"] = b


def _block(sd: dict, m: CT2Model, src: str, dst: str) -> None:
    """Self-attention and MLP of one residual block (encoder and decoder alike)."""
    sa = f"{src}/self_attention"
    _split(
        m.get(f"{sa}/linear_0/weight"), m.get(f"{sa}/linear_0/bias"), 3, ["query", "key", "value"], sd, f"{dst}.attn"
    )
    _linear(sd, f"{dst}.attn.out", m, f"{sa}/linear_1")
    _ln(sd, f"{dst}.attn_ln", m, f"{sa}/layer_norm")
    _linear(sd, f"{dst}.mlp.0", m, f"{src}/ffn/linear_0")
    _linear(sd, f"{dst}.mlp.2", m, f"{src}/ffn/linear_1")
    _ln(sd, f"{dst}.mlp_ln", m, f"{src}/ffn/layer_norm")


def to_whisper(m: CT2Model) -> tuple[dict, dict[str, np.ndarray]]:
    """(ModelDimensions fields, openai-whisper state dict in float32) from a CTranslate2 model."""
    n_audio_layer = _layer_count(m, "encoder")
    n_text_layer = _layer_count(m, "decoder")
    sd: dict[str, np.ndarray] = {}

    sd["encoder.conv1.weight"] = _f32(m.get("encoder/conv1/weight"))
    sd["encoder.conv1.bias"] = _f32(m.get("encoder/conv1/bias"))
    sd["encoder.conv2.weight"] = _f32(m.get("encoder/conv2/weight"))
    sd["encoder.conv2.bias"] = _f32(m.get("encoder/conv2/bias"))
    sd["encoder.positional_embedding"] = _f32(m.get("encoder/position_encodings/encodings"))
    for i in range(n_audio_layer):
        _block(sd, m, f"encoder/layer_{i}", f"encoder.blocks.{i}")
    _ln(sd, "encoder.ln_post", m, "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = _f32(m.get("decoder/embeddings/weight"))
    sd["decoder.positional_embedding"] = _f32(m.get("decoder/position_encodings/encodings"))
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _block(sd, m, src, dst)
        ca = f"{src}/attention"
        _linear(sd, f"{dst}.cross_attn.query", m, f"{ca}/linear_0")
        _split(
            m.get(f"{ca}/linear_1/weight"), m.get(f"{ca}/linear_1/bias"), 2, ["key", "value"], sd, f"{dst}.cross_attn"
        )
        _linear(sd, f"{dst}.cross_attn.out", m, f"{ca}/linear_2")
        _ln(sd, f"{dst}.cross_attn_ln", m, f"{ca}/layer_norm")
    _ln(sd, "decoder.ln", m, "decoder/layer_norm")

    # whisper ties the output head to the token embedding; CT2 stores it as an alias (or a copy)
    head = m.get("decoder/projection/weight")
    if head.shape != sd["decoder.token_embedding.weight"].shape or not np.array_equal(
        _f32(head), sd["decoder.token_embedding.weight"]
    ):
        raise CT2FormatError("decoder/projection/weight differs from the token embedding; whisper ties them")

    # scalars (activation, pre_norm, alignment_heads, ...) describe the architecture whisper fixes
    unused = sorted(k for k, v in m.variables.items() if k not in m.used and v.ndim > 0)
    if unused:
        raise CT2FormatError(f"model.bin tensors with no openai-whisper name: {unused[:5]}")

    conv1 = sd["encoder.conv1.weight"]
    dims = dict(
        n_mels=conv1.shape[1],
        n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=_scalar(m, "encoder/num_heads"),
        n_audio_layer=n_audio_layer,
        n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0],
        n_text_state=sd["decoder.token_embedding.weight"].shape[1],
        n_text_head=_scalar(m, "decoder/num_heads"),
        n_text_layer=n_text_layer,
    )
    return dims, sd


def alignment_heads(m: CT2Model) -> list[list[int]] | None:
    """(layer, head) pairs used for word timestamps, as config.json carries them."""
    heads = m.config.get("alignment_heads")
    return [list(map(int, h)) for h in heads] if heads else None
