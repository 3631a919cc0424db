"""whisper-convert on the real multilingual base weights (51865 tokens)."""

import pytest

from whisper_max.runtime.package import Package


@pytest.mark.slow
def test_base_converts_with_every_layer_in_parity(tmp_path):
    from whisper_max.converter.convert import convert

    result = convert("base", tmp_path / "base.maxpkg", parity="layers")  # the probe too: every layer
    pkg = Package.open(result.path)
    m = pkg.manifest
    assert m.model.multilingual and m.model.dims["n_vocab"] == 51865 and m.parity["check"] == "layers"
    entries = pkg.json("parity.json")
    names = {e["name"] for e in entries}
    dims = m.model.dims
    assert {f"encoder.blocks.{i}" for i in range(dims["n_audio_layer"])} <= names
    assert {f"decoder.blocks.{i}" for i in range(dims["n_text_layer"])} <= names
    assert {"logits", "logits.incremental.rows", "logits.all", "encoder.ln_post"} <= names
    assert {f"decoder.blocks.{i}.cross_attn.qk" for i in range(dims["n_text_layer"])} <= names
    assert all(e["ok"] for e in entries), [e for e in entries if not e["ok"]]
    assert "assets/multilingual.tiktoken" in m.files
