"""select_kernels: which of our kernels each product and attention of a graph runs, for a target.

The package's IR is the same for every CPU (`--rebuild` recompiles it on another); lowering
applies this pass for the target it compiles for (lower.lower_graph), so each lowering maps one
op to one kernel and chooses nothing. The choices (converter/target.py names the kinds):

- aten.linear of x with one position per row and a weight W (stored, or float32): linear_rows,
  which reads W as stored; linear_rows_amx for a bfloat16 W (k in whole 32s) on AMX.
- aten.linear of many rows with W stored in bfloat16: linear_bf16 (VDPBF16PS); linear_amx on AMX.
- aten.matmul of one position per row with a transposed weight (the tied vocabulary): as
  aten.linear of one position per row.
- attention_bf16: attention_amx on AMX.
- decoder_layer: attribute `amx`, its products on tiles (bfloat16 matrices of whole 32s, on AMX).

A stored weight is read through a cast (passes.store_weights); a kernel reads it as stored, so
the cast is dropped when nothing else reads it. Products of many rows with a float32 weight
stay aten.linear (MAX's matmul).
"""

from __future__ import annotations

from dataclasses import replace

from ...runtime.manifest import Target
from .. import ir
from ..target import amx, bfloat16_kernels
from .weights import LAYER_MATRICES, STORED_DTYPES

_MATMULS = ("aten.matmul.default", "aten.bmm.default", "aten.mm.default")


class KernelChoiceError(ValueError):
    """A product no kernel of ours takes and no graph op should get (a pass left it)."""


def select_kernels(g: ir.Graph, target: Target) -> ir.Graph:
    """`g` with its products and attention as the kernels `target` runs (the module docstring)."""
    types = g.types()
    weights = {w.name for w in g.weights}
    producers = {n.name: n for n in g.nodes}
    on_amx = amx(target)

    def weight(name: str) -> str | None:
        """The graph weight `name` reads as stored: itself, or the stored weight its cast widens."""
        if name in weights:
            return name
        src = producers.get(name)
        if (
            src is not None
            and src.op == ir.CAST
            and src.inputs[0] in weights
            and types[src.inputs[0]].dtype in STORED_DTYPES
        ):
            return src.inputs[0]
        return None

    def rows_op(w: str) -> str:
        t = types[w]
        return ir.LINEAR_ROWS_AMX if on_amx and t.dtype == "bfloat16" and t.shape[-1] % 32 == 0 else ir.LINEAR_ROWS

    nodes = []
    for n in g.nodes:
        if n.op == "aten.linear.default":
            n = _linear(g, n, weight(n.inputs[1]), types, rows_op, target)
        elif n.op in _MATMULS:
            src = producers.get(n.inputs[1])
            w = weight(src.inputs[0]) if src is not None and src.op == "aten.transpose.int" else None
            if w is not None and len(types[n.inputs[1]].shape) == 2 and ir.one_position_per_row(g, n.inputs[0]):
                n = replace(n, op=rows_op(w), inputs=(n.inputs[0], w), attrs=())
        elif n.op == ir.ATTENTION_BF16 and bfloat16_kernels(target) == "amx":
            n = replace(n, op=ir.ATTENTION_AMX)
        elif n.op == ir.DECODER_LAYER:
            matrices = [types[n.inputs[i]] for i in LAYER_MATRICES]
            tiles = on_amx and all(
                len(t.shape) == 2 and t.dtype == "bfloat16" and t.shape[1] % 32 == 0 and t.shape[0] % 32 == 0
                for t in matrices
            )
            n = replace(n, attrs=(*((k, v) for k, v in n.attrs if k != "amx"), ("amx", tiles)))
        nodes.append(n)
    # a cast only the kernels read goes (they read the stored weight); every other node stays, as
    # the parity probe may tap it
    read = {i for n in nodes for i in n.inputs} | {v for _, v in g.outputs}
    out = replace(g, nodes=tuple(n for n in nodes if n.op != ir.CAST or n.name in read))
    out.validate()
    return out


def _linear(g: ir.Graph, n: ir.Node, w: str | None, types: dict, rows_op, target: Target) -> ir.Node:
    if w is None:
        return n
    bias = tuple(i for i in n.inputs[2:3] if i)
    if ir.one_position_per_row(g, n.inputs[0]):
        return replace(n, op=rows_op(w), inputs=(n.inputs[0], w, *bias))
    dtype, shape = types[w].dtype, list(types[w].shape)
    if dtype == "float16":
        raise KernelChoiceError(
            f"{n.name}: a product of many rows reads the float16 weight {w!r}; passes.store_weights should have "
            "bound its widened copy"
        )
    if dtype == "bfloat16":
        if not ir.bfloat16_product_fits(shape):
            raise KernelChoiceError(
                f"{n.name}: a product of many rows reads the bfloat16 weight {w!r} of shape {shape}, which "
                "whisper_max.linear_bf16 cannot take (rows a multiple of 64, even columns); passes.store_weights "
                "should have bound its widened copy"
            )
        op = ir.LINEAR_AMX if bfloat16_kernels(target) == "amx" else ir.LINEAR_BF16
        return replace(n, op=op, inputs=(n.inputs[0], w, *bias))
    return n  # many rows, a float32 weight: MAX's matmul
