# whisper-max's own CPU kernels, registered as MAX custom ops. The converter lowers graph ops to
# them (converter/lower/custom.py); their machine code is compiled into the package's MEF, so
# loading a package needs neither this source nor a compile.
import extensibility
from extensibility import InputTensor, OutputTensor, _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import erf, exp, log, sqrt
from std.utils.numerics import neg_inf
from std.runtime import parallelism_level
from std.memory import bitcast, stack_allocation
from std.sys import inlined_assembly

comptime V = 16  # float32 lanes of one AVX-512 register


@extensibility.register("whisper_max.linear_rows")
struct LinearRows:
    """y (rows, n) = x (rows, k) @ w (n, k)^T + b (n), for a few rows (decoder steps).

    Matrix-vector work is bound by reading w: each weight row is loaded from memory once and
    multiplied with every row of x from cache, the n weight rows split across the runtime's
    workers. w is float32, or bfloat16 widened exactly to float32 as it is read; x, b and the
    sums are float32."""

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[rank=2, ...],
        b: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var n = w.dim_size(0)
        var k = w.dim_size(1)
        if x.dim_size(1) != k or b.dim_size(0) != n or y.dim_size(0) != rows or y.dim_size(1) != n:
            raise Error("whisper_max.linear_rows: operand shapes do not agree")
        _linear[w.dtype, PLAIN](y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), b.unsafe_ptr(), x.unsafe_ptr(), True, 1.0, rows, n, k)


# --- products of many rows in bfloat16 (encoder, cross K/V, prompts of a bfloat16 package) -------

comptime BF16 = DType.bfloat16
comptime NR = 64  # output columns of one panel: four float32 registers
comptime MR = 6  # rows of one register tile: 6 x 4 sums, 4 panel loads, 6 broadcasts


@always_inline
def _dot_bf16(acc: SIMD[DType.float32, V], a: SIMD[DType.uint32, V], b: SIMD[DType.uint32, V]) -> SIMD[DType.float32, V]:
    """acc[i] + a[2i] * b[2i] + a[2i+1] * b[2i+1] over the bfloat16 pairs whose bits a and b hold:
    AVX512_BF16's VDPBF16PS (products exact in float32, summed in float32). Inline assembly on
    integer registers: LLVM's intrinsic takes bfloat16 vectors, whose lowering aborts the compile
    on an Intel Xeon with AMX and AVX512_FP16 ("Do not know how to split this operator's
    operand!"); the instruction is the same."""
    return inlined_assembly["vdpbf16ps $2, $1, $0", SIMD[DType.float32, V], constraints="=v,v,v,0", has_side_effect=False](a, b, acc)


@always_inline
def _tile_bf16[mr: Int, biased: Bool, o: MutOrigin](
    y: UnsafePointer[Float32, o], ldy: Int, x: UnsafePointer[BFloat16, _], k: Int,
    panel: UnsafePointer[BFloat16, _], bias: UnsafePointer[Float32, _],
):
    """y[0:mr, 0:64] = x[0:mr, 0:k] (bfloat16 rows, k apart) times the packed panel (k/2 pairs
    of 64 columns, each column's two k values adjacent), plus bias[0:64] if `biased`. The
    mr x 64 sums stay in registers for the whole k."""
    var acc = stack_allocation[mr * 4 * V, Float32, alignment=64]()
    comptime for i in range(mr * 4):
        acc.store(i * V, SIMD[DType.float32, V](0))
    var x32 = x.bitcast[UInt32]()
    var panel32 = panel.bitcast[UInt32]()
    var kp = k // 2
    for p in range(kp):
        var bp = panel32 + p * NR  # 64 columns of one k pair: 64 uint32, each two bfloat16
        var b0 = bp.load[width=V](0)
        var b1 = bp.load[width=V](V)
        var b2 = bp.load[width=V](2 * V)
        var b3 = bp.load[width=V](3 * V)
        comptime for i in range(mr):
            var a = SIMD[DType.uint32, V](x32.load(i * kp + p))
            acc.store((4 * i) * V, _dot_bf16(acc.load[width=V]((4 * i) * V), a, b0))
            acc.store((4 * i + 1) * V, _dot_bf16(acc.load[width=V]((4 * i + 1) * V), a, b1))
            acc.store((4 * i + 2) * V, _dot_bf16(acc.load[width=V]((4 * i + 2) * V), a, b2))
            acc.store((4 * i + 3) * V, _dot_bf16(acc.load[width=V]((4 * i + 3) * V), a, b3))
    comptime for i in range(mr):
        comptime for j in range(4):
            comptime if biased:
                y.store(i * ldy + j * V, acc.load[width=V]((4 * i + j) * V) + bias.load[width=V](j * V))
            else:
                y.store(i * ldy + j * V, acc.load[width=V]((4 * i + j) * V))


def _rows_bf16[biased: Bool, o: MutOrigin](
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


@always_inline
def _bf16_bits[w: Int](x: SIMD[DType.float32, w]) -> SIMD[DType.uint16, w]:
    """The bits of x rounded to bfloat16, to nearest even, by integer arithmetic on its bits: what
    VCVTNEPS2BF16 gives for finite x. LLVM's own float32 -> bfloat16 vector conversion aborts
    the compile on some CPUs ("Do not know how to split this operator's operand!" on an Intel
    Xeon with AMX and AVX512_FP16), so bfloat16 values are only ever stored as their bits."""
    var u = bitcast[DType.uint32, w](x)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).cast[DType.uint16]()


