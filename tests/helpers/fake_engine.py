"""A fake whisper-max program for decoding tests that need neither MAX nor a compiled package.

Its "decoder" returns scripted logits: a pseudo-random function of the window and of the row's
tokens so far, with some structure (end-of-text grows more likely with length, a few
timestamps stand out), so a run ends, uses timestamps and exercises the filters. The same
function backs a fake torch model that openai-whisper's own DecodingTask runs on, so the two
decoders can be compared token for token on identical logits.

The next-token choice is the select graph's (kernel whisper_max.select_tokens) in numpy: the
filters as a suppressed list and banned ranges per row, the timestamp rule's text ban, then
log_softmax and the k best (ties to the lower token) or a sample drawn with the given u.
tests/compiled/test_select.py holds the kernel itself to openai-whisper's filter classes; here the
host side of decoding (runtime.decoding: rules, greedy and beam bookkeeping, ranking) is what
is tested.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np

N_AUDIO_CTX, N_AUDIO_STATE, N_TEXT_CTX = 1500, 384, 448


def scripted_logits(window: float, seq, tokenizer) -> np.ndarray:
    """float32 logits (n_vocab,) after `seq` (the row's tokens so far) in window `window`."""
    seq = np.asarray(seq, np.int64)
    rng = np.random.default_rng(zlib.crc32(np.float64(window).tobytes() + seq.tobytes()))
    n_vocab = tokenizer.encoding.n_vocab
    x = rng.standard_normal(n_vocab, dtype=np.float32) * np.float32(2.0)
    x[tokenizer.eot] += np.float32(0.45 * max(0, len(seq) - 6))  # ends after some tokens
    tb = tokenizer.timestamp_begin
    stamps = rng.integers(0, 300, 3)
    x[tb + stamps] += np.float32(6.0)  # a few timestamps stand out at every step
    x[tokenizer.encode(" ")[0]] += np.float32(5.0)  # the blank SuppressBlank removes first
    return x


def choose(logits: np.ndarray, rules: np.ndarray, suppress: np.ndarray, sampling: np.ndarray, k: int) -> np.ndarray:
    """The select graph's choice, (rows, k, 2) float32 (token, log-probability) pairs."""
    rows, n = logits.shape
    out = np.zeros((rows, k, 2), np.float32)
    for r in range(rows):
        s = logits[r].astype(np.float32).copy()
        for j in range(4):
            lo, hi = (max(0, min(n, int(v))) for v in rules[r, 2 * j : 2 * j + 2])
            s[lo:hi] = -np.inf
        s[suppress] = -np.inf
        tb = int(rules[r, 8])
        lp = _log_softmax(s)
        if 0 < tb < n:
            ts = np.logaddexp.reduce(lp[tb:].astype(np.float64)) if np.isfinite(lp[tb:]).any() else -np.inf
            if ts > lp[:tb].max():
                s[:tb] = -np.inf
                lp = _log_softmax(s)
        temperature, u = sampling[r]
        if temperature > 0:
            p = np.exp((s / temperature - s.max() / temperature).astype(np.float64))
            pick = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
            pick = min(pick, int(np.flatnonzero(p > 0)[-1]))
            out[r, 0] = (pick, lp[pick])
            out[r, 1:] = (-1, -np.inf)
        else:  # the k largest, ties to the lower token
            kth = np.partition(lp, n - k)[n - k]
            cand = np.flatnonzero(lp >= kth)
            best = cand[np.lexsort((cand, -lp[cand]))][:k]
            out[r, :, 0], out[r, :, 1] = best, lp[best]
    return out


def _log_softmax(s: np.ndarray) -> np.ndarray:
    m = s.max()
    return ((s - m) - np.log(np.exp(s - m).sum())).astype(np.float32)


class FakeEngine:
    """What runtime.engine asks of a loaded program (runtime.model.WhisperModel), on scripted
    logits. A window's features are its id in [:, 0, 0]; the decoder state of a row is its
    token history. `calls` counts decoder calls for running rows, `widest` the most rows in one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.dims = {"n_text_ctx": N_TEXT_CTX, "n_audio_ctx": N_AUDIO_CTX, "n_audio_state": N_AUDIO_STATE}
        self.calls = self.widest = 0

    @staticmethod
    def features(ids) -> np.ndarray:
        """Encoder output for windows `ids`, in the shape openai-whisper takes as features."""
        f = np.zeros((len(ids), N_AUDIO_CTX, N_AUDIO_STATE), np.float32)
        f[:, 0, 0] = ids
        return f

    def embed_audio(self, mel):
        return mel

    def cross_kv(self, features) -> dict:
        return {"window": float(np.asarray(features)[0, 0, 0])}

    def pool(self) -> FakePool:
        return FakePool(self)


class FakePool:
    """runtime.pool.RowPool on scripted logits: each window's rows are token histories."""

    def __init__(self, engine: FakeEngine):
        self.engine = engine

    def open(self, cross) -> FakeRows:
        return FakeRows(self.engine, cross["window"])

    def step(self, items) -> list[np.ndarray]:
        self.engine.calls += 1
        self.engine.widest = max(self.engine.widest, sum(len(st.rows) for _, st in items))
        out = []
        for rows, st in items:
            logits = []
            for r, token in zip(st.rows, st.tokens[:, 0]):
                rows.history[r] = np.append(rows.history[r], token)
                logits.append(scripted_logits(rows.window, rows.history[r], self.engine.tokenizer))
            out.append(choose(np.stack(logits), st.rules, st.suppress, st.sampling, st.slots))
        return out


class FakeRows:
    """runtime.decoding.Rows for one window of FakePool."""

    def __init__(self, engine: FakeEngine, window: float):
        self.engine, self.window = engine, window
        self.prompt = np.zeros(0, np.int64)
        self.history: list[np.ndarray] = []

    def prefill(self, tokens):
        self.prompt = np.concatenate([self.prompt, tokens[0]])
        return scripted_logits(self.window, self.prompt, self.engine.tokenizer)[None]

    def logits(self, tokens):
        return scripted_logits(self.window, tokens[0], self.engine.tokenizer)[None]

    def spread(self, n: int) -> None:
        self.history = [self.prompt.copy() for _ in range(n)]

    def reorder(self, sources) -> None:
        self.history = [self.history[s].copy() for s in sources]

    def select(self, logits, rules, suppress, sampling, slots):
        return choose(logits, rules, suppress, sampling, slots)

    def close(self) -> None:
        self.history = []


class FakeStreamModel(FakeEngine):
    """FakeEngine with what runtime.stream asks of a model besides: the log-mel of audio (real,
    with openai-whisper's filters `mel_filters`) and whether it is multilingual. The window's
    id, the value the scripted logits depend on, is the first value of its log-mel."""

    def __init__(self, tokenizer, mel_filters: np.ndarray):
        super().__init__(tokenizer)
        self.mel_filters = mel_filters
        self.is_multilingual = tokenizer.multilingual

    def features(self, audio):  # the stream's, not FakeEngine.features(ids)
        from whisper_max.runtime.audio import LogMel

        return LogMel([np.asarray(audio, np.float32)], self.mel_filters)


def torch_model(tokenizer, multilingual: bool = False):
    """A stand-in for openai-whisper's Whisper model with the same scripted logits, for its
    DecodingTask: features pass through (shape (n, 1500, 384)), and the decoder keeps each row's
    token history in the kv_cache entries openai-whisper reorders for beams."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            block = torch.nn.Module()
            block.attn = torch.nn.Module()
            block.attn.key, block.attn.value = torch.nn.Identity(), torch.nn.Identity()
            self.blocks = torch.nn.ModuleList([block])

        def forward(self, tokens, xa, kv_cache=None):
            key, value = self.blocks[0].attn.key, self.blocks[0].attn.value
            before = kv_cache.get(key, torch.zeros((tokens.shape[0], 0), dtype=torch.long))
            history = torch.cat([before, tokens], dim=1)
            kv_cache[key] = kv_cache[value] = history
            start = before.shape[1]
            windows = xa[:, 0, 0].tolist()
            if len(windows) == 1:  # openai-whisper gives the rows of one window (beams) its features once
                windows *= history.shape[0]
            out = [
                [scripted_logits(w, h[: start + j + 1].numpy(), tokenizer) for j in range(tokens.shape[1])]
                for w, h in zip(windows, history)
            ]
            return torch.from_numpy(np.array(out, np.float32))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()
            self.dims = SimpleNamespace(n_text_ctx=N_TEXT_CTX, n_audio_ctx=N_AUDIO_CTX, n_audio_state=N_AUDIO_STATE)
            self.is_multilingual = multilingual
            self.num_languages = 99  # n_vocab - 51765 - multilingual, for tiny.en and base alike

        def install_kv_cache_hooks(self, cache=None):
            return ({} if cache is None else cache), []

    return Model()
