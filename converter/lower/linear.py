"""Linear layers and matrix products; weights stay in torch's (out, in) layout.

A product whose left operand is a single row (every leading dim statically 1: a decoder step for
one sequence and one token) is a matrix-vector product, bound by reading the weight once. MAX's
general matmul reaches ~32 GB/s on it here (the 80 MB vocabulary projection: 2.5 ms); the same
dot products written as a broadcast multiply and a sum over `in`, which MAX fuses into one pass
over the (out, in) weight, reach ~44 GB/s (1.8 ms), and the 1536x384 MLP weights go from 145 to
67 us. With 5 rows the same form is 2.4x slower than matmul (it streams the weight once per row),
so only single rows take it.

A single row times a weight stored in bfloat16 (passes.store_weights reads it through a cast
there) is a bfloat16 matrix product instead, `W @ x.T` with the row rounded to bfloat16 and the
result widened back: it reads half the bytes, and it is the one form in which MAX reads a stored
weight as stored. Every other product of a stored weight binds its float32 widening (`X/widened`,
made at load) and computes in float32: MAX's bfloat16 matrix products of several rows are slower
than float32 here (~3x for many rows), and a cast of a weight would be folded by MAX into a
float32 copy per graph.
"""

from max.dtype import DType
from max.graph import ops

from .. import ir
from . import register


def _single_row(x) -> bool:
    return all(str(d) == "1" for d in x.shape[:-1])


def gemv(x, weight_out_in):
    """x (..., in) with one row, weight (out, in) -> (..., out): one fused pass over the weight."""
    return ops.squeeze(ops.sum(ops.unsqueeze(x, -2) * weight_out_in, axis=-1), -1)


def stored_weight(ctx, name: str):
    """The bfloat16 weight that the IR value `name` widens (a cast of a weight), or None."""
    src = ctx.producer(name)
    if src is None or src.op != ir.CAST:
        return None
    w = ctx.value(src.inputs[0])
    return w if w.dtype == DType.bfloat16 and ctx.producer(src.inputs[0]) is None else None


def gemv_stored(x, weight_out_in):
    """x (..., in) float32 with one row, weight (out, in) bfloat16 -> (..., out) float32."""
    row = ops.reshape(ops.cast(x, weight_out_in.dtype), [1, x.shape[-1]])
    y = weight_out_in @ ops.transpose(row, 0, 1)  # (out, 1)
    return ops.reshape(ops.cast(y, DType.float32), [*x.shape[:-1], weight_out_in.shape[0]])


@register("aten.linear.default")
def linear(ctx, node, x, weight, bias):
    stored = stored_weight(ctx, node.inputs[1])
    if _single_row(x) and stored is not None:
        y = gemv_stored(x, stored)
    elif _single_row(x):
        y = gemv(x, weight)
    else:
        y = x @ ops.transpose(weight, 0, 1)  # (..., in) @ (in, out); as fast as a pre-transposed weight
    return y if bias is None else y + bias


def _rows_share_b(a, b) -> bool:
    """a (rows, heads, 1, k) against b (1, heads, k, n): one position per row, every row against
    the same b (decoder_rows' cross attention on the window's shared K/V)."""
    return a.rank == 4 and b.rank == 4 and str(b.shape[0]) == "1" and str(a.shape[2]) == "1" and str(a.shape[0]) != "1"


def rows_as_m(a, b):
    """`a @ b` for _rows_share_b, as one product per head with the rows as its M dim: the
    broadcast form runs a one-row product per row (10-15% of a 5-row step, measured)."""
    y = ops.unsqueeze(ops.permute(ops.squeeze(a, 2), [1, 0, 2]), 0) @ b  # (1, heads, rows, n)
    return ops.unsqueeze(ops.permute(ops.squeeze(y, 0), [1, 0, 2]), 2)  # (rows, heads, 1, n)


@register("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
def matmul(ctx, node, a, b):
    # x @ W.T with W an (out, in) weight (the tied vocabulary projection): a matrix-vector product
    src = ctx.producer(node.inputs[1])
    if src is not None and src.op == "aten.transpose.int" and b.rank == 2 and a.rank == 2 and _single_row(a):
        stored = stored_weight(ctx, src.inputs[0])
        return gemv(a, ctx.value(src.inputs[0])) if stored is None else gemv_stored(a, stored)
    if _rows_share_b(a, b):
        return rows_as_m(a, b)
    return a @ b
