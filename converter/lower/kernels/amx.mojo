# Products in bfloat16 on Intel AMX (AMX-BF16): the encoder's linear layers and attention of a
# bfloat16 package, when the converting CPU has AMX (converter/lower/target.py decides; the
# package then records amx_tile and amx_bf16 among its CPU features and runs nowhere else).
#
# The tile instructions are inline assembly: LLVM's AMX intrinsics need the target features
# +amx-tile/+amx-bf16, which Mojo does not enable where the CPU reports another model number (a
# Sapphire Rapids under KVM is seen as "rocketlake"); the assembler takes the mnemonics whatever
# the target. Every product here runs through TDPBF16PS in one k order whatever the number of
# rows, so a row's result does not depend on the rows it is computed with.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.ffi import external_call
from std.math import exp
from std.runtime import parallelism_level
from std.memory import stack_allocation
from std.sys import inlined_assembly

from .rows import PLAIN, store
from .simd import V, bf16_bits, range_max

comptime TILE = 16  # rows of a tile; a tile row is 64 bytes: 16 float32, or 16 pairs of bfloat16
comptime BLOCK = 32  # a block of results is 2 x 2 tiles: 32 rows x 32 columns
comptime STEP = 32  # bfloat16 values of k per TDPBF16PS (16 pairs)


def request_amx() raises:
    """Ask Linux for this process's permission to use AMX tile data (arch_prctl
    ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): without it the first tile instruction is SIGILL.
    Process-wide and idempotent, so every kernel asks before its first tile instruction."""
    var rc = external_call["syscall", Int64](Int64(158), Int64(0x1023), Int64(18))
    if rc != 0:
        raise Error("whisper_max AMX kernels: Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM failed); rebuild the package on this machine without AMX or run it on a kernel >= 5.16 that allows it")


@always_inline
def tile_config():
    """Palette 1, tiles 0-7 all 16 rows x 64 bytes, for the calling thread (tile state is per
    thread): tmm0-3 hold a block of sums, tmm4-5 two tiles of A, tmm6-7 two of B."""
    var cfg = stack_allocation[64, UInt8, alignment=64]()
    for i in range(64):
        cfg[i] = 0
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = TILE
    inlined_assembly["ldtilecfg ($0)", NoneType, constraints="r,~{memory}", has_side_effect=True](cfg)


@always_inline
def tile_release():
    """Back to the initial tile state, so that a context switch does not save 8 KB per thread."""
    inlined_assembly["tilerelease", NoneType, constraints="~{memory}", has_side_effect=True]()


