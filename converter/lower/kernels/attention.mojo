# Multi-head self-attention without a mask (Whisper's encoder) in float32, scores kept in cache.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import exp

from .rows import PANEL, block_product
from .simd import F32, V, range_max

comptime QUERIES = 48  # queries of one work item: their scores (48 x keys) stay in L2


@extensibility.register("whisper_max.attention")
struct Attention:
    """y (b, t, d) = softmax((q s)(k s)^T) v per head of 64 columns, q, k, v (b, t, d) float32,
    s = `scale` (openai-whisper scales q and k by hd ** -0.25 each), all in float32.

    MAX's graph ops write each head's t x t scores to memory and read them back twice; here
    each work item takes QUERIES queries of one head: their scores against all keys in blocks of
    64 keys (rows.block_product: register tiles, each sum in head-column order), kept in L2;
    then per query exp(score - max) and its sum; then the exponentials times the values in
    blocks of 64 keys, divided by the sum. k s is packed once per head, transposed and padded to
    whole blocks of 64 keys; v is read in place. A query's result does not depend on the
    others in its item or batch (one order for every sum)."""

    @staticmethod
    def execute[target: StaticString, heads: Int, scale: Float64](
        y: OutputTensor[dtype=DType.float32, rank=3, ...],
        q: InputTensor[dtype=DType.float32, rank=3, ...],
        k: InputTensor[dtype=DType.float32, rank=3, ...],
        v: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        var b = q.dim_size(0)
        var t = q.dim_size(1)
        var d = q.dim_size(2)
        for i in range(3):
            if k.dim_size(i) != q.dim_size(i) or v.dim_size(i) != q.dim_size(i) or y.dim_size(i) != q.dim_size(i):
                raise Error("whisper_max.attention: q, k, v and out differ in shape")
        if d != heads * PANEL:
            raise Error("whisper_max.attention: heads of 64 columns expected")
        if b * t == 0:
            return
        var tp = (t + PANEL - 1) // PANEL * PANEL  # keys padded to whole blocks
        var items = b * heads
        var qs = alloc[Float32](items * t * PANEL)  # (b, h) -> t rows of 64: q s
        var kt = alloc[Float32](items * PANEL * tp)  # (b, h) -> 64 rows of tp keys: (k s)^T, zeros after t
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var s = Float32(scale)

        def pack(bh: Int) {var qs, var kt, var qp, var kp, var s, var t, var tp, var d}:
            var bi = bh // heads
            var h = bh % heads
            var kh = kt + bh * PANEL * tp
            for j in range(t):
                var src = (bi * t + j) * d + h * PANEL
                var dst = qs + (bh * t + j) * PANEL
                for c in range(0, PANEL, V):
                    dst.store(c, qp.load[width=V](src + c) * s)
                for c in range(PANEL):
                    kh.store(c * tp + j, kp.load(src + c) * s)
            for c in range(PANEL):
                for j in range(t, tp):
                    kh.store(c * tp + j, Float32(0))

        parallelize(pack, items)
        var blocks = (t + QUERIES - 1) // QUERIES
        var op = y.unsafe_ptr()

        def attend(it: Int) {var qs, var kt, var vp, var op, var t, var tp, var d, var blocks}:
            var bh = it // blocks
            var bi = bh // heads
            var h = bh % heads
            var lo = (it % blocks) * QUERIES
            var rows = min(t, lo + QUERIES) - lo
            var buf = alloc[Float32](QUERIES * tp + QUERIES * PANEL + QUERIES)  # one allocation per item
            var sc = buf  # scores, then exponentials (rows x tp)
            var o = sc + QUERIES * tp  # exponentials times values (rows x 64)
            var sums = o + QUERIES * PANEL
            var qrows = qs + (bh * t + lo) * PANEL
            var kh = kt + bh * PANEL * tp
            for l0 in range(0, tp, PANEL):
                block_product(sc + l0, tp, qrows, PANEL, rows, kh + l0, tp, 0, PANEL, True)
            var t16 = t - t % V
            for i in range(rows):
                var row = sc + i * tp
                var m = range_max(row, 0, t)
                var acc = SIMD[F32, V](0)
                for c in range(0, t16, V):
                    var e = exp(row.load[width=V](c) - m)
                    row.store(c, e)
                    acc += e
                var total = acc.reduce_add()
                for c in range(t16, t):
                    var e = exp(row.load(c) - m)
                    row.store(c, e)
                    total += e
                sums.store(i, total)
            var vh = vp + bi * t * d + h * PANEL
            for kb in range(0, t, PANEL):
                block_product(o, PANEL, sc, tp, rows, vh, d, kb, min(PANEL, t - kb), kb == 0)
            for i in range(rows):
                var inv = 1.0 / sums.load(i)
                var dst = op + (bi * t + lo + i) * d + h * PANEL
                for c in range(0, PANEL, V):
                    dst.store(c, o.load[width=V](i * PANEL + c) * inv)
            buf.free()

        parallelize(attend, items * blocks)
        qs.free()
        kt.free()
