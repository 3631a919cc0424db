# Products of many rows in bfloat16 on AVX512_BF16 (VDPBF16PS): the encoder, cross K/V and
# prompts of a bfloat16 package on CPUs without AMX (Zen 4, Zen 5).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import exp
from std.runtime import parallelism_level
from std.memory import stack_allocation
from std.sys import inlined_assembly

from .simd import bf16_bits, range_max, round_bf16

comptime L = 16  # float32 lanes of the zmm registers VDPBF16PS works on (AVX-512 only)
comptime BF16 = DType.bfloat16
comptime NR = 64  # output columns of one panel: four float32 registers
comptime MR = 6  # rows of one register tile: 6 x 4 sums, 4 panel loads, 6 broadcasts


@always_inline
def _dot_bf16(acc: SIMD[DType.float32, L], a: SIMD[DType.uint32, L], b: SIMD[DType.uint32, L]) -> SIMD[DType.float32, L]:
    """acc[i] + a[2i] * b[2i] + a[2i+1] * b[2i+1] over the bfloat16 pairs whose bits a and b hold:
    AVX512_BF16's VDPBF16PS (products exact in float32, summed in float32). Inline assembly on
    integer registers: LLVM's intrinsic takes bfloat16 vectors, whose lowering aborts the compile
    on an Intel Xeon with AMX and AVX512_FP16 ("Do not know how to split this operator's
    operand!"); the instruction is the same."""
    return inlined_assembly["vdpbf16ps $2, $1, $0", SIMD[DType.float32, L], constraints="=v,v,v,0", has_side_effect=False](a, b, acc)


@always_inline
def _tile_bf16[mr: Int, biased: Bool, o: MutOrigin](
    y: UnsafePointer[Float32, o], ldy: Int, x: UnsafePointer[BFloat16, _], k: Int,
    panel: UnsafePointer[BFloat16, _], bias: UnsafePointer[Float32, _],
):
    """y[0:mr, 0:64] = x[0:mr, 0:k] (bfloat16 rows, k apart) times the packed panel (k/2 pairs
    of 64 columns, each column's two k values adjacent), plus bias[0:64] if `biased`. The
    mr x 64 sums stay in registers for the whole k."""
    var acc = stack_allocation[mr * 4 * L, Float32, alignment=64]()
    comptime for i in range(mr * 4):
        acc.store(i * L, SIMD[DType.float32, L](0))
    var x32 = x.bitcast[UInt32]()
    var panel32 = panel.bitcast[UInt32]()
    var kp = k // 2
    for p in range(kp):
        var bp = panel32 + p * NR  # 64 columns of one k pair: 64 uint32, each two bfloat16
        var b0 = bp.load[width=L](0)
        var b1 = bp.load[width=L](L)
        var b2 = bp.load[width=L](2 * L)
        var b3 = bp.load[width=L](3 * L)
        comptime for i in range(mr):
            var a = SIMD[DType.uint32, L](x32.load(i * kp + p))
            acc.store((4 * i) * L, _dot_bf16(acc.load[width=L]((4 * i) * L), a, b0))
            acc.store((4 * i + 1) * L, _dot_bf16(acc.load[width=L]((4 * i + 1) * L), a, b1))
            acc.store((4 * i + 2) * L, _dot_bf16(acc.load[width=L]((4 * i + 2) * L), a, b2))
            acc.store((4 * i + 3) * L, _dot_bf16(acc.load[width=L]((4 * i + 3) * L), a, b3))
    comptime for i in range(mr):
        comptime for j in range(4):
            comptime if biased:
                y.store(i * ldy + j * L, acc.load[width=L]((4 * i + j) * L) + bias.load[width=L](j * L))
            else:
                y.store(i * ldy + j * L, acc.load[width=L]((4 * i + j) * L))


