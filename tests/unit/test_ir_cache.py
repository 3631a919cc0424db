"""The IR cache: what its key holds, a round trip, and a damaged entry."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
from helpers.tiny_model import TINY_DIMS, optimised_tiny

from whisper_max.converter import ir, ir_cache
from whisper_max.converter.recipes import RECIPES
from whisper_max.runtime.manifest import Target


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WHISPER_MAX_CACHE", str(tmp_path))
    return tmp_path / "ir"


def _state(scale=1.0):
    return {
        "a.weight": np.full((4, 3), scale, np.float32),
        "a.bias": np.zeros(4, np.float32),
        "b.weight": np.ones((2, 4), np.float16),
    }


def test_the_key_holds_what_tracing_reads_and_not_the_weights_values():
    """One architecture, recipe and target: one key, whatever the weights' values (another
    checkpoint of the same shape reuses the entry). Each of dims, a tensor's name, dtype or
    shape, the recipe, the target's features and the exact-float16 set changes it."""
    f32, bf16 = RECIPES[("whisper", "float32")], RECIPES[("whisper", "bfloat16")]
    host = Target("cpu", "x86_64", ("avx2", "fma"))
    base = ir_cache.key(TINY_DIMS, _state(), f32, host, frozenset({"a.weight"}))
    assert ir_cache.key(TINY_DIMS, _state(scale=2.0), f32, host, frozenset({"a.weight"})) == base
    other_shape = {**_state(), "a.weight": np.ones((4, 5), np.float32)}
    other_dtype = {**_state(), "b.weight": np.ones((2, 4), np.float32)}
    renamed = {("c.weight" if k == "a.weight" else k): v for k, v in _state().items()}
    changed = [
        ir_cache.key({**TINY_DIMS, "n_text_layer": 3}, _state(), f32, host, frozenset({"a.weight"})),
        ir_cache.key(TINY_DIMS, other_shape, f32, host, frozenset({"a.weight"})),
        ir_cache.key(TINY_DIMS, other_dtype, f32, host, frozenset({"a.weight"})),
        ir_cache.key(TINY_DIMS, renamed, f32, host, frozenset({"a.weight"})),
        ir_cache.key(TINY_DIMS, _state(), bf16, host, frozenset({"a.weight"})),
        ir_cache.key(TINY_DIMS, _state(), f32, host.without("fma"), frozenset({"a.weight"})),
        ir_cache.key(TINY_DIMS, _state(), f32, host, frozenset()),
        ir_cache.key(TINY_DIMS, _state(), f32, host, None),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_a_stored_program_reads_back_the_same(cache):
    program = optimised_tiny()
    assert ir_cache.load("k1") is None
    ir_cache.store("k1", program)
    assert [p.name for p in cache.iterdir()] == ["k1.zip"]  # no temporary left
    assert ir.format_program(ir_cache.load("k1")) == ir.format_program(program)


def test_a_damaged_entry_is_a_miss_with_a_warning_and_is_replaced(cache, caplog):
    program = optimised_tiny()
    cache.mkdir(parents=True)
    (cache / "k2.zip").write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="whisper_max.converter.ir_cache"):
        assert ir_cache.load("k2") is None
    assert "unreadable" in caplog.text and "k2.zip" in caplog.text
    ir_cache.store("k2", replace(program))
    assert ir.format_program(ir_cache.load("k2")) == ir.format_program(program)


def test_a_cache_that_cannot_be_written_is_a_warning(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("WHISPER_MAX_CACHE", str(blocker))  # a file where the directory would go
    with caplog.at_level(logging.WARNING, logger="whisper_max.converter.ir_cache"):
        ir_cache.store("k3", optimised_tiny())
    assert "cannot cache the IR" in caplog.text
