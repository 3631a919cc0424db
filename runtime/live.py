"""Live transcription: text of audio that is still arriving, confirmed as consecutive decodes agree.

The method is whisper_streaming's (Macháček, Dabre and Bojar, 2023), on a Whisper that is not
itself streaming: keep a buffer of the latest audio; whenever enough new audio has arrived,
transcribe the whole buffer again (with word timestamps, the confirmed text before the buffer
as the prompt); confirm the words two consecutive transcriptions agree on from the start of
what is unconfirmed (LocalAgreement-2), keep the rest as a partial hypothesis; cut the buffer at
the end of a confirmed segment once it is long, so a decode stays within one window.

    live = LiveTranscription(model, on_event=print)
    live.append(samples)                  # 16 kHz mono float32, any chunk size, as it arrives
    stream = live.next_update()           # a TranscriptionStream of the buffer, or None (too little new audio)
    engine.submit(stream, on_done=live.update)   # its windows batch with every other stream's
    ...
    live.finish()                         # no more audio: the next update is the last, then all is confirmed

Events: `Partial` (the unconfirmed hypothesis after each update), `Confirmed` (words newly
confirmed), `Behind` (decodes do not keep up with the audio), `Finished` (the whole confirmed
text). Word times are in the stream's time (seconds
since its first sample). `append` may be called from another thread than the rest.

With `vad_filter` in the transcription options, Silero VAD (runtime.vad.LiveVad, with
`vad_parameters`) watches the audio as it comes: silence is not decoded (the buffer keeps only
the pad before the next speech), and a turn ends after `min_silence_duration_ms` of silence: its
last update confirms every word it has, without waiting for a second decode to agree. Events
`SpeechStarted`, `SpeechStopped` and `Turn` (a turn's confirmed text) mark the turns; they are
what whisper-serve's server_vad turn detection sends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE, LiveMel
from .model import WhisperModel
from .options import TranscribeOptions
from .results import TranscriptionResult, Word
from .stream import TranscriptionStream
from .vad import LiveVad, VadOptions


@dataclass(frozen=True)
class LiveOptions:
    """min_chunk: seconds of new audio before the buffer is decoded again (whisper_streaming's
    --min-chunk-size); trim: seconds of buffer past which it is cut at the end of a confirmed
    segment (its --buffer_trimming_sec); behind: seconds of new audio a decode may start with
    before the stream is told it is Behind; max_buffer: seconds of buffer past which it is cut at
    the last confirmed word even without a segment end (a decode must stay within a window);
    prompt_chars: confirmed text before the buffer given as the prompt (its 200 characters);
    transcribe: the decoding options (word timestamps are always on)."""

    min_chunk: float = 1.0
    behind: float = 5.0
    trim: float = 15.0
    max_buffer: float = 25.0
    prompt_chars: int = 200
    transcribe: TranscribeOptions = field(default_factory=TranscribeOptions)

    def __post_init__(self) -> None:
        if self.min_chunk <= 0 or not 0 < self.trim <= self.max_buffer <= N_SAMPLES / SAMPLE_RATE:
            raise ValueError(
                f"live options min_chunk {self.min_chunk}, trim {self.trim}, max_buffer {self.max_buffer}: expected "
                f"min_chunk > 0 and 0 < trim <= max_buffer <= {N_SAMPLES // SAMPLE_RATE}"
            )


@dataclass(frozen=True)
class Partial:
    """The unconfirmed words after an update (they may still change), and the audio seconds
    received when it was decoded."""

    words: tuple[Word, ...]
    audio_time: float


@dataclass(frozen=True)
class Confirmed:
    """Words confirmed by an update (they will not change), and the audio seconds received when
    the update that confirmed them was decoded."""

    words: tuple[Word, ...]
    audio_time: float

    @property
    def text(self) -> str:
        return "".join(w.word for w in self.words)


@dataclass(frozen=True)
class Behind:
    """A decode starts with more than LiveOptions.behind seconds of audio that came since the
    last one: the decodes do not keep up with the audio (the machine is too busy for real time,
    or the audio comes faster than real time). Said once a stream."""

    seconds: float
    audio_time: float


@dataclass(frozen=True)
class SpeechStarted:
    """The VAD heard speech begin at `audio_time` (stream seconds, the pad before it included)."""

    audio_time: float


@dataclass(frozen=True)
class SpeechStopped:
    """The speech that began at the last SpeechStarted ended at `audio_time` (the pad after it
    included): its turn's last update is due."""

    audio_time: float


@dataclass(frozen=True)
class Turn:
    """A turn's words, all confirmed: the speech from `start` to `end` (stream seconds)."""

    words: tuple[Word, ...]
    start: float
    end: float

    @property
    def text(self) -> str:
        return "".join(w.word for w in self.words).strip()


@dataclass(frozen=True)
class Finished:
    """The stream ended and everything is confirmed: its whole text."""

    text: str


def _same(a: Word, b: Word) -> bool:
    return a.word.strip() == b.word.strip()


