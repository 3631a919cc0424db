"""Decoding one 30 s window, with openai-whisper's options and semantics, in numpy.

The decoder graph returns the logits of the last position and grows the self-attention cache by
the tokens it is given; cross-attention K/V are computed once per window. The first call is
split at <|startoftranscript|> so its logits (for no_speech_prob) are a last position too.
"""

from __future__ import annotations

import zlib
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .audio import CHUNK_LENGTH
from .model import WhisperModel
from .program import SELECT_RANGES, SELECT_RULES
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"
    language: str | None = None
    temperature: float = 0.0
    sample_len: int | None = None
    best_of: int | None = None
    beam_size: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    prompt: str | list[int] | None = None
    prefix: str | list[int] | None = None
    suppress_tokens: str | Iterable[int] | None = "-1"
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float | None = 1.0
    fp16: bool = False  # accepted for compatibility; the package's dtype decides
    seed: int | None = None  # for temperature sampling (numpy's generator)


@dataclass
class DecodingResult:
    audio_features: object
    language: str
    language_probs: dict[str, float] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = np.nan
    no_speech_prob: float = np.nan
    temperature: float = np.nan
    compression_ratio: float = np.nan
    cross: dict | None = field(default=None, repr=False)  # the window's cross_kv values (word timestamps reuse them)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


# --- the logit filters, as the package's select graph applies them ---

_END = np.iinfo(np.int32).max  # a range's end past the last token


class TokenRules:
    """openai-whisper's logit filters (SuppressBlank, SuppressTokens, ApplyTimestampRules) as
    the select graph takes them (kernel whisper_max.select_tokens): one list of tokens every row
    suppresses, and per row (`rows`) the token ranges its tokens so far ban, plus the switch of
    the rule that bans text when the timestamps together outweigh it. The filters only set
    logits to -inf before that last rule, so their order does not matter until it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        sample_begin: int,
        suppress_blank: bool,
        suppress_tokens: Sequence[int],
        timestamps: bool,
        max_initial_timestamp_index: int | None,
    ):
        self.sample_begin = sample_begin
        self.eot = tokenizer.eot
        self.blank = tokenizer.encode(" ") + [tokenizer.eot] if suppress_blank else []
        self.tb = tokenizer.timestamp_begin if timestamps else 0
        self.max_initial = max_initial_timestamp_index
        ids = set(suppress_tokens) | ({tokenizer.no_timestamps} if timestamps else set())
        self.suppress = np.array(sorted(ids), np.int32)

    def rows(self, tokens: np.ndarray) -> np.ndarray:
        """(rows, SELECT_RULES) int32 for the rows of `tokens` (rows, positions so far)."""
        n, width = tokens.shape
        out = np.zeros((n, SELECT_RULES), np.int32)
        first = width == self.sample_begin
        tb = self.tb
        for k in range(n):
            ranges = [(t, t + 1) for t in self.blank] if first else []
            if tb:
                sampled = tokens[k, self.sample_begin :]
                last_ts = len(sampled) >= 1 and sampled[-1] >= tb
                penultimate_ts = len(sampled) < 2 or sampled[-2] >= tb
                if last_ts:
                    # timestamps come in pairs: after a closed pair text (or eot), after an open one a timestamp or eot
                    ranges.append((tb, _END) if penultimate_ts else (0, self.eot))
                stamps = sampled[sampled >= tb]
                if stamps.size:
                    # non-decreasing; a segment must have nonzero length
                    last = stamps[-1] if (last_ts and not penultimate_ts) else stamps[-1] + 1
                    ranges.append((tb, int(last)))
                if first:  # a timestamp first, at most max_initial_timestamp
                    ranges.append((0, tb))
                    if self.max_initial is not None:
                        ranges.append((tb + self.max_initial + 1, _END))
                out[k, -1] = tb
            merged: list[list[int]] = []
            for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
                if merged and lo <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], hi)
                else:
                    merged.append([lo, hi])
            if len(merged) > SELECT_RANGES:
                raise ValueError(
                    f"{len(merged)} banned token ranges in one row; the select graph takes {SELECT_RANGES}"
                )
            out[k, : 2 * len(merged)] = np.array(merged, np.int32).reshape(-1) if merged else ()
        return out


# --- token selection: each decoder takes the select graph's choice, (rows, k, 2) (token,
# log-probability) pairs, best first ---


def _check(choice: np.ndarray) -> np.ndarray:
    if np.isnan(choice[:, 0, 1]).any():
        raise FloatingPointError(
            "the decoder's logits hold NaN (no token can be chosen): the package's graphs computed NaN; check its "
            "parity report"
        )
    return choice


class TokenDecoder(Protocol):
    """openai-whisper's TokenDecoder as a window's decoding uses it: how many (token,
    log-probability) pairs each row's choice needs (`slots`), the (temperature, u) each row is
    sampled with, and the bookkeeping of sequences from one step's choice to the ranked
    candidates. GreedyDecoder (greedy and sampling) and BeamSearchDecoder implement it."""

    slots: int

    def reset(self) -> None: ...

    def sampling(self, rows: int) -> np.ndarray:
        """(rows, 2) float32: each row's temperature and uniform draw for this step."""

    def update(self, tokens: np.ndarray, choice: np.ndarray, sum_logprobs: np.ndarray):
        """The sequences grown by `choice` (rows, slots, 2): (tokens, completed, the rows each new
        row continues (beam search) or None)."""

    def finalize(self, tokens: np.ndarray, sum_logprobs: np.ndarray):
        """The candidates per audio and their summed log-probabilities."""


