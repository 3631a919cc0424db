# Helpers of several kernels: vector width, bfloat16 rounding, softmax pieces.
from std.math import exp, floor
from std.memory import bitcast
from std.sys import simd_width_of
from std.utils.numerics import neg_inf

comptime F32 = DType.float32
comptime V = simd_width_of[F32]()  # float32 lanes of one vector register of the target


@always_inline
def bf16_bits[w: Int](x: SIMD[DType.float32, w]) -> SIMD[DType.uint16, w]:
    """The bits of x rounded to bfloat16, to nearest even, by integer arithmetic on its bits: what
    VCVTNEPS2BF16 gives for finite x. LLVM's own float32 -> bfloat16 vector conversion aborts
    the compile on some CPUs ("Do not know how to split this operator's operand!" on an Intel
    Xeon with AMX and AVX512_FP16), so bfloat16 values are only ever stored as their bits."""
    var u = bitcast[DType.uint32, w](x)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).cast[DType.uint16]()


# e^x for x <= 0 (exp_neg): x = n ln2 + r, |r| <= ln2 / 2, ln2 in two parts (Cody and Waite),
# e^r by a polynomial of degree 6 fitted (least maximum relative error) on that range
comptime _LOG2E = Float32(1.4426950408889634)
comptime _LN2_HI = Float32(0.693145751953125)  # 16 bits: n * _LN2_HI is exact for |n| < 2^8
comptime _LN2_LO = Float32(1.428606765330187e-06)
comptime _EXP_MIN = Float32(-87.33654)  # e^x is below the least normal float32 under this
comptime _E2 = Float32(0.4999999403953552)
comptime _E3 = Float32(0.1666652113199234)
comptime _E4 = Float32(0.04166838899254799)
comptime _E5 = Float32(0.008368710055947304)
comptime _E6 = Float32(0.001381461275741458)


@always_inline
def exp_neg[w: Int](x: SIMD[F32, w]) -> SIMD[F32, w]:
    """The exponential e^x for x <= 0 (a softmax's scores minus their maximum) within 1.2 ulp of
    float32 (checked against float64 on 3 million points), 0 where e^x is not a normal float32
    (x < -87.34, -inf included), NaN for NaN. ~15 vector instructions, no branch or table:
    std.math.exp took ~0.7 ns an element a core in the AMX attention on an Intel Xeon, a third
    of that kernel's time."""
    var n = floor(max(x, _EXP_MIN) * _LOG2E + 0.5)
    var r = n.fma(-_LN2_HI, x)  # from x itself, so that a NaN stays NaN
    r = n.fma(-_LN2_LO, r)
    var p = SIMD[F32, w](_E6).fma(r, _E5)
    p = p.fma(r, _E4)
    p = p.fma(r, _E3)
    p = p.fma(r, _E2)
    p = p.fma(r, 1.0)
    p = p.fma(r, 1.0)
    var two_n = bitcast[F32, w]((n.cast[DType.int32]() + 127) << 23)
    return x.lt(_EXP_MIN).select(SIMD[F32, w](0), p * two_n)


def round_bf16[o: MutOrigin](dst: UnsafePointer[BFloat16, o], src: UnsafePointer[Float32, _], n: Int, scale: Float32):
    """dst[0:n] = src[0:n] * scale rounded to bfloat16 (to nearest even)."""
    var bits = dst.bitcast[UInt16]()
    var n16 = n - n % V
    for i in range(0, n16, V):
        bits.store(i, bf16_bits[V](src.load[width=V](i) * scale))
    for i in range(n16, n):
        bits.store(i, bf16_bits[1](src.load[width=1](i) * scale))


def range_max(s: UnsafePointer[Float32, _], lo: Int, hi: Int) -> Float32:
    """max(s[lo:hi]) (-inf when empty), 4 V lanes at a time: four independent chains of max, as
    one chain waits for the last max at every vector (a third of an encoder attention's time on
    an Intel Xeon with one chain)."""
    var n = max(0, hi - lo)
    var v64 = lo + n // (4 * V) * (4 * V)
    var v16 = lo + n // V * V
    var m0 = SIMD[F32, V](neg_inf[F32]())
    var m1 = m0
    var m2 = m0
    var m3 = m0
    for i in range(lo, v64, 4 * V):
        m0 = max(m0, s.unsafe_load[width=V](i))
        m1 = max(m1, s.unsafe_load[width=V](i + V))
        m2 = max(m2, s.unsafe_load[width=V](i + 2 * V))
        m3 = max(m3, s.unsafe_load[width=V](i + 3 * V))
    for i in range(v64, v16, V):
        m0 = max(m0, s.unsafe_load[width=V](i))
    var m = max(max(m0, m1), max(m2, m3)).reduce_max()
    for i in range(v16, hi):
        m = max(m, s.unsafe_load(i))
    return m


