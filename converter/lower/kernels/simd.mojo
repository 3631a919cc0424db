# Helpers of several kernels: vector width, bfloat16 rounding, softmax pieces.
from std.math import exp
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


def round_bf16[o: MutOrigin](dst: UnsafePointer[BFloat16, o], src: UnsafePointer[Float32, _], n: Int, scale: Float32):
    """dst[0:n] = src[0:n] * scale rounded to bfloat16 (to nearest even)."""
    var bits = dst.bitcast[UInt16]()
    var n16 = n - n % V
    for i in range(0, n16, V):
        bits.store(i, bf16_bits[V](src.load[width=V](i) * scale))
    for i in range(n16, n):
        bits.store(i, bf16_bits[1](src.load[width=1](i) * scale))


def range_max(s: UnsafePointer[Float32, _], lo: Int, hi: Int) -> Float32:
    """max(s[lo:hi]) (-inf when empty), V lanes at a time."""
    var v16 = lo + max(0, hi - lo) // V * V
    var mv = SIMD[F32, V](neg_inf[F32]())
    for i in range(lo, v16, V):
        mv = max(mv, s.unsafe_load[width=V](i))
    var m = mv.reduce_max()
    for i in range(v16, hi):
        m = max(m, s.unsafe_load(i))
    return m


def softmax(s: UnsafePointer[Float32, MutUntrackedOrigin], n: Int):
    """s[:n] = softmax(s[:n]) in place: exp(s - max) / sum, V lanes at a time (the cross
    attention of a beam step takes ~45k exponentials per layer)."""
    var n16 = n - n % V
    var m = range_max(s, 0, n)
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
