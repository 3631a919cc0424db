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


comptime HD = 64  # columns of one attention head


@extensibility.register("whisper_max.attention_amx")
struct AttentionAMX:
    """Multi-head self-attention without a mask (Whisper's encoder) on AMX: y (b, t, d) =
    softmax((q s)(k s)^T) v per head of 64 columns, q, k, v (b, t, d) float32, s = `scale`
    (openai-whisper scales q and k by hd ** -0.25 each). The arithmetic of
    whisper_max.attention_bf16: q s, k s, v and the softmax's numerators rounded to bfloat16,
    products summed in float32, the softmax in float32.

    Per head, q s is rounded into rows of 64 (padded with zero rows to a multiple of 32), k s into
    panels of 64 keys (32 pairs x 64 keys) and v into key pairs x 64 columns (keys padded with
    zeros to a multiple of 64): the B tiles of both products are 16-row slices of them, loaded
    256 bytes a row. Each work item is 32 queries of one head: their scores against every key
    (2 x 2 tiles per 32 keys), the exponentials, and their product with v."""

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
                raise Error("whisper_max.attention_amx: q, k, v and out differ in shape")
        if d != heads * HD:
            raise Error("whisper_max.attention_amx: heads of 64 columns expected")
        if b * t == 0:
            return
        request_amx()
        var tq = (t + BLOCK - 1) // BLOCK * BLOCK  # queries padded to whole blocks
        var tp = (t + 2 * BLOCK - 1) // (2 * BLOCK) * (2 * BLOCK)  # keys padded to whole panels
        var items = b * heads
        var qb = alloc[BFloat16](items * tq * HD)
        var kb = alloc[BFloat16](items * tp * HD)
        var vb = alloc[BFloat16](items * tp * HD)
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var s = Float32(scale)

        def pack(bh: Int) {var qb, var kb, var vb, var qp, var kp, var vp, var s, var t, var tq, var tp, var d}:
            var bi = bh // heads
            var h = bh % heads
            var row = alloc[UInt16](HD)
            var r32 = row.bitcast[UInt32]()
            var kq = (kb + bh * tp * HD).bitcast[UInt32]()
            var vq = (vb + bh * tp * HD).bitcast[UInt16]()
            var qq = (qb + bh * tq * HD).bitcast[UInt16]()
            for j in range(t):
                var src = (bi * t + j) * d + h * HD
                for c in range(0, HD, V):
                    qq.store(j * HD + c, bf16_bits[V](qp.load[width=V](src + c) * s))
                    row.store(c, bf16_bits[V](kp.load[width=V](src + c) * s))
                var panel = kq + (j // HD) * (HD // 2) * HD
                for p in range(HD // 2):
                    panel.store(p * HD + j % HD, r32.load(p))
                for c in range(0, HD, V):
                    row.store(c, bf16_bits[V](vp.load[width=V](src + c)))
                var pair = vq + (j // 2) * 2 * HD
                for c in range(HD):
                    pair.store(2 * c + j % 2, row.load(c))
            for j in range(t, tq):
                for c in range(HD):
                    qq.store(j * HD + c, UInt16(0))
            for j in range(t, tp):
                var panel = kq + (j // HD) * (HD // 2) * HD
                for p in range(HD // 2):
                    panel.store(p * HD + j % HD, UInt32(0))
                var pair = vq + (j // 2) * 2 * HD
                for c in range(HD):
                    pair.store(2 * c + j % 2, UInt16(0))
            row.free()

        parallelize(pack, items)
        var blocks = tq // BLOCK
        var op = y.unsafe_ptr()

        def attend(it: Int) {var qb, var kb, var vb, var op, var t, var tq, var tp, var d, var blocks}:
            var bh = it // blocks
            var bi = bh // heads
            var h = bh % heads
            var r0 = (it % blocks) * BLOCK
            var rows = min(BLOCK, t - r0)
            var scores = alloc[Float32](BLOCK * tp)
            var probs = alloc[BFloat16](BLOCK * tp)
            var sums = alloc[Float32](BLOCK)
            var o = alloc[Float32](BLOCK * HD)
            var qrows = qb + (bh * tq + r0) * HD
            var keys = kb + bh * tp * HD
            var values = vb + bh * tp * HD
            tile_config()
            # scores: a panel of 64 keys is 32 pair rows of 64 keys (256 bytes); its two blocks of
            # 32 keys start 64 bfloat16 apart, their halves 32, its 16-pair steps 2048
            for pn in range(tp // HD):
                for half in range(2):
                    block[False](scores + pn * HD + half * BLOCK, tp * 4, qrows, HD * 2, keys + pn * HD * HD + half * 2 * BLOCK, HD * 4, 2 * TILE * HD, 2 * TILE, HD // STEP, o)
            var t16 = t - t % V
            for i in range(BLOCK):
                var srow = scores + i * tp
                var pbits = (probs + i * tp).bitcast[UInt16]()
                if i >= rows:  # padding queries: no probabilities
                    for c in range(tp):
                        pbits.store(c, UInt16(0))
                    sums.store(i, 1.0)
                    continue
                var mx = range_max(srow, 0, t)
                var acc = SIMD[DType.float32, V](0)
                for c in range(0, t16, V):
                    var e = exp(srow.load[width=V](c) - mx)
                    acc += e
                    pbits.store(c, bf16_bits[V](e))
                var total = acc.reduce_add()
                for c in range(t16, t):
                    var e = exp(srow.load[width=1](c) - mx)
                    total += e[0]
                    pbits.store(c, bf16_bits[1](e))
                for c in range(t, tp):
                    pbits.store(c, UInt16(0))
                sums.store(i, total)
            # probabilities (32 x tp) times v: key pairs are rows of 64 columns (256 bytes), steps
            # of 16 pairs 2048 bfloat16 apart; two blocks of 32 columns
            for half in range(2):
                block[False](o + half * BLOCK, HD * 4, probs, tp * 2, values + half * 2 * BLOCK, HD * 4, 2 * TILE * HD, 2 * TILE, tp // STEP, o)
            tile_release()
            for i in range(rows):
                var inv = 1.0 / sums.load(i)
                var dst = op + (bi * t + r0 + i) * d + h * HD
                for c in range(0, HD, V):
                    dst.store(c, o.load[width=V](i * HD + c) * inv)
            scores.free()
            probs.free()
            sums.free()
            o.free()

        parallelize(attend, items * blocks)
        qb.free()
        kb.free()
        vb.free()


# Products of a few rows (decoder steps, beams, the engine's rows) with a bfloat16 weight on AMX.
# The weight is the A operand, read as stored: a tile is 16 weight rows x 32 values of k (64
# bytes of each row, the row's stride apart), so nothing is repacked and each weight byte is read
# once per call whatever the number of rows. The rows of x are the B operand, rounded to
# bfloat16 and packed per call into chunks of 16 (pairs of k down, 16 rows across). A sum is one
# TDPBF16PS chain over k in ascending steps for every number of rows, M = 1 included: a row's
# result does not depend on the rows it is computed with (the padding columns are zeros).


def pack_rows(xb: UnsafePointer[UInt32, MutUntrackedOrigin], x: UnsafePointer[Float32, _], rows: Int, k: Int):
    """x (rows, k) float32 rounded to bfloat16 as B tiles: chunk c (k / 2 rows of 16 words) holds
    rows 16 c .. 16 c + 15, word (q, col) the pair (x[16 c + col, 2 q], x[16 c + col, 2 q + 1]);
    columns past `rows` are zeros."""
    var pairs = k // 2
    var chunks = (rows + TILE - 1) // TILE
    var row = alloc[UInt16](k)
    var r32 = row.bitcast[UInt32]()
    var k16 = k - k % V
    for c in range(chunks):
        var dst = xb + c * pairs * TILE
        for col in range(TILE):
            var r = c * TILE + col
            if r < rows:
                var src = x + r * k
                for i in range(0, k16, V):
                    row.store(i, bf16_bits[V](src.load[width=V](i)))
                for i in range(k16, k):
                    row.store(i, bf16_bits[1](src.load[width=1](i)))
                for q in range(pairs):
                    dst.store(q * TILE + col, r32.load(q))
            else:
                for q in range(pairs):
                    dst.store(q * TILE + col, UInt32(0))
    row.free()


@always_inline
def _weight_tiles[chunks: Int](c: UnsafePointer[Float32, _], a: UnsafePointer[BFloat16, _], lda: Int, b: UnsafePointer[UInt32, _], b_chunk: Int, steps: Int):
    """c (2 * chunks tiles of 16 x 16 float32, 1 KB apart) = 32 weight rows at a (lda bytes
    apart) times `chunks` (1 or 2) packed chunks of rows at b (b_chunk words apart): tile 2 i + h
    is weight rows 16 h .. 16 h + 15 against chunk i, as (weight row, row of x). Each step also
    prefetches 1/steps of the next 32 weight rows (the 32 lda bytes after a's): a tile load
    touches 16 rows far apart, which the hardware prefetcher does not follow as one stream."""
    var ahead = a.bitcast[UInt8]() + 32 * lda
    var per_step = 32 * lda // steps
    inlined_assembly["tilezero %tmm0", NoneType, constraints="~{memory}", has_side_effect=True]()
    inlined_assembly["tilezero %tmm1", NoneType, constraints="~{memory}", has_side_effect=True]()
    comptime if chunks == 2:
        inlined_assembly["tilezero %tmm2", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tilezero %tmm3", NoneType, constraints="~{memory}", has_side_effect=True]()
    var a1 = a + TILE * (lda // 2)
    for s in range(steps):
        var bs = b + s * TILE * TILE
        var pf = ahead + s * per_step
        for line in range(0, per_step, 64):
            inlined_assembly["prefetcht0 ($0)", NoneType, constraints="r,~{memory}", has_side_effect=True](pf + line)
        inlined_assembly["tileloadd ($0,$1,1), %tmm6", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bs, Int(64))
        inlined_assembly["tileloadd ($0,$1,1), %tmm4", NoneType, constraints="r,r,~{memory}", has_side_effect=True](a + s * STEP, lda)
        inlined_assembly["tdpbf16ps %tmm6, %tmm4, %tmm0", NoneType, constraints="~{memory}", has_side_effect=True]()
        inlined_assembly["tileloadd ($0,$1,1), %tmm5", NoneType, constraints="r,r,~{memory}", has_side_effect=True](a1 + s * STEP, lda)
        inlined_assembly["tdpbf16ps %tmm6, %tmm5, %tmm1", NoneType, constraints="~{memory}", has_side_effect=True]()
        comptime if chunks == 2:
            inlined_assembly["tileloadd ($0,$1,1), %tmm7", NoneType, constraints="r,r,~{memory}", has_side_effect=True](bs + b_chunk, Int(64))
            inlined_assembly["tdpbf16ps %tmm7, %tmm4, %tmm2", NoneType, constraints="~{memory}", has_side_effect=True]()
            inlined_assembly["tdpbf16ps %tmm7, %tmm5, %tmm3", NoneType, constraints="~{memory}", has_side_effect=True]()
    inlined_assembly["tilestored %tmm0, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c, Int(64))
    inlined_assembly["tilestored %tmm1, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c + TILE * TILE, Int(64))
    comptime if chunks == 2:
        inlined_assembly["tilestored %tmm2, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c + 2 * TILE * TILE, Int(64))
        inlined_assembly["tilestored %tmm3, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](c + 3 * TILE * TILE, Int(64))


def _block_rows[mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], xb: UnsafePointer[UInt32, _], a: UnsafePointer[BFloat16, _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int, j0: Int, tmp: UnsafePointer[Float32, MutUntrackedOrigin],
):
    """Columns j0 .. j0 + 31 (clipped to n) of y (rows, n): the 32 weight rows at a (k apart)
    against every chunk of rows packed at xb, plus b, through the epilogue `mode` (rows.store)."""
    var steps = k // STEP
    var pairs = k // 2
    var chunks = (rows + TILE - 1) // TILE
    var ch = 0
    while ch < chunks:
        var two = ch + 1 < chunks
        if two:
            _weight_tiles[2](tmp, a, k * 2, xb + ch * pairs * TILE, pairs * TILE, steps)
        else:
            _weight_tiles[1](tmp, a, k * 2, xb + ch * pairs * TILE, pairs * TILE, steps)
        for i in range(2 if two else 1):
            var cols = min(TILE, rows - (ch + i) * TILE)
            for h in range(2):
                for jj in range(TILE):
                    var j = j0 + h * TILE + jj
                    if j >= n:
                        break
                    var bias = b.load(j) if has_bias else Float32(0)
                    var sums = tmp + (2 * i + h) * TILE * TILE + jj * TILE
                    for col in range(cols):
                        store[mode](y, res, (ch + i) * TILE + col, j, n, sums.load(col) + bias, scale)
        ch += 2 if two else 1


def rows_blocks[mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], xb: UnsafePointer[UInt32, _], w: UnsafePointer[BFloat16, _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int, lo: Int, hi: Int,
    pad: UnsafePointer[BFloat16, MutUntrackedOrigin], tmp: UnsafePointer[Float32, MutUntrackedOrigin],
):
    """Columns 32 lo .. 32 hi (clipped to n) of y (rows, n) = the rows packed at xb times w (n, k)
    bfloat16 plus b, through the epilogue `mode` (rows.store), on the calling thread's tiles
    (configured by the caller). A last block of fewer than 32 weight rows is copied into `pad`
    (32 x k) with zero rows after it; tmp holds 4 tiles of sums."""
    for blk in range(lo, hi):
        var j0 = blk * BLOCK
        var real = min(BLOCK, n - j0)
        if real == BLOCK:
            _block_rows[mode](y, xb, w + j0 * k, b, res, has_bias, scale, rows, n, k, j0, tmp)
        else:
            var src = (w + j0 * k).bitcast[UInt16]()
            var dst = pad.bitcast[UInt16]()
            for i in range(real * k):
                dst.store(i, src.load(i))
            for i in range(real * k, BLOCK * k):
                dst.store(i, UInt16(0))
            _block_rows[mode](y, xb, pad, b, res, has_bias, scale, rows, n, k, j0, tmp)


def linear_rows_amx[mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], w: UnsafePointer[BFloat16, _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
) raises:
    """rows.linear on AMX for a bfloat16 w (n, k), k a multiple of 32: x rounded to bfloat16, the
    weight's 32-row blocks split across the workers."""
    if k % STEP != 0:
        raise Error("whisper_max AMX row products: the weight's columns must be a multiple of 32")
    if rows == 0:
        return
    request_amx()
    var chunks = (rows + TILE - 1) // TILE
    var xb = alloc[UInt32](chunks * (k // 2) * TILE)
    pack_rows(xb, x, rows, k)
    var blocks = (n + BLOCK - 1) // BLOCK
    var tasks = max(1, min(parallelism_level(), blocks))

    def work(t: Int) {var y, var xb, var w, var b, var res, var has_bias, var scale, var rows, var n, var k, var blocks, var tasks}:
        var pad = alloc[BFloat16](BLOCK * k if n % BLOCK != 0 else 0)  # for a partial last block only
        var tmp = alloc[Float32](4 * TILE * TILE)
        tile_config()
        rows_blocks[mode](y, xb, w, b, res, has_bias, scale, rows, n, k, t * blocks // tasks, (t + 1) * blocks // tasks, pad, tmp)
        tile_release()
        tmp.free()
        pad.free()

    parallelize(work, tasks)
    xb.free()


@extensibility.register("whisper_max.linear_rows_amx")
struct LinearRowsAMX:
    """whisper_max.linear_rows for a bfloat16 weight on AMX: y (rows, n) = x (rows, k) @ w (n,
    k)^T + b (n), x rounded to bfloat16, pair products summed in float32 (k a multiple of 32).
    The weight is read as stored, once per call, for every row; a row's result is the same
    whatever the number of rows and its place among them."""

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.bfloat16, rank=2, ...],
        b: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var n = w.dim_size(0)
        var k = w.dim_size(1)
        if x.dim_size(1) != k or b.dim_size(0) != n or y.dim_size(0) != rows or y.dim_size(1) != n:
            raise Error("whisper_max.linear_rows_amx: operand shapes do not agree")
        linear_rows_amx[PLAIN](y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), b.unsafe_ptr(), x.unsafe_ptr(), True, 1.0, rows, n, k)
