"""Linear layers and matrix products; weights stay in torch's (out, in) layout.

A product whose left operand holds one position per row (ir.one_position_per_row: a decoder
step, one token for each of one or several rows) is a matrix-vector product, bound by reading
the weight. It runs as our kernel whisper_max.linear_rows (custom.linear_rows), which reads each
weight row once for all rows and splits the weight's rows across the workers. Measured on an AMD
EPYC (Zen 4, 2 cores), the 80 MB vocabulary product of one row: 2.2-2.5 ms with the kernel,
7.7-8.3 ms as MAX's fused broadcast-multiply-sum (the form used before); of 5 rows: 2.8-3.0 ms
against 5.4-6.0 ms as MAX's matmul. (The decoder blocks of those graphs are fused whole:
passes.fuse_decoder_layers.)

A weight stored in bfloat16 or float16 (passes.store_weights reads it through a cast in such
products) is read as stored by the same kernel, which widens each element exactly as it loads
it: half the bytes, float32 arithmetic (a float16 weight of a float32 package is one whose
values float16 holds exactly, so those sums are the float32 ones bit for bit); where the target has AMX, by
whisper_max.linear_rows_amx instead (the
rows rounded to bfloat16, the weight the tiles' A operand as stored). A linear layer of many rows with a stored weight
(the encoder, cross
K/V, a prompt) runs as our kernel whisper_max.linear_bf16 (custom.linear_bf16): rows rounded to
bfloat16, AVX512_BF16 pair products summed in float32, ~2.5x MAX's float32 matmul on an AMD EPYC
(Zen 4); MAX's own bfloat16 matmul was no faster than its float32 one there. Every other product
of a stored weight binds its float32 widening (`X/widened`, made at load) and computes in
float32; a cast of a weight would be folded by MAX into a float32 copy per graph.
"""

from max.dtype import DType
from max.graph import ops

from .. import ir
from . import LoweringError, register
from .custom import linear_bf16, linear_rows


def _weight(ctx, name: str):
    """The weight the IR value `name` is, as MAX binds it: the stored bfloat16 weight when
    `name` widens one (a cast), else the weight itself; None if `name` is not a weight."""
    stored = stored_weight(ctx, name)
    if stored is not None:
        return stored
    return ctx.value(name) if name in ctx.weight_names else None


def stored_weight(ctx, name: str):
    """The bfloat16 or float16 weight that the IR value `name` widens (a cast of a weight), or None."""
    src = ctx.producer(name)
    if src is None or src.op != ir.CAST:
        return None
    w = ctx.value(src.inputs[0])
    return w if w.dtype in (DType.bfloat16, DType.float16) and ctx.producer(src.inputs[0]) is None else None


@register("aten.linear.default")
def linear(ctx, node, x, weight, bias):
    w = _weight(ctx, node.inputs[1])
    if w is not None and ir.one_position_per_row(ctx.graph, node.inputs[0]):
        return linear_rows(ctx, x, w, bias)
    if w is not None and w.dtype == DType.float16:
        raise LoweringError(
            f"{node.name}: a product of many rows reads the float16 weight {node.inputs[1]!r}; passes.store_weights "
            "should have bound its widened copy"
        )
    if w is not None and w.dtype == DType.bfloat16:
        if not ir.bfloat16_product_fits([int(d) for d in w.shape]):
            raise LoweringError(
                f"{node.name}: a product of many rows reads the bfloat16 weight {node.inputs[1]!r} of shape "
                f"{[int(d) for d in w.shape]}, which whisper_max.linear_bf16 cannot take (rows a multiple of 64, "
                f"even columns); passes.store_weights should have bound its widened copy"
            )
        return linear_bf16(ctx, x, w, bias)
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
    # x @ W.T with W an (out, in) weight (the tied vocabulary projection): a matrix-vector product
    src = ctx.producer(node.inputs[1])
    w = _weight(ctx, src.inputs[0]) if src is not None and src.op == "aten.transpose.int" and b.rank == 2 else None
    if w is not None and ir.one_position_per_row(ctx.graph, node.inputs[0]):
        return linear_rows(ctx, a, w)
    if _rows_share_b(a, b):
        return rows_as_m(a, b)
    return a @ b