def rows_bf16[biased: Bool, o: MutOrigin](
    y: UnsafePointer[Float32, o], ldy: Int, x: UnsafePointer[BFloat16, _], k: Int,
    panel: UnsafePointer[BFloat16, _], bias: UnsafePointer[Float32, _], rows: Int,
):
    """_tile_bf16 over `rows` rows of x: tiles of 6, then one tile of the rest."""
    var m6 = rows - rows % MR
    for i in range(0, m6, MR):
        _tile_bf16[MR, biased](y + i * ldy, ldy, x + i * k, k, panel, bias)
    var rest = rows - m6
    var yr = y + m6 * ldy
    var xr = x + m6 * k
    if rest == 1:
        _tile_bf16[1, biased](yr, ldy, xr, k, panel, bias)
    elif rest == 2:
        _tile_bf16[2, biased](yr, ldy, xr, k, panel, bias)
    elif rest == 3:
        _tile_bf16[3, biased](yr, ldy, xr, k, panel, bias)
    elif rest == 4:
        _tile_bf16[4, biased](yr, ldy, xr, k, panel, bias)
    elif rest == 5:
        _tile_bf16[5, biased](yr, ldy, xr, k, panel, bias)


@extensibility.register("whisper_max.linear_bf16")
struct LinearBF16:
    """y (m, n) = x (m, k) @ w (n, k)^T + b (n) in bfloat16 arithmetic with float32 sums, for
    products of many rows with a bfloat16 weight (n a multiple of 64, k even).

    x is rounded to bfloat16 (to nearest even) once; each worker takes whole 64-column panels of
    w, repacks a panel so that the two values of a column at k and k+1 are adjacent (the operand
    layout of VDPBF16PS, which multiplies pairs exactly and adds them into float32 sums), and runs
    every row of x against it in tiles of 6 rows x 64 columns held in registers. On an AMD EPYC
    (Zen 4, 2 cores) 1500 x 384 @ 384 x 1536 ran at ~450 GFLOP/s against 177 for MAX's float32
    matmul and 162 for its bfloat16 one."""

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.bfloat16, rank=2, ...],
        b: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var m = x.dim_size(0)
        var n = w.dim_size(0)
        var k = w.dim_size(1)
        if x.dim_size(1) != k or b.dim_size(0) != n or y.dim_size(0) != m or y.dim_size(1) != n:
            raise Error("whisper_max.linear_bf16: operand shapes do not agree")
        if n % NR != 0 or k % 2 != 0:
            raise Error("whisper_max.linear_bf16: the weight's rows must be a multiple of 64 and its columns even")
        if m == 0:
            return
        var xb = alloc[BFloat16](m * k)
        var xp = x.unsafe_ptr()
        var workers = parallelism_level()
        var chunk = (m + workers - 1) // workers

        def round_rows(t: Int) {var xb, var xp, var chunk, var m, var k}:
            var lo = min(m, t * chunk) * k
            round_bf16(xb + lo, xp + lo, min(m, (t + 1) * chunk) * k - lo, 1.0)

        parallelize(round_rows, workers)
        var panels = n // NR
        var tasks = min(workers, panels)
        var yp = y.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var bp = b.unsafe_ptr()

        def work(t: Int) {var xb, var yp, var wp, var bp, var panels, var tasks, var m, var n, var k}:
            var panel = alloc[BFloat16](NR * k)
            var p32 = panel.bitcast[UInt32]()
            var kp = k // 2
            for pn in range(t * panels // tasks, (t + 1) * panels // tasks):
                var w32 = (wp + pn * NR * k).bitcast[UInt32]()
                for c in range(NR):
                    for p in range(kp):
                        p32.store(p * NR + c, w32.load(c * kp + p))
                rows_bf16[True](yp + pn * NR, n, xb, k, panel, bp + pn * NR, m)
            panel.free()

        parallelize(work, tasks)
        xb.free()


@extensibility.register("whisper_max.attention_bf16")
struct AttentionBF16:
    """Multi-head self-attention without a mask (Whisper's encoder) in bfloat16 arithmetic:
    y (b, t, d) = softmax((q s)(k s)^T) v per head of 64 columns, q, k, v (b, t, d) float32,
    s = `scale` (openai-whisper scales q and k by hd ** -0.25 each).

    q s, k s and v are rounded to bfloat16 (to nearest even) and packed per head: k s in panels
    of 64 keys, v in key pairs (the operand layouts of VDPBF16PS; keys padded to a multiple of
    64 with zeros). Each worker takes blocks of queries of one head: scores for 6 queries at a
    time against all keys in registers and float32 sums, then exp(score - row max) in float32,
    rounded to bfloat16 for the product with v, and the product divided by the row's float32
    sum of the exponentials."""

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
                raise Error("whisper_max.attention_bf16: q, k, v and out differ in shape")
        if d != heads * NR:
            raise Error("whisper_max.attention_bf16: heads of 64 columns expected")
        if b * t == 0:
            return
        var tp = (t + NR - 1) // NR * NR  # keys padded to whole panels
        var items = b * heads
        var qb = alloc[BFloat16](items * t * NR)  # (b, h) -> t rows of 64, scaled
        var kb = alloc[BFloat16](items * tp * NR)  # (b, h) -> tp/64 panels of 32 pairs x 64 keys x 2
        var vb = alloc[BFloat16](items * tp * NR)  # (b, h) -> tp/2 key pairs x 64 columns x 2
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var s = Float32(scale)

        def pack(bh: Int) {var qb, var kb, var vb, var qp, var kp, var vp, var s, var t, var tp, var d}:
            var bi = bh // heads
            var h = bh % heads
            var row = alloc[BFloat16](NR)
            var r32 = row.bitcast[UInt32]()
            var kq = (kb + bh * tp * NR).bitcast[UInt32]()
            var vq = (vb + bh * tp * NR).bitcast[UInt16]()
            for j in range(t):
                var src = (bi * t + j) * d + h * NR
                round_bf16(qb + (bh * t + j) * NR, qp + src, NR, s)
                round_bf16(row, kp + src, NR, s)
                var panel = kq + (j // NR) * (NR // 2) * NR
                for p in range(NR // 2):
                    panel.store(p * NR + j % NR, r32.load(p))
                round_bf16(row, vp + src, NR, 1.0)
                var pair = vq + (j // 2) * 2 * NR
                var r16 = row.bitcast[UInt16]()
                for c in range(NR):
                    pair.store(2 * c + j % 2, r16.load(c))
            for j in range(t, tp):
                var panel = kq + (j // NR) * (NR // 2) * NR
                for p in range(NR // 2):
                    panel.store(p * NR + j % NR, UInt32(0))
                var pair = vq + (j // 2) * 2 * NR
                for c in range(NR):
                    pair.store(2 * c + j % 2, UInt16(0))
            row.free()

        parallelize(pack, items)
        comptime BLOCK = 10 * MR  # queries per work item
        var blocks = (t + BLOCK - 1) // BLOCK
        var op = y.unsafe_ptr()

        def attend(it: Int) {var qb, var kb, var vb, var op, var t, var tp, var d, var blocks}:
            var bh = it // blocks
            var bi = bh // heads
            var h = bh % heads
            var lo = (it % blocks) * BLOCK
            var hi = min(t, lo + BLOCK)
            var scores = alloc[Float32](MR * tp)
            var probs = alloc[BFloat16](MR * tp)
            var sums = alloc[Float32](MR)
            var o = alloc[Float32](MR * NR)
            var t16 = t - t % L
            for r0 in range(lo, hi, MR):
                var rows = min(MR, hi - r0)
                var qrows = qb + (bh * t + r0) * NR
                for pn in range(tp // NR):
                    rows_bf16[False](scores + pn * NR, tp, qrows, NR, kb + bh * tp * NR + pn * NR * NR, o, rows)
                for i in range(rows):
                    var srow = scores + i * tp
                    var prow = probs + i * tp
                    var m = range_max(srow, 0, t)
                    var pbits = prow.bitcast[UInt16]()
                    var acc = SIMD[DType.float32, L](0)
                    for c in range(0, t16, L):
                        var e = exp(srow.load[width=L](c) - m)
                        acc += e
                        pbits.store(c, bf16_bits[L](e))
                    var total = acc.reduce_add()
                    for c in range(t16, t):
                        var e = exp(srow.load[width=1](c) - m)
                        total += e[0]
                        pbits.store(c, bf16_bits[1](e))
                    for c in range(t, tp):
                        pbits.store(c, UInt16(0))
                    sums.store(i, total)
                rows_bf16[False](o, NR, probs, tp, vb + bh * tp * NR, o, rows)
                for i in range(rows):
                    var inv = 1.0 / sums.load(i)
                    var dst = op + (bi * t + r0 + i) * d + h * NR
                    for c in range(0, NR, L):
                        dst.store(c, o.load[width=L](i * NR + c) * inv)
            scores.free()
            probs.free()
            sums.free()
            o.free()

        parallelize(attend, items * blocks)
        qb.free()
        kb.free()
        vb.free()
