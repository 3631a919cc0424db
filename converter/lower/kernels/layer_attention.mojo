# The attention of the fused decoder block (decoder_layer.mojo) for a few rows: self-attention
# over each row's cached positions (through its lineage), and cross-attention over each row's
# window, rows of one window grouped so that its keys and values are read once per group.

from .rows import PANEL, block_product, dot
from .simd import F32, V, softmax, wide, wide1
from .team import Crew


def self_attention(
    mut crew: Crew, dst: UnsafePointer[Float32, MutUntrackedOrigin], q: UnsafePointer[Float32, _],
    kc: UnsafePointer[Float32, _], vc: UnsafePointer[Float32, _], scores: UnsafePointer[Float32, MutUntrackedOrigin],
    lineage: UnsafePointer[Int32, _], has_lineage: Bool, pos: UnsafePointer[Int, MutUntrackedOrigin], rows: Int, heads: Int, hd: Int, cap: Int,
):
    """Each row r and head attends to the first pos[r] + 1 positions of the caches (slots,
    heads, cap, hd): position i of row r is in cache slot lineage[r, i] (rows, cap) when
    `has_lineage`, else in slot r; q (rows, heads * hd) scaled, keys stored scaled; out (rows,
    heads * hd), the value rows weighted by the softmax, summed in position order. One phase of
    `crew`'s team, a job for each row and head."""
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
            s.unsafe_store(i, dot(kc + at(i), qh, hd))
        softmax(s, length)
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

    crew.share(rows * heads, work)


def padded_block[dt: DType](pad: UnsafePointer[Float32, MutUntrackedOrigin], src: UnsafePointer[Scalar[dt], _], ld: Int, rows: Int, cols: Int):
    """pad (rows, PANEL) = src[0:rows, 0:cols] (rows ld apart) as float32 (exactly), zeros after
    column cols: a last partial block of a product's operand in the layout rows.block_product
    reads."""
    for i in range(rows):
        for c in range(PANEL):
            pad.unsafe_store(i * PANEL + c, wide1(src, i * ld + c) if c < cols else Float32(0))


comptime STREAM_ROWS = 8  # groups of at most this many rows read the keys as one stream (scores_streamed)


def scores_streamed[dt: DType](
    sg: UnsafePointer[Float32, MutUntrackedOrigin], ld: Int, qg: UnsafePointer[Float32, _], m: Int,
    kh: UnsafePointer[Scalar[dt], _], hd: Int, frames: Int,
):
    """sg[j, 0:frames] (rows ld apart) = qg[j, 0:hd] @ kh (hd, frames) for the m rows j, for a
    head width of one block (hd == PANEL): the keys read in memory order, one row of kh at a
    time, for all frames. block_product reads them in blocks of 64 frames, 64 rows of kh apart,
    which the hardware prefetcher does not follow as one stream (a group of one row reads its
    window's keys at ~26 GB/s that way on an AMD EPYC Zen 4). Each score is the same FMA chain
    from zero in c order as block_product's over one block, so the bits are its bits."""
    var f16 = frames - frames % V
    for j in range(m):
        var s = sg + j * ld
        for l in range(0, f16, V):
            s.unsafe_store(l, SIMD[F32, V](0))
        for l in range(f16, frames):
            s.unsafe_store(l, Float32(0))
    for c in range(hd):
        var krow = kh + c * frames
        for j in range(m):
            var s = sg + j * ld
            var a = SIMD[F32, V](qg.unsafe_load(j * hd + c))
            for l in range(0, f16, V):
                s.unsafe_store(l, a.fma(wide(krow, l), s.unsafe_load[width=V](l)))
            for l in range(f16, frames):
                s.unsafe_store(l, a[0].fma(wide1(krow, l), s.unsafe_load(l)))


