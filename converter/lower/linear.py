"""Linear layers and matrix products; weights stay in torch's (out, in) layout."""

from max.graph import ops

from . import register


@register("aten.linear.default")
def linear(ctx, node, x, weight, bias):
    y = x @ ops.transpose(weight, 0, 1)  # (..., in) @ (in, out); as fast as a pre-transposed weight
    return y if bias is None else y + bias


@register("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
def matmul(ctx, node, a, b):
    return a @ b
