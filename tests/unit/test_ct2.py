"""CTranslate2 reader and name mapping: exact on a synthetic model.bin, and on the real tiny.en."""

import json

import numpy as np
import pytest
from helpers.tiny_model import TINY_DIMS, state_dict_np, tiny_whisper, to_ct2_variables, write_model_bin

from whisper_max.converter import ct2


def _fp16_sd(sd):
    return {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}


@pytest.fixture
def ct2_dir(tmp_path):
    sd = _fp16_sd(state_dict_np(tiny_whisper()))
    variables = to_ct2_variables(sd, TINY_DIMS)
    (tmp_path / "model.bin").write_bytes(
        write_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    )
    (tmp_path / "config.json").write_text(json.dumps({"alignment_heads": [[1, 0], [1, 1]]}))
    return tmp_path, sd, variables


def test_mapping_reproduces_the_state_dict_exactly(ct2_dir):
    path, sd, _ = ct2_dir
    model = ct2.load_ct2_dir(path)
    dims, got = ct2.to_whisper(model)
    assert dims == TINY_DIMS
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == np.float32 and got[k].flags.c_contiguous, k
        np.testing.assert_array_equal(got[k], sd[k], err_msg=k)
    assert ct2.alignment_heads(model) == [[1, 0], [1, 1]]


def test_nonzero_fused_key_bias_is_rejected(ct2_dir):
    path, _, variables = ct2_dir
    b = variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
    b[TINY_DIMS["n_audio_state"]] = 1  # first element of the key part
    variables["encoder/layer_0/self_attention/linear_0/bias"] = b
    (path / "model.bin").write_bytes(
        write_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    )
    with pytest.raises(ct2.CT2FormatError, match="key bias is not zero"):
        ct2.to_whisper(ct2.load_ct2_dir(path))


def test_unmapped_tensor_is_rejected(ct2_dir):
    path, _, variables = ct2_dir
    variables["decoder/extra/weight"] = np.zeros((2, 2), np.float16)
    (path / "model.bin").write_bytes(
        write_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    )
    with pytest.raises(ct2.CT2FormatError, match="no openai-whisper name"):
        ct2.to_whisper(ct2.load_ct2_dir(path))


def test_untied_head_is_rejected(ct2_dir):
    path, _, variables = ct2_dir
    variables["decoder/projection/weight"] = variables["decoder/embeddings/weight"] + np.float16(1)
    (path / "model.bin").write_bytes(write_model_bin(variables, {}))
    with pytest.raises(ct2.CT2FormatError, match="ties them"):
        ct2.to_whisper(ct2.load_ct2_dir(path))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-7], "truncated|trailing"),
        (lambda b: (5).to_bytes(4, "little") + b[4:], "binary version 5"),
        (lambda b: b + b"\0\0", "trailing bytes"),
    ],
)
def test_malformed_model_bin(ct2_dir, mutate, message):
    path, _, _ = ct2_dir
    data = mutate((path / "model.bin").read_bytes())
    with pytest.raises(ct2.CT2FormatError, match=message):
        ct2.read_model_bin(data)


def test_real_tiny_en_maps_to_openai_whisper_names():
    from whisper.model import ModelDimensions, Whisper

    from whisper_max.converter.sources import resolve

    src = resolve("tiny.en")
    expected = Whisper(ModelDimensions(**src.dims)).state_dict()
    assert set(src.state_dict) == set(expected)
    assert all(tuple(expected[k].shape) == src.state_dict[k].shape for k in expected)
    assert src.dims["n_vocab"] == 51864 and not src.multilingual
    assert len(src.alignment_heads) > 0
