"""whisper-serve through the official `openai` client: every response format against whisper-run's
outputs for the same file and options, batching across requests, limits and bad uploads."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package brings
import numpy as np
import openai
import pytest
import uvicorn
from helpers import OPENAI_SEGMENT_KEYS, shared_audio, wer, words_of

from whisper_max import golden, runtime
from whisper_max.runtime.cli import main as whisper_run
from whisper_max.runtime.serving.app import Settings, create_app

JFK = Path(golden.JFK_WAV)


class Served:
    """An app on a free loopback port, uvicorn in a thread; `client` is the real openai client."""

    def __init__(self, app, api_key: str = "unused"):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start in 30 s"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=300)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def model(tiny_en):
    return runtime.load(tiny_en.path)


@pytest.fixture(scope="module")
def served(model):
    s = Served(create_app(model))
    yield s
    s.close()


@pytest.fixture(scope="module")
def whisper_run_jfk(tiny_en, tmp_path_factory):
    """whisper-run's outputs for jfk.wav with its defaults, and with word timestamps."""
    out = tmp_path_factory.mktemp("whisper-run")
    assert whisper_run([str(tiny_en.path), str(JFK), "-o", str(out / "plain"), "--verbose", "False"]) == 0
    assert (
        whisper_run(
            [
                str(tiny_en.path),
                str(JFK),
                "-o",
                str(out / "words"),
                "-f",
                "json",
                "--verbose",
                "False",
                "--word_timestamps",
                "True",
            ]
        )
        == 0
    )
    return out


def transcribe(client, path: Path, model: str = "whisper-1", **kwargs):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(file=(path.name, f.read()), model=model, **kwargs)


def test_every_response_format_is_whisper_runs(served, whisper_run_jfk):
    ref = json.loads((whisper_run_jfk / "plain" / "jfk.json").read_text())
    assert transcribe(served.client, JFK).text == ref["text"]
    assert transcribe(served.client, JFK, response_format="text") == ref["text"]
    for fmt in ("srt", "vtt"):
        assert (
            transcribe(served.client, JFK, response_format=fmt)
            == (whisper_run_jfk / "plain" / f"jfk.{fmt}").read_text()
        )
    verbose = transcribe(served.client, JFK, response_format="verbose_json")
    assert (verbose.task, verbose.language, verbose.duration, verbose.text) == (
        "transcribe",
        "english",
        11.0,
        ref["text"],
    )
    assert [s.model_dump(include=set(OPENAI_SEGMENT_KEYS)) for s in verbose.segments] == [
        {k: s[k] for k in OPENAI_SEGMENT_KEYS} for s in ref["segments"]
    ]
    assert verbose.words is None


