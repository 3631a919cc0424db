"""serving.registry on fake models (tests/helpers/fake_engine.py): loading on first use, one load
for concurrent first requests, unloading the least recently used idle model, refusing when every
resident model is busy, and requests answered by the model they name. No MAX, no HTTP."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers.fake_engine import FakeStreamModel

from whisper_max.converter.convert import mel_assets, tokenizer_assets
from whisper_max.runtime.options import TranscribeOptions
from whisper_max.runtime.serving.registry import AllBusy, Registry, UnknownModel
from whisper_max.runtime.tokenizer import Tokenizer

OPTIONS = TranscribeOptions.from_kwargs(language="en", temperature=0.0, condition_on_previous_text=False)
AUDIO = np.random.default_rng(5).standard_normal(16000 * 2).astype(np.float32) * 0.1


@pytest.fixture(scope="module")
def parts():
    assets = tokenizer_assets(False, 99)
    tokenizer = Tokenizer(assets["assets/gpt2.tiktoken"], json.loads(assets["assets/tokenizer.json"]))
    return tokenizer, np.load(io.BytesIO(mel_assets(80)["assets/mel_filters.npy"]))


class Gated(FakeStreamModel):
    """A fake model whose requests wait at their start until `gate` is set (a request in flight)."""

    def __init__(self, name, tokenizer, filters):
        super().__init__(tokenizer, filters)
        self.name, self.gate = name, threading.Event()
        self.gate.set()

    def features(self, audio):
        assert self.gate.wait(30), "the test never opened the gate"
        return super().features(np.asarray(audio) * (2.0 if self.name == "b" else 1.0))  # other text per model


class Loader:
    def __init__(self, parts):
        self.parts, self.loaded, self.models = parts, [], {}
        self.slow = threading.Event()
        self.slow.set()

    def __call__(self, source):
        assert self.slow.wait(30)
        self.loaded.append(source)
        self.models[source] = Gated(source, *self.parts)
        return self.models[source]


def answer(registry, model_id):
    job, _ = registry.submit(model_id, AUDIO, OPTIONS)
    return job.future.result(30).text


def test_models_load_on_first_use_and_answer_as_alone(parts):
    load = Loader(parts)
    registry = Registry({"a": "a", "b": "b"}, load)
    try:
        assert load.loaded == [] and registry.stats()["models"] == {"a": {"loaded": False}, "b": {"loaded": False}}
        assert registry.resolve("whisper-1") == "a" and registry.resolve("b") == "b"
        with pytest.raises(UnknownModel):
            registry.resolve("large-v3")
        a, b = answer(registry, "a"), answer(registry, "b")
        assert load.loaded == ["a", "b"] and a != b
        alone = Registry({"b": "b"}, Loader(parts))
        try:
            assert answer(alone, "b") == b  # the request went to the model it named
        finally:
            alone.stop()
        stats = registry.stats()
        assert stats["served"] == 2 and stats["loads"] == 2 and stats["models"]["a"]["loaded"]
    finally:
        registry.stop()


def test_concurrent_first_requests_share_one_load(parts):
    load = Loader(parts)
    load.slow.clear()
    registry = Registry({"a": "a"}, load)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(answer, registry, "a") for _ in range(4)]
            load.slow.set()
            texts = [f.result(30) for f in futures]
        assert load.loaded == ["a"] and len(set(texts)) == 1
    finally:
        registry.stop()


def test_the_least_recently_used_idle_model_is_unloaded(parts):
    load = Loader(parts)
    registry = Registry({"a": "a", "b": "b", "c": "c"}, load, max_resident=2)
    try:
        answer(registry, "a")
        answer(registry, "b")
        answer(registry, "a")  # b is now the least recently used
        answer(registry, "c")
        models = registry.stats()["models"]
        assert [m for m in models if models[m]["loaded"]] == ["a", "c"]
        assert registry.evictions == 1 and registry.scheduler("b") is None
        answer(registry, "b")  # loads again, unloading a
        assert load.loaded == ["a", "b", "c", "b"] and registry.scheduler("a") is None
    finally:
        registry.stop()


def test_a_busy_model_is_not_unloaded(parts):
    load = Loader(parts)
    registry = Registry({"a": "a", "b": "b"}, load, max_resident=1)
    try:
        registry.model("a").gate.clear()  # a's next request waits at its start: in flight
        job, _ = registry.submit("a", AUDIO, OPTIONS)
        with pytest.raises(AllBusy, match="a"):
            registry.submit("b", AUDIO, OPTIONS)
        load.models["a"].gate.set()
        job.future.result(30)
        assert answer(registry, "b") and registry.scheduler("a") is None and registry.evictions == 1
    finally:
        registry.stop()


def test_a_failed_load_is_reported_and_retried(parts):
    calls = []

    def load(source):
        calls.append(source)
        if len(calls) == 1:
            raise OSError("the package moved")
        return Gated(source, *parts)

    registry = Registry({"a": "a"}, load)
    try:
        with pytest.raises(OSError, match="moved"):
            registry.model("a")
        assert answer(registry, "a") and calls == ["a", "a"]
    finally:
        registry.stop()