class GreedyDecoder:
    def __init__(self, temperature: float, eot: int, rng: np.random.Generator):
        self.temperature, self.eot, self.rng = temperature, eot, rng
        self.slots = 1

    def reset(self) -> None:
        pass

    def sampling(self, rows: int) -> np.ndarray:
        """(temperature, u) per row: the argmax at temperature 0, else a sample drawn with u."""
        out = np.zeros((rows, 2), np.float32)
        if self.temperature > 0:
            out[:, 0] = self.temperature
            out[:, 1] = self.rng.random(rows)
        return out

    def update(self, tokens, choice, sum_logprobs):
        next_tokens = choice[:, 0, 0].astype(np.int64)
        live = tokens[:, -1] != self.eot
        sum_logprobs += np.where(live, choice[:, 0, 1], np.float32(0))
        next_tokens[~live] = self.eot
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all()), None

    def finalize(self, tokens, sum_logprobs):
        tokens = np.pad(tokens, [(0, 0), (0, 0), (0, 1)], constant_values=self.eot)
        return tokens, sum_logprobs.tolist()


class BeamSearchDecoder:
    def __init__(self, beam_size: int, eot: int, patience: float | None = None):
        self.beam_size, self.eot = beam_size, eot
        self.patience = patience or 1.0
        self.max_candidates = round(beam_size * self.patience)
        if self.max_candidates <= 0:
            raise ValueError(f"invalid beam size ({beam_size}) or patience ({patience})")
        self.finished: list[dict] | None = None
        self.slots = beam_size + 1

    def reset(self) -> None:
        self.finished = None

    def sampling(self, rows: int) -> np.ndarray:
        return np.zeros((rows, 2), np.float32)

    def update(self, tokens, choice, sum_logprobs):
        """`choice`: each row's beam_size + 1 best (token, log-probability); `sum_logprobs`
        float32, as openai-whisper's sums are."""
        if tokens.shape[0] % self.beam_size:
            raise ValueError(f"{tokens.shape[0]} sequences is not a multiple of beam_size {self.beam_size}")
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
        best = choice[:, :, 0].astype(np.int64).tolist()
        lps = choice[:, :, 1]
        width = tokens.shape[1]
        kept, sources, newly_finished = [], [], []  # kept: (source row, token) of each next row
        for i in range(n_audio):
            rows = range(i * self.beam_size, (i + 1) * self.beam_size)
            # a candidate is its prefix row and a token; equal prefixes (all rows, at the first
            # step) are one prefix, so equal sequences are one candidate, as openai-whisper's
            # dict of whole sequences makes them, without building each sequence
            first: dict[bytes, int] = {}
            prefix = {idx: first.setdefault(tokens[idx].tobytes(), idx) for idx in rows}
            scores, source, finished = {}, {}, {}
            for idx in rows:
                new = sum_logprobs[idx] + lps[idx]  # float32 sums, as openai-whisper's
                for j, token in enumerate(best[idx]):
                    key = (prefix[idx], token)
                    scores[key] = float(new[j])
                    source[key] = idx
            saved = 0
            for key in sorted(scores, key=scores.get, reverse=True):
                if key[1] == self.eot:
                    finished[tuple(tokens[key[0]].tolist()) + (self.eot,)] = scores[key]
                else:
                    sum_logprobs[len(kept)] = scores[key]
                    kept.append((source[key], key[1]))
                    sources.append(source[key])
                    saved += 1
                    if saved == self.beam_size:
                        break
            newly_finished.append(finished)
        for prev, new in zip(self.finished, newly_finished):
            for seq in sorted(new, key=new.get, reverse=True):
                if len(prev) >= self.max_candidates:
                    break
                prev[seq] = new[seq]
        completed = all(len(f) >= self.max_candidates for f in self.finished)
        src = np.array([k[0] for k in kept], np.int64).reshape(-1)
        new = np.array([k[1] for k in kept], np.int64).reshape(-1, 1)
        return np.concatenate([tokens[src].reshape(len(kept), width), new], axis=1), completed, sources

    def finalize(self, preceding, sum_logprobs):
        for i, seqs in enumerate(self.finished):
            if len(seqs) < self.beam_size:  # not enough finished: take the best unfinished
                for j in np.argsort(sum_logprobs[i])[::-1]:
                    seqs[tuple(preceding[i, j].tolist() + [self.eot])] = float(sum_logprobs[i][j])
                    if len(seqs) >= self.beam_size:
                        break
        tokens = [[np.array(s) for s in seqs] for seqs in self.finished]
        return tokens, [list(seqs.values()) for seqs in self.finished]