def test_word_and_segment_granularities(served, whisper_run_jfk):
    ref = json.loads((whisper_run_jfk / "words" / "jfk.json").read_text())
    words = [{"word": w["word"], "start": w["start"], "end": w["end"]} for s in ref["segments"] for w in s["words"]]
    both = transcribe(served.client, JFK, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert [w.model_dump(include={"word", "start", "end"}) for w in both.words] == words and len(words) > 15
    assert [s.text for s in both.segments] == [s["text"] for s in ref["segments"]]
    only_words = transcribe(served.client, JFK, response_format="verbose_json", timestamp_granularities=["word"])
    assert only_words.segments is None and [w.word for w in only_words.words] == [w["word"] for w in words]


def test_a_prompt_is_whisper_runs_initial_prompt(served, tiny_en, tmp_path):
    clip = shared_audio("ls_1221-135766-0001.wav")
    prompt = "Sherlock Holmes. Hester Prynne."
    assert (
        whisper_run(
            [
                str(tiny_en.path),
                str(clip),
                "-o",
                str(tmp_path),
                "-f",
                "json",
                "--verbose",
                "False",
                "--initial_prompt",
                prompt,
            ]
        )
        == 0
    )
    ref = json.loads((tmp_path / f"{clip.stem}.json").read_text())
    got = transcribe(served.client, clip, prompt=prompt, response_format="verbose_json")
    assert got.text == ref["text"] and [s.tokens for s in got.segments] == [s["tokens"] for s in ref["segments"]]
    # a greedy request (temperature > 0 would sample): temperature 0 is fallback, as openai-whisper's default
    assert transcribe(served.client, clip, prompt=prompt, temperature=0.0).text == ref["text"]


def test_stream_true_sends_a_delta_per_segment_then_the_whole_text(served):
    """OpenAI's streamed transcription through the openai client: transcript.text.delta events as
    the segments are decoded, then transcript.text.done; together the text of the unstreamed
    answer. A format that is not streamed, or a bad value, is a 400 before any event."""
    clip = shared_audio("ls_1221-135766-0001.wav")
    for path in (JFK, clip):
        events = list(transcribe(served.client, path, stream=True))
        deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
        assert [e.type for e in events[-1:]] == ["transcript.text.done"] and len(deltas) == len(events) - 1
        assert len(deltas) >= 2 and "".join(deltas) == events[-1].text == transcribe(served.client, path).text
    with pytest.raises(openai.BadRequestError, match="'srt' is not streamed"):
        transcribe(served.client, JFK, stream=True, response_format="srt")
    r = httpx.post(
        f"{served.url}/v1/audio/transcriptions",
        files={"file": ("jfk.wav", JFK.read_bytes())},
        data={"model": "whisper-1", "stream": "maybe"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_a_streamed_request_whose_client_goes_away_frees_its_rows(served):
    clip = shared_audio("longform_lj001_0001-0032.wav")  # 231 s: many windows, many segments
    with httpx.stream(
        "POST",
        f"{served.url}/v1/audio/transcriptions",
        files={"file": (clip.name, clip.read_bytes())},
        data={"model": "whisper-1", "stream": "true"},
        timeout=120,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_lines())
        assert json.loads(first.removeprefix("data: "))["type"] == "transcript.text.delta"
    _idle(served, within=10.0)


def _pcm(path: Path, rate: int = 24000) -> bytes:
    """The clip as 16-bit PCM at `rate` (OpenAI's audio/pcm is 24 kHz)."""
    import soxr

    audio = runtime.audio.load_audio(path)
    if rate != 16000:
        audio = soxr.resample(audio, 16000, rate)
    return np.round(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def _realtime_item(conn, pcm: bytes, rate: int, pace: float = 0.0) -> list:
    """Append `pcm` in 0.2 s pieces (sleeping `pace` s between them), commit, and return the
    server's events up to the item's completion."""
    _append(conn, pcm, rate, pace)
    conn.send({"type": "input_audio_buffer.commit"})
    events = []
    while not events or events[-1].type != "conversation.item.input_audio_transcription.completed":
        events.append(conn.recv())
        assert events[-1].type != "error", events[-1]
    return events


def _session(conn, rate: int = 24000, language: str | None = "en") -> None:
    assert conn.recv().type == "session.created"
    audio = {"format": {"type": "audio/pcm", "rate": rate}, "transcription": {"model": "whisper-1"}}
    if language:
        audio["transcription"]["language"] = language
    conn.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio}}})
    updated = conn.recv()
    assert updated.type == "session.updated" and updated.session.audio.input.format.rate == rate


def test_a_realtime_transcription_session_through_the_openai_client(served, model):
    """OpenAI's Realtime transcription protocol over the WebSocket, with the openai client: two
    items (24 kHz at real-time pace, then 16 kHz as fast as it goes), each its deltas as words are
    confirmed, then committed and completed: the deltas make the transcript, and it has the
    clip's words (streamed text may differ from the offline decode; the dev-set WER is
    scripts/live_bench.py's); a bad event is an error event and the session goes on; a cleared
    buffer drops its audio."""
    clip = shared_audio("ls_1221-135766-0002.wav")
    with served.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        _session(conn)
        events = _realtime_item(conn, _pcm(JFK), 24000, pace=0.2)
        kinds = [e.type for e in events]
        assert (
            "input_audio_buffer.committed" in kinds
            and kinds.count("conversation.item.input_audio_transcription.delta") >= 2
        )
        done = events[-1]
        deltas = [e.delta for e in events if e.type.endswith(".delta")]
        assert {e.item_id for e in events if e.type != "input_audio_buffer.committed"} == {done.item_id}
        assert words_of("".join(deltas)) == words_of(done.transcript)
        assert wer(done.transcript, model.transcribe(str(JFK))["text"]) <= 0.15, done.transcript
        conn.send({"type": "no.such.event"})
        error = conn.recv()
        assert error.type == "error" and error.error.code == "unknown_event"
        conn.send({"type": "input_audio_buffer.append", "audio": "not base64!"})
        assert conn.recv().error.code == "invalid_audio"
        conn.send({"type": "input_audio_buffer.append", "audio": "AAAAAA=="})
        conn.send({"type": "input_audio_buffer.clear"})
        assert conn.recv().type == "input_audio_buffer.cleared"
        conn.send(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                },
            }
        )
        assert conn.recv().type == "session.updated"
        second = _realtime_item(conn, _pcm(clip, 16000), 16000)
        assert second[-1].item_id != done.item_id
        # as fast as it goes, an update may end inside a word: "Hester Prin" -> "has to print"
        second_deltas = "".join(e.delta for e in second if e.type.endswith(".delta"))
        assert words_of(second_deltas) == words_of(second[-1].transcript)
        assert wer(second[-1].transcript, model.transcribe(str(clip))["text"]) <= 0.4, second[-1].transcript
    _idle(served, within=10.0)
    assert served.health()["live_streams"] == 0


