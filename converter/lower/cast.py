"""whisper-max's cast: a stored weight read as float32 (passes.store_weights), and float32 values
stored as bfloat16 (passes.store_cross_kv) by our kernel whisper_max.to_bfloat16."""

from max.dtype import DType
from max.graph import TensorType, ops

from .. import ir
from . import max_dtype, register

TO_BFLOAT16 = f"{ir.OWN_DOMAIN}.to_bfloat16"


@register(ir.CAST)
def cast(ctx, node, x, dtype):
    if dtype == "bfloat16" and x.dtype == DType.float32:
        # not ops.cast: LLVM's float32 -> bfloat16 vector conversion aborts the compile on some
        # CPUs (kernels/cast.mojo); the values are flattened for the element-wise kernel
        flat = ops.reshape(x, [-1])
        out = TensorType(DType.bfloat16, flat.shape, ctx.device)
        y = ops.custom(TO_BFLOAT16, device=ctx.device, values=[flat], out_types=[out])[0].tensor
        return ops.reshape(y, x.shape)
    return ops.cast(x, max_dtype(dtype))
