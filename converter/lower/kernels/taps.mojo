# The windows a 1-D convolution reads, as the rows of a matrix (im2col): the convolution stem
# then runs as one matrix product (MAX's, the one its own conv2d runs, with the same sums).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.runtime import parallelism_level

from .simd import F32, V


@extensibility.register("whisper_max.conv_taps")
struct ConvTaps:
    """y (b, t', taps * c) from x (b, c, t) (`channels_last` 0) or (b, t, c) (1): row j of item
    i holds x's columns at j * stride + tap - padding for tap = 0 .. taps - 1, each c values in
    channel order, zeros where a column falls outside x; t' = (t + 2 padding - taps) / stride + 1.
    Row j times the weight (f, c, taps) laid out as (f, taps * c) is output column j of the
    convolution. MAX's conv2d builds this matrix inside, one conv at a time; made here (a copy,
    ~1 ms for Whisper's stem) it costs half what the conv2d did (20 ms for tiny.en's stem on an
    AMD EPYC Zen 4, with the same bits), and graph ops (pad, strided slices, concat) took 8 ms."""

    @staticmethod
    def execute[target: StaticString, taps: Int, stride: Int, padding: Int, channels_last: Int](
        y: OutputTensor[dtype=DType.float32, rank=3, ...],
        x: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        var b = x.dim_size(0)
        var c = x.dim_size(2) if channels_last else x.dim_size(1)
        var t = x.dim_size(1) if channels_last else x.dim_size(2)
        var tq = (t + 2 * padding - taps) // stride + 1
        if taps < 1 or stride < 1 or padding < 0 or tq < 1:
            raise Error("whisper_max.conv_taps: taps and stride must be positive, padding not negative, and the input as long as one window")
        if y.dim_size(0) != b or y.dim_size(1) != tq or y.dim_size(2) != taps * c:
            raise Error("whisper_max.conv_taps: the output is not (batch, output length, taps * channels)")
        if b * tq == 0:
            return
        var xp = x.unsafe_ptr()
        var yp = y.unsafe_ptr()
        var width = taps * c
        var workers = parallelism_level()
        var chunk = (tq + workers - 1) // workers
        var cv = c - c % V

        def rows(task: Int) {var xp, var yp, var c, var t, var tq, var width, var workers, var chunk, var cv}:
            var i = task // workers
            var lo = (task % workers) * chunk
            var hi = min(tq, lo + chunk)
            var xi = xp + i * c * t
            for j in range(lo, hi):
                var row = yp + (i * tq + j) * width
                for tap in range(taps):
                    var col = j * stride + tap - padding
                    var dst = row + tap * c
                    if col < 0 or col >= t:
                        for ch in range(0, cv, V):
                            dst.store(ch, SIMD[F32, V](0))
                        for ch in range(cv, c):
                            dst.store(ch, Float32(0))
                    elif channels_last:
                        var src = xi + col * c
                        for ch in range(0, cv, V):
                            dst.store(ch, src.load[width=V](ch))
                        for ch in range(cv, c):
                            dst.store(ch, src.load(ch))
                    else:  # channel-major: one value from each channel's row
                        for ch in range(c):
                            dst.store(ch, xi.load(ch * t + col))

        parallelize(rows, b * workers)