def _round_bf16[o: MutOrigin](dst: UnsafePointer[BFloat16, o], src: UnsafePointer[Float32, _], n: Int, scale: Float32):
    """dst[0:n] = src[0:n] * scale rounded to bfloat16 (to nearest even)."""
    var bits = dst.bitcast[UInt16]()
    var n16 = n - n % V
    for i in range(0, n16, V):
        bits.store(i, _bf16_bits[V](src.load[width=V](i) * scale))
    for i in range(n16, n):
        bits.store(i, _bf16_bits[1](src.load[width=1](i) * scale))


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
            _round_bf16(xb + lo, xp + lo, min(m, (t + 1) * chunk) * k - lo, 1.0)

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
                _rows_bf16[True](yp + pn * NR, n, xb, k, panel, bp + pn * NR, m)
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
                _round_bf16(qb + (bh * t + j) * NR, qp + src, NR, s)
                _round_bf16(row, kp + src, NR, s)
                var panel = kq + (j // NR) * (NR // 2) * NR
                for p in range(NR // 2):
                    panel.store(p * NR + j % NR, r32.load(p))
                _round_bf16(row, vp + src, NR, 1.0)
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
            var t16 = t - t % V
            for r0 in range(lo, hi, MR):
                var rows = min(MR, hi - r0)
                var qrows = qb + (bh * t + r0) * NR
                for pn in range(tp // NR):
                    _rows_bf16[False](scores + pn * NR, tp, qrows, NR, kb + bh * tp * NR + pn * NR * NR, o, rows)
                for i in range(rows):
                    var srow = scores + i * tp
                    var prow = probs + i * tp
                    var m = _range_max(srow, 0, t)
                    var pbits = prow.bitcast[UInt16]()
                    var acc = SIMD[DType.float32, V](0)
                    for c in range(0, t16, V):
                        var e = exp(srow.load[width=V](c) - m)
                        acc += e
                        pbits.store(c, _bf16_bits[V](e))
                    var total = acc.reduce_add()
                    for c in range(t16, t):
                        var e = exp(srow.load[width=1](c) - m)
                        total += e[0]
                        pbits.store(c, _bf16_bits[1](e))
                    for c in range(t, tp):
                        pbits.store(c, UInt16(0))
                    sums.store(i, total)
                _rows_bf16[False](o, NR, probs, tp, vb + bh * tp * NR, o, rows)
                for i in range(rows):
                    var inv = 1.0 / sums.load(i)
                    var dst = op + (bi * t + r0 + i) * d + h * NR
                    for c in range(0, NR, V):
                        dst.store(c, o.load[width=V](i * NR + c) * inv)
            scores.free()
            probs.free()
            sums.free()
            o.free()

        parallelize(attend, items * blocks)
        qb.free()
        kb.free()
        vb.free()


# --- one decoder layer for a few rows, one new token each ---------------------------------------

comptime F32 = DType.float32


def _layer_norm(
    y: UnsafePointer[Float32, MutUntrackedOrigin], x: UnsafePointer[Float32, _], w: UnsafePointer[Float32, _],
    b: UnsafePointer[Float32, _], d: Int, eps: Float32,
):
    """y = (x - mean) / sqrt(var + eps) * w + b over d values (biased variance, two passes)."""
    var d16 = d - d % V
    var s = SIMD[F32, V](0)
    for c in range(0, d16, V):
        s += x.unsafe_load[width=V](c)
    var total = s.reduce_add()
    for c in range(d16, d):
        total += x.unsafe_load(c)
    var mean = total / Float32(d)
    var q = SIMD[F32, V](0)
    for c in range(0, d16, V):
        var t = x.unsafe_load[width=V](c) - mean
        q += t * t
    var sq = q.reduce_add()
    for c in range(d16, d):
        var t = x.unsafe_load(c) - mean
        sq += t * t
    var rstd = 1.0 / sqrt(sq / Float32(d) + eps)
    for c in range(0, d16, V):
        y.unsafe_store(c, (x.unsafe_load[width=V](c) - mean) * rstd * w.unsafe_load[width=V](c) + b.unsafe_load[width=V](c))
    for c in range(d16, d):
        y.unsafe_store(c, (x.unsafe_load(c) - mean) * rstd * w.unsafe_load(c) + b.unsafe_load(c))


@always_inline
def _wide[dt: DType](a: UnsafePointer[Scalar[dt], _], c: Int) -> SIMD[F32, V]:
    """a[c : c + 16] as float32: float32 as it is; bfloat16 widened exactly, its 16 bits made the
    upper half of a float32's (what a conversion does, without LLVM's bfloat16 vector lowering,
    which cannot split some widths)."""
    comptime if dt == DType.bfloat16:
        var bits = a.bitcast[UInt16]().unsafe_load[width=V](c).cast[DType.uint32]() << 16
        return bitcast[F32, V](bits)
    else:
        return a.unsafe_load[width=V](c).cast[F32]()


def _dot[dt: DType](a: UnsafePointer[Scalar[dt], _], x: UnsafePointer[Float32, _], k: Int) -> Float32:
    """sum(a[:k] * x[:k]) with a widened to float32: four vector sums over blocks of 64, then
    16-wide and single tails."""
    var k64 = k - k % 64
    var k16 = k - k % V
    var a0 = SIMD[F32, V](0)
    var a1 = SIMD[F32, V](0)
    var a2 = SIMD[F32, V](0)
    var a3 = SIMD[F32, V](0)
    for c in range(0, k64, 64):
        a0 += _wide(a, c) * x.unsafe_load[width=V](c)
        a1 += _wide(a, c + 16) * x.unsafe_load[width=V](c + 16)
        a2 += _wide(a, c + 32) * x.unsafe_load[width=V](c + 32)
        a3 += _wide(a, c + 48) * x.unsafe_load[width=V](c + 48)
    for c in range(k64, k16, V):
        a0 += _wide(a, c) * x.unsafe_load[width=V](c)
    var s = ((a0 + a1) + (a2 + a3)).reduce_add()
    for c in range(k16, k):
        s += a.unsafe_load(c).cast[F32]() * x.unsafe_load(c)
    return s


def _dot4[dt: DType](a: UnsafePointer[Scalar[dt], _], x: UnsafePointer[Float32, _], k: Int) -> SIMD[F32, 4]:
    """sum(a[:k] * x[i * k : i * k + k]) for four consecutive rows i of x: each 16-wide block of a
    is loaded and widened once for the four (a beam step's rows share every weight row). Each
    row is summed exactly as _dot sums it (the same blocks, accumulators, order and tail), so a
    row's result does not depend on the rows it is decoded with: alone, in a group of four, or
    among the remainder."""
    var k64 = k - k % 64
    var k16 = k - k % V
    var x1 = x + k
    var x2 = x + 2 * k
    var x3 = x + 3 * k
    var p0 = SIMD[F32, V](0)
    var p1 = SIMD[F32, V](0)
    var p2 = SIMD[F32, V](0)
    var p3 = SIMD[F32, V](0)
    var q0 = SIMD[F32, V](0)
    var q1 = SIMD[F32, V](0)
    var q2 = SIMD[F32, V](0)
    var q3 = SIMD[F32, V](0)
    var r0 = SIMD[F32, V](0)
    var r1 = SIMD[F32, V](0)
    var r2 = SIMD[F32, V](0)
    var r3 = SIMD[F32, V](0)
    var t0 = SIMD[F32, V](0)
    var t1 = SIMD[F32, V](0)
    var t2 = SIMD[F32, V](0)
    var t3 = SIMD[F32, V](0)
    for c in range(0, k64, 64):
        var w0 = _wide(a, c)
        var w1 = _wide(a, c + 16)
        var w2 = _wide(a, c + 32)
        var w3 = _wide(a, c + 48)
        p0 += w0 * x.unsafe_load[width=V](c)
        p1 += w1 * x.unsafe_load[width=V](c + 16)
        p2 += w2 * x.unsafe_load[width=V](c + 32)
        p3 += w3 * x.unsafe_load[width=V](c + 48)
        q0 += w0 * x1.unsafe_load[width=V](c)
        q1 += w1 * x1.unsafe_load[width=V](c + 16)
        q2 += w2 * x1.unsafe_load[width=V](c + 32)
        q3 += w3 * x1.unsafe_load[width=V](c + 48)
        r0 += w0 * x2.unsafe_load[width=V](c)
        r1 += w1 * x2.unsafe_load[width=V](c + 16)
        r2 += w2 * x2.unsafe_load[width=V](c + 32)
        r3 += w3 * x2.unsafe_load[width=V](c + 48)
        t0 += w0 * x3.unsafe_load[width=V](c)
        t1 += w1 * x3.unsafe_load[width=V](c + 16)
        t2 += w2 * x3.unsafe_load[width=V](c + 32)
        t3 += w3 * x3.unsafe_load[width=V](c + 48)
    for c in range(k64, k16, V):
        var w = _wide(a, c)
        p0 += w * x.unsafe_load[width=V](c)
        q0 += w * x1.unsafe_load[width=V](c)
        r0 += w * x2.unsafe_load[width=V](c)
        t0 += w * x3.unsafe_load[width=V](c)
    var s0 = ((p0 + p1) + (p2 + p3)).reduce_add()
    var s1 = ((q0 + q1) + (q2 + q3)).reduce_add()
    var s2 = ((r0 + r1) + (r2 + r3)).reduce_add()
    var s3 = ((t0 + t1) + (t2 + t3)).reduce_add()
    for c in range(k16, k):
        var wc = a.unsafe_load(c).cast[F32]()
        s0 += wc * x.unsafe_load(c)
        s1 += wc * x1.unsafe_load(c)
        s2 += wc * x2.unsafe_load(c)
        s3 += wc * x3.unsafe_load(c)
    return SIMD[F32, 4](s0, s1, s2, s3)


comptime PLAIN = 0  # y = x @ w^T + b
comptime SCALED = 1  # y = (x @ w^T + b) * scale
comptime GELU = 2  # y = gelu(x @ w^T + b), exact (erf)
comptime RESIDUAL = 3  # y = res + (x @ w^T + b)


@always_inline
def _store[mode: Int, o: MutOrigin](y: UnsafePointer[Float32, o], res: UnsafePointer[Float32, _], r: Int, j: Int, n: Int, sum: Float32, scale: Float32):
    """y[r, j] = the epilogue `mode` of sum (x @ w^T + b at row r, column j)."""
    var s = sum
    comptime if mode == SCALED:
        s = s * scale
    elif mode == GELU:
        s = 0.5 * s * (1.0 + erf(s * 0.7071067811865476))
    elif mode == RESIDUAL:
        s = res.unsafe_load(r * n + j) + s
    y.unsafe_store(r * n + j, s)


def _weight_row[dt: DType, mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], row: UnsafePointer[Scalar[dt], _], bias: Float32,
    res: UnsafePointer[Float32, _], scale: Float32, rows: Int, j: Int, n: Int, k: Int,
):
    """Column j of y (rows, n): weight row `row` (k) times every row of x (rows, k), plus bias,
    through the epilogue `mode`; four rows per pass over the weight row, then one at a time."""
    var r4 = rows - rows % 4
    for r0 in range(0, r4, 4):
        var s4 = _dot4(row, x + r0 * k, k)
        for i in range(4):
            _store[mode](y, res, r0 + i, j, n, s4[i] + bias, scale)
    for r in range(r4, rows):
        _store[mode](y, res, r, j, n, _dot(row, x + r * k, k) + bias, scale)


def _linear[dt: DType, mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], w: UnsafePointer[Scalar[dt], _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
):
    """rows x (k) times w (n, k)^T into y (rows, n), with the epilogue `mode`; the weight rows
    are split across the workers and each is read once for all rows."""
    var tasks = max(1, min(parallelism_level(), n // 64))
    var chunk = (n + tasks - 1) // tasks

    def work(t: Int) {var y, var x, var w, var b, var res, var has_bias, var scale, var rows, var n, var k, var chunk}:
        for j in range(t * chunk, min(n, (t + 1) * chunk)):
            _weight_row[dt, mode](y, x, w + j * k, b.unsafe_load(j) if has_bias else Float32(0), res, scale, rows, j, n, k)

    parallelize(work, tasks)


def _qkv[dq: DType, dk: DType, dv: DType](
    qkv: UnsafePointer[Float32, MutUntrackedOrigin], x: UnsafePointer[Float32, _],
    wq: UnsafePointer[Scalar[dq], _], bq: UnsafePointer[Float32, _], wk: UnsafePointer[Scalar[dk], _],
    wv: UnsafePointer[Scalar[dv], _], bv: UnsafePointer[Float32, _], scale: Float32, rows: Int, d: Int,
):
    """qkv (3, rows, d) = q = (x wq^T + bq) * scale, k = (x wk^T) * scale, v = x wv^T + bv: the
    three products of the block's input as one pass over the three weights (one dispatch to the
    workers instead of three)."""
    var n = 3 * d
    var tasks = max(1, min(parallelism_level(), n // 64))
    var chunk = (n + tasks - 1) // tasks

    def work(t: Int) {var qkv, var x, var wq, var bq, var wk, var wv, var bv, var scale, var rows, var d, var n, var chunk}:
        for jj in range(t * chunk, min(n, (t + 1) * chunk)):
            var which = jj // d
            var j = jj % d
            var dst = qkv + which * rows * d  # q, k or v (rows, d); bq stands in for the unused residual
            if which == 0:
                _weight_row[dq, SCALED](dst, x, wq + j * d, bq.unsafe_load(j), bq, scale, rows, j, d, d)
            elif which == 1:
                _weight_row[dk, SCALED](dst, x, wk + j * d, Float32(0), bq, scale, rows, j, d, d)
            else:
                _weight_row[dv, PLAIN](dst, x, wv + j * d, bv.unsafe_load(j), bq, scale, rows, j, d, d)

    parallelize(work, tasks)


def _softmax(s: UnsafePointer[Float32, MutUntrackedOrigin], n: Int):
    """s[:n] = softmax(s[:n]) in place: exp(s - max) / sum, 16 lanes at a time (the cross
    attention of a beam step takes ~45k exponentials per layer)."""
    var n16 = n - n % V
    var m = _range_max(s, 0, n)
    var tv = SIMD[F32, V](0)
    for i in range(0, n16, V):
        var e = exp(s.unsafe_load[width=V](i) - m)
        s.unsafe_store(i, e)
        tv += e
    var total = tv.reduce_add()
    for i in range(n16, n):
        var e = exp(s.unsafe_load(i) - m)
        s.unsafe_store(i, e)
        total += e
    for i in range(0, n16, V):
        s.unsafe_store(i, s.unsafe_load[width=V](i) / total)
    for i in range(n16, n):
        s.unsafe_store(i, s.unsafe_load(i) / total)


def _self_attention(
    dst: UnsafePointer[Float32, MutUntrackedOrigin], q: UnsafePointer[Float32, _],
    kc: UnsafePointer[Float32, _], vc: UnsafePointer[Float32, _], scores: UnsafePointer[Float32, MutUntrackedOrigin],
    lineage: UnsafePointer[Int32, _], has_lineage: Bool, pos: UnsafePointer[Int, MutUntrackedOrigin], rows: Int, heads: Int, hd: Int, cap: Int,
):
    """Each row r and head attends to the first pos[r] + 1 positions of the caches (slots,
    heads, cap, hd): position i of row r is in cache slot lineage[r, i] (rows, cap) when
    `has_lineage`, else in slot r; q (rows, heads * hd) scaled, keys stored scaled; out (rows,
    heads * hd), the value rows weighted by the softmax, summed in position order."""
    def work(t: Int) {var dst, var q, var kc, var vc, var scores, var lineage, var has_lineage, var pos, var heads, var hd, var cap}:
        var r = t // heads
        var h = t % heads
        var qh = q + (r * heads + h) * hd
        var s = scores + t * cap
        var o = dst + (r * heads + h) * hd
        var line = lineage + r * cap
        var length = pos.unsafe_load(r) + 1

        @always_inline
        def at(i: Int) {var line, var has_lineage, var r, var heads, var h, var cap, var hd} -> Int:
            """Offset of position i's key (and value) row in the caches."""
            var src = Int(line.unsafe_load(i)) if has_lineage else r
            return ((src * heads + h) * cap + i) * hd

        for i in range(length):
            s.unsafe_store(i, _dot(kc + at(i), qh, hd))
        _softmax(s, length)
        var hd16 = hd - hd % V
        for c in range(hd):
            o.unsafe_store(c, Float32(0))
        for i in range(length):
            var w = s.unsafe_load(i)
            var row = vc + at(i)
            for c in range(0, hd16, V):
                o.unsafe_store(c, o.unsafe_load[width=V](c) + w * row.unsafe_load[width=V](c))
            for c in range(hd16, hd):
                o.unsafe_store(c, o.unsafe_load(c) + w * row.unsafe_load(c))

    parallelize(work, rows * heads)


def _cross_attention(
    dst: UnsafePointer[Float32, MutUntrackedOrigin], q: UnsafePointer[Float32, _],
    kt: UnsafePointer[Float32, _], v: UnsafePointer[Float32, _], scores: UnsafePointer[Float32, MutUntrackedOrigin],
    order: UnsafePointer[Int, MutUntrackedOrigin], starts: UnsafePointer[Int, MutUntrackedOrigin], wins: UnsafePointer[Int, MutUntrackedOrigin],
    groups: Int, heads: Int, hd: Int, frames: Int,
):
    """Each row and head attends to its window's keys kt (windows, heads, hd, frames), stored
    scaled and transposed, and values v (windows, heads, frames, hd). The rows are in `groups`
    groups, one per window: group g is window wins[g] and the rows order[starts[g] ..<
    starts[g + 1]]. The rows of one window are done together, so each row of its keys and of its
    values is read from memory once for all of them; every row's sums run in the same order as
    alone."""
    var tail = frames - frames % V

    def work(t: Int) {var dst, var q, var kt, var v, var scores, var order, var starts, var wins, var heads, var hd, var frames, var tail}:
        var g = t // heads
        var h = t % heads
        var w = wins.unsafe_load(g)
        var kh = kt + (w * heads + h) * hd * frames
        var lo = starts.unsafe_load(g)
        var hi = starts.unsafe_load(g + 1)
        for j in range(lo, hi):
            var sr = scores + (order.unsafe_load(j) * heads + h) * frames
            for l in range(frames):
                sr.unsafe_store(l, Float32(0))
        # scores += q[c] * keys[c, :], c ascending: each row of keys is streamed once, in order
        # (a block of frames across all hd rows at once is hd strided streams, too many for the
        # prefetchers), and every score sums its hd products in the same order as a dot product
        for c in range(hd):
            var krow = kh + c * frames
            for j in range(lo, hi):
                var r = order.unsafe_load(j)
                var qc = (q + (r * heads + h) * hd).unsafe_load(c)
                var sr = scores + (r * heads + h) * frames
                for l in range(0, tail, V):
                    sr.unsafe_store(l, sr.unsafe_load[width=V](l) + qc * krow.unsafe_load[width=V](l))
                for l in range(tail, frames):
                    sr.unsafe_store(l, sr.unsafe_load(l) + qc * krow.unsafe_load(l))
        for j in range(lo, hi):
            _softmax(scores + (order.unsafe_load(j) * heads + h) * frames, frames)
        var vh = v + (w * heads + h) * frames * hd
        var hd16 = hd - hd % V
        for j in range(lo, hi):
            for c in range(hd):
                (dst + (order.unsafe_load(j) * heads + h) * hd).unsafe_store(c, Float32(0))
        for i in range(frames):
            var row = vh + i * hd
            for j in range(lo, hi):
                var r = order.unsafe_load(j)
                var p = (scores + (r * heads + h) * frames).unsafe_load(i)
                var o = dst + (r * heads + h) * hd
                for c in range(0, hd16, V):
                    o.unsafe_store(c, o.unsafe_load[width=V](c) + p * row.unsafe_load[width=V](c))
                for c in range(hd16, hd):
                    o.unsafe_store(c, o.unsafe_load(c) + p * row.unsafe_load(c))

    parallelize(work, groups * heads)


@extensibility.register("whisper_max.decoder_layer")
struct DecoderLayer:
    """One residual attention block of Whisper's text decoder for `rows` rows, one new token
    each, row r at cache position position[r] (`position` holds one value for every row, or one
    per row):

        x1 = x + out(self_attention(ln1(x)))      keys and values of the new token written into
                                                   the caches (slots, heads, capacity, hd) first
        x2 = x1 + cross_out(cross_attention(ln2(x1)))   over the row's window's keys and values
        y  = x2 + fc2(gelu(fc1(ln3(x2))))

    as openai-whisper computes it: q and k scaled by `scale` (hd ** -0.25) after their
    products, keys stored scaled; exact GELU; float32 throughout.

    Where rows keep their state: without a lineage, row r is cache slot r (slots == rows). With
    `lineage` (rows, capacity) int32, position i of row r is in slot lineage[r, i], and the new
    token is written into slot lineage[r, position[r]]: beam search reorders rows after every
    step by rewriting this map instead of moving caches, and an engine decoding rows of many
    streams keeps each row's positions in slots of a pool. No two rows may write the same
    (slot, position). Which window a row reads: `window` (rows) int32 names its window in the
    cross keys/values (windows, ...); without it there is one window for all rows or one per row.
    Weight matrices are float32 or bfloat16 (widened exactly as they are read). One kernel
    instead of ~40 graph ops: the step is bound by reading weights, and each of those ops paid a
    launch."""

    @staticmethod
    def execute[target: StaticString, heads: Int, scale: Float64, eps: Float64](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        kc: MutableInputTensor[dtype=DType.float32, rank=4, ...],
        vc: MutableInputTensor[dtype=DType.float32, rank=4, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        position: InputTensor[dtype=DType.int64, rank=1, ...],
        ln1_w: InputTensor[dtype=DType.float32, rank=1, ...],
        ln1_b: InputTensor[dtype=DType.float32, rank=1, ...],
        wq: InputTensor[rank=2, ...],
        bq: InputTensor[dtype=DType.float32, rank=1, ...],
        wk: InputTensor[rank=2, ...],
        wv: InputTensor[rank=2, ...],
        bv: InputTensor[dtype=DType.float32, rank=1, ...],
        wo: InputTensor[rank=2, ...],
        bo: InputTensor[dtype=DType.float32, rank=1, ...],
        ln2_w: InputTensor[dtype=DType.float32, rank=1, ...],
        ln2_b: InputTensor[dtype=DType.float32, rank=1, ...],
        wcq: InputTensor[rank=2, ...],
        bcq: InputTensor[dtype=DType.float32, rank=1, ...],
        wco: InputTensor[rank=2, ...],
        bco: InputTensor[dtype=DType.float32, rank=1, ...],
        ln3_w: InputTensor[dtype=DType.float32, rank=1, ...],
        ln3_b: InputTensor[dtype=DType.float32, rank=1, ...],
        w1: InputTensor[rank=2, ...],
        b1: InputTensor[dtype=DType.float32, rank=1, ...],
        w2: InputTensor[rank=2, ...],
        b2: InputTensor[dtype=DType.float32, rank=1, ...],
        ckt: InputTensor[dtype=DType.float32, rank=4, ...],
        cv: InputTensor[dtype=DType.float32, rank=4, ...],
        lineage: InputTensor[dtype=DType.int32, rank=2, ...],
        window: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var d = x.dim_size(1)
        var hd = d // heads
        var slots = kc.dim_size(0)
        var cap = kc.dim_size(2)
        var f = w1.dim_size(0)
        var windows = ckt.dim_size(0)
        var frames = ckt.dim_size(3)
        var has_lineage = lineage.dim_size(0) != 0
        var has_window = window.dim_size(0) != 0
        if hd * heads != d:
            raise Error("whisper_max.decoder_layer: heads * head width != d")
        if kc.dim_size(1) != heads or kc.dim_size(3) != hd or vc.dim_size(0) != slots or vc.dim_size(2) != cap:
            raise Error("whisper_max.decoder_layer: the caches are not (slots, heads, capacity, head width)")
        if not has_lineage and slots != rows:
            raise Error("whisper_max.decoder_layer: caches of another number of rows than x, and no lineage to map rows to them")
        if ckt.dim_size(2) != hd or cv.dim_size(0) != windows or cv.dim_size(2) != frames:
            raise Error("whisper_max.decoder_layer: cross keys/values are not (windows, heads, hd, frames) / (.., frames, hd)")
        if not has_window and windows != 1 and windows != rows:
            raise Error("whisper_max.decoder_layer: cross keys/values for neither one window nor one per row, and no window input")
        if has_window and window.dim_size(0) != rows:
            raise Error("whisper_max.decoder_layer: window is not one index per row")
        if position.dim_size(0) != 1 and position.dim_size(0) != rows:
            raise Error("whisper_max.decoder_layer: position is neither one value nor one per row")
        if has_lineage and (lineage.dim_size(0) != rows or lineage.dim_size(1) != cap):
            raise Error("whisper_max.decoder_layer: lineage is not (rows, capacity)")
        # per row: position, the slot it writes, its window; the rows grouped by window
        var ints = alloc[Int](4 * rows + 3 * windows + 1)
        var pos = ints  # rows
        var dst_slot = pos + rows  # rows
        var win = dst_slot + rows  # rows
        var order = win + rows  # rows
        var wins = order + rows  # windows: each group's window
        var count = wins + windows  # windows
        var starts = count + windows  # groups + 1 <= windows + 1
        var per_row = position.dim_size(0) == rows
        var lp = lineage.unsafe_ptr()
        for r in range(rows):
            var t = Int(position.unsafe_ptr().unsafe_load(r if per_row else 0))
            if t < 0 or t >= cap:
                ints.free()
                raise Error("whisper_max.decoder_layer: position outside the caches")
            pos.unsafe_store(r, t)
            dst_slot.unsafe_store(r, Int(lp.unsafe_load(r * cap + t)) if has_lineage else r)
            if has_lineage:
                for i in range(t + 1):
                    var src = Int(lp.unsafe_load(r * cap + i))
                    if src < 0 or src >= slots:
                        ints.free()
                        raise Error("whisper_max.decoder_layer: lineage names a slot outside the caches")
            var w = Int(window.unsafe_ptr().unsafe_load(r)) if has_window else (0 if windows == 1 else r)
            if w < 0 or w >= windows:
                ints.free()
                raise Error("whisper_max.decoder_layer: window outside the cross keys/values")
            win.unsafe_store(r, w)
        for r in range(rows):
            for o in range(r):
                if dst_slot.unsafe_load(o) == dst_slot.unsafe_load(r) and pos.unsafe_load(o) == pos.unsafe_load(r):
                    ints.free()
                    raise Error("whisper_max.decoder_layer: two rows write the same cache slot and position")
        # a counting sort of the rows by window: groups in window order, rows in row order
        for w in range(windows):
            count.unsafe_store(w, 0)
        for r in range(rows):
            count.unsafe_store(win.unsafe_load(r), count.unsafe_load(win.unsafe_load(r)) + 1)
        var groups = 0
        var at = 0
        for w in range(windows):
            var c = count.unsafe_load(w)
            count.unsafe_store(w, at)  # where window w's rows start in `order`
            if c > 0:
                wins.unsafe_store(groups, w)
                starts.unsafe_store(groups, at)
                groups += 1
            at += c
        starts.unsafe_store(groups, rows)
        for r in range(rows):
            var w = win.unsafe_load(r)
            order.unsafe_store(count.unsafe_load(w), r)
            count.unsafe_store(w, count.unsafe_load(w) + 1)

        var s = Float32(scale)
        var e = Float32(eps)
        var rd = rows * d
        var scratch = alloc[Float32](7 * rd + rows * f + rows * heads * max(cap, frames))
        var h = scratch
        var q = h + rd
        var kn = q + rd
        var vn = kn + rd
        var att = vn + rd
        var x1 = att + rd
        var x2 = x1 + rd
        var hid = x2 + rd
        var sc = hid + rows * f
        var kp = kc.unsafe_ptr()
        var vp = vc.unsafe_ptr()
        var xp = x.unsafe_ptr()

        for r in range(rows):
            _layer_norm(h + r * d, xp + r * d, ln1_w.unsafe_ptr(), ln1_b.unsafe_ptr(), d, e)
        _qkv[wq.dtype, wk.dtype, wv.dtype](q, h, wq.unsafe_ptr(), bq.unsafe_ptr(), wk.unsafe_ptr(), wv.unsafe_ptr(), bv.unsafe_ptr(), s, rows, d)
        for r in range(rows):
            for i in range(heads):
                var dst = ((dst_slot.unsafe_load(r) * heads + i) * cap + pos.unsafe_load(r)) * hd
                for c in range(hd):
                    (kp + dst).unsafe_store(c, (kn + r * d + i * hd).unsafe_load(c))
                    (vp + dst).unsafe_store(c, (vn + r * d + i * hd).unsafe_load(c))
        _self_attention(att, q, kp, vp, sc, lp, has_lineage, pos, rows, heads, hd, cap)
        _linear[wo.dtype, RESIDUAL](x1, att, wo.unsafe_ptr(), bo.unsafe_ptr(), xp, True, s, rows, d, d)

        for r in range(rows):
            _layer_norm(h + r * d, x1 + r * d, ln2_w.unsafe_ptr(), ln2_b.unsafe_ptr(), d, e)
        _linear[wcq.dtype, SCALED](q, h, wcq.unsafe_ptr(), bcq.unsafe_ptr(), xp, True, s, rows, d, d)
        _cross_attention(att, q, ckt.unsafe_ptr(), cv.unsafe_ptr(), sc, order, starts, wins, groups, heads, hd, frames)
        _linear[wco.dtype, RESIDUAL](x2, att, wco.unsafe_ptr(), bco.unsafe_ptr(), x1, True, s, rows, d, d)

        for r in range(rows):
            _layer_norm(h + r * d, x2 + r * d, ln3_w.unsafe_ptr(), ln3_b.unsafe_ptr(), d, e)
        _linear[w1.dtype, GELU](hid, h, w1.unsafe_ptr(), b1.unsafe_ptr(), xp, True, s, rows, f, d)
        _linear[w2.dtype, RESIDUAL](y.unsafe_ptr(), hid, w2.unsafe_ptr(), b2.unsafe_ptr(), x2, True, s, rows, d, f)
        scratch.free()
        ints.free()


# --- token selection after a decoder call -------------------------------------------------------

comptime RULES = 9  # per row: four banned ranges [lo, hi), then timestamp_begin (0: no timestamp rule)


def _fill(s: UnsafePointer[Float32, MutUntrackedOrigin], lo: Int, hi: Int, v: Float32):
    for i in range(lo, hi):
        s.unsafe_store(i, v)


def _range_max(s: UnsafePointer[Float32, _], lo: Int, hi: Int) -> Float32:
    """max(s[lo:hi]) (-inf when empty), 16 lanes at a time."""
    var v16 = lo + max(0, hi - lo) // V * V
    var mv = SIMD[F32, V](neg_inf[F32]())
    for i in range(lo, v16, V):
        mv = max(mv, s.unsafe_load[width=V](i))
    var m = mv.reduce_max()
    for i in range(v16, hi):
        m = max(m, s.unsafe_load(i))
    return m


def _log_sum_exp(s: UnsafePointer[Float32, _], lo: Int, hi: Int, m: Float32, lse: Float32, top: Float32) -> Float32:
    """log(sum(exp(((s[lo:hi] - m) - lse) - top))), 16 lanes at a time: with lse = top = 0 the
    log of softmax's sum (subtracting 0 is exact); with the log-probabilities' lse and their max
    `top`, logsumexp of those log-probabilities less `top`."""
    var v16 = lo + max(0, hi - lo) // V * V
    var tv = SIMD[F32, V](0)
    for i in range(lo, v16, V):
        tv += exp(((s.unsafe_load[width=V](i) - m) - lse) - top)
    var total = tv.reduce_add()
    for i in range(v16, hi):
        total += exp(((s.unsafe_load(i) - m) - lse) - top)
    return log(total)


@always_inline
def _insert(idx: UnsafePointer[Int, MutUntrackedOrigin], val: UnsafePointer[Float32, MutUntrackedOrigin], count: Int, k: Int, i: Int, v: Float32) -> Int:
    """Token i of value v into the list idx/val (count <= k entries, largest first; an equal
    value goes after those already there); the new count."""
    if count == k and not (v > val.unsafe_load(k - 1)):
        return count
    var pos = count if count < k else k - 1
    while pos > 0 and val.unsafe_load(pos - 1) < v:
        idx.unsafe_store(pos, idx.unsafe_load(pos - 1))
        val.unsafe_store(pos, val.unsafe_load(pos - 1))
        pos -= 1
    idx.unsafe_store(pos, i)
    val.unsafe_store(pos, v)
    return min(count + 1, k)


def _select_row[o: MutOrigin](
    dst: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], s: UnsafePointer[Float32, MutUntrackedOrigin],
    rule: UnsafePointer[Int32, _], suppress: UnsafePointer[Int32, _], n_suppress: Int, temperature: Float32, u: Float32,
    idx: UnsafePointer[Int, MutUntrackedOrigin], val: UnsafePointer[Float32, MutUntrackedOrigin], n: Int, k: Int,
):
    """One row of SelectTokens: x (n) logits -> dst (k, 2) (token, log-probability) pairs."""
    var ninf = neg_inf[F32]()
    var n16 = n - n % V
    var finite = SIMD[F32, V](0)  # stays 0 unless a logit is NaN or infinite
    for i in range(0, n16, V):
        var v = x.unsafe_load[width=V](i)
        finite += v * 0
        s.unsafe_store(i, v)
    var finite_tail = Float32(0)
    for i in range(n16, n):
        finite_tail += x.unsafe_load(i) * 0
        s.unsafe_store(i, x.unsafe_load(i))
    var bad = finite.reduce_add() + finite_tail
    for j in range(4):
        var lo = max(0, min(n, Int(rule.unsafe_load(2 * j))))
        var hi = max(0, min(n, Int(rule.unsafe_load(2 * j + 1))))
        _fill(s, lo, hi, ninf)
    for j in range(n_suppress):
        s.unsafe_store(Int(suppress.unsafe_load(j)), ninf)
    var tb = Int(rule.unsafe_load(2 * 4))
    if tb <= 0 or tb >= n:
        tb = 0
    # log_softmax(s) = (s - m) - lse: m the max, lse = log(sum(exp(s - m)))
    var text_max = _range_max(s, 0, tb)
    var ts_max = _range_max(s, tb, n)
    var m = max(text_max, ts_max)
    var lse = _log_sum_exp(s, 0, n, m, 0, 0) + bad  # NaN (so every log-probability is) when a logit is not finite
    if tb > 0:
        # openai-whisper's ApplyTimestampRules, last: if the timestamps' probabilities together
        # (logsumexp of their log-probabilities) outweigh the most likely text token, text is banned
        var ts_top = (ts_max - m) - lse
        var ts = ts_top
        if ts_top > ninf:
            ts = ts_top + _log_sum_exp(s, tb, n, m, lse, ts_top)
        if ts > (text_max - m) - lse:
            _fill(s, 0, tb, ninf)
            m = ts_max
            lse = _log_sum_exp(s, 0, n, m, 0, 0) + bad
    if temperature > 0:
        # a sample of softmax(logits / temperature): the first token whose running sum of
        # probabilities passes u * total (float64 sums, in token order)
        var top = m / temperature
        var total = Float64(0)
        for i in range(n):
            total += Float64(exp(s.unsafe_load(i) / temperature - top))
        var target = Float64(u) * total
        var run = Float64(0)
        var pick = -1
        for i in range(n):
            var p = Float64(exp(s.unsafe_load(i) / temperature - top))
            if p > 0:
                pick = i  # the last token with a probability, if rounding leaves the sum short
                run += p
                if run > target:
                    break
        dst.unsafe_store(0, Float32(pick))
        dst.unsafe_store(1, (s.unsafe_load(max(pick, 0)) - m) - lse if pick >= 0 else ninf)
        for j in range(1, k):
            dst.unsafe_store(2 * j, Float32(-1))
            dst.unsafe_store(2 * j + 1, ninf)
        return
    # the k largest, largest first, ties to the lower token: a stable sort's first k. A block of
    # 16 is looked at one by one only when one of them would enter the list
    var count = 0
    for c in range(0, n16, V):
        if count < k or s.unsafe_load[width=V](c).reduce_max() > val.unsafe_load(k - 1):
            for i in range(c, c + V):
                count = _insert(idx, val, count, k, i, s.unsafe_load(i))
    for i in range(n16, n):
        count = _insert(idx, val, count, k, i, s.unsafe_load(i))
    for j in range(k):
        var t = idx.unsafe_load(j)
        dst.unsafe_store(2 * j, Float32(t))
        dst.unsafe_store(2 * j + 1, (s.unsafe_load(t) - m) - lse)


@extensibility.register("whisper_max.select_tokens")
struct SelectTokens:
    """The next-token choice of openai-whisper's decoding, per row of logits (rows, n), so that a
    step hands back k (token, log-probability) pairs per row instead of n logits.

    The logits are filtered as openai-whisper's logit filters leave them: every token in
    `suppress` (SuppressTokens, no-timestamps) and, per row, four token ranges [lo, hi) in
    `rules` (rows, 9) (SuppressBlank at the first sampled position; ApplyTimestampRules' pairing,
    monotonic and initial-timestamp rules, which the caller works out from the row's tokens) are
    set to -inf; then, when rules[r, 8] (timestamp_begin) is > 0, text is banned too if the
    timestamps' summed probability outweighs any text token's. The log-probabilities are
    log_softmax of what is left ((x - max) - log(sum(exp(x - max))), float32).

    `sampling` (rows, 2) is (temperature, u) per row. Temperature 0: choice (rows, k, 2) holds the
    k highest-scoring tokens, best first, ties to the lower token (slot 0 is the greedy
    choice, the argmax of the filtered logits; beam search takes the k). Temperature > 0: slot
    0 is a sample of softmax(logits / temperature) drawn with u in [0, 1); the other slots are
    (-1, -inf). Tokens are stored as float32 (exact below 2^24). A logit that is NaN or infinite
    makes the row's log-probabilities NaN, which the caller reports."""

    @staticmethod
    def execute[target: StaticString](
        choice: OutputTensor[dtype=DType.float32, rank=3, ...],
        logits: InputTensor[dtype=DType.float32, rank=2, ...],
        rules: InputTensor[dtype=DType.int32, rank=2, ...],
        suppress: InputTensor[dtype=DType.int32, rank=1, ...],
        sampling: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = logits.dim_size(0)
        var n = logits.dim_size(1)
        var k = choice.dim_size(1)
        var n_suppress = suppress.dim_size(0)
        if choice.dim_size(0) != rows or choice.dim_size(2) != 2 or k < 1:
            raise Error("whisper_max.select_tokens: choice is not (rows, k >= 1, 2)")
        if rules.dim_size(0) != rows or rules.dim_size(1) != RULES or sampling.dim_size(0) != rows or sampling.dim_size(1) != 2:
            raise Error("whisper_max.select_tokens: rules (rows, 9) and sampling (rows, 2) expected")
        if k > n:
            raise Error("whisper_max.select_tokens: more candidates asked for than there are tokens")
        var sp = suppress.unsafe_ptr()
        for j in range(n_suppress):
            if Int(sp.unsafe_load(j)) < 0 or Int(sp.unsafe_load(j)) >= n:
                raise Error("whisper_max.select_tokens: a suppressed token is outside the vocabulary")
        var scratch = alloc[Float32](rows * (n + k))
        var slots = alloc[Int](rows * k)
        var op = choice.unsafe_ptr()
        var xp = logits.unsafe_ptr()
        var rp = rules.unsafe_ptr()
        var tp = sampling.unsafe_ptr()

        def work(r: Int) {var op, var xp, var rp, var sp, var tp, var scratch, var slots, var n_suppress, var n, var k}:
            _select_row(
                op + r * k * 2, xp + r * n, scratch + r * (n + k), rp + r * RULES, sp, n_suppress,
                tp.unsafe_load(2 * r), tp.unsafe_load(2 * r + 1), slots + r * k, scratch + r * (n + k) + n, n, k,
            )

        parallelize(work, rows)
        scratch.free()
        slots.free()