def test_server_vad_makes_each_turn_an_item_and_skips_the_silence(served, model):
    """turn_detection server_vad: the server hears the turns (Silero VAD, 1.5 s of silence ends
    one) in jfk.wav, 3 s of silence, a LibriSpeech clip and 3 s of silence sent at 4x real
    time: each turn is an item, speech_started, speech_stopped and committed in that order, its
    deltas, then completed with the turn's words; a client's commit is an error; semantic_vad is
    refused."""
    clip = shared_audio("ls_1221-135766-0002.wav")
    silence = bytes(2 * 24000 * 3)
    with served.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
        _session(conn)
        turns = {"type": "server_vad", "silence_duration_ms": 1500}
        conn.send(
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"turn_detection": turns}}},
            }
        )
        updated = conn.recv()
        assert updated.type == "session.updated", updated
        detection = updated.session.audio.input.turn_detection
        assert (detection.type, detection.silence_duration_ms, detection.prefix_padding_ms) == ("server_vad", 1500, 300)
        _append(conn, _pcm(JFK) + silence + _pcm(clip) + silence, pace=0.05)
        conn.send({"type": "input_audio_buffer.commit"})
        events = []
        while sum(e.type.endswith("transcription.completed") for e in events) < 2:
            events.append(conn.recv())
        errors = [e for e in events if e.type == "error"]
        assert [e.error.code for e in errors] == ["server_vad_commit"]
        conn.send(
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            }
        )
        refused = conn.recv()
        assert refused.type == "error" and refused.error.code == "invalid_value"
    events = [e for e in events if e.type != "error" and not e.type.startswith("whisper_max.")]
    items = list(dict.fromkeys(e.item_id for e in events))
    assert len(items) == 2
    # an update that ends inside a word may hear "Hester Prin" as "has to print" (as above)
    for item, audio, bound in zip(items, (JFK, clip), (0.2, 0.4)):
        mine = [e for e in events if e.item_id == item]
        kinds = [e.type for e in mine]
        head = [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
        ]
        assert [k for k in kinds if k.startswith("input_audio_buffer.")] == head, kinds
        assert kinds[-1] == "conversation.item.input_audio_transcription.completed"
        deltas = "".join(e.delta for e in mine if e.type.endswith(".delta"))
        assert words_of(deltas) == words_of(mine[-1].transcript)
        assert wer(mine[-1].transcript, model.transcribe(str(audio))["text"]) <= bound, mine[-1].transcript
    starts = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stops = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert (
        0 < starts[0].audio_start_ms < stops[0].audio_end_ms < 14000 < starts[1].audio_start_ms < stops[1].audio_end_ms
    )
    _idle(served, within=10.0)
    assert served.health()["live_streams"] == 0


def _append(conn, pcm: bytes, rate: int = 24000, pace: float = 0.0) -> None:
    """Send `pcm` in input_audio_buffer.append events of 0.2 s, sleeping `pace` s after each."""
    import base64

    step = int(0.2 * rate) * 2
    for i in range(0, len(pcm), step):
        conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()})
        time.sleep(pace)


