"""GELU and softmax."""

from max.graph import ops

from . import register


@register("aten.gelu.default")
def gelu(ctx, node, x, approximate):
    # "none" is the exact erf GELU, as torch's default
    nwc = ctx.nwc.get(node.inputs[0])
    if nwc is not None:
        ctx.nwc[node.name] = ops.gelu(nwc, approximate=approximate)
    return ops.gelu(x, approximate=approximate)


@register("aten.softmax.int", "aten._softmax.default")
def softmax(ctx, node, x, dim, dtype=None, half_to_float=False):
    if dtype is not None and dtype != node.type.dtype:
        raise ValueError(f"softmax with a dtype change to {dtype} is not lowered")
    return ops.softmax(x, axis=dim % x.rank)
