"""conv1d as an NHWC conv2d with H = 1."""

from max.graph import ops
from max.graph.type import FilterLayout

from . import register


@register("aten.conv1d.default")
def conv1d(ctx, node, x, weight, bias, stride, padding, dilation, groups):
    if isinstance(padding, str):
        raise ValueError(f"conv1d padding={padding!r}: only explicit padding is lowered")
    (s,), (p,), (d,) = stride, padding, dilation
    nwc = ctx.nwc.get(node.inputs[0])
    if nwc is None:
        nwc = ops.permute(x, [0, 2, 1])  # (B, C, T) -> (B, T, C)
    nhwc = ops.unsqueeze(nwc, 1)  # (B, 1, T, C)
    filt = ops.unsqueeze(weight, 2)  # torch (F, C/groups, K) -> FCRS (F, C/groups, 1, K)
    y = ops.conv2d(nhwc, filt, stride=(1, s), dilation=(1, d), padding=(0, 0, p, p), groups=groups, bias=bias, filter_layout=FilterLayout.FCRS)
    y = ops.squeeze(y, 1)  # (B, 1, T', F) -> (B, T', F)
    ctx.nwc[node.name] = y
    return ops.permute(y, [0, 2, 1])  # (B, F, T'), as torch; unused if the consumer takes nwc