@always_inline
def _shifted[rescaled: Bool, w: Int](x: SIMD[F32, w], m: Float32, lse: Float32, top: Float32) -> SIMD[F32, w]:
    """x - m, or ((x - m) - lse) - top when `rescaled`: exp_sum's argument of exp."""
    comptime if rescaled:
        return ((x - m) - lse) - top
    return x - m


def exp_sum[store: Bool, rescaled: Bool](
    s: UnsafePointer[Float32, MutUntrackedOrigin], lo: Int, hi: Int, m: Float32, lse: Float32, top: Float32
) -> Float32:
    """The sum of exp(s[i] - m) for lo <= i < hi, or of exp(((s[i] - m) - lse) - top) when
    `rescaled` (select_tokens' logsumexp of log-probabilities); with `store`, each exponential
    also written back to s[i]. V lanes at a time, four vectors in flight (one alone waits on its
    own chain of ~15 dependent operations), added to one vector sum in index order, then its
    lanes, then the tail one by one: the same bits as one vector at a time. On an AMD EPYC
    (family 23) four at a time took an encoder attention layer 70.5 -> 68.4 ms and a row's
    token choice 320 -> 294 us."""
    var n = max(0, hi - lo)
    var v64 = lo + n // (4 * V) * (4 * V)
    var v16 = lo + n // V * V
    var tv = SIMD[F32, V](0)
    for i in range(lo, v64, 4 * V):
        var e0 = exp(_shifted[rescaled, V](s.unsafe_load[width=V](i), m, lse, top))
        var e1 = exp(_shifted[rescaled, V](s.unsafe_load[width=V](i + V), m, lse, top))
        var e2 = exp(_shifted[rescaled, V](s.unsafe_load[width=V](i + 2 * V), m, lse, top))
        var e3 = exp(_shifted[rescaled, V](s.unsafe_load[width=V](i + 3 * V), m, lse, top))
        comptime if store:
            s.unsafe_store(i, e0)
            s.unsafe_store(i + V, e1)
            s.unsafe_store(i + 2 * V, e2)
            s.unsafe_store(i + 3 * V, e3)
        tv += e0
        tv += e1
        tv += e2
        tv += e3
    for i in range(v64, v16, V):
        var e = exp(_shifted[rescaled, V](s.unsafe_load[width=V](i), m, lse, top))
        comptime if store:
            s.unsafe_store(i, e)
        tv += e
    var total = tv.reduce_add()
    for i in range(v16, hi):
        var e = exp(_shifted[rescaled, 1](s.unsafe_load[width=1](i), m, lse, top))
        comptime if store:
            s.unsafe_store(i, e)
        total += e[0]
    return total


def softmax(s: UnsafePointer[Float32, MutUntrackedOrigin], n: Int):
    """s[:n] = softmax(s[:n]) in place: exp(s - max) / sum, V lanes at a time (the cross
    attention of a beam step takes ~45k exponentials per layer)."""
    var n16 = n - n % V
    var total = exp_sum[True, False](s, 0, n, range_max(s, 0, n), 0, 0)
    for i in range(0, n16, V):
        s.unsafe_store(i, s.unsafe_load[width=V](i) / total)
    for i in range(n16, n):
        s.unsafe_store(i, s.unsafe_load(i) / total)


@always_inline
def wide[dt: DType](a: UnsafePointer[Scalar[dt], _], c: Int) -> SIMD[F32, V]:
    """a[c : c + V] as float32: float32 as it is; float16 converted (exact; VCVTPH2PS); bfloat16
    widened exactly, its 16 bits made the upper half of a float32's (what a conversion does,
    without LLVM's bfloat16 vector lowering, which cannot split some widths)."""
    comptime if dt == DType.bfloat16:
        var bits = a.bitcast[UInt16]().unsafe_load[width=V](c).cast[DType.uint32]() << 16
        return bitcast[F32, V](bits)
    else:
        return a.unsafe_load[width=V](c).cast[F32]()


@always_inline
def wide1[dt: DType](a: UnsafePointer[Scalar[dt], _], c: Int) -> Float32:
    """a[c] as float32, exactly: wide's one-element form (a bfloat16 by its bits, as wide does)."""
    comptime if dt == DType.bfloat16:
        return bitcast[F32, 1](a.bitcast[UInt16]().unsafe_load(c).cast[DType.uint32]() << 16)[0]
    else:
        return a.unsafe_load(c).cast[F32]()
