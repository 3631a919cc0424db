"""Linear layers and matrix products that MAX's own ops run; weights stay in torch's (out, in)
layout. Which products run as our kernels instead is passes.select_kernels' choice, made before
lowering for the target: a product of one position per row with a weight (a decoder step) as
whisper_max.linear_rows (custom.py; it reads each weight row once for all rows, a stored
bfloat16 or float16 weight as stored; measured on an AMD EPYC (Zen 4, 2 cores), the 80 MB
vocabulary product of one row: 2.2-2.5 ms, against 7.7-8.3 ms as MAX's fused
broadcast-multiply-sum; of 5 rows 2.8-3.0 ms against 5.4-6.0 ms as MAX's matmul), and one of
many rows with a bfloat16 weight as whisper_max.linear_bf16 or linear_amx (~2.5x MAX's float32
matmul on Zen 4; MAX's own bfloat16 matmul was no faster than its float32 one there). What is
left here: products of many rows with a float32 weight (the encoder, cross K/V, a prompt), by
MAX's matmul, and products of two activations.
"""

from max.dtype import DType
from max.graph import ops

from . import LoweringError, register


@register("aten.linear.default")
def linear(ctx, node, x, weight, bias):
    if weight.dtype != DType.float32:
        raise LoweringError(
            f"{node.name}: aten.linear of a {weight.dtype} weight {node.inputs[1]!r}; passes.select_kernels gives "
            "every product of a stored weight to one of our kernels"
        )
    y = x @ ops.transpose(weight, 0, 1)  # (..., in) @ (in, out); as fast as a pre-transposed weight
    return y if bias is None else y + bias


def _rows_share_b(a, b) -> bool:
    """a (rows, heads, 1, k) against b (1, heads, k, n): one position per row, every row against
    the same b (the cross attention of an unfused decoder_rows on the window's shared K/V: the IR
    of packages converted before fuse_decoder_layers, which `rebuild` recompiles)."""
    return a.rank == 4 and b.rank == 4 and str(b.shape[0]) == "1" and str(a.shape[2]) == "1" and str(a.shape[0]) != "1"


def rows_as_m(a, b):
    """`a @ b` for _rows_share_b, as one product per head with the rows as its M dim: the
    broadcast form runs a one-row product per row (10-15% of a 5-row step, measured)."""
    y = ops.unsqueeze(ops.permute(ops.squeeze(a, 2), [1, 0, 2]), 0) @ b  # (1, heads, rows, n)
    return ops.unsqueeze(ops.permute(ops.squeeze(y, 0), [1, 0, 2]), 2)  # (rows, heads, 1, n)


@register("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
def matmul(ctx, node, a, b):
    if _rows_share_b(a, b):
        return rows_as_m(a, b)
    return a @ b
