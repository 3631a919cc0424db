"""Op lowerings on small modules (convolutions, GELU, layer norm, softmax), the encoder, and the registry's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.op_module import (
    close,
)
from helpers.tiny_model import TINY_DIMS

from whisper_max.converter import ir
from whisper_max.converter.lower import LoweringError, lower_graph, register


def test_micro_ops(compiled):
    _, micro, _, models, _ = compiled
    for batch in (1, 3):  # traced at 2: the graph is symbolic in batch
        x = np.random.default_rng(batch).standard_normal((batch, 4, 9)).astype(np.float32)
        with torch.no_grad():
            ref = micro(torch.from_numpy(x)).numpy()
        close(models["micro"].execute(x)[0].to_numpy(), ref)


def test_encoder_conv_stem_attention_mlp(compiled):
    model, _, _, models, _ = compiled
    mel = (
        np.random.default_rng(0)
        .standard_normal((2, TINY_DIMS["n_mels"], 2 * TINY_DIMS["n_audio_ctx"]))
        .astype(np.float32)
    )
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(mel)).numpy()
    close(models["encoder"].execute(mel)[0].to_numpy(), ref)


def test_missing_lowering_names_op_and_module():
    g = ir.Graph(
        "g",
        (ir.Value("x", ir.TensorType("float32", (2, 3))),),
        (),
        (),
        (
            ir.Node(
                "blocks.0.mlp/frob",
                "aten.frobnicate.default",
                ("x",),
                (),
                ir.TensorType("float32", (2, 3)),
                "blocks.0.mlp",
            ),
        ),
        (("y", "blocks.0.mlp/frob"),),
    )
    with pytest.raises(LoweringError, match=r"no lowering for aten\.frobnicate\.default .*module blocks\.0\.mlp"):
        lower_graph(g)


def test_registering_an_op_twice_fails():
    with pytest.raises(LoweringError, match="registered twice"):
        register("aten.linear.default")(lambda ctx, node, *a: None)
