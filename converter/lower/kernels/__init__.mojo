# whisper-max's own CPU kernels, registered as MAX custom ops. The converter lowers graph ops to
# them (converter/lower/custom.py); their machine code is compiled into the package's MEF, so
# loading a package needs neither this source nor a compile.
import extensibility
from extensibility import InputTensor, OutputTensor, _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import erf, exp, sqrt
from std.runtime import parallelism_level

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
        a0 += a.unsafe_load[width=V](c).cast[F32]() * x.unsafe_load[width=V](c)
        a1 += a.unsafe_load[width=V](c + 16).cast[F32]() * x.unsafe_load[width=V](c + 16)
        a2 += a.unsafe_load[width=V](c + 32).cast[F32]() * x.unsafe_load[width=V](c + 32)
        a3 += a.unsafe_load[width=V](c + 48).cast[F32]() * x.unsafe_load[width=V](c + 48)
    for c in range(k64, k16, V):
        a0 += a.unsafe_load[width=V](c).cast[F32]() * x.unsafe_load[width=V](c)
    var s = ((a0 + a1) + (a2 + a3)).reduce_add()
    for c in range(k16, k):
        s += a.unsafe_load(c).cast[F32]() * x.unsafe_load(c)
    return s


def _dot4[dt: DType](a: UnsafePointer[Scalar[dt], _], x: UnsafePointer[Float32, _], k: Int) -> SIMD[F32, 4]:
    """sum(a[:k] * x[i * k : i * k + k]) for four consecutive rows i of x: each 16-wide block of a
    is loaded and widened once for the four (a beam step's rows share every weight row)."""
    var k16 = k - k % V
    var a0 = SIMD[F32, V](0)
    var a1 = SIMD[F32, V](0)
    var a2 = SIMD[F32, V](0)
    var a3 = SIMD[F32, V](0)
    for c in range(0, k16, V):
        var wv = a.unsafe_load[width=V](c).cast[F32]()
        a0 += wv * x.unsafe_load[width=V](c)
        a1 += wv * (x + k).unsafe_load[width=V](c)
        a2 += wv * (x + 2 * k).unsafe_load[width=V](c)
        a3 += wv * (x + 3 * k).unsafe_load[width=V](c)
    var s = SIMD[F32, 4](a0.reduce_add(), a1.reduce_add(), a2.reduce_add(), a3.reduce_add())
    for c in range(k16, k):
        var wc = a.unsafe_load(c).cast[F32]()
        s += SIMD[F32, 4](wc * x.unsafe_load(c), wc * (x + k).unsafe_load(c), wc * (x + 2 * k).unsafe_load(c), wc * (x + 3 * k).unsafe_load(c))
    return s


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
    var mv = SIMD[F32, V](s.unsafe_load(0))
    for i in range(0, n16, V):
        mv = max(mv, s.unsafe_load[width=V](i))
    var m = mv.reduce_max()
    for i in range(n16, n):
        m = max(m, s.unsafe_load(i))
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


def _weighted_rows(
    dst: UnsafePointer[Float32, MutUntrackedOrigin], p: UnsafePointer[Float32, _], v: UnsafePointer[Float32, _], n: Int, hd: Int,
):
    """dst (hd) = p[:n] @ v (n, hd): the rows of v weighted by p, summed in row order."""
    var hd16 = hd - hd % V
    for c in range(hd):
        dst.unsafe_store(c, Float32(0))
    for i in range(n):
        var w = p.unsafe_load(i)
        var row = v + i * hd
        for c in range(0, hd16, V):
            dst.unsafe_store(c, dst.unsafe_load[width=V](c) + w * row.unsafe_load[width=V](c))
        for c in range(hd16, hd):
            dst.unsafe_store(c, dst.unsafe_load(c) + w * row.unsafe_load(c))


def _self_attention(
    dst: UnsafePointer[Float32, MutUntrackedOrigin], q: UnsafePointer[Float32, _],
    kc: UnsafePointer[Float32, _], vc: UnsafePointer[Float32, _], scores: UnsafePointer[Float32, MutUntrackedOrigin],
    rows: Int, heads: Int, hd: Int, cap: Int, length: Int,
):
    """Each row and head attends to its cache's first `length` positions (rows, heads, cap, hd);
    q (rows, heads * hd) scaled, keys stored scaled; out (rows, heads * hd)."""
    def work(t: Int) {var dst, var q, var kc, var vc, var scores, var heads, var hd, var cap, var length}:
        var r = t // heads
        var h = t % heads
        var qh = q + (r * heads + h) * hd
        var kh = kc + ((r * heads + h) * cap) * hd
        var s = scores + t * cap
        for i in range(length):
            s.unsafe_store(i, _dot(kh + i * hd, qh, hd))
        _softmax(s, length)
        _weighted_rows(dst + (r * heads + h) * hd, s, vc + ((r * heads + h) * cap) * hd, length, hd)

    parallelize(work, rows * heads)


