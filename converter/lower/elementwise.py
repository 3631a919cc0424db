"""Elementwise arithmetic; a Python scalar operand arrives as the `other` attribute."""

from . import register


def _operand(ctx, x, other_value, other_attr):
    if other_value is not None:
        return other_value
    if other_attr is None:
        raise ValueError("second operand is neither a tensor nor a scalar")
    return ctx.const(other_attr, x)


@register("aten.add.Tensor")
def add(ctx, node, x, other_value=None, alpha=1, other=None):
    y = _operand(ctx, x, other_value, other)
    if alpha != 1:
        y = y * ctx.const(alpha, x)
    return x + y


@register("aten.sub.Tensor")
def sub(ctx, node, x, other_value=None, alpha=1, other=None):
    y = _operand(ctx, x, other_value, other)
    if alpha != 1:
        y = y * ctx.const(alpha, x)
    return x - y


@register("aten.mul.Tensor")
def mul(ctx, node, x, other_value=None, other=None):
    return x * _operand(ctx, x, other_value, other)


@register("aten.div.Tensor")
def div(ctx, node, x, other_value=None, other=None):
    return x / _operand(ctx, x, other_value, other)
