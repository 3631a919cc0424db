"""OpenAI's Realtime transcription over a WebSocket (`/v1/realtime?intent=transcription`).

A session takes OpenAI's client events: `session.update` (the audio's rate, 24 kHz as OpenAI's
`audio/pcm` or 16 kHz; the transcription's language and prompt), `input_audio_buffer.append`
(base64 PCM16 mono), `.commit` and `.clear`. The audio since the last commit is one item: a
live stream (runtime.live) on the model's engine, decoded beside the server's other requests and
streams. As its words are confirmed they are sent as
`conversation.item.input_audio_transcription.delta` events; the commit ends the item, answered by
`input_audio_buffer.committed` and, once the rest is decoded, `...completed` with the whole
transcript (each delta also carries `words`, their start and end in the item's audio: not
OpenAI's, and ignored by its clients). Turn detection is the client's (its commits) unless the
session asks for `turn_detection` `server_vad` (threshold, prefix_padding_ms,
silence_duration_ms): then one live stream with Silero VAD (runtime.live's vad_filter) takes the
whole session's audio, silence is not decoded, and each turn is an item: `speech_started`,
`speech_stopped`, `committed`, its deltas and `completed`, as OpenAI's server sends them (the
server commits; a client's commit is an error). An item whose decode starts with more
than 5 s of audio that came since the last is told it is behind, once (`whisper_max.live.behind`,
ours: the server does not keep up with its audio). Errors are OpenAI's `error` events
and leave the session open, except a server at its live-stream capacity, which says so and
closes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import uuid
from dataclasses import replace

import numpy as np

from ..audio import SAMPLE_RATE
from ..live import Behind, Confirmed, Finished, LiveOptions, SpeechStarted, SpeechStopped, Turn
from ..vad import VadOptions
from .protocol import Settings, options_for
from .registry import AllBusy, Registry, UnknownModel
from .scheduler import Busy, DecodingFailed

RATES = (24000, 16000)  # OpenAI's audio/pcm rate, and Whisper's own
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}  # OpenAI's


def _event(kind: str, **fields) -> dict:
    return {"type": kind, "event_id": f"event_{uuid.uuid4().hex[:20]}", **fields}


def _error(
    message: str,
    code: str,
    client_event: str | None = None,
    param: str | None = None,
    kind: str = "invalid_request_error",
) -> dict:
    error = {"type": kind, "code": code, "message": message, "param": param}
    return _event("error", error={**error, "event_id": client_event})


class Session:
    """One WebSocket session: client events in, server events out (`send`, a coroutine)."""

    def __init__(self, registry: Registry, model_id: str, settings: Settings, send):
        self.registry, self.model_id, self.settings, self._send = registry, model_id, settings, send
        self.id = f"sess_{uuid.uuid4().hex[:20]}"
        self.rate, self.language, self.prompt = RATES[0], None, None
        self.loop = asyncio.get_running_loop()
        self._items = (f"item_{uuid.uuid4().hex[:12]}_{i}" for i in itertools.count())
        self._item: str | None = None  # the item the audio since the last commit belongs to
        self._previous: str | None = None
        self._live = None
        self._scheduler = None
        self._resampler = None
        self._closed = False
        self.turn_detection: dict | None = None  # SERVER_VAD's keys when the server detects turns

    def description(self) -> dict:
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": self.id,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.rate},
                    "transcription": {"model": self.model_id, "language": self.language, "prompt": self.prompt or ""},
                    "turn_detection": self.turn_detection,
                    "noise_reduction": None,
                }
            },
        }

    async def send(self, event: dict) -> None:
        if not self._closed:
            await self._send(event)

    # --- client events ---

    async def handle(self, text: str) -> bool:
        """One client event; False when the session must end."""
        try:
            event = json.loads(text)
            kind = event["type"] if isinstance(event, dict) else None
        except (ValueError, KeyError):
            await self.send(_error("a client event is a JSON object with a 'type'", "invalid_json"))
            return True
        client_id = event.get("event_id")
        if kind in ("session.update", "transcription_session.update"):
            return await self._update(event.get("session") or {}, client_id, kind.replace(".update", ".updated"))
        if kind == "input_audio_buffer.append":
            return await self._append(event.get("audio"), client_id)
        if kind == "input_audio_buffer.commit":
            return await self._commit(client_id)
        if kind == "input_audio_buffer.clear":
            self._drop_item()
            await self.send(_event("input_audio_buffer.cleared"))
            return True
        await self.send(_error(f"unknown or unsupported client event {kind!r}", "unknown_event", client_id, "type"))
        return True

    async def _update(self, session: dict, client_id, reply: str) -> bool:
        audio = (session.get("audio") or {}).get("input") or {}
        fmt = audio.get("format") or {}
        transcription = audio.get("transcription") or session.get("input_audio_transcription") or {}
        rate = fmt.get("rate", self.rate) if isinstance(fmt, dict) else self.rate
        if session.get("input_audio_format") not in (None, "pcm16") or (
            isinstance(fmt, dict) and fmt.get("type", "audio/pcm") != "audio/pcm"
        ):
            await self.send(_error("audio formats: audio/pcm (pcm16) only", "unsupported_format", client_id, "format"))
            return True
        if rate not in RATES:
            await self.send(_error(f"rate {rate}: 24000 or 16000", "unsupported_rate", client_id, "rate"))
            return True
        if self._live is not None and rate != self.rate:
            await self.send(_error("the rate cannot change within an item; commit first", "item_open", client_id))
            return True
        language, prompt = transcription.get("language") or None, transcription.get("prompt") or None
        turns = audio.get("turn_detection", session.get("turn_detection", self.turn_detection))
        try:
            turns = _turn_detection(turns)
        except ValueError as e:
            await self.send(_error(str(e), "invalid_value", client_id, "turn_detection"))
            return True
        if self._live is not None and turns != self.turn_detection:
            await self.send(_error("turn detection cannot change within an item; commit first", "item_open", client_id))
            return True
        try:
            model = await asyncio.to_thread(self.registry.model, self.model_id)
            form = {"language": language or "", "prompt": prompt or ""}
            options_for(model, self.settings, "transcribe", form)  # the HTTP endpoint's checks
        except Exception as e:  # noqa: BLE001 - ApiError (a bad language), or a model that cannot load
            await self.send(_error(getattr(e, "message", str(e)), "invalid_value", client_id, "language"))
            return True
        self.rate, self.language, self.prompt, self.turn_detection = rate, language, prompt, turns
        await self.send(_event(reply, session=self.description()))
        return True

    async def _append(self, audio, client_id) -> bool:
        try:
            data = base64.b64decode(audio or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            await self.send(_error("audio: base64 of 16-bit little-endian PCM", "invalid_audio", client_id, "audio"))
            return True
        if len(data) % 2:
            await self.send(_error("audio: a whole number of 16-bit samples", "invalid_audio", client_id, "audio"))
            return True
        if self._live is None and not await self._start_item():
            return False
        samples = np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._live.append(samples)
        self._scheduler.wake()
        return True

    async def _start_item(self) -> bool:
        model = await asyncio.to_thread(self.registry.model, self.model_id)
        # live decodes are greedy (with temperature fallback): a decode runs every second or so
        # per item, and beams cost rows the other streams need (the dev set's WER is no worse)
        greedy = replace(self.settings, beam_size=None, best_of=None)
        options, _, _ = options_for(
            model, greedy, "transcribe", {"language": self.language or "", "prompt": self.prompt or ""}
        )
        if self.turn_detection is None:
            item = next(self._items)
            on_event = lambda event: self._on_live(item, event)  # noqa: E731
        else:  # items are the VAD's turns: ids given as each starts, the oldest open first
            t = self.turn_detection
            vad = VadOptions(t["threshold"], min_silence_duration_ms=t["silence_duration_ms"])
            options = replace(
                options, vad_filter=True, vad_parameters=replace(vad, speech_pad_ms=t["prefix_padding_ms"])
            )
            item, turns = None, []
            on_event = lambda event: self._on_turn(turns, event)  # noqa: E731
        try:
            self._live, self._scheduler = await asyncio.to_thread(
                self.registry.open_live,
                self.model_id,
                LiveOptions(min_chunk=self.settings.live_min_chunk, transcribe=options),
                on_event,
            )
        except (Busy, AllBusy) as e:
            await self.send(_error(f"the server is at capacity for live sessions ({e}); retry later", "server_busy"))
            return False
        self._item = item
        if self.rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return True

    async def _commit(self, client_id) -> bool:
        if self.turn_detection is not None:
            message = "turn detection is the server's (server_vad): it commits each turn itself"
            await self.send(_error(message, "server_vad_commit", client_id))
            return True
        if self._live is None:
            await self.send(_error("the audio buffer is empty: nothing to commit", "input_audio_buffer_commit_empty"))
            return True
        if self._resampler is not None:
            self._live.append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        self._live.finish()
        self._scheduler.wake()
        await self.send(_event("input_audio_buffer.committed", item_id=self._item, previous_item_id=self._previous))
        self._previous = self._item
        self._live = self._scheduler = self._resampler = None  # the next append opens the next item
        return True

    def _drop_item(self) -> None:
        """The audio since the last commit is dropped, its live stream closed."""
        if self._live is not None:
            self._scheduler.close_live(self._live)
        self._live = self._scheduler = self._resampler = None
        self._item = None

    def close(self) -> None:
        self._closed = True
        self._drop_item()

    # --- the live stream's events (the scheduler's thread) ---

    def _on_live(self, item: str, event) -> None:
        if isinstance(event, Confirmed):
            kind = "conversation.item.input_audio_transcription.delta"
            # `words` is ours (OpenAI's delta has none): each word's times in the item's audio
            words = [{"word": w.word, "start": w.start, "end": w.end} for w in event.words]
            out = _event(kind, item_id=item, content_index=0, delta=event.text, words=words)
        elif isinstance(event, Finished):
            out = _event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item,
                content_index=0,
                transcript=event.text,
            )
        elif isinstance(event, Behind):  # ours, not OpenAI's: the text will come, later
            out = _event("whisper_max.live.behind", item_id=item, seconds=event.seconds)
        elif isinstance(event, DecodingFailed):  # not the audio's fault
            out = _error(f"the item's decoding failed; it ends here: {event}", "decoding_failed", kind="server_error")
        elif isinstance(event, Exception):
            out = _error(f"the audio cannot be transcribed: {event}", "invalid_audio")
        else:
            return
        asyncio.run_coroutine_threadsafe(self.send(out), self.loop)

    def _on_turn(self, turns: list[str], event) -> None:
        """A server_vad stream's events (the scheduler's thread): `turns` holds the ids of the
        turns begun and not yet completed, oldest first; deltas belong to the oldest."""
        outs = []
        if isinstance(event, SpeechStarted):
            turns.append(next(self._items))
            outs.append(_event("input_audio_buffer.speech_started", audio_start_ms=_ms(event), item_id=turns[-1]))
        elif isinstance(event, SpeechStopped):
            item = turns[-1]
            outs.append(_event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(event), item_id=item))
            outs.append(_event("input_audio_buffer.committed", item_id=item, previous_item_id=self._previous))
            self._previous = item
        elif isinstance(event, Turn):
            outs.append(
                _event(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=turns.pop(0),
                    content_index=0,
                    transcript=event.text,
                )
            )
        elif isinstance(event, (Confirmed, Behind, Exception)) and turns:
            return self._on_live(turns[0], event)
        for out in outs:
            asyncio.run_coroutine_threadsafe(self.send(out), self.loop)


def _ms(event) -> int:
    return round(event.audio_time * 1000)


def _turn_detection(value) -> dict | None:
    """A session's `turn_detection`: None (the client commits) or server_vad with OpenAI's
    defaults for what it leaves out."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type", "server_vad") != "server_vad":
        raise ValueError("turn_detection: null or {'type': 'server_vad', ...}; semantic_vad is not supported")
    out = {**SERVER_VAD, **{k: v for k, v in value.items() if k in SERVER_VAD and v is not None}}
    try:
        VadOptions(float(out["threshold"]), min_silence_duration_ms=int(out["silence_duration_ms"]))
        if int(out["prefix_padding_ms"]) < 0:
            raise ValueError("prefix_padding_ms: >= 0 expected")
    except (TypeError, ValueError) as e:
        raise ValueError(f"turn_detection: {e}") from None
    return {
        **out,
        "threshold": float(out["threshold"]),
        "prefix_padding_ms": int(out["prefix_padding_ms"]),
        "silence_duration_ms": int(out["silence_duration_ms"]),
    }