@always_inline
def block[biased: Bool](
    c: UnsafePointer[Float32, _], ldc: Int, a: UnsafePointer[BFloat16, _], lda: Int,
    b: UnsafePointer[BFloat16, _], ldb: Int, b_step: Int, b_half: Int, steps: Int, bias: UnsafePointer[Float32, _],
):
    """c (32 x 32 float32, rows ldc bytes apart) = a (32 rows of STEP * steps bfloat16, lda bytes
    apart) times b, plus bias[0:32] on every row if `biased`: for each step s of 32 values of k,
    two B tiles of 16 pairs x 16 columns (each column's two k values adjacent, rows ldb bytes
    apart), at b + s * b_step and b + s * b_step + b_half (bfloat16 elements). The sums start at
    the bias (a tile load of stride 0 repeats its row) or 0, and add k in ascending steps."""
    comptime if biased:
        inlined_assembly["tileloadd ($0,$1,1), %tmm0", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bias, Int(0))
        inlined_assembly["tileloadd ($0,$1,1), %tmm1", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bias + TILE, Int(0))
        inlined_assembly["tileloadd ($0,$1,1), %tmm2", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bias, Int(0))
        inlined_assembly["tileloadd ($0,$1,1), %tmm3", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bias + TILE, Int(0))
    else:
        inlined_assembly["tilezero %tmm0", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tilezero %tmm1", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tilezero %tmm2", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tilezero %tmm3", NoneType, constraints="~{memory}", has_side_effect=True]()
    var a1 = a + TILE * (lda // 2)
    for s in range(steps):
        var bs = b + s * b_step
        inlined_assembly["tileloadd ($0,$1,1), %tmm4", NoneType, constraints="r,r,~{memory}", has_side_effect=True](a + s * STEP, lda)
        inlined_assembly["tileloadd ($0,$1,1), %tmm6", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bs, ldb)
        inlined_assembly["tdpbf16ps %tmm6, %tmm4, %tmm0", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tileloadd ($0,$1,1), %tmm7", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bs + b_half, ldb)
        inlined_assembly["tdpbf16ps %tmm7, %tmm4, %tmm1", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tileloadd ($0,$1,1), %tmm5", NoneType, constraints="r,r,~{memory}", has_side_effect=True](a1 + s * STEP, lda)
        inlined_assembly["tdpbf16ps %tmm6, %tmm5, %tmm2", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tdpbf16ps %tmm7, %tmm5, %tmm3", NoneType, constraints="~{memory}", has_side_effect=True]()
    var c1 = c + TILE * (ldc // 4)
    inlined_assembly["tilestored %tmm0, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c, ldc)
    inlined_assembly["tilestored %tmm1, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c + TILE, ldc)
    inlined_assembly["tilestored %tmm2, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c1, ldc)
    inlined_assembly["tilestored %tmm3, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c1 + TILE, ldc)


def _round_rows[o: MutOrigin](dst: UnsafePointer[BFloat16, o], src: UnsafePointer[Float32, _], rows: Int, k: Int, kp: Int, scale: Float32):
    """dst (rows, kp) = src (rows, k) * scale rounded to bfloat16 (to nearest even), columns k..kp
    zero."""
    var bits = dst.bitcast[UInt16]()
    var k16 = k - k % V
    for r in range(rows):
        var d = bits + r * kp
        var s = src + r * k
        for c in range(0, k16, V):
            d.store(c, bf16_bits[V](s.load[width=V](c) * scale))
        for c in range(k16, k):
            d.store(c, bf16_bits[1](s.load[width=1](c) * scale))
        for c in range(k, kp):
            d.store(c, UInt16(0))


@extensibility.register("whisper_max.linear_amx")
struct LinearAMX:
    """y (m, n) = x (m, k) @ w (n, k)^T + b (n) on AMX: x rounded to bfloat16 (to nearest even),
    w bfloat16, pair products summed in float32 (n a multiple of 32, k even; k is padded with
    zeros to a multiple of 32).

    x is rounded into 32-row blocks (the last padded with zero rows). Each worker takes a range of
    32-column blocks of w, repacks it into B tiles (16 k pairs x 16 columns), and runs every block
    of x against it: 2 x 2 tiles of sums per block, A tiles streamed from the rounded x."""

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
            raise Error("whisper_max.linear_amx: operand shapes do not agree")
        if n % BLOCK != 0 or k % 2 != 0:
            raise Error("whisper_max.linear_amx: the weight's rows must be a multiple of 32 and its columns even")
        if m == 0:
            return
        request_amx()
        var kp = (k + STEP - 1) // STEP * STEP
        var mp = (m + BLOCK - 1) // BLOCK * BLOCK
        var xb = alloc[BFloat16](mp * kp)
        var xp = x.unsafe_ptr()
        var workers = parallelism_level()
        var chunk = (mp // BLOCK + workers - 1) // workers * BLOCK

        def round_rows(t: Int) {var xb, var xp, var chunk, var m, var mp, var k, var kp}:
            var lo = min(mp, t * chunk)
            var hi = min(mp, (t + 1) * chunk)
            var real = max(0, min(m, hi) - lo)
            _round_rows(xb + lo * kp, xp + lo * k, real, k, kp, 1.0)
            var zeros = xb.bitcast[UInt16]() + (lo + real) * kp
            for i in range((hi - lo - real) * kp):
                zeros.store(i, UInt16(0))

        parallelize(round_rows, workers)
        var blocks = n // BLOCK
        var tasks = min(workers, blocks)
        var yp = y.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var bp = b.unsafe_ptr()

        def work(t: Int) {var xb, var yp, var wp, var bp, var blocks, var tasks, var m, var mp, var n, var k, var kp}:
            var lo = t * blocks // tasks
            var hi = (t + 1) * blocks // tasks
            var steps = kp // STEP
            var per_block = steps * 2 * TILE * STEP  # bfloat16 values of one packed block
            var pack = alloc[BFloat16]((hi - lo) * per_block)
            # w's 32-column blocks as B tiles: word p * 16 + c of tile (s, half) is the pair
            # (w[col, 2 q], w[col, 2 q + 1]), col = 32 j + 16 half + c, q = 16 s + p; zero past k
            var p32 = pack.bitcast[UInt32]()
            var w32 = wp.bitcast[UInt32]()
            var pairs = k // 2
            for j in range(lo, hi):
                var dst = p32 + (j - lo) * (per_block // 2)
                for s in range(steps):
                    for half in range(2):
                        var tile = dst + (s * 2 + half) * TILE * TILE
                        for c in range(TILE):
                            var src = w32 + (j * BLOCK + half * TILE + c) * pairs
                            for p in range(TILE):
                                var q = s * TILE + p
                                tile.store(p * TILE + c, src.load(q) if q < pairs else UInt32(0))
            var tmp = alloc[Float32](BLOCK * BLOCK)
            tile_config()
            for mb in range(mp // BLOCK):
                var rows = min(BLOCK, m - mb * BLOCK)
                var a = xb + mb * BLOCK * kp
                for j in range(lo, hi):
                    var c = yp + mb * BLOCK * n + j * BLOCK
                    var packed = pack + (j - lo) * per_block
                    if rows == BLOCK:
                        block[True](c, n * 4, a, kp * 2, packed, 64, 2 * TILE * STEP, TILE * STEP, steps, bp + j * BLOCK)
                    else:  # the last, partial block of rows: through a 32 x 32 scratch
                        block[True](tmp, BLOCK * 4, a, kp * 2, packed, 64, 2 * TILE * STEP, TILE * STEP, steps, bp + j * BLOCK)
                        for r in range(rows):
                            for q in range(0, BLOCK, V):
                                c.store(r * n + q, tmp.load[width=V](r * BLOCK + q))
            tile_release()
            tmp.free()
            pack.free()

        parallelize(work, tasks)
        xb.free()
