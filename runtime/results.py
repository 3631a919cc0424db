"""What a transcription gives: typed, frozen `TranscriptionResult`, `Segment` and `Word`, and
openai-whisper's result dict (`as_openai_dict`), which the writers, the Python API's
`transcribe()` and the parity tests read, with its keys in openai-whisper's order."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float

    def as_openai_dict(self) -> dict:
        return {"word": self.word, "start": self.start, "end": self.end, "probability": self.probability}


@dataclass(frozen=True)
class Segment:
    """One segment, in openai-whisper's field order; `words` only with word timestamps."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: tuple[int, ...]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: tuple[Word, ...] | None = None

    @classmethod
    def from_openai_dict(cls, d: dict) -> Segment:
        unknown = set(d) - _SEGMENT_FIELDS
        if unknown:
            raise ValueError(f"segment: unknown keys {sorted(unknown)}")
        words = d.get("words")
        return cls(
            **{k: v for k, v in d.items() if k not in ("tokens", "words")},
            tokens=tuple(d["tokens"]),
            words=None if words is None else tuple(Word(**w) for w in words),
        )

    def as_openai_dict(self) -> dict:
        d = {f: getattr(self, f) for f in _SEGMENT_ORDER}
        d["tokens"] = list(self.tokens)
        if self.words is not None:
            d["words"] = [w.as_openai_dict() for w in self.words]
        return d


_SEGMENT_FIELDS = {f.name for f in fields(Segment)}
_SEGMENT_ORDER = tuple(f.name for f in fields(Segment) if f.name != "words")


@dataclass(frozen=True)
class TranscriptionResult:
    text: str
    segments: tuple[Segment, ...]
    language: str

    @classmethod
    def from_openai_dict(cls, d: dict) -> TranscriptionResult:
        return cls(d["text"], tuple(Segment.from_openai_dict(s) for s in d["segments"]), d["language"])

    def as_openai_dict(self) -> dict:
        """openai-whisper's `transcribe()` result: text, segments (as dicts), language."""
        return {
            "text": self.text,
            "segments": [s.as_openai_dict() for s in self.segments],
            "language": self.language,
        }