def rank(tokens: list[list[np.ndarray]], sum_logprobs: list[list[float]], length_penalty: float | None) -> list[int]:
    """Index of the best candidate per audio: log-probability over length (or a GNMT-style penalty)."""
    out = []
    for seqs, lps in zip(tokens, sum_logprobs):
        scores = [
            lp / (len(t) if length_penalty is None else ((5 + len(t)) / 6) ** length_penalty)
            for t, lp in zip(seqs, lps)
        ]
        out.append(int(np.argmax(scores)))
    return out


# --- the task: one window, as a generator the engine drives ---


@dataclass
class Step:
    """One decoder call's worth of a window: the next token for its live rows. The engine
    decodes the steps of many windows in one call and sends each its choice, (len(rows), slots,
    2) (token, log-probability) pairs. `rows` are indices into the window's rows (an ended
    greedy or sampled row stops running: its next token is end-of-text whatever it computes)."""

    rows: np.ndarray  # (live,) int
    tokens: np.ndarray  # (live, 1) int64: each live row's last token
    rules: np.ndarray  # (live, SELECT_RULES) int32 (TokenRules.rows)
    suppress: np.ndarray  # (n,) int32: tokens every row of the window suppresses
    sampling: np.ndarray  # (live, 2) float32: (temperature, u)
    slots: int  # (token, log-probability) pairs wanted per row


class Rows(Protocol):
    """A window's rows in an engine: where its decoder state lives. Made by the engine's pool
    (`open(cross)`) from the window's cross-attention values; `close()` frees it."""

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """Run the decoder on (1, n) prompt tokens after those prefilled so far (one row, the
        general decoder): the logits (1, n_vocab) of the last."""

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """The logits (1, n_vocab) of the last of (1, n) tokens from an empty cache, kept nowhere
        (language detection)."""

    def spread(self, n: int) -> None:
        """The window now decodes `n` rows, each continuing the prompt prefilled."""

    def reorder(self, sources) -> None:
        """Row i continues what row sources[i] was (beam search)."""

    def select(self, logits: np.ndarray, rules, suppress, sampling, slots: int) -> np.ndarray:
        """The next-token choice for `logits` (rows, n_vocab) (the select graph)."""

    def close(self) -> None: ...