def _cross_attention(
    dst: UnsafePointer[Float32, MutUntrackedOrigin], q: UnsafePointer[Float32, _],
    kt: UnsafePointer[Float32, _], v: UnsafePointer[Float32, _], scores: UnsafePointer[Float32, MutUntrackedOrigin],
    rows: Int, window_rows: Int, heads: Int, hd: Int, frames: Int,
):
    """Each row and head attends to the window's keys kt (window_rows, heads, hd, frames), stored
    scaled and transposed, and values v (window_rows, heads, frames, hd); window_rows is 1 (one
    window shared by every row: beams) or rows. The rows of one window are done together, so
    each row of keys and each row of values is read from memory once for all of them; every
    row's sums run in the same order as alone."""
    var tail = frames - frames % V
    var per_window = 1 if window_rows == rows else rows

    def work(t: Int) {var dst, var q, var kt, var v, var scores, var per_window, var heads, var hd, var frames, var tail}:
        var w = t // heads
        var h = t % heads
        var kh = kt + t * hd * frames
        var first = w * per_window  # the rows of window w: first ..< first + per_window
        for r in range(first, first + per_window):
            var sr = scores + (r * heads + h) * frames
            for l in range(frames):
                sr.unsafe_store(l, Float32(0))
        # scores += q[c] * keys[c, :], c ascending: each row of keys is streamed once, in order
        # (a block of frames across all hd rows at once is hd strided streams, too many for the
        # prefetchers), and every score sums its hd products in the same order as a dot product
        for c in range(hd):
            var krow = kh + c * frames
            for r in range(first, first + per_window):
                var qc = (q + (r * heads + h) * hd).unsafe_load(c)
                var sr = scores + (r * heads + h) * frames
                for l in range(0, tail, V):
                    sr.unsafe_store(l, sr.unsafe_load[width=V](l) + qc * krow.unsafe_load[width=V](l))
                for l in range(tail, frames):
                    sr.unsafe_store(l, sr.unsafe_load(l) + qc * krow.unsafe_load(l))
        for r in range(first, first + per_window):
            _softmax(scores + (r * heads + h) * frames, frames)
        var vh = v + t * frames * hd
        var hd16 = hd - hd % V
        for r in range(first, first + per_window):
            for c in range(hd):
                (dst + (r * heads + h) * hd).unsafe_store(c, Float32(0))
        for i in range(frames):
            var row = vh + i * hd
            for r in range(first, first + per_window):
                var p = (scores + (r * heads + h) * frames).unsafe_load(i)
                var o = dst + (r * heads + h) * hd
                for c in range(0, hd16, V):
                    o.unsafe_store(c, o.unsafe_load[width=V](c) + p * row.unsafe_load[width=V](c))
                for c in range(hd16, hd):
                    o.unsafe_store(c, o.unsafe_load(c) + p * row.unsafe_load(c))

    parallelize(work, window_rows * heads)


@extensibility.register("whisper_max.decoder_layer")
struct DecoderLayer:
    """One residual attention block of Whisper's text decoder for `rows` rows, one new token
    each, at cache position `position` (the same for every row):

        x1 = x + out(self_attention(ln1(x)))      keys and values of the new token written into
                                                   the caches (rows, heads, capacity, hd) first
        x2 = x1 + cross_out(cross_attention(ln2(x1)))   over the window's keys and values
        y  = x2 + fc2(gelu(fc1(ln3(x2))))

    as openai-whisper computes it: q and k scaled by `scale` (hd ** -0.25) after their
    products, keys stored scaled; exact GELU; float32 throughout. Weight matrices are float32
    or bfloat16 (widened exactly as they are read). One kernel instead of ~40 graph ops: the
    step is bound by reading weights, and each of those ops paid a launch."""

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
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var d = x.dim_size(1)
        var hd = d // heads
        var cap = kc.dim_size(2)
        var f = w1.dim_size(0)
        var window_rows = ckt.dim_size(0)
        var frames = ckt.dim_size(3)
        var t = Int(position.unsafe_ptr().unsafe_load(0))
        if hd * heads != d:
            raise Error("whisper_max.decoder_layer: heads * head width != d")
        if kc.dim_size(0) != rows or kc.dim_size(1) != heads or kc.dim_size(3) != hd or vc.dim_size(2) != cap:
            raise Error("whisper_max.decoder_layer: the caches are not (rows, heads, capacity, head width)")
        if (window_rows != 1 and window_rows != rows) or ckt.dim_size(2) != hd or cv.dim_size(2) != frames:
            raise Error("whisper_max.decoder_layer: cross keys/values are not (1 or rows, heads, hd, frames) / (.., frames, hd)")
        if t < 0 or t >= cap:
            raise Error("whisper_max.decoder_layer: position outside the caches")
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
                var at = ((r * heads + i) * cap + t) * hd
                for c in range(hd):
                    (kp + at).unsafe_store(c, (kn + r * d + i * hd).unsafe_load(c))
                    (vp + at).unsafe_store(c, (vn + r * d + i * hd).unsafe_load(c))
        _self_attention(att, q, kp, vp, sc, rows, heads, hd, cap, t + 1)
        _linear[wo.dtype, RESIDUAL](x1, att, wo.unsafe_ptr(), bo.unsafe_ptr(), xp, True, s, rows, d, d)

        for r in range(rows):
            _layer_norm(h + r * d, x1 + r * d, ln2_w.unsafe_ptr(), ln2_b.unsafe_ptr(), d, e)
        _linear[wcq.dtype, SCALED](q, h, wcq.unsafe_ptr(), bcq.unsafe_ptr(), xp, True, s, rows, d, d)
        _cross_attention(att, q, ckt.unsafe_ptr(), cv.unsafe_ptr(), sc, rows, window_rows, heads, hd, frames)
        _linear[wco.dtype, RESIDUAL](x2, att, wco.unsafe_ptr(), bco.unsafe_ptr(), x1, True, s, rows, d, d)

        for r in range(rows):
            _layer_norm(h + r * d, x2 + r * d, ln3_w.unsafe_ptr(), ln3_b.unsafe_ptr(), d, e)
        _linear[w1.dtype, GELU](hid, h, w1.unsafe_ptr(), b1.unsafe_ptr(), xp, True, s, rows, f, d)
        _linear[w2.dtype, RESIDUAL](y.unsafe_ptr(), hid, w2.unsafe_ptr(), b2.unsafe_ptr(), x2, True, s, rows, d, f)
        scratch.free()
