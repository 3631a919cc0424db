# The encoder's attention in bfloat16 on Intel AMX tiles (whisper_max.attention_amx): the tile
# helpers are amx.mojo's.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext

from .amx import BLOCK, STEP, TILE, block, request_amx, tile_config, tile_release
from .simd import V, bf16_bits, exp_neg, range_max
from .team import Crew, team


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
            _pack_head(qb, kb, vb, qp, kp, vp, s, bh // heads, bh % heads, t, tq, tp, d)

        var blocks = tq // BLOCK
        var op = y.unsafe_ptr()

        def run(mut crew: Crew) {var qb, var kb, var vb, var op, var t, var tq, var tp, var d, var items, var blocks, ref pack}:
            crew.share(items, pack)
            # each worker's scratch, and its tiles, once for all the blocks of queries it takes
            var scores = alloc[Float32](BLOCK * tp, alignment=64)
            var probs = alloc[BFloat16](BLOCK * tp, alignment=64)
            var sums = alloc[Float32](BLOCK)
            var o = alloc[Float32](BLOCK * HD, alignment=64)
            tile_config()

            def attend(it: Int) {var qb, var kb, var vb, var op, var t, var tq, var tp, var d, var blocks, var scores, var probs, var sums, var o}:
                var bh = it // blocks
                _attend_block(op, qb, kb, vb, scores, probs, sums, o, bh // heads, bh % heads, (it % blocks) * BLOCK, t, tq, tp, d)

            crew.share(items * blocks, attend)
            tile_release()
            scores.free()
            probs.free()
            sums.free()
            o.free()

        team(2, run)
        qb.free()
        kb.free()
        vb.free()


def _pack_head(
    qb: UnsafePointer[BFloat16, MutUntrackedOrigin], kb: UnsafePointer[BFloat16, MutUntrackedOrigin],
    vb: UnsafePointer[BFloat16, MutUntrackedOrigin], qp: UnsafePointer[Float32, _], kp: UnsafePointer[Float32, _],
    vp: UnsafePointer[Float32, _], s: Float32, bi: Int, h: Int, t: Int, tq: Int, tp: Int, d: Int,
):
    """Head h of batch item bi: q s rounded into rows of 64 (zero rows to tq), k s into panels of
    64 keys (32 pairs x 64 keys) and v into key pairs x 64 columns (zero keys to tp)."""
    var bh = bi * (d // HD) + h
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


def _attend_block[o_: MutOrigin](
    op: UnsafePointer[Float32, o_], qb: UnsafePointer[BFloat16, _], kb: UnsafePointer[BFloat16, _],
    vb: UnsafePointer[BFloat16, _], scores: UnsafePointer[Float32, MutUntrackedOrigin],
    probs: UnsafePointer[BFloat16, MutUntrackedOrigin], sums: UnsafePointer[Float32, MutUntrackedOrigin],
    o: UnsafePointer[Float32, MutUntrackedOrigin], bi: Int, h: Int, r0: Int, t: Int, tq: Int, tp: Int, d: Int,
):
    """Queries r0 .. r0 + 31 of head h of batch item bi, on the calling thread's tiles: their
    scores against every key (2 x 2 tiles per 32 keys), the exponentials, their product with v."""
    var bh = bi * (d // HD) + h
    var rows = min(BLOCK, t - r0)
    var qrows = qb + (bh * tq + r0) * HD
    var keys = kb + bh * tp * HD
    var values = vb + bh * tp * HD
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
            var e = exp_neg[V](srow.load[width=V](c) - mx)
            acc += e
            pbits.store(c, bf16_bits[V](e))
        var total = acc.reduce_add()
        for c in range(t16, t):
            var e = exp_neg[1](srow.load[width=1](c) - mx)
            total += e[0]
            pbits.store(c, bf16_bits[1](e))
        for c in range(t, tp):
            pbits.store(c, UInt16(0))
        sums.store(i, total)
    # probabilities (32 x tp) times v: key pairs are rows of 64 columns (256 bytes), steps
    # of 16 pairs 2048 bfloat16 apart; two blocks of 32 columns
    for half in range(2):
        block[False](o + half * BLOCK, HD * 4, probs, tp * 2, values + half * 2 * BLOCK, HD * 4, 2 * TILE * HD, 2 * TILE, tp // STEP, o)
    for i in range(rows):
        var inv = 1.0 / sums.load(i)
        var dst = op + (bi * t + r0 + i) * d + h * HD
        for c in range(0, HD, V):
            dst.store(c, o.load[width=V](i * HD + c) * inv)