def language_probs(logits: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, list[dict[str, float]]]:
    """The language tokens' choice from the logits (n, n_vocab) at <|startoftranscript|>."""
    lang_tokens = np.array(tokenizer.all_language_tokens)
    mask = np.ones(logits.shape[-1], bool)
    mask[lang_tokens] = False
    logits = logits.copy()
    logits[:, mask] = -np.inf
    probs = np.exp(log_softmax(logits))
    best = logits.argmax(axis=-1)
    return best, [
        {code: float(probs[i, tok]) for tok, code in zip(lang_tokens, tokenizer.all_language_codes)}
        for i in range(len(logits))
    ]


class DecodingTask:
    """openai-whisper's DecodingTask for one window: `window(rows, features)` is a generator
    that yields a Step per token and returns the DecodingResult (runtime.engine drives it)."""

    def __init__(self, model: WhisperModel, options: DecodingOptions):
        self.model = model
        self.options = self._verify(options)
        language = options.language or "en"
        task = "transcribe" if options.task == "lang_id" else options.task  # lang_id: <|startoftranscript|> alone
        if options.task == "lang_id" and not model.tokenizer.multilingual:
            raise ValueError("this model doesn't have language tokens so it can't perform lang id")
        self.tokenizer = model.tokenizer.with_language(language, task)
        self.n_group = options.beam_size or options.best_of or 1
        self.n_ctx = model.dims["n_text_ctx"]
        self.sample_len = options.sample_len or self.n_ctx // 2
        self.sot_sequence = self.tokenizer.sot_sequence
        if options.without_timestamps:
            self.sot_sequence = self.tokenizer.sot_sequence_including_notimestamps
        self.initial_tokens = self._initial_tokens()
        self.sample_begin = len(self.initial_tokens)
        self.sot_index = self.initial_tokens.index(self.tokenizer.sot)
        rng = np.random.default_rng(options.seed)
        self.decoder: TokenDecoder
        if options.beam_size is not None:
            self.decoder = BeamSearchDecoder(options.beam_size, self.tokenizer.eot, options.patience)
        else:
            self.decoder = GreedyDecoder(options.temperature, self.tokenizer.eot, rng)
        precision = CHUNK_LENGTH / model.dims["n_audio_ctx"]  # 0.02 s per audio position
        max_index = None if options.max_initial_timestamp is None else round(options.max_initial_timestamp / precision)
        self.rules = TokenRules(
            self.tokenizer,
            self.sample_begin,
            options.suppress_blank,
            self._suppress_tokens() if options.suppress_tokens else (),
            not options.without_timestamps,
            max_index,
        )

    @staticmethod
    def _verify(o: DecodingOptions) -> DecodingOptions:
        if o.beam_size is not None and o.best_of is not None:
            raise ValueError("beam_size and best_of can't be given together")
        if o.temperature == 0 and o.best_of is not None:
            raise ValueError("best_of with greedy sampling (T=0) is not compatible")
        if o.patience is not None and o.beam_size is None:
            raise ValueError("patience requires beam_size to be given")
        if o.length_penalty is not None and not 0 <= o.length_penalty <= 1:
            raise ValueError("length_penalty (alpha) should be a value between 0 and 1")
        return o

    def _initial_tokens(self) -> tuple[int, ...]:
        tk, o = self.tokenizer, self.options
        tokens = list(self.sot_sequence)
        if o.prefix:
            prefix = tk.encode(" " + o.prefix.strip()) if isinstance(o.prefix, str) else list(o.prefix)
            # as openai-whisper: with the default sample_len this is prefix[-0:], the whole prefix
            prefix = prefix[-(self.n_ctx // 2 - self.sample_len) :]
            tokens += prefix
        if o.prompt:
            prompt = tk.encode(" " + o.prompt.strip()) if isinstance(o.prompt, str) else list(o.prompt)
            tokens = [tk.sot_prev] + prompt[-(self.n_ctx // 2 - 1) :] + tokens
        return tuple(tokens)

    def _suppress_tokens(self) -> tuple[int, ...]:
        tk, s = self.tokenizer, self.options.suppress_tokens
        if isinstance(s, str):
            s = [int(t) for t in s.split(",") if t.strip()]
        s = list(s or [])
        if -1 in s:
            s = [t for t in s if t >= 0] + list(tk.non_speech_tokens)
        s += [tk.transcribe, tk.translate, tk.sot, tk.sot_prev, tk.sot_lm, tk.no_speech]
        return tuple(sorted(set(s)))

    def window(self, rows: Rows, features, cross: dict | None = None) -> Generator[Step, np.ndarray, DecodingResult]:
        """Decode one window whose decoder state `rows` holds (`features`: its encoder output,
        `cross` its cross_kv values, both kept in the result for word timestamps): yields a Step
        per token, is sent the choice."""
        self.decoder.reset()
        tk, n = self.tokenizer, self.n_group
        tokens = np.array([self.initial_tokens], np.int64)
        split = self.sot_index + 1
        # the first call in two parts, so the logits at <|startoftranscript|> are a last
        # position: no_speech_prob, and the language when none is given (openai-whisper detects
        # it on <|startoftranscript|> alone, so after a prompt that is a call of its own)
        logits_sot = rows.prefill(tokens[:, :split])
        language, lang_probs = self.options.language, None
        if language is None or self.options.task == "lang_id":
            lang_logits = logits_sot if split == 1 else rows.logits(tokens[:, self.sot_index : split])
            lang_tokens, probs = language_probs(lang_logits, tk)
            language, lang_probs = max(probs[0], key=probs[0].get), probs[0]
            if self.options.language is None:
                tokens[:, split] = lang_tokens[0]
        if self.options.task == "lang_id":
            return DecodingResult(audio_features=features, language=language, language_probs=lang_probs, cross=cross)
        logits = rows.prefill(tokens[:, split:]) if split < tokens.shape[1] else logits_sot
        no_speech = float(np.exp(log_softmax(logits_sot))[0, tk.no_speech])

        rows.spread(n)  # each row chooses (samples) its own next token from the prompt's logits
        tokens, logits = np.repeat(tokens, n, axis=0), np.repeat(logits, n, axis=0)
        sum_logprobs = np.zeros(n, np.float32)
        slots = self.decoder.slots
        choice = _check(
            rows.select(logits, self.rules.rows(tokens), self.rules.suppress, self.decoder.sampling(n), slots)
        )
        ended = isinstance(self.decoder, GreedyDecoder)  # a greedy or sampled row that has ended stops running
        for _ in range(self.sample_len):
            tokens, completed, sources = self.decoder.update(tokens, choice, sum_logprobs)
            if sources is not None:
                rows.reorder(sources)
            if completed or tokens.shape[-1] > self.n_ctx:
                break
            live = np.flatnonzero(tokens[:, -1] != tk.eot) if ended else np.arange(n)
            sampling = self.decoder.sampling(n)[live]  # drawn for every row, as alone
            got = yield Step(
                live, tokens[live, -1:], self.rules.rows(tokens[live]), self.rules.suppress, sampling, slots
            )
            choice = np.zeros((n, slots, 2), np.float32)
            choice[:, :, 0] = tk.eot
            choice[live] = _check(got)

        cand, cand_lp = self.decoder.finalize(tokens[None], sum_logprobs[None])
        cand = [t[self.sample_begin : int(np.nonzero(t == tk.eot)[0][0])] for t in cand[0]]
        chosen = rank([cand], cand_lp, self.options.length_penalty)[0]
        toks = [int(t) for t in cand[chosen]]
        text = tk.decode(toks).strip()
        return DecodingResult(
            audio_features=features,
            cross=cross,
            language=language,
            language_probs=lang_probs,
            tokens=toks,
            text=text,
            avg_logprob=cand_lp[0][chosen] / (len(toks) + 1),
            no_speech_prob=no_speech,
            temperature=self.options.temperature,
            compression_ratio=compression_ratio(text),
        )
