"""whisper-max's cast (made by passes.store_weights): a stored weight read as float32."""

from max.graph import ops

from .. import ir
from . import max_dtype, register


@register(ir.CAST)
def cast(ctx, node, x, dtype):
    return ops.cast(x, max_dtype(dtype))