def test_a_realtime_session_that_floods_or_vanishes_costs_another_nothing(served, model):
    """While one session speaks at real-time pace, another sends 27 s of audio at once (it is told
    it fell behind, then gets its transcript) and a third goes away in the middle of an item: the
    first gets its words, and nothing is left live afterwards."""
    clip = shared_audio("mfa_acoustic_corpus_spontaneous.wav")  # 26.7 s
    steady: dict = {}

    def speak() -> None:
        with served.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
            _session(conn)
            steady["transcript"] = _realtime_item(conn, _pcm(JFK), 24000, pace=0.2)[-1].transcript

    speaker = threading.Thread(target=speak)
    speaker.start()
    gone = served.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}).enter()
    _session(gone)
    _append(gone, _pcm(clip)[: 24000 * 2 * 3])
    gone.close()
    with served.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as flood:
        _session(flood)
        pcm = _pcm(clip)
        _append(flood, pcm[: 24000 * 2 * 2])
        time.sleep(0.5)  # its first decode may start on 2 s; then the rest arrives at once
        _append(flood, pcm[24000 * 2 * 2 :])
        flood.send({"type": "input_audio_buffer.commit"})
        events = []
        while not events or events[-1].type != "conversation.item.input_audio_transcription.completed":
            events.append(flood.recv())
            assert events[-1].type != "error", events[-1]
        behind = [e for e in events if e.type == "whisper_max.live.behind"]
        assert len(behind) == 1 and behind[0].seconds > 5, [e.type for e in events]
        assert wer(events[-1].transcript, model.transcribe(str(clip))["text"]) <= 0.4, events[-1].transcript
    speaker.join(300)
    assert wer(steady["transcript"], model.transcribe(str(JFK))["text"]) <= 0.15, steady
    _idle(served, within=10.0)
    assert served.health()["live_streams"] == 0


def test_realtime_sessions_beyond_max_live_are_refused_and_others_go_on(model):
    s = Served(create_app(model, Settings(max_live=1)))
    try:
        import base64

        first = s.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}).enter()
        _session(first)
        first.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(_pcm(JFK)[:48000]).decode()})
        with s.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as second:
            _session(second)
            second.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\0\0" * 4800).decode()})
            refused = second.recv()
            assert refused.type == "error" and refused.error.code == "server_busy"
        events = _realtime_item(first, _pcm(JFK)[48000:], 24000)
        assert wer(events[-1].transcript, model.transcribe(str(JFK))["text"]) <= 0.4, events[-1].transcript
        first.close()
    finally:
        s.close()


def test_concurrent_requests_decode_in_the_same_calls(served):
    clips = [
        JFK,
        *(shared_audio(n) for n in ("ls_1089-134686-0001.wav", "ls_1221-135766-0002.wav", "lj_LJ050-0131.wav")),
    ]
    alone = [transcribe(served.client, c).text for c in clips]
    before = served.health()
    with ThreadPoolExecutor(len(clips)) as pool:
        together = list(pool.map(lambda c: transcribe(served.client, c).text, clips))
    after = served.health()
    assert together == alone
    calls, rows = after["decoder_calls"] - before["decoder_calls"], after["rows_decoded"] - before["rows_decoded"]
    # alone, every call of a beam-5 request decodes 5 rows; together, several requests' rows share calls
    assert rows / calls > 5.5, f"{rows} rows in {calls} decoder calls: the requests were not batched"


