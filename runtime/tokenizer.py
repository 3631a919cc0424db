"""openai-whisper's tokenizer, rebuilt from a package's assets (tiktoken ranks + special tokens).

Behaves as `whisper.tokenizer.Tokenizer`: the same special-token ids, sot sequence, suppression
set of non-speech symbols, and decoding that drops timestamp tokens.
"""

from __future__ import annotations

import json
import string
from binascii import a2b_base64
from functools import cached_property

import tiktoken

# language names that are not in the table but that openai-whisper also accepts
_ALIASES = {
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}


class Tokenizer:
    def __init__(self, ranks: bytes, meta: dict, language: str | None = None, task: str | None = None):
        mergeable = {a2b_base64(tok): int(rank) for tok, rank in (line.split() for line in ranks.splitlines() if line)}
        self.encoding = tiktoken.Encoding(
            name=meta["encoding"],
            explicit_n_vocab=meta["n_vocab"],
            pat_str=meta["pat_str"],
            mergeable_ranks=mergeable,
            special_tokens=meta["special_tokens"],
        )
        self.special_tokens: dict[str, int] = dict(meta["special_tokens"])
        self.languages: dict[str, str] = dict(meta["languages"])  # code -> name, in token order
        self.multilingual = meta["encoding"] == "multilingual"
        self._non_speech = tuple(meta["non_speech_tokens"])
        self._specials_marked = all(k.startswith("<|") for k in self.special_tokens)
        self._configure(language, task)

    def _configure(self, language: str | None, task: str | None) -> None:
        """English-only models have neither; multilingual ones default to English transcription."""
        if self.multilingual:
            language, task = self.language_code(language or "en"), task or "transcribe"
            if task not in ("transcribe", "translate"):
                raise ValueError(f"task {task!r}: use transcribe or translate")
        else:
            language, task = None, None
        self.language, self.task = language, task
        seq = [self.sot]
        if language is not None:
            seq.append(self.to_language_token(language))
        if task is not None:
            seq.append(self.transcribe if task == "transcribe" else self.translate)
        self.sot_sequence = tuple(seq)

    @classmethod
    def from_package(cls, pkg, language: str | None = None, task: str | None = None) -> Tokenizer:
        meta = json.loads(pkg.read("assets/tokenizer.json"))
        return cls(pkg.read(f"assets/{meta['encoding']}.tiktoken"), meta, language, task)

    def with_language(self, language: str | None, task: str | None) -> Tokenizer:
        """The same vocabulary with another language/task (shares the tiktoken encoding)."""
        new = object.__new__(Tokenizer)
        new.__dict__.update(
            {
                k: v
                for k, v in self.__dict__.items()
                if k in ("encoding", "special_tokens", "languages", "multilingual", "_non_speech", "_specials_marked")
            }
        )  # language-independent
        new._configure(language, task)
        return new

    def language_code(self, language: str) -> str:
        lang = language.lower()
        if lang in self.languages:
            return lang
        by_name = {name: code for code, name in self.languages.items()} | _ALIASES
        if lang in by_name and by_name[lang] in self.languages:
            return by_name[lang]
        raise ValueError(
            f"unsupported language {language!r}; use one of {sorted(self.languages)} or their English names"
        )

    def encode(self, text: str) -> list[int]:
        # tiktoken's check that `text` holds no special token compiles a regex of all of them on
        # first use (~0.1 s of start-up); when they all start with "<|", text without it passes
        return (
            self.encoding.encode_ordinary(text)
            if self._specials_marked and "<|" not in text
            else self.encoding.encode(text)
        )

    def decode(self, tokens) -> str:
        return self.encoding.decode([t for t in tokens if t < self.timestamp_begin])

    def decode_with_timestamps(self, tokens) -> str:
        return self.encoding.decode(list(tokens))

    def _special(self, name: str) -> int:
        return self.special_tokens[name]

    @cached_property
    def eot(self) -> int:
        return self.encoding.eot_token

    sot = cached_property(lambda self: self._special("<|startoftranscript|>"))
    transcribe = cached_property(lambda self: self._special("<|transcribe|>"))
    translate = cached_property(lambda self: self._special("<|translate|>"))
    sot_lm = cached_property(lambda self: self._special("<|startoflm|>"))
    sot_prev = cached_property(lambda self: self._special("<|startofprev|>"))
    no_speech = cached_property(lambda self: self._special("<|nospeech|>"))
    no_timestamps = cached_property(lambda self: self._special("<|notimestamps|>"))
    timestamp_begin = cached_property(lambda self: self._special("<|0.00|>"))

    def to_language_token(self, language: str) -> int:
        token = self.special_tokens.get(f"<|{language}|>")
        if token is None:
            raise KeyError(f"language {language} not found in the tokenizer")
        return token

    @cached_property
    def all_language_tokens(self) -> tuple[int, ...]:
        return tuple(self.special_tokens[f"<|{code}|>"] for code in self.languages)

    @cached_property
    def all_language_codes(self) -> tuple[str, ...]:
        return tuple(self.languages)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return self.sot_sequence + (self.no_timestamps,)

    @property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens of speaker tags and non-speech annotations (♪, [MUSIC], ...) that openai-whisper
        suppresses by default; its own list, stored in the package by the converter."""
        return self._non_speech

    def split_to_word_tokens(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        if self.language in {"zh", "ja", "th", "lo", "my", "yue"}:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        full = self.decode_with_timestamps(tokens)
        words, word_tokens, current, offset = [], [], [], 0
        for token in tokens:
            current.append(token)
            decoded = self.decode_with_timestamps(current)
            if "\ufffd" not in decoded or full[offset + decoded.index("\ufffd")] == "\ufffd":
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens

    def split_tokens_on_spaces(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        words, word_tokens = [], []
        for sub, sub_tokens in zip(*self.split_tokens_on_unicode(tokens)):
            if sub_tokens[0] >= self.eot or sub.startswith(" ") or sub.strip() in string.punctuation or not words:
                words.append(sub)
                word_tokens.append(sub_tokens)
            else:
                words[-1] += sub
                word_tokens[-1].extend(sub_tokens)
        return words, word_tokens
