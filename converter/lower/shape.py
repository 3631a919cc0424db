"""Reshapes, permutes, slices, concatenation and selection, with symbolic dims."""

from max.graph import ops

from .. import ir
from . import parse_dim, register


@register("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def view(ctx, node, x, size):
    # the traced output shape, not `size`: MAX cannot infer -1 against an algebraic dim
    return ops.reshape(x, ctx.shape(node.type))


@register("aten.permute.default")
def permute(ctx, node, x, dims):
    dims = [d % x.rank for d in dims]
    nwc = ctx.nwc.get(node.inputs[0])
    if nwc is not None and dims == [0, 2, 1]:
        return nwc  # the value was produced channels-last; skip the round trip
    return ops.permute(x, dims)


@register("aten.transpose.int")
def transpose(ctx, node, x, dim0, dim1):
    return ops.transpose(x, dim0 % x.rank, dim1 % x.rank)


@register("aten.flatten.using_ints")
def flatten(ctx, node, x, start_dim=0, end_dim=-1):
    return ops.reshape(x, ctx.shape(node.type))


@register("aten.cat.default")
def cat(ctx, node, *tensors, dim=0):
    return ops.concat(list(tensors), axis=dim % tensors[0].rank)


@register("aten.slice.Tensor")
def slice_(ctx, node, x, dim=0, start=None, end=None, step=1):
    if step != 1:
        raise ValueError(f"slice with step {step} is not lowered")
    dim %= x.rank
    start = 0 if start is None else start
    size = x.shape[dim]
    static_size = int(str(size)) if str(size).isdigit() else None
    if isinstance(end, int) and end >= ir.OPEN_END:
        end = None
    if isinstance(start, int) and (end is None or isinstance(end, int)):
        index = slice(start, end if end is None or static_size is None else min(end, static_size))
    else:
        # run-time bounds need the tuple form: the out dim names the slice's length
        out_dim = parse_dim(node.type.shape[dim])
        index = (slice(ctx.index(start), ctx.index(size if end is None else end)), out_dim)
    idx = [slice(None)] * x.rank
    idx[dim] = index
    return x[tuple(idx)]


@register("aten.index_select.default")
def index_select(ctx, node, x, index, dim):
    return ops.gather(x, index, axis=dim % x.rank)


@register("aten.select.int")
def select(ctx, node, x, dim, index):
    idx = [slice(None)] * x.rank
    idx[dim % x.rank] = index
    return x[tuple(idx)]