def test_models_health_and_errors_in_openais_shape(served):
    assert [m.id for m in served.client.models.list()] == ["tiny.en"]
    assert served.health()["status"] == "ok"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        served.client.audio.transcriptions.create(file=("jfk.wav", JFK.read_bytes()), model="large-v3")
    with pytest.raises(openai.BadRequestError, match="English-only: it cannot translate"):
        served.client.audio.translations.create(file=("jfk.wav", JFK.read_bytes()), model="whisper-1")
    with pytest.raises(openai.BadRequestError, match="response_format 'xml'"):
        transcribe(served.client, JFK, response_format="xml")
    with pytest.raises(openai.BadRequestError, match="temperature 1.5"):
        transcribe(served.client, JFK, temperature=1.5)
    r = httpx.post(f"{served.url}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def bad(served, files, data=None):
    r = httpx.post(
        f"{served.url}/v1/audio/transcriptions", files=files, data={"model": "whisper-1"} if data is None else data
    )
    return r.status_code, r.json()["error"]["message"]


def test_bad_uploads_get_400_and_the_server_keeps_serving(served, tmp_path):
    wav = JFK.read_bytes()
    status, message = bad(served, {"file": ("notes.wav", b"hello, this is text")})
    assert status == 400 and message.startswith("notes.wav: "), message
    assert bad(served, {"file": ("empty.wav", b"")}) == (400, "empty.wav: the upload is empty")
    status, message = bad(served, {"file": ("header.wav", wav[:44])})
    assert status == 400 and message.startswith("header.wav: no audio samples"), message
    status, message = bad(served, {"audio": ("jfk.wav", wav)})
    assert status == 400 and "unknown form field(s) ['audio']" in message
    status, message = bad(served, {"file": ("jfk.wav", wav)}, data={})
    assert status == 400 and "no 'model' field" in message
    r = httpx.post(f"{served.url}/v1/audio/transcriptions", files={"file": (None, "text")}, data={"model": "whisper-1"})
    assert r.status_code == 400 and "text field" in r.json()["error"]["message"]
    r = httpx.post(f"{served.url}/v1/audio/transcriptions", json={"model": "whisper-1"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    # a truncated WAV decodes what is there, as whisper-run does
    (tmp_path / "half.wav").write_bytes(wav[: len(wav) // 2])
    assert transcribe(served.client, tmp_path / "half.wav").text.startswith(" And so")
    assert transcribe(served.client, JFK).text.endswith("for your country.")


def test_limits_api_key_and_queue(model):
    s = Served(
        create_app(
            model, Settings(max_upload_bytes=600_000, max_audio_seconds=11.5, max_active=1, queue_size=1, api_key="k3y")
        ),
        api_key="k3y",
    )
    try:
        nokey = openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            nokey.models.list()
        assert httpx.get(f"{s.url}/health").status_code == 200  # health needs no key
        long_clip = shared_audio("mfa_acoustic_corpus_spontaneous.wav")
        with pytest.raises(openai.APIStatusError, match="at most 600000") as e:
            s.client.audio.transcriptions.create(file=("long.wav", _cut(long_clip, 25.0)), model="whisper-1")  # 800 kB
        assert e.value.status_code == 413
        # the same without a declared length (chunked): measured once parsed, before it is read in
        boundary = "whisper-max-test"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n\r\n'
        )
        body = head.encode() + _cut(long_clip, 25.0) + f"\r\n--{boundary}--\r\n".encode()
        chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
        r = httpx.post(
            f"{s.url}/v1/audio/transcriptions",
            content=chunks,
            headers={"content-type": f"multipart/form-data; boundary={boundary}", "authorization": "Bearer k3y"},
        )
        assert r.status_code == 413 and "at most 600000" in r.json()["error"]["message"], r.text
        with pytest.raises(openai.BadRequestError, match="longer than this server takes"):
            s.client.audio.transcriptions.create(file=("long.wav", _cut(long_clip, 12.5)), model="whisper-1")
        # one decoding, one waiting, the rest 429 with Retry-After; none lost or answered wrongly
        alone = transcribe(s.client, JFK).text
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda _: _outcome(s.client, JFK), range(6)))
        answered = [o for o in outcomes if isinstance(o, str)]
        refused = [o for o in outcomes if not isinstance(o, str)]
        assert answered and all(a == alone for a in answered), outcomes
        assert refused and all(e.status_code == 429 and int(e.response.headers["retry-after"]) >= 1 for e in refused), (
            outcomes
        )
        _idle(s)
    finally:
        s.close()


def test_timeouts_and_clients_that_go_away_free_their_rows(model):
    clip = shared_audio("longform_lj001_0001-0032.wav")  # 231 s: many windows
    s = Served(create_app(model, Settings(timeout=1)))
    try:
        with pytest.raises(openai.APIStatusError, match="longer than 1 s") as e:
            s.client.audio.transcriptions.create(file=(clip.name, clip.read_bytes()), model="whisper-1")
        assert e.value.status_code == 504
        _idle(s)
    finally:
        s.close()
    s = Served(create_app(model))
    try:
        impatient = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=3)
        with pytest.raises(openai.APITimeoutError):
            impatient.audio.transcriptions.create(file=(clip.name, clip.read_bytes()), model="whisper-1")
        _idle(s)
        assert s.health()["served"] == 0
    finally:
        s.close()


def test_a_slow_upload_holds_no_engine_and_one_cut_mid_upload_leaves_nothing(served):
    """A client that sends half its upload and stalls is not admitted (the engine never sees it)
    while another request is answered; when it goes away mid-upload nothing is
    left admitted."""
    boundary = "slow-upload"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="jfk.wav"\r\n\r\n'
    ).encode()
    body = head + JFK.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    host, port = served.url.removeprefix("http://").split(":")
    alone = transcribe(served.client, JFK).text
    with socket.create_connection((host, int(port))) as slow:
        slow.sendall(
            (
                f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        time.sleep(0.5)
        assert transcribe(served.client, JFK).text == alone  # answered while the other upload stalls
        assert served.health()["admitted"] == 0  # the stalled upload is not a request yet
    _idle(served)  # it went away mid-upload: nothing admitted, no rows


def _cut(path: Path, seconds: float) -> bytes:
    import io

    import soundfile as sf

    samples, rate = sf.read(path, frames=int(seconds * 16000), dtype="int16")
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _outcome(client, path):
    try:
        return transcribe(client, path).text
    except openai.APIStatusError as e:
        return e


def _idle(s: Served, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (h := s.health())["admitted"] or h["live_rows"]:
        assert time.monotonic() < deadline, f"rows still held {within} s after the request ended: {h}"
        time.sleep(0.1)


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_en, model):
    """SIGTERM while a request decodes: /health answers 503 draining, a new request gets a 503,
    the one in flight is answered in full, then the server exits 0."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "whisper_max.runtime.serve",
            str(tiny_en.path),
            "--port",
            str(port),
            "--log_level",
            "warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"whisper-serve exited {proc.returncode}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "whisper-serve did not answer /health in 120 s"
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        clip = shared_audio("mfa_acoustic_corpus_spontaneous.wav")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(transcribe, client, clip)
            while httpx.get(f"{url}/health").json()["active"] == 0:
                assert not pending.done(), pending.result()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while (health := httpx.get(f"{url}/health")).status_code != 503:  # draining: out of rotation
                assert time.monotonic() < deadline and not pending.done(), "no draining /health after SIGTERM"
                time.sleep(0.02)
            assert health.json()["status"] == "draining" and health.json()["active"] == 1
            with pytest.raises(openai.InternalServerError, match="shutting down") as refused:
                transcribe(client, JFK)  # a new request while the one in flight finishes
            assert refused.value.status_code == 503
            assert not pending.done() or pending.result().text  # the refusal came while it decoded
            text = pending.result(timeout=300).text
        assert proc.wait(60) == 0, proc.stderr.read()
        assert text == model.transcribe(str(clip), beam_size=5, best_of=5)["text"]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_translations_and_languages_on_base(base_pkg, tmp_path):
    clip = shared_audio("pv_test_de.wav")
    assert (
        whisper_run(
            [str(base_pkg), str(clip), "-o", str(tmp_path), "-f", "json", "--verbose", "False", "--task", "translate"]
        )
        == 0
    )
    ref = json.loads((tmp_path / f"{clip.stem}.json").read_text())
    s = Served(create_app(runtime.load(base_pkg)))
    try:
        got = s.client.audio.translations.create(
            file=(clip.name, clip.read_bytes()), model="whisper-1", response_format="verbose_json"
        )
        assert (got.task, got.language, got.text) == ("translate", "german", ref["text"])
        assert [seg.tokens for seg in got.segments] == [seg["tokens"] for seg in ref["segments"]]
        german = transcribe(s.client, clip, language="de", response_format="verbose_json")
        assert german.language == "german" and german.text != got.text
        with pytest.raises(openai.BadRequestError, match="unsupported language 'klingon'"):
            transcribe(s.client, clip, language="klingon")
    finally:
        s.close()


@pytest.mark.slow
def test_two_models_in_one_server_chosen_by_the_request(model, base_pkg):
    """tiny.en and base behind one app, at most one resident: each request is answered by the
    model it names (the text each gives alone), the other being unloaded and loaded back."""
    from whisper_max.runtime.serving.registry import Registry

    base = runtime.load(base_pkg)
    german = shared_audio("pv_test_de.wav")
    expected = {
        ("tiny.en", JFK): model.transcribe(str(JFK), beam_size=5, best_of=5)["text"],
        ("base", JFK): base.transcribe(str(JFK), beam_size=5, best_of=5)["text"],
        ("base", german): base.transcribe(str(german), beam_size=5, best_of=5)["text"],
    }
    del base
    registry = Registry({"tiny.en": model.package.path, "base": base_pkg}, runtime.load, max_resident=1)
    s = Served(create_app(registry))
    try:
        assert [m.id for m in s.client.models.list()] == ["tiny.en", "base"]
        for name, clip in [("tiny.en", JFK), ("base", german), ("base", JFK), ("whisper-1", JFK)]:
            model_id = "tiny.en" if name == "whisper-1" else name
            assert transcribe(s.client, clip, model=name).text == expected[model_id, clip], (name, clip.name)
        health = s.health()
        assert (health["loads"], health["evictions"]) == (3, 2), health
        assert [m for m, h in health["models"].items() if h["loaded"]] == ["tiny.en"]
        with pytest.raises(openai.NotFoundError, match="serves 'tiny.en', 'base'"):
            transcribe(s.client, JFK, model="small")
    finally:
        s.close()


def test_a_decoding_failure_answers_500_and_the_server_goes_on(model):
    s = Served(create_app(model))
    try:
        scheduler = s.app.state.registry.scheduler("tiny.en")
        engine = scheduler.engine

        def broken():
            raise MemoryError("simulated failure inside a decoder call")

        engine.step = broken  # this engine only: the scheduler replaces it after the failure
        with pytest.raises(openai.InternalServerError, match="decoding failed: MemoryError"):
            transcribe(s.client, JFK)
        assert transcribe(s.client, JFK).text.endswith("for your country.")
        _idle(s)
    finally:
        s.close()


def test_metrics_count_the_requests_sent_and_each_request_has_an_id_and_a_log_line(model, caplog):
    """/metrics (Prometheus' text format, read with prometheus-client's parser) after 3
    transcriptions of jfk.wav, an unreadable upload and an unknown model: the request counters,
    audio seconds and real-time factors of exactly those, the engine's counts; each answer
    carries an X-Request-Id (the client's when it sent one) and the log has its line."""
    from prometheus_client.parser import text_string_to_metric_families

    s = Served(create_app(model))
    try:
        with caplog.at_level(logging.INFO, logger="whisper_max.serve.access"):
            for _ in range(2):
                transcribe(s.client, JFK)
            files = {"file": ("jfk.wav", JFK.read_bytes())}
            r = httpx.post(
                f"{s.url}/v1/audio/transcriptions",
                files=files,
                data={"model": "whisper-1"},
                headers={"x-request-id": "client-id-7"},
                timeout=120,
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-7"
            with pytest.raises(openai.BadRequestError):
                s.client.audio.transcriptions.create(file=("x.wav", b"not audio"), model="whisper-1")
            with pytest.raises(openai.NotFoundError):
                transcribe(s.client, JFK, model="large-v3")
            generated = httpx.get(f"{s.url}/health").headers["x-request-id"]
            scraped = httpx.get(f"{s.url}/metrics")
        assert scraped.headers["content-type"].startswith("text/plain") and len(generated) == 32
        samples = {}
        for family in text_string_to_metric_families(scraped.text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        path = "/v1/audio/transcriptions"
        assert value("whisper_requests_total", endpoint=path, model="tiny.en", status="200") == 3
        assert value("whisper_requests_total", endpoint=path, model="tiny.en", status="400") == 1
        assert value("whisper_requests_total", endpoint=path, model="", status="404") == 1
        assert value("whisper_request_errors_total", endpoint=path, model="", code="model_not_found") == 1
        assert value("whisper_request_audio_seconds_count", model="tiny.en") == 3
        assert value("whisper_request_audio_seconds_sum", model="tiny.en") == pytest.approx(3 * 11.0, abs=0.01)
        assert value("whisper_request_real_time_factor_count", model="tiny.en") == 3
        assert value("whisper_request_duration_seconds_count", endpoint=path, model="tiny.en") == 4
        assert (
            value("whisper_served_total", model="tiny.en") == 3 and value("whisper_model_loaded", model="tiny.en") == 1
        )
        assert value("whisper_encoder_windows_total", model="tiny.en") == 3
        assert (
            value("whisper_decoder_rows_total", model="tiny.en")
            > value("whisper_decoder_calls_total", model="tiny.en")
            > 0
        )
        assert (
            value("whisper_rows_in_flight", model="tiny.en") == 0 and value("whisper_queue_depth", model="tiny.en") == 0
        )
        lines = [r.getMessage() for r in caplog.records if r.name == "whisper_max.serve.access"]
        assert any(
            line.startswith("client-id-7 POST /v1/audio/transcriptions 200 ") and "audio=11.00" in line
            for line in lines
        )
        assert any(line.startswith(f"{generated} GET /health 200 ") for line in lines)
    finally:
        s.close()


def test_a_live_stream_whose_decoding_fails_ends_alone(served, model, monkeypatch):
    """Two Realtime sessions on one engine; every update of the one whose prompt is "poison"
    raises as its result comes back. That session gets an error event and its item ends; the
    other's item is transcribed as it is alone, and nothing is left live."""
    from whisper_max.runtime import live as live_mod

    update = live_mod.LiveTranscription.update

    def poisoned(self, stream):
        if self.options.transcribe.initial_prompt == "poison":
            raise RuntimeError("simulated fault in a live update")
        return update(self, stream)

    monkeypatch.setattr(live_mod.LiveTranscription, "update", poisoned)
    results = {}

    def session(prompt: str | None) -> None:
        with served.client.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
            _session(conn)
            if prompt:
                input_ = {"transcription": {"model": "whisper-1", "language": "en", "prompt": prompt}}
                conn.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": input_}}})
                assert conn.recv().type == "session.updated"
            _append(conn, _pcm(JFK), pace=0.05)
            conn.send({"type": "input_audio_buffer.commit"})
            events = []
            while not events or events[-1].type not in (
                "error",
                "conversation.item.input_audio_transcription.completed",
            ):
                events.append(conn.recv())
            results[prompt] = events[-1]

    with ThreadPoolExecutor(2) as threads:
        list(threads.map(session, ["poison", None]))
    failed = results["poison"]
    assert failed.type == "error" and failed.error.code == "decoding_failed" and failed.error.type == "server_error"
    assert "simulated fault in a live update" in failed.error.message
    assert wer(results[None].transcript, model.transcribe(str(JFK))["text"]) <= 0.15, results[None].transcript
    _idle(served, within=10.0)
    assert served.health()["live_streams"] == 0


def test_a_window_that_fails_inside_decoding_fails_its_request_alone(model):
    """16 concurrent requests on one engine; the decoder calls that hold the rows of one of them
    (the only one sampling at temperature 0.3) raise. That request gets a 500 with the error;
    the engine runs the others' steps alone after each failed call, and the 15 get exactly the
    text each gets alone."""
    s = Served(create_app(model))
    try:
        pool = s.app.state.registry.scheduler("tiny.en").engine.pool
        real = pool._call

        def call(items):
            if any((st.sampling[:, 0] == np.float32(0.3)).any() for _, st in items):
                raise RuntimeError("simulated fault in a decoder call")
            return real(items)

        pool._call = call
        names = ("ls_1089-134686-0001.wav", "ls_1221-135766-0002.wav", "lj_LJ050-0131.wav", "ls_2412-153948-0000.wav")
        clips = [JFK, *(shared_audio(n) for n in names)]
        alone = {c: transcribe(s.client, c).text for c in clips}
        order = [clips[i % len(clips)] for i in range(15)]
        order.insert(7, None)  # the failing request, among the others

        def send(clip):
            if clip is not None:
                return transcribe(s.client, clip).text
            with pytest.raises(openai.InternalServerError, match="simulated fault in a decoder call"):
                transcribe(s.client, JFK, temperature=0.3)
            return None

        with ThreadPoolExecutor(16) as threads:
            got = list(threads.map(send, order))
        assert [t for t, c in zip(got, order) if c is not None] == [alone[c] for c in order if c is not None]
        assert s.app.state.registry.scheduler("tiny.en").engine.failed >= 1
        _idle(s, within=10.0)
    finally:
        s.close()


@pytest.mark.parametrize("name", ["jfk.wav", "jfk_8k.wav", "jfk_22k_s24.wav", "jfk_48k.flac"])
def test_uploads_wait_as_16_bit_values_without_loss(name):
    from whisper_max.runtime.audio import load_audio
    from whisper_max.runtime.serving.protocol import read_upload

    path = JFK.with_name(name)
    held = read_upload(path.read_bytes(), name, 60.0)
    assert held.dtype == np.int16
    np.testing.assert_array_equal(held.astype(np.float32) / np.float32(32768), load_audio(path))


def test_log_json_makes_each_line_a_json_object():
    """--log_json: a request's line, with its fields, as one JSON object (python-json-logger)."""
    code = (
        "import logging; from whisper_max.runtime.serving.observe import json_logs; json_logs(); "
        "logging.getLogger('whisper_max.serve.access').info('r1 GET /health 200', "
        "extra={'request_id': 'r1', 'status': 200, 'duration_s': 0.01})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    line = json.loads(out.stderr.strip())
    assert line["message"] == "r1 GET /health 200" and line["request_id"] == "r1" and line["status"] == 200
    assert line["name"] == "whisper_max.serve.access" and line["levelname"] == "INFO"
