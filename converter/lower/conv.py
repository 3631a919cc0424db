"""conv1d: as its windows' matrix (whisper_max.conv_taps) times the weight, MAX's matmul.

MAX's conv2d builds the same matrix inside and runs the same product (the outputs are the same
bits), but took 20 ms for tiny.en's stem on an AMD EPYC (Zen 4) where the copy and the product
take ~11 ms; building the matrix from graph ops (pad, strided slices, concat) took 8 ms alone. A
convolution our op does not take (grouped, dilated, or of a length known only at run time) is
an NHWC conv2d with H = 1."""

from max.dtype import DType
from max.graph import TensorType, ops
from max.graph.type import FilterLayout

from . import register

CONV_TAPS = "whisper_max.conv_taps"


@register("aten.conv1d.default")
def conv1d(ctx, node, x, weight, bias, stride, padding, dilation, groups):
    if isinstance(padding, str):
        raise ValueError(f"conv1d padding={padding!r}: only explicit padding is lowered")
    (s,), (p,), (d,) = stride, padding, dilation
    nwc = ctx.nwc.get(node.inputs[0])
    length = x.shape[2]
    if groups == 1 and d == 1 and str(length).isdigit():
        y = _as_product(ctx, nwc if nwc is not None else x, weight, bias, s, p, int(length), nwc is not None)
    else:
        if nwc is None:
            nwc = ops.permute(x, [0, 2, 1])  # (B, C, T) -> (B, T, C)
        nhwc = ops.unsqueeze(nwc, 1)  # (B, 1, T, C)
        filt = ops.unsqueeze(weight, 2)  # torch (F, C/groups, K) -> FCRS (F, C/groups, 1, K)
        y = ops.conv2d(
            nhwc,
            filt,
            stride=(1, s),
            dilation=(1, d),
            padding=(0, 0, p, p),
            groups=groups,
            bias=bias,
            filter_layout=FilterLayout.FCRS,
        )
        y = ops.squeeze(y, 1)  # (B, 1, T', F) -> (B, T', F)
    ctx.nwc[node.name] = y
    return ops.permute(y, [0, 2, 1])  # (B, F, T'), as torch; unused if the consumer takes nwc


def _as_product(ctx, x, weight, bias, stride: int, padding: int, length: int, channels_last: bool):
    """(B, T', F): the rows of conv_taps (B, T', K * C) @ the weight (F, C, K) as (F, K * C)."""
    f, c, k = (int(dim) for dim in weight.shape)
    out = (length + 2 * padding - k) // stride + 1
    cols = ops.custom(
        CONV_TAPS,
        device=ctx.device,
        values=[x],
        out_types=[TensorType(DType.float32, [x.shape[0], out, k * c], ctx.device)],
        parameters={"taps": k, "stride": stride, "padding": padding, "channels_last": int(channels_last)},
    )[0].tensor
    w = ops.reshape(ops.permute(weight, [0, 2, 1]), [f, k * c])  # tap-major, as the rows are
    y = ops.reshape(cols, [-1, k * c]) @ ops.transpose(w, 0, 1)
    if bias is not None:
        y = y + bias
    return ops.reshape(y, [x.shape[0], out, f])
