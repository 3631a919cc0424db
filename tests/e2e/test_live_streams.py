"""Live transcription on the real tiny.en: audio fed as it arrives, text confirmed as decodes agree."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import words_of

from whisper_max import golden
from whisper_max.runtime import load
from whisper_max.runtime.audio import SAMPLE_RATE, load_audio
from whisper_max.runtime.engine import Engine
from whisper_max.runtime.live import Confirmed, Finished, LiveTranscription, Partial, run_live


@pytest.fixture(scope="module")
def model(tiny_en):
    return load(tiny_en.path)


def feed_in_chunks(model, lives_audio, chunk: float, engine: Engine):
    """Each live stream gets its audio `chunk` seconds at a time; after each chunk every stream's
    update (if it has one) is decoded, all on `engine` together, before the next chunk arrives:
    a live run faster than real time with a fixed schedule."""
    n = round(chunk * SAMPLE_RATE)
    longest = max(len(a) for _, a in lives_audio)
    for at in range(0, longest, n):
        for live, audio in lives_audio:
            if at < len(audio):
                live.append(audio[at : at + n])
                if at + n >= len(audio):
                    live.finish()
            update = live.next_update()
            if update is not None:
                engine.submit(update, on_done=live.update)
        engine.run()
    run_live(engine, [live for live, _ in lives_audio])


def test_live_jfk_confirms_the_offline_words_in_order(model):
    audio = load_audio(golden.JFK_WAV)
    offline = model.transcribe(audio)["text"]
    events: list = []
    live = LiveTranscription(model, on_event=events.append)
    feed_in_chunks(model, [(live, audio)], 0.5, Engine(model))
    assert words_of(events[-1].text) == words_of(offline), (events[-1], offline)
    assert isinstance(events[-1], Finished) and live.finished
    confirmed = [w for e in events if isinstance(e, Confirmed) for w in e.words]
    assert len([e for e in events if isinstance(e, Confirmed)]) >= 5  # confirmed as it went, not at the end
    assert any(isinstance(e, Partial) and e.words for e in events)
    starts = [w.start for w in confirmed]
    assert starts == sorted(starts) and 0 <= starts[0] and confirmed[-1].end <= len(audio) / SAMPLE_RATE + 0.5
    # each word is confirmed once it is in the audio, and a few seconds later at most
    late = [e.audio_time - w.end for e in events if isinstance(e, Confirmed) for w in e.words]
    assert min(late) >= 0 and np.median(late) <= 3.0, late


def test_live_streams_share_the_engine_with_a_file_and_get_their_solo_words(model):
    """Two live streams (jfk, and a dev clip) and a file on one engine: the decoder calls carry
    rows of several of them, and each live stream confirms what it confirms alone."""
    from helpers import shared_audio

    clips = [load_audio(golden.JFK_WAV), load_audio(shared_audio("ls_1221-135766-0002.wav"))]
    solo = []
    for audio in clips:
        live = LiveTranscription(model)
        feed_in_chunks(model, [(live, audio)], 1.0, Engine(model))
        solo.append([w.word for w in live.confirmed])
    engine = Engine(model)
    done: list = []
    engine.submit_window(model.log_mel(clips[0], padding=480000)[:, :3000], model_options(), done.append)
    lives = [LiveTranscription(model) for _ in clips]
    feed_in_chunks(model, list(zip(lives, clips)), 1.0, engine)
    assert [[w.word for w in live.confirmed] for live in lives] == solo
    assert done and engine.rows_decoded > engine.calls  # calls held rows of more than one window


def model_options():
    from whisper_max.runtime.decoding import DecodingOptions

    return DecodingOptions(language="en", without_timestamps=False)


RUN = "import sys; sys.argv[0] = 'whisper-run'; from whisper_max.runtime.cli import run; run()"


def test_whisper_run_live_reads_pcm16_from_standard_input(tiny_en, model):
    audio = load_audio(golden.JFK_WAV)
    pcm = np.round(audio * 32768).astype("<i2").tobytes()
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(tiny_en.path), "-", "--live", "True"],
        input=pcm,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert words_of(proc.stdout.decode()) == words_of(model.transcribe(audio)["text"]), proc.stdout
