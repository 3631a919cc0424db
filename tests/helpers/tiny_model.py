"""A tiny random openai-whisper model (same architecture, small sizes) for fast tests."""

from __future__ import annotations

import functools
import struct

import numpy as np
import torch
from whisper.model import ModelDimensions, Whisper

TINY_DIMS = dict(
    n_mels=8,
    n_audio_ctx=10,
    n_audio_state=16,
    n_audio_head=2,
    n_audio_layer=2,
    n_vocab=50,
    n_text_ctx=12,
    n_text_state=16,
    n_text_head=2,
    n_text_layer=2,
)


def tiny_whisper(seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**TINY_DIMS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # openai-whisper leaves the decoder's positional embedding uninitialised
            if "positional_embedding" in name or p.abs().max() == 0:
                p.copy_(torch.randn_like(p) * 0.5)
            if name.endswith("ln.weight") or name.endswith("_ln.weight") or name.endswith("ln_post.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def state_dict_np(model: Whisper) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def write_model_bin(
    variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6, spec: str = "WhisperSpec"
) -> bytes:
    codes = {
        np.dtype(np.float32): 0,
        np.dtype(np.int8): 1,
        np.dtype(np.int16): 2,
        np.dtype(np.int32): 3,
        np.dtype(np.float16): 4,
    }
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, a in variables.items():
        a = np.asarray(a).copy(order="C")  # keeps rank 0 (ascontiguousarray would make it 1-d)
        out += [
            _string(name),
            struct.pack("<B", a.ndim),
            struct.pack(f"<{a.ndim}I", *a.shape),
            struct.pack("<B", codes[a.dtype]),
            struct.pack("<I", a.nbytes),
            a.tobytes(),
        ]
    out.append(struct.pack("<I", len(aliases)))
    for k, v in aliases.items():
        out += [_string(k), _string(v)]
    return b"".join(out)


def to_ct2_variables(sd: dict[str, np.ndarray], dims: dict) -> dict[str, np.ndarray]:
    """openai-whisper names -> CTranslate2's (the reverse of converter.ct2.to_whisper), fp16."""
    h = lambda a: a.astype(np.float16)  # noqa: E731
    v: dict[str, np.ndarray] = {
        "encoder/num_heads": np.array(dims["n_audio_head"], np.int16),
        "decoder/num_heads": np.array(dims["n_text_head"], np.int16),
        "encoder/conv1/weight": h(sd["encoder.conv1.weight"]),
        "encoder/conv1/bias": h(sd["encoder.conv1.bias"]),
        "encoder/conv2/weight": h(sd["encoder.conv2.weight"]),
        "encoder/conv2/bias": h(sd["encoder.conv2.bias"]),
        "encoder/position_encodings/encodings": h(sd["encoder.positional_embedding"]),
        "encoder/layer_norm/gamma": h(sd["encoder.ln_post.weight"]),
        "encoder/layer_norm/beta": h(sd["encoder.ln_post.bias"]),
        "decoder/embeddings/weight": h(sd["decoder.token_embedding.weight"]),
        "decoder/position_encodings/encodings": h(sd["decoder.positional_embedding"]),
        "decoder/layer_norm/gamma": h(sd["decoder.ln.weight"]),
        "decoder/layer_norm/beta": h(sd["decoder.ln.bias"]),
    }

    def ln(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = h(sd[f"{src}.weight"]), h(sd[f"{src}.bias"])

    def lin(dst, src):
        v[f"{dst}/weight"], v[f"{dst}/bias"] = h(sd[f"{src}.weight"]), h(sd[f"{src}.bias"])

    def fused(dst, src, names):
        v[f"{dst}/weight"] = h(np.concatenate([sd[f"{src}.{n}.weight"] for n in names]))
        d = sd[f"{src}.{names[-1]}.bias"].shape[0]
        v[f"{dst}/bias"] = h(
            np.concatenate([sd[f"{src}.{n}.bias"] if n != "key" else np.zeros(d, np.float32) for n in names])
        )

    for side, n_layer in (("encoder", dims["n_audio_layer"]), ("decoder", dims["n_text_layer"])):
        for i in range(n_layer):
            s, c = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            fused(f"{c}/self_attention/linear_0", f"{s}.attn", ["query", "key", "value"])
            lin(f"{c}/self_attention/linear_1", f"{s}.attn.out")
            ln(f"{c}/self_attention/layer_norm", f"{s}.attn_ln")
            lin(f"{c}/ffn/linear_0", f"{s}.mlp.0")
            lin(f"{c}/ffn/linear_1", f"{s}.mlp.2")
            ln(f"{c}/ffn/layer_norm", f"{s}.mlp_ln")
            if side == "decoder":
                lin(f"{c}/attention/linear_0", f"{s}.cross_attn.query")
                fused(f"{c}/attention/linear_1", f"{s}.cross_attn", ["key", "value"])
                lin(f"{c}/attention/linear_2", f"{s}.cross_attn.out")
                ln(f"{c}/attention/layer_norm", f"{s}.cross_attn_ln")
    return v


@functools.cache
def traced_tiny():
    """trace_program(tiny_whisper()), once per session: the IR is frozen and passes return new
    programs, so tests share it (each torch.export of the tiny model takes seconds)."""
    from whisper_max.converter.trace import trace_program

    return trace_program(tiny_whisper())


@functools.cache
def optimised_tiny():
    """passes.optimise(traced_tiny()), once per session."""
    from whisper_max.converter.passes import optimise

    return optimise(traced_tiny())
