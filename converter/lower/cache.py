"""whisper-max's own cache op: append to a state buffer in place and read the filled prefix."""

from max.graph import ops

from .. import ir
from . import parse_dim, register


@register(ir.CACHE_APPEND)
def cache_append(ctx, node, state, new, position, axis):
    # one row written at `position`; the attention reads the prefix [0, position + len(new))
    n = new.shape[axis]
    end = position + ctx.index(int(str(n)) if str(n).isdigit() else n)
    at = [slice(None)] * new.rank
    at[axis] = (slice(position, end), n)
    ops.buffer_store_slice(state, new, at)
    prefix = [slice(None)] * new.rank
    prefix[axis] = (slice(ctx.index(0), end), parse_dim(node.type.shape[axis]))
    return ops.buffer_load(state)[tuple(prefix)]
