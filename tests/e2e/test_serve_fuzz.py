"""Fuzzing whisper-serve's upload endpoint with hypothesis: multipart bodies built from random
parts (names, filenames, part types, values, a bit of real audio), then cut, spliced and sent in
random pieces, under random Content-Type and Content-Length headers, straight to the ASGI app.
Every answer is a 4xx (or a 200 for a body that is a real request) within a bounded time: never
a 5xx, never a hang; afterwards nothing is left admitted or decoding.

Runs derandomized (the same 500 examples every run); WHISPER_MAX_FUZZ_EXAMPLES searches longer."""

from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisper_max import runtime
from whisper_max.runtime.serving.app import Settings, create_app

EXAMPLES = int(os.environ.get("WHISPER_MAX_FUZZ_EXAMPLES", "500"))
ANSWER_WITHIN = 30.0  # seconds: an example that takes longer is a hang


def _wav(seconds: float) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(16000 * seconds), np.float32), 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


SILENCE = _wav(0.3)
NAMES = st.sampled_from(
    ["file", "model", "language", "prompt", "temperature", "response_format", "timestamp_granularities[]", "stream"]
) | st.text(max_size=12)
VALUES = st.sampled_from(
    ["whisper-1", "tiny.en", "large-v3", "en", "xx", "json", "verbose_json", "srt", "text", "word", "true", "0.2", "-1"]
) | st.text(max_size=30)
DATA = st.binary(max_size=400) | VALUES.map(str.encode) | st.just(SILENCE) | st.just(SILENCE[:44])
PART = st.tuples(
    NAMES,
    st.sampled_from([None, None, None, None, None, "a.wav", "é\r\n.wav"]),  # filename: a second file is a 400
    st.none() | st.sampled_from(["audio/wav", "text/plain", "application/octet-stream", "x;;=", ""]),
    DATA,
)


def _body(parts, boundary: bytes, closed: bool) -> bytes:
    out = b""
    for name, filename, ctype, data in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode()
        out += b"" if ctype is None else f"\r\nContent-Type: {ctype}".encode()
        out += b"\r\n\r\n" + data + b"\r\n"
    return out + (b"--" + boundary + b"--\r\n" if closed else b"")


@st.composite
def requests(draw):
    boundary = draw(st.sampled_from([b"whisper-fuzz", b"x", b"--", b"a" * 70])) if draw(st.booleans()) else b"b0undary"
    parts = draw(st.lists(PART, max_size=4))
    if draw(st.integers(0, 3)):  # most bodies are requests with a few random fields
        parts = [("model", None, None, b"whisper-1"), ("file", "a.wav", "audio/wav", draw(DATA)), *parts]
    body = _body(parts, boundary, draw(st.integers(0, 3)) > 0)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):  # splice random bytes in, or cut bytes out
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(max_size=20)) if draw(st.booleans()) else body[:at] + body[at + 1 :]
    kind = draw(st.integers(0, 9))
    if kind < 6:
        ctype = f"multipart/form-data; boundary={boundary.decode()}"
    elif kind < 9:
        ctype = draw(st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=", "application/json"]))
    else:
        ctype = draw(st.text(max_size=40)).encode("latin-1", "replace").decode("latin-1")
    headers = [(b"content-type", ctype.encode("latin-1"))]
    length = draw(st.sampled_from(["right"] * 4 + ["none", "short", "long", "huge", "junk"]))
    value = {"right": len(body), "short": max(0, len(body) - 7), "long": len(body) + 100, "huge": 10**12, "junk": "12a"}
    if length != "none":
        headers.append((b"content-length", str(value[length]).encode()))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    return headers, pieces


async def _call(app, headers, pieces) -> tuple[int, bytes]:
    """One HTTP request straight through the ASGI app: its status and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/audio/transcriptions",
        "raw_path": b"/v1/audio/transcriptions",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": p, "more_body": i + 1 < len(pieces)} for i, p in enumerate(pieces)]
    messages = messages or [{"type": "http.request", "body": b"", "more_body": False}]
    connected = asyncio.Event()  # never set: the client stays until the answer

    async def receive():
        if messages:
            return messages.pop(0)
        await connected.wait()
        return {"type": "http.disconnect"}

    status, body = [0], []

    async def send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await asyncio.wait_for(app(scope, receive, send), ANSWER_WITHIN)
    return status[0], b"".join(body)


@pytest.fixture(scope="module")
def app(tiny_en):
    app = create_app(runtime.load(tiny_en.path), Settings(beam_size=None, max_upload_bytes=2**20))
    loop = asyncio.new_event_loop()
    yield app, loop
    loop.close()
    app.state.registry.stop()


@settings(
    max_examples=EXAMPLES,
    deadline=None,  # ANSWER_WITHIN bounds each example instead (a first window compiles nothing, but may queue)
    derandomize=EXAMPLES <= 500,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(request=requests())
def test_any_upload_gets_a_4xx_or_an_answer_never_a_5xx_or_a_hang(app, request):
    asgi, loop = app
    headers, pieces = request
    status, body = loop.run_until_complete(_call(asgi, headers, pieces))
    assert status == 200 or 400 <= status < 500, (status, body[:300], headers)


def test_the_fuzzed_server_holds_nothing_afterwards(app):
    """Runs after the fuzzing (file order): every request answered, no rows held."""
    stats = app[0].state.registry.stats()
    assert stats["admitted"] == 0 and stats["live_rows"] == 0, stats