class LiveTranscription:
    """One live stream (the module docstring). Not thread-safe but for `append`."""

    def __init__(
        self,
        model: WhisperModel,
        options: LiveOptions | None = None,
        on_event: Callable[[object], None] | None = None,
    ):
        self.model = model
        self.options = options or LiveOptions()
        self._emit = on_event or (lambda event: None)
        self._lock = threading.Lock()
        self._pending: list[np.ndarray] = []  # appended, not yet in the buffer
        self._ended = False
        self._buffer = np.zeros(0, np.float32)  # the samples since `offset`
        self._mel = LiveMel(model.mel_filters)
        self.offset = 0.0  # the buffer's start, in seconds of the stream
        self.received = 0  # samples appended so far
        self._decoded_at = 0  # samples received when the last update was made
        self._in_flight = False
        self._final = False  # the update in flight is the last (the stream had ended)
        self._warned = False  # Behind was said
        self._language = self.options.transcribe.decode.language  # the first update's, when not given
        self.confirmed: list[Word] = []
        self._hypothesis: list[Word] = []  # the last update's unconfirmed words
        self.finished = False
        t = self.options.transcribe
        self._vad = LiveVad(t.vad_parameters or VadOptions()) if t.vad_filter else None
        self._turns: list[list[float]] = []  # [start, end or inf] of turns not yet done (VAD)
        self._turn_words = 0  # confirmed words before the oldest open turn
        self._turn_end: float | None = None  # the update in flight ends the oldest turn, at this time

    # --- the audio side (any thread) ---

    def append(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        with self._lock:
            if self._ended:
                raise RuntimeError("append: the live stream was finished")
            self._pending.append(samples)

    def finish(self) -> None:
        """No more audio: the next update decodes what is left, then every word is confirmed."""
        with self._lock:
            self._ended = True

    # --- the decoding side ---

    def fail(self, error: Exception) -> None:
        """The stream cannot go on (its audio, or its decoding, failed): `error` is its last event."""
        self._in_flight = False
        self.finished = True
        self._emit(error)

    def _take(self) -> bool:
        """Moves appended samples into the buffer; True once the stream has ended."""
        with self._lock:
            pending, self._pending, ended = self._pending, [], self._ended
        for block in pending:
            self._mel.extend(block)  # refuses NaN and infinities
            self.received += len(block)
            for kind, at in self._vad.push(block) if self._vad is not None else ():
                if kind == "start":
                    self._turns.append([at / SAMPLE_RATE, np.inf])
                    self._emit(SpeechStarted(at / SAMPLE_RATE))
                else:
                    self._turns[-1][1] = at / SAMPLE_RATE
                    self._emit(SpeechStopped(at / SAMPLE_RATE))
        if pending:
            self._buffer = np.concatenate([self._buffer, *pending])  # one copy of the buffer a take
        return ended

    def next_update(self) -> TranscriptionStream | None:
        """A TranscriptionStream of the buffer to decode now (feed its result to update), or
        None: an update is in flight, too little new audio has arrived, or the stream is done."""
        ended = self._take()
        if self._in_flight or self.finished:
            return None
        new = self.received - self._decoded_at
        turn_over = self._vad is not None and bool(self._turns) and self._turns[0][1] < np.inf
        if self._vad is not None and not self._turns:  # silence: nothing to decode
            if ended:
                self._finish()
            else:
                self._drop_silence()
            return None
        if not ended and not turn_over and new < self.options.min_chunk * SAMPLE_RATE:
            return None
        if ended and (new == 0 or len(self._buffer) == 0):
            self._finish()
            return None
        if new > self.options.behind * SAMPLE_RATE and not self._warned:
            self._warned = True
            self._emit(Behind(round(new / SAMPLE_RATE, 2), self.received / SAMPLE_RATE))
        self._in_flight, self._decoded_at = True, self.received
        self._final = ended
        self._turn_end = self._turns[0][1] if turn_over and not ended else None
        o = self.options.transcribe
        options = replace(
            o,
            word_timestamps=True,
            initial_prompt=self._prompt(),
            verbose=None,
            vad_filter=False,
            decode=replace(o.decode, language=self._language),
        )
        return TranscriptionStream(self.model, self._mel.features(), options, one_window=True)

    def _prompt(self) -> str | None:
        before = "".join(w.word for w in self.confirmed if w.end <= self.offset)
        return before[-self.options.prompt_chars :] or None

    def update(self, stream: TranscriptionStream) -> None:
        """The result of the stream next_update() gave: confirm, emit, cut the buffer."""
        self._in_flight = False
        result: TranscriptionResult = stream.result
        self._language = self._language or result.language
        at = self._decoded_at / SAMPLE_RATE
        words = [
            replace(w, start=round(self.offset + w.start, 3), end=round(self.offset + w.end, 3))
            for s in result.segments
            for w in s.words or ()
        ]
        words = self._after_confirmed(words)
        agreed = 0
        while agreed < min(len(words), len(self._hypothesis)) and _same(words[agreed], self._hypothesis[agreed]):
            agreed += 1
        if self._final:
            agreed = len(words)
        elif self._turn_end is not None:  # the turn is over: what it said is confirmed
            agreed = sum(1 for w in words if w.start < self._turn_end)
        confirmed, self._hypothesis = words[:agreed], words[agreed:]
        if confirmed:
            self.confirmed.extend(confirmed)
            self._emit(Confirmed(tuple(confirmed), at))
        self._emit(Partial(tuple(self._hypothesis), at))
        if self._final:
            self._finish()
        elif self._turn_end is not None:
            self._end_turn()
            self._cut(max(self.offset, self._turn_end))
        else:
            self._trim([self.offset + s.end for s in result.segments])

    def _after_confirmed(self, words: list[Word]) -> list[Word]:
        """The words of a decode that follow what is confirmed. A decode of a buffer that starts
        before the last confirmed word says the confirmed tail again, with timings that move by
        a few hundred ms between decodes: the words through the last match of the confirmed
        tail's last 5..1 words (ending within 0.5 s of its end) go; without a match, the words
        whose middle is before its end."""
        if not self.confirmed:
            return words
        last = self.confirmed[-1].end
        for n in range(min(5, len(self.confirmed)), 0, -1):
            tail = self.confirmed[-n:]
            for i in range(len(words) - n, -1, -1):
                said = words[i : i + n]
                if abs(said[-1].end - last) <= 0.5 and all(_same(a, b) for a, b in zip(tail, said)):
                    return words[i + n :]
        return [w for w in words if (w.start + w.end) / 2 > last]

    def _trim(self, segment_ends: list[float]) -> None:
        seconds = len(self._buffer) / SAMPLE_RATE
        if seconds <= self.options.trim:
            return
        done = self.confirmed[-1].end if self.confirmed else self.offset
        # the last segment end within what is confirmed (whisper_streaming's chunk_completed_segment)
        cut = max((e for e in segment_ends[:-1] if e <= done), default=None)
        if cut is None and seconds > self.options.max_buffer:
            # no segment end to cut at and the buffer nears a window: cut at what is confirmed, or
            # (silence, or nothing agreed for long) before the last `trim` seconds
            keep = self._hypothesis[0].start if self._hypothesis else np.inf
            cut = max(done, min(keep, self.offset + seconds - self.options.trim))
        if cut is not None and cut > self.offset:
            self._cut(cut)

    def _cut(self, at: float) -> None:
        drop = min(len(self._buffer), round((at - self.offset) * SAMPLE_RATE / HOP_LENGTH) * HOP_LENGTH)
        self._buffer = self._buffer[drop:]
        self.offset += drop / SAMPLE_RATE
        self._mel = LiveMel(self.model.mel_filters)
        self._mel.extend(self._buffer)
        self._hypothesis = [w for w in self._hypothesis if w.start >= self.offset]

    def _end_turn(self) -> None:
        """The oldest open turn is decoded to its end: Turn with its words."""
        start, end = self._turns.pop(0)
        end = min(end, self.received / SAMPLE_RATE)
        words, self._turn_words = self.confirmed[self._turn_words :], len(self.confirmed)
        self._emit(Turn(tuple(words), start, end))

    def _drop_silence(self) -> None:
        """Between turns: the buffer keeps only the VAD's pad before what comes next, once it
        holds a second more than that."""
        pad = self._vad.options.speech_pad_ms / 1000
        if len(self._buffer) / SAMPLE_RATE > pad + 1:
            self._cut(self.received / SAMPLE_RATE - pad)
            self._decoded_at = self.received  # silence is not new audio to decode

    def _finish(self) -> None:
        """Confirm what the last update left unconfirmed (the audio ended with it), and end."""
        if self._hypothesis:
            rest, self._hypothesis = self._hypothesis, []
            self.confirmed.extend(rest)
            self._emit(Confirmed(tuple(rest), self.received / SAMPLE_RATE))
        while self._turns:  # the audio ended in a turn (or one the last update did not end)
            self._end_turn()
        self.finished = True
        self._emit(Finished("".join(w.word for w in self.confirmed).strip()))


def read_pcm16(f, live: LiveTranscription, block_bytes: int = 3200) -> None:
    """Append the 16-bit little-endian mono 16 kHz samples read from the binary file `f` (a pipe
    from ffmpeg: `-f s16le -ar 16000 -ac 1 -`) to `live` as they come, 0.1 s at most at a time;
    finish it at the end of the file."""
    read = getattr(f, "read1", f.read)  # read1: what the pipe holds now, without waiting for more
    rest = b""
    while chunk := read(block_bytes):
        data = rest + chunk
        whole = len(data) - len(data) % 2
        rest = data[whole:]
        if whole:
            live.append(np.frombuffer(data[:whole], "<i2").astype(np.float32) / np.float32(32768))
    live.finish()


def run_live(engine, streams: list[LiveTranscription], idle: float = 0.01) -> None:
    """Decode the updates of live streams on `engine` (with whatever else it decodes) until each
    has finished: every stream's update joins the engine when it has enough new audio."""
    while not all(s.finished for s in streams):
        for s in streams:
            update = s.next_update()
            if update is not None:
                engine.submit(update, on_done=s.update)
        if engine.busy:
            engine.step()
        else:
            time.sleep(idle)  # waiting for audio
