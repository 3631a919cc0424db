# Multi-head self-attention without a mask (Whisper's encoder) in float32, scores kept in cache.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize

from .rows import PANEL, block_product
from .simd import F32, V, exp_sum, range_max

comptime QUERIES = 48  # queries of one work item: their scores (48 x keys) stay in L2
# floats added to a row of scores (whole blocks of 64 keys) so that rows are not a multiple of
# 4 KB apart: 1536 keys (1500 padded) are 6 KB, and the tiles' rows of scores then fell in two
# sets of an 8-way L1 (a 32 KB L1 of 64 sets: one set every 4 KB)
comptime SKEW = 16


@extensibility.register("whisper_max.attention")
struct Attention:
    """y (b, t, d) = softmax((q s)(k s)^T) v per head of 64 columns, q, k, v (b, t, d) float32,
    s = `scale` (openai-whisper scales q and k by hd ** -0.25 each), all in float32.

    MAX's graph ops write each head's t x t scores to memory and read them back twice; here
    each work item takes QUERIES queries of one head: their scores against all keys in blocks of
    64 keys (rows.block_product: register tiles, each sum in head-column order), kept in L2;
    then per query exp(score - max) and its sum; then the exponentials times the values in
    blocks of 64 keys, divided by the sum. Each head's operands are packed once, so that every
    block a tile reads is 16 KB in a row (in place, a block's 64 rows were 6 KB apart for k^T and
    1.5 KB for v, and fell in a few sets of L1): k s transposed, a block of 64 keys at a time
    (64 x 64), zeros after t; v as t rows of 64. A query's result does not depend on the others
    in its item or batch (one order for every sum). On an AMD EPYC (family 23, model 1: AVX2,
    128-bit FMA units; kernel_bench's shape, in-process A/B, same bits) packed blocks and
    scores rows SKEW apart took 73.3 -> 70.5 ms a layer."""

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
        var nb = (t + PANEL - 1) // PANEL  # blocks of 64 keys
        var tp = nb * PANEL  # keys padded to whole blocks
        var ts = tp + SKEW  # floats between two queries' rows of scores
        var items = b * heads
        var qs = alloc[Float32](items * t * PANEL)  # (b, h) -> t rows of 64: q s
        var kt = alloc[Float32](items * tp * PANEL)  # (b, h) -> nb blocks of 64 x 64: (k s)^T, zeros after t
        var vs = alloc[Float32](items * t * PANEL)  # (b, h) -> t rows of 64: v
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var s = Float32(scale)

        def pack(bh: Int) {var qs, var kt, var vs, var qp, var kp, var vp, var s, var t, var tp, var d}:
            var bi = bh // heads
            var h = bh % heads
            var kh = kt + bh * tp * PANEL
            for j in range(t):
                var src = (bi * t + j) * d + h * PANEL
                var dst = qs + (bh * t + j) * PANEL
                var vd = vs + (bh * t + j) * PANEL
                for c in range(0, PANEL, V):
                    dst.store(c, qp.load[width=V](src + c) * s)
                    vd.store(c, vp.load[width=V](src + c))
                var kb = kh + (j // PANEL) * PANEL * PANEL + j % PANEL
                for c in range(PANEL):
                    kb.store(c * PANEL, kp.load(src + c) * s)
            for j in range(t, tp):
                var kb = kh + (j // PANEL) * PANEL * PANEL + j % PANEL
                for c in range(PANEL):
                    kb.store(c * PANEL, Float32(0))

        parallelize(pack, items)
        var blocks = (t + QUERIES - 1) // QUERIES
        var op = y.unsafe_ptr()

        def attend(it: Int) {var qs, var kt, var vs, var op, var t, var tp, var ts, var d, var blocks}:
            var bh = it // blocks
            var bi = bh // heads
            var h = bh % heads
            var lo = (it % blocks) * QUERIES
            var rows = min(t, lo + QUERIES) - lo
            var buf = alloc[Float32](QUERIES * ts + QUERIES * PANEL + QUERIES)  # one allocation per item
            var sc = buf  # scores, then exponentials (rows ts apart)
            var o = sc + QUERIES * ts  # exponentials times values (rows x 64)
            var sums = o + QUERIES * PANEL
            var qrows = qs + (bh * t + lo) * PANEL
            var kh = kt + bh * tp * PANEL
            for l0 in range(0, tp, PANEL):
                block_product(sc + l0, ts, qrows, PANEL, rows, kh + l0 * PANEL, PANEL, 0, PANEL, True)
            for i in range(rows):
                var row = sc + i * ts
                sums.store(i, exp_sum[True, False](row, 0, t, range_max(row, 0, t), 0, 0))
            var vh = vs + bh * t * PANEL
            for kb in range(0, t, PANEL):
                block_product(o, PANEL, sc, ts, rows, vh, PANEL, kb, min(PANEL, t - kb), kb == 0)
            for i in range(rows):
                var inv = 1.0 / sums.load(i)
                var dst = op + (bi * t + lo + i) * d + h * PANEL
                for c in range(0, PANEL, V):
                    dst.store(c, o.load[width=V](i * PANEL + c) * inv)
            buf.free()

        parallelize(attend, items * blocks)
        qs.free()
        kt.free()
        vs.free()
