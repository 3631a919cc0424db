"""Reference tensors from stock openai-whisper (PyTorch fp32), keyed by module path.

Needs torch and openai-whisper: converter side only.
"""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch
import whisper
from whisper.model import Whisper, disable_sdpa

from . import JFK_WAV


def load_clip(path=JFK_WAV) -> np.ndarray:
    audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    if sr != whisper.audio.SAMPLE_RATE or audio.ndim != 1:
        raise ValueError(f"{path}: golden clips are 16 kHz mono (got {sr} Hz, {audio.ndim} dims)")
    return audio


def mel_for(model: Whisper, audio: np.ndarray) -> torch.Tensor:
    """(1, n_mels, frames) log-mel of the first 30 s window, as openai-whisper computes it."""
    window = whisper.pad_or_trim(torch.from_numpy(audio))
    return whisper.log_mel_spectrogram(window, n_mels=model.dims.n_mels)[None]


def decode_tokens(model: Whisper, mel: torch.Tensor) -> tuple[list[int], str]:
    """Prompt + greedy tokens openai-whisper decodes (with timestamps), and the text."""
    tok = whisper.tokenizer.get_tokenizer(
        model.is_multilingual, num_languages=model.num_languages, language="en", task="transcribe"
    )
    opts = whisper.DecodingOptions(language="en", fp16=False, temperature=0.0)
    res = whisper.decode(model, mel[0], opts)
    return list(tok.sot_sequence) + list(res.tokens), res.text


@torch.no_grad()
def capture(model: Whisper, mel: torch.Tensor, tokens: list[int]) -> dict[str, np.ndarray]:
    """Module outputs of one encoder pass and one full-sequence decoder pass, by module path."""
    model = model.eval()
    out: dict[str, np.ndarray] = {}
    hooks = []

    def keep(name):
        def hook(module, args, output):
            out[name] = output.detach().numpy().copy()

        return hook

    enc, dec = model.encoder, model.decoder
    for name in ("conv1", "conv2", "ln_post"):
        hooks.append(getattr(enc, name).register_forward_hook(keep(f"encoder.{name}")))
    for i, b in enumerate(enc.blocks):
        hooks.append(b.register_forward_hook(keep(f"encoder.blocks.{i}")))
    for i, b in enumerate(dec.blocks):
        hooks.append(b.register_forward_hook(keep(f"decoder.blocks.{i}")))
        for kv in ("key", "value"):
            hooks.append(getattr(b.attn, kv).register_forward_hook(keep(f"decoder.blocks.{i}.attn.{kv}")))
            hooks.append(getattr(b.cross_attn, kv).register_forward_hook(keep(f"decoder.blocks.{i}.cross_attn.{kv}")))
    hooks.append(dec.ln.register_forward_hook(keep("decoder.ln")))
    try:
        xa = enc(mel)
        logits = dec(torch.tensor([tokens]), xa)
    finally:
        for h in hooks:
            h.remove()
    out["logits.all"] = logits[0].numpy().copy()  # (n, n_vocab): every position, for incremental checks
    out["logits"] = logits[:, -1].numpy().copy()

    # cross-attention scores, from the explicit (non-SDPA) path as openai-whisper's find_alignment reads them
    qk_hooks = [
        b.cross_attn.register_forward_hook(
            lambda _m, _i, o, i=i: out.__setitem__(f"decoder.blocks.{i}.cross_attn.qk", o[1].numpy().copy())
        )
        for i, b in enumerate(dec.blocks)
    ]
    try:
        with disable_sdpa():
            dec(torch.tensor([tokens]), xa)
    finally:
        for h in qk_hooks:
            h.remove()
    return out