def cross_attention[dt: DType](
    mut crew: Crew, dst: UnsafePointer[Float32, MutUntrackedOrigin], q: UnsafePointer[Float32, _],
    kt: UnsafePointer[Scalar[dt], _], v: UnsafePointer[Scalar[dt], _],
    order: UnsafePointer[Int, MutUntrackedOrigin], starts: UnsafePointer[Int, MutUntrackedOrigin], wins: UnsafePointer[Int, MutUntrackedOrigin],
    groups: Int, heads: Int, hd: Int, frames: Int,
):
    """Each row and head attends to its window's keys kt (windows, heads, hd, frames), stored
    scaled and transposed, and values v (windows, heads, frames, hd). The rows are in `groups`
    groups, one per window: group g is window wins[g] and the rows order[starts[g] ..<
    starts[g + 1]]. Both products of a group and head run as rows.block_product: the scores
    q (rows, hd) @ kt (hd, frames) in blocks of 64 frames, the output softmax (rows, frames) @
    v (frames, hd) in blocks of 64 frames, so each block of keys and values is read once for all
    the group's rows, its sums kept in registers; a last partial block is copied beside, padded
    with zeros. Keys and values are float32, or bfloat16 widened exactly as they are read (a
    bfloat16 package's, half the bytes a row reads). A group of at most STREAM_ROWS rows gets its scores from scores_streamed
    instead, reading the keys in memory order (the same sums). Every row's sums run in one
    order whatever rows it is decoded with. One phase of `crew`'s team, a job for each group
    and head."""
    var fp = (frames + PANEL - 1) // PANEL * PANEL  # a row of scores, padded to whole blocks

    def work(t: Int) {var dst, var q, var kt, var v, var order, var starts, var wins, var heads, var hd, var frames, var fp}:
        var g = t // heads
        var h = t % heads
        var w = wins.unsafe_load(g)
        var kh = kt + (w * heads + h) * hd * frames
        var vh = v + (w * heads + h) * frames * hd
        var lo = starts.unsafe_load(g)
        var m = starts.unsafe_load(g + 1) - lo
        var padded = (max(hd, frames) if hd % PANEL != 0 else hd) * PANEL if frames % PANEL != 0 or hd % PANEL != 0 else 0
        var buf = alloc[Float32](m * hd + m * fp + m * PANEL + padded)  # one allocation per task
        var qg = buf  # the group's q rows of this head, together
        var sg = qg + m * hd  # their scores, then probabilities
        var og = sg + m * fp
        var pad = og + m * PANEL  # a partial block, zero-padded
        for j in range(m):
            var src = q + (order.unsafe_load(lo + j) * heads + h) * hd
            for c in range(hd):
                qg.unsafe_store(j * hd + c, src.unsafe_load(c))
        if m <= STREAM_ROWS and hd == PANEL:
            scores_streamed(sg, fp, qg, m, kh, hd, frames)
        else:
            for l0 in range(0, frames, PANEL):
                var cols = min(PANEL, frames - l0)
                if cols < PANEL:
                    padded_block(pad, kh + l0, frames, hd, cols)
                    for kb in range(0, hd, PANEL):
                        block_product(sg + l0, fp, qg, hd, m, pad, PANEL, kb, min(PANEL, hd - kb), kb == 0)
                else:
                    for kb in range(0, hd, PANEL):
                        block_product(sg + l0, fp, qg, hd, m, kh + l0, frames, kb, min(PANEL, hd - kb), kb == 0)
        for j in range(m):
            softmax(sg + j * fp, frames)
        for c0 in range(0, hd, PANEL):
            var cols = min(PANEL, hd - c0)
            if cols < PANEL:
                padded_block(pad, vh + c0, hd, frames, cols)
                for kb in range(0, frames, PANEL):
                    block_product(og, PANEL, sg, fp, m, pad, PANEL, kb, min(PANEL, frames - kb), kb == 0)
            else:
                for kb in range(0, frames, PANEL):
                    block_product(og, PANEL, sg, fp, m, vh + c0, hd, kb, min(PANEL, frames - kb), kb == 0)
            for j in range(m):
                var o = dst + (order.unsafe_load(lo + j) * heads + h) * hd + c0
                for c in range(cols):
                    o.unsafe_store(c, og.unsafe_load(j * PANEL + c))
        buf.free()

    crew.share(groups * heads, work)
