"""Layer normalisation over the last axis."""

import numpy as np
from max.dtype import DType
from max.graph import ops

from . import register


@register("aten.layer_norm.default")
def layer_norm(ctx, node, x, weight, bias, normalized_shape, eps, cudnn_enable=False):
    if len(normalized_shape) != 1:
        raise ValueError(f"layer_norm over {normalized_shape}: only the last axis is lowered")
    (n,) = normalized_shape
    if weight is None:
        weight = ops.constant(np.ones(n, np.float32), DType.float32, ctx.device)
    if bias is None:
        bias = ops.constant(np.zeros(n, np.float32), DType.float32, ctx.device)
    return ops.layer_norm(x, weight, bias, epsilon=eps)