async def serve_session(websocket, registry: Registry, settings: Settings) -> None:
    """The WebSocket endpoint: a Session until the client goes away (its item is dropped then)."""
    from starlette.websockets import WebSocketDisconnect

    await websocket.accept()
    lock = asyncio.Lock()
    if settings.api_key and websocket.headers.get("authorization") != f"Bearer {settings.api_key}":
        message = "missing or wrong API key: send Authorization: Bearer <key>"
        await websocket.send_json(_error(message, "invalid_api_key"))
        await websocket.close(code=1008)
        return

    async def send(event: dict) -> None:
        async with lock:
            await websocket.send_json(event)

    try:
        model_id = registry.resolve(websocket.query_params.get("model") or registry.ids[0])
    except UnknownModel:
        await send(_error(f"model {websocket.query_params.get('model')!r} is not served here", "model_not_found"))
        await websocket.close()
        return
    if registry.draining:
        await send(_error("the server is shutting down: no new sessions", "shutting_down", kind="server_error"))
        await websocket.close(code=1012)  # service restart
        return
    session = Session(registry, model_id, settings, send)
    await session.send(_event("session.created", session=session.description()))
    try:
        while True:
            text = await websocket.receive_text()
            if not await session.handle(text):
                await websocket.close()
                break
    except WebSocketDisconnect:
        pass
    finally:
        session.close()
