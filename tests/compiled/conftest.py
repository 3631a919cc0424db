"""The op tests' one MAX module, compiled once per session, and its variants with bfloat16 and
float16 weights."""

from __future__ import annotations

import pytest
import torch
from helpers import BF16_TARGETS, HAS_BF16
from helpers.op_module import (
    Micro,
    attention_f32_graph,
    bf16_product_graphs,
    float16_exact_tiny_whisper,
    panel_product_graphs,
    to_bfloat16_graph,
)
from helpers.tiny_model import state_dict_np, tiny_whisper
from torch.export import Dim, export

from whisper_max.converter import ir
from whisper_max.converter.lower import compile_with_kernels, lower_graph
from whisper_max.converter.passes import optimise, panel_products, store_cross_kv, store_weights
from whisper_max.converter.trace import to_ir, trace_program
from whisper_max.runtime.weights import from_bfloat16, to_bfloat16, with_derived


@pytest.fixture(scope="session")
def compiled():
    from max.engine import InferenceSession
    from max.graph import Module

    model = float16_exact_tiny_whisper()
    program = panel_products(optimise(trace_program(model)))  # the form packages ship
    micro = Micro().eval()
    with torch.no_grad():
        ep = export(micro, (torch.randn(2, 4, 9),), dynamic_shapes=({0: Dim("batch", min=2)},))
    micro_ir = to_ir(ep, "micro", ["x"], [{0: "batch"}], ["y"], {"batch": (1, None)})
    products, product_weights = bf16_product_graphs() if HAS_BF16 else (ir.Program((), {}), {})
    mod = Module()
    panels, panel_weights = panel_product_graphs()
    for g in program.graphs + (micro_ir,) + panels.graphs + (attention_f32_graph(), to_bfloat16_graph()):
        lower_graph(g, mod)
    for kind, target in BF16_TARGETS.items():  # each kind of our bfloat16 kernels this CPU runs
        for g in products.graphs:
            lower_graph(g, mod, name=f"{g.name}_{kind}", target=target)
    weights = with_derived(state_dict_np(model), program.weight_names()) | {
        k: v.detach().numpy().copy() for k, v in micro.state_dict().items()
    }
    weights |= product_weights | panel_weights
    session = InferenceSession()
    models = session.init_all(compile_with_kernels(session, mod), weights_registry=weights)
    return model, micro, program, models, weights


@pytest.fixture(scope="session", params=list(BF16_TARGETS))
def compiled_bf16(request):
    """The tiny program with bfloat16-stored weights lowered for one kind of our bfloat16 kernels
    (helpers.BF16_TARGETS; none on a CPU without them, so its tests are skipped), and
    openai-whisper on the same rounded weights."""
    from max.engine import InferenceSession
    from max.graph import Module

    torch.manual_seed(0)
    # as the bfloat16 recipe leaves it for this kind: cross keys and values in bfloat16, the
    # steps' products in pair panels on VDPBF16PS ("bf16"), the stored weights read by the AMX
    # row kernels ("amx")
    kind = request.param
    program = panel_products(
        store_cross_kv(store_weights(optimise(trace_program(tiny_whisper())))),
        bfloat16=kind != "amx",
        pairs=kind == "bf16",
    )
    stored = {k for k, dt in program.stored_weights().items() if dt == "bfloat16"}
    weights = {k: to_bfloat16(v) if k in stored else v for k, v in state_dict_np(tiny_whisper()).items()}
    widened = {k: from_bfloat16(v) if k in stored else v for k, v in weights.items()}
    bound = with_derived(weights, program.weight_names())
    model = tiny_whisper()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in widened.items()})
    mod = Module()
    for g in program.graphs:
        lower_graph(g, mod, target=BF16_TARGETS[request.param])
    session = InferenceSession()
    return (
        request.param,
        model.eval(),
        program,
        session.init_all(compile_with_kernels(session, mod), weights_registry=bound),
    )


@pytest.fixture(scope="session")
def compiled_float16():
    """The decoder graphs of the tiny program (float16-exact weights) with the step's matrices
    stored in float16, as a float32 package stores them (passes.store_weights)."""
    from max.engine import InferenceSession
    from max.graph import Module

    from whisper_max.converter.convert import stored_as
    from whisper_max.converter.recipes import float16_exact

    model = float16_exact_tiny_whisper()
    sd = state_dict_np(model)
    program = panel_products(store_weights(optimise(trace_program(model)), "float16", exact=float16_exact(sd)))
    stored = program.stored_weights()
    weights = with_derived({k: stored_as(v, stored[k]) for k, v in sd.items()}, program.weight_names())
    mod = Module()
    for name in ("cross_kv", "decoder", "decoder_step"):
        lower_graph(program.graph(name), mod)
    session = InferenceSession()
    return program, session.init_all(compile_with_kernels(session, mod), weights_registry=weights)
