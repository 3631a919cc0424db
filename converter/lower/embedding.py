"""Embedding lookup."""

from max.graph import ops

from . import register


@register("aten.embedding.default")
def embedding(ctx, node, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return ops.gather(weight, indices, axis=0)  # (V, d)[(b, n)] -> (b, n, d)
