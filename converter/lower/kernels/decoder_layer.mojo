# One decoder block for a few rows, one new token each: the step of the decoder, fused.
import extensibility
from extensibility import InputTensor, OutputTensor, _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from std.math import sqrt

from .amx import BLOCK, TILE, request_amx
from .amx_rows import alloc_packed, free_tiles, pack_row, share_pack, share_rows_amx, worker_tiles
from .rows import GELU, PLAIN, RESIDUAL, SCALED, share_linear, share_linear_panels
from .simd import F32, V, round_bf16
from .layer_attention import cross_attention, self_attention
from .pairs import share_pair_products, share_round
from .team import Crew, team


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


def _share_norm[pairs: Bool](
    mut crew: Crew, h: UnsafePointer[Float32, MutUntrackedOrigin], hb: UnsafePointer[BFloat16, MutUntrackedOrigin],
    x: UnsafePointer[Float32, _], w: UnsafePointer[Float32, _], b: UnsafePointer[Float32, _], rows: Int, d: Int, eps: Float32,
):
    """h = layer norm of each row of x, and (`pairs`) h rounded to bfloat16 into hb: one phase
    of `crew`'s team, a job a row."""

    def job(r: Int) {var h, var hb, var x, var w, var b, var d, var eps}:
        _layer_norm(h + r * d, x + r * d, w, b, d, eps)
        comptime if pairs:
            round_bf16(hb + r * d, h + r * d, d, 1.0)

    crew.share(rows, job)


def _share_product[panels: Bool, pairs: Bool, dt: DType, mode: Int, o: MutOrigin](
    mut crew: Crew, y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], xb: UnsafePointer[BFloat16, _],
    w: UnsafePointer[Scalar[dt], _], b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool,
    scale: Float32, rows: Int, n: Int, k: Int,
):
    """rows x (k) times W (n, k)^T into y (rows, n), with the epilogue `mode`, as one phase of
    `crew`'s team: on bfloat16 pair panels from xb, x already rounded (pairs.share_pair_products), on
    weight panels (rows.share_linear_panels), or on the plain weight (rows.share_linear)."""
    comptime if pairs:
        share_pair_products[mode](crew, y, xb, w.bitcast[BFloat16](), b, res, has_bias, scale, rows, n, k)
    elif panels:
        share_linear_panels[dt, mode](crew, y, x, w, b, res, has_bias, scale, rows, n, k)
    else:
        share_linear[dt, mode](crew, y, x, w, b, res, has_bias, scale, rows, n, k)


def _share_norm_pack(
    mut crew: Crew, h: UnsafePointer[Float32, MutUntrackedOrigin], xb: UnsafePointer[UInt32, MutUntrackedOrigin],
    x: UnsafePointer[Float32, _], w: UnsafePointer[Float32, _], b: UnsafePointer[Float32, _], rows: Int, d: Int, eps: Float32,
):
    """h = layer norm of each row of x, rounded to bfloat16 and packed as AMX B tiles into xb
    (amx_rows.pack_row): one phase of `crew`'s team, a job a chunk of 16 rows (amx_rows.share_pack)."""

    def job(c: Int) {var h, var xb, var x, var w, var b, var rows, var d, var eps}:
        for r in range(c * TILE, min(rows, (c + 1) * TILE)):
            _layer_norm(h + r * d, x + r * d, w, b, d, eps)
            pack_row(xb, h + r * d, r, d)

    crew.share((rows + TILE - 1) // TILE, job)


comptime _PHASES = 24  # at most, of one block's team (it shares 18 with pair panels or AMX tiles, 15 on neither)


@extensibility.register("whisper_max.decoder_layer")
struct DecoderLayer:
    """One residual attention block of Whisper's text decoder for `rows` rows, one new token
    each, row r at cache position position[r] (`position` holds one value for every row, or one
    per row):

        x1 = x + out(self_attention(ln1(x)))      keys and values of the new token written into
                                                   the caches (slots, heads, capacity, hd) first
        x2 = x1 + cross_out(cross_attention(ln2(x1)))   over the row's window's keys and values
        y  = x2 + fc2(gelu(fc1(ln3(x2))))
    and `cq`, the rows' cross-attention queries (scaled, as the keys are): the alignment heads'
    scores of word timestamps are cq's heads times the window's keys, taken on the host.

    as openai-whisper computes it: q and k scaled by `scale` (hd ** -0.25) after their
    products, keys stored scaled; exact GELU; float32 throughout.

    Where rows keep their state: without a lineage, row r is cache slot r (slots == rows). With
    `lineage` (rows, capacity) int32, position i of row r is in slot lineage[r, i], and the new
    token is written into slot lineage[r, position[r]]: beam search reorders rows after every
    step by rewriting this map instead of moving caches, and an engine decoding rows of many
    streams keeps each row's positions in slots of a pool. No two rows may write the same
    (slot, position). Which window a row reads: `window` (rows) int32 names its window in the
    cross keys/values (windows, ...); without it there is one window for all rows or one per row.
    The cross keys and values are float32, or bfloat16 (a bfloat16 package's: half the bytes a
    row reads), widened exactly as they are read.
    Weight matrices are float32, float16 or bfloat16 (widened exactly as they are read), in
    panels or not, or bfloat16 in pair panels (VDPBF16PS: each product's rows rounded to
    bfloat16, pair products summed in float32). One kernel
    instead of ~40 graph ops: the step is bound by reading weights, and each of those ops paid a
    launch."""

    @staticmethod
    def execute[target: StaticString, heads: Int, scale: Float64, eps: Float64, amx: Bool](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        cq: OutputTensor[dtype=DType.float32, rank=2, ...],
        kc: MutableInputTensor[dtype=DType.float32, rank=4, ...],
        vc: MutableInputTensor[dtype=DType.float32, rank=4, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        position: InputTensor[dtype=DType.int64, rank=1, ...],
        ln1_w: InputTensor[dtype=DType.float32, rank=1, ...],
        ln1_b: InputTensor[dtype=DType.float32, rank=1, ...],
        wq: InputTensor[...],
        bq: InputTensor[dtype=DType.float32, rank=1, ...],
        wk: InputTensor[...],
        wv: InputTensor[...],
        bv: InputTensor[dtype=DType.float32, rank=1, ...],
        wo: InputTensor[...],
        bo: InputTensor[dtype=DType.float32, rank=1, ...],
        ln2_w: InputTensor[dtype=DType.float32, rank=1, ...],
        ln2_b: InputTensor[dtype=DType.float32, rank=1, ...],
        wcq: InputTensor[...],
        bcq: InputTensor[dtype=DType.float32, rank=1, ...],
        wco: InputTensor[...],
        bco: InputTensor[dtype=DType.float32, rank=1, ...],
        ln3_w: InputTensor[dtype=DType.float32, rank=1, ...],
        ln3_b: InputTensor[dtype=DType.float32, rank=1, ...],
        w1: InputTensor[...],
        b1: InputTensor[dtype=DType.float32, rank=1, ...],
        w2: InputTensor[...],
        b2: InputTensor[dtype=DType.float32, rank=1, ...],
        ckt: InputTensor[rank=4, ...],
        cv: InputTensor[dtype=ckt.dtype, rank=4, ...],
        lineage: InputTensor[dtype=DType.int32, rank=2, ...],
        window: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var d = x.dim_size(1)
        var hd = d // heads
        var slots = kc.dim_size(0)
        var cap = kc.dim_size(2)
        var f = b1.dim_size(0)
        comptime panels = wq.rank == 3  # the matrices in panels (runtime.weights.to_panels)
        comptime pairs = wq.rank == 4  # bfloat16 matrices in pair panels (runtime.weights.to_pairs)
        comptime if pairs:
            if wq.rank != 4 or wk.rank != 4 or wv.rank != 4 or wo.rank != 4 or wcq.rank != 4 or wco.rank != 4 or w1.rank != 4 or w2.rank != 4:
                raise Error("whisper_max.decoder_layer: some weight matrices in pair panels and some not")
            comptime bf = DType.bfloat16
            if wq.dtype != bf or wk.dtype != bf or wv.dtype != bf or wo.dtype != bf or wcq.dtype != bf or wco.dtype != bf or w1.dtype != bf or w2.dtype != bf:
                raise Error("whisper_max.decoder_layer: pair panels are bfloat16 only")
            if amx:
                raise Error("whisper_max.decoder_layer: amx=True takes bfloat16 matrices, not pair panels")
            if wq.dim_size(1) * 2 != d or w1.dim_size(0) != (f + 63) // 64 or w2.dim_size(1) * 2 != f or wq.dim_size(2) != 64 or wq.dim_size(3) != 2:
                raise Error("whisper_max.decoder_layer: weight pair panels are not (ceil(n / 64), k / 2, 64, 2) for the block's widths")
        elif panels:
            if wq.rank != 3 or wk.rank != 3 or wv.rank != 3 or wo.rank != 3 or wcq.rank != 3 or wco.rank != 3 or w1.rank != 3 or w2.rank != 3:
                raise Error("whisper_max.decoder_layer: some weight matrices in panels and some not")
            if amx:
                raise Error("whisper_max.decoder_layer: amx=True takes bfloat16 matrices, not panels")
            if wq.dim_size(1) != d or w1.dim_size(0) != (f + 63) // 64 or w2.dim_size(1) != f or wq.dim_size(2) != 64:
                raise Error("whisper_max.decoder_layer: weight panels are not (ceil(n / 64), k, 64) for the block's widths")
        elif wq.rank != 2 or wk.rank != 2 or wv.rank != 2 or wo.rank != 2 or wcq.rank != 2 or wco.rank != 2 or w1.rank != 2 or w2.rank != 2:
            raise Error("whisper_max.decoder_layer: weight matrices of rank 2 (or all in panels) expected")
        var windows = ckt.dim_size(0)
        var frames = ckt.dim_size(3)
        var has_lineage = lineage.dim_size(0) != 0
        var has_window = window.dim_size(0) != 0
        if hd * heads != d:
            raise Error("whisper_max.decoder_layer: heads * head width != d")
        if cq.dim_size(0) != rows or cq.dim_size(1) != d:
            raise Error("whisper_max.decoder_layer: the cross queries output is not (rows, d)")
        if kc.dim_size(1) != heads or kc.dim_size(3) != hd or vc.dim_size(0) != slots or vc.dim_size(2) != cap:
            raise Error("whisper_max.decoder_layer: the caches are not (slots, heads, capacity, head width)")
        if not has_lineage and slots != rows:
            raise Error("whisper_max.decoder_layer: caches of another number of rows than x, and no lineage to map rows to them")
        comptime if ckt.dtype != DType.float32 and ckt.dtype != DType.bfloat16:
            raise Error("whisper_max.decoder_layer: cross keys/values of float32 or bfloat16 only")
        if ckt.dim_size(2) != hd or cv.dim_size(0) != windows or cv.dim_size(2) != frames:
            raise Error("whisper_max.decoder_layer: cross keys/values are not (windows, heads, hd, frames) / (.., frames, hd)")
        if not has_window and windows != 1 and windows != rows:
            raise Error("whisper_max.decoder_layer: cross keys/values for neither one window nor one per row, and no window input")
        if has_window and window.dim_size(0) != rows:
            raise Error("whisper_max.decoder_layer: window is not one index per row")
        comptime if amx:
            comptime bf = DType.bfloat16
            if wq.dtype != bf or wk.dtype != bf or wv.dtype != bf or wo.dtype != bf or wcq.dtype != bf or wco.dtype != bf or w1.dtype != bf or w2.dtype != bf:
                raise Error("whisper_max.decoder_layer: amx=True takes bfloat16 weight matrices only")
            if d % BLOCK != 0 or f % BLOCK != 0:
                raise Error("whisper_max.decoder_layer: amx=True takes a width and hidden width that are multiples of 32")
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
        var scratch = alloc[Float32](7 * rd + rows * f + rows * heads * cap)
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

        var yp = y.unsafe_ptr()
        var cqp = cq.unsafe_ptr()  # the rows' scaled cross-attention queries: word timestamps' scores
        var ckp = ckt.unsafe_ptr()
        var cvp = cv.unsafe_ptr()
        var pln1_w = ln1_w.unsafe_ptr()
        var pln1_b = ln1_b.unsafe_ptr()
        var pln2_w = ln2_w.unsafe_ptr()
        var pln2_b = ln2_b.unsafe_ptr()
        var pln3_w = ln3_w.unsafe_ptr()
        var pln3_b = ln3_b.unsafe_ptr()
        var pwq = wq.unsafe_ptr()
        var pwk = wk.unsafe_ptr()
        var pwv = wv.unsafe_ptr()
        var pwo = wo.unsafe_ptr()
        var pwcq = wcq.unsafe_ptr()
        var pwco = wco.unsafe_ptr()
        var pw1 = w1.unsafe_ptr()
        var pw2 = w2.unsafe_ptr()
        var pbq = bq.unsafe_ptr()
        var pbv = bv.unsafe_ptr()
        var pbo = bo.unsafe_ptr()
        var pbcq = bcq.unsafe_ptr()
        var pbco = bco.unsafe_ptr()
        var pb1 = b1.unsafe_ptr()
        var pb2 = b2.unsafe_ptr()

        @always_inline
        def write_cache(r: Int) {var kp, var vp, var kn, var vn, var dst_slot, var pos, var cap, var hd, var d}:
            """The new token's keys and values of row r into its cache slot and position."""
            for i in range(heads):
                var dst = ((dst_slot.unsafe_load(r) * heads + i) * cap + pos.unsafe_load(r)) * hd
                for c in range(hd):
                    (kp + dst).unsafe_store(c, (kn + r * d + i * hd).unsafe_load(c))
                    (vp + dst).unsafe_store(c, (vn + r * d + i * hd).unsafe_load(c))

        comptime if amx:
            # the same phases on AMX tiles: each worker configures its tiles once for the block,
            # and each input of products is rounded and packed as B tiles once, a job a chunk of 16 rows
            request_amx()
            var xb = alloc_packed(rows, max(d, f))

            def amx_block(mut crew: Crew) {
                var rows, var d, var f, var hd, var cap, var frames, var groups, var s, var e,
                var h, var xb, var q, var kn, var vn, var att, var x1, var x2, var hid, var sc, var kp, var vp, var xp,
                var yp, var cqp, var ckp, var cvp, var lp, var has_lineage, var pos, var order, var starts,
                var wins, var pln1_w, var pln1_b, var pln2_w, var pln2_b, var pln3_w, var pln3_b, var pwq, var pwk,
                var pwv, var pwo, var pwcq, var pwco, var pw1, var pw2, var pbq, var pbv, var pbo, var pbcq, var pbco,
                var pb1, var pb2, ref write_cache
            }:
                var t = worker_tiles(0)  # d and f are whole blocks (checked above): nothing to pad
                _share_norm_pack(crew, h, xb, xp, pln1_w, pln1_b, rows, d, e)
                share_rows_amx[SCALED](crew, t, q, xb, pwq.bitcast[BFloat16](), pbq, xp, True, s, rows, d, d)
                share_rows_amx[SCALED](crew, t, kn, xb, pwk.bitcast[BFloat16](), pbq, xp, False, s, rows, d, d)
                share_rows_amx[PLAIN](crew, t, vn, xb, pwv.bitcast[BFloat16](), pbv, xp, True, s, rows, d, d)
                crew.share(rows, write_cache)
                self_attention(crew, att, q, kp, vp, sc, lp, has_lineage, pos, rows, heads, hd, cap)
                share_pack(crew, xb, att, rows, d)
                share_rows_amx[RESIDUAL](crew, t, x1, xb, pwo.bitcast[BFloat16](), pbo, xp, True, s, rows, d, d)
                _share_norm_pack(crew, h, xb, x1, pln2_w, pln2_b, rows, d, e)
                share_rows_amx[SCALED](crew, t, q, xb, pwcq.bitcast[BFloat16](), pbcq, xp, True, s, rows, d, d)

                def copy_queries(r: Int) {var cqp, var q, var d}:
                    for c in range(d):
                        cqp.unsafe_store(r * d + c, q.unsafe_load(r * d + c))

                crew.share(rows, copy_queries)
                cross_attention(crew, att, q, ckp, cvp, order, starts, wins, groups, heads, hd, frames)
                share_pack(crew, xb, att, rows, d)
                share_rows_amx[RESIDUAL](crew, t, x2, xb, pwco.bitcast[BFloat16](), pbco, x1, True, s, rows, d, d)
                _share_norm_pack(crew, h, xb, x2, pln3_w, pln3_b, rows, d, e)
                share_rows_amx[GELU](crew, t, hid, xb, pw1.bitcast[BFloat16](), pb1, xp, True, s, rows, f, d)
                share_pack(crew, xb, hid, rows, f)
                share_rows_amx[RESIDUAL](crew, t, yp, xb, pw2.bitcast[BFloat16](), pb2, x2, True, s, rows, d, f)
                free_tiles(t)

            team(_PHASES, amx_block)
            xb.free()
        else:
            # every step of the block as a phase of one team: one dispatch to the workers for the
            # block instead of ~10 (one row's step is ~10 products and attentions of 10-100 us,
            # and a dispatch costs ~10 us)
            var hb = alloc[BFloat16](rows * max(d, f) if pairs else 0)  # pair products' rounded input

            def block(mut crew: Crew) {
                var rows, var d, var f, var hd, var cap, var frames, var groups, var s, var e, var rd,
                var h, var hb, var q, var kn, var vn, var att, var x1, var x2, var hid, var sc, var kp, var vp, var xp,
                var yp, var cqp, var ckp, var cvp, var lp, var has_lineage, var pos, var dst_slot, var order, var starts,
                var wins, var pln1_w, var pln1_b, var pln2_w, var pln2_b, var pln3_w, var pln3_b, var pwq, var pwk,
                var pwv, var pwo, var pwcq, var pwco, var pw1, var pw2, var pbq, var pbv, var pbo, var pbcq, var pbco,
                var pb1, var pb2, ref write_cache
            }:
                _share_norm[pairs](crew, h, hb, xp, pln1_w, pln1_b, rows, d, e)
                _share_product[panels, pairs, wq.dtype, SCALED](crew, q, h, hb, pwq, pbq, xp, True, s, rows, d, d)
                _share_product[panels, pairs, wk.dtype, SCALED](crew, kn, h, hb, pwk, pbq, xp, False, s, rows, d, d)
                _share_product[panels, pairs, wv.dtype, PLAIN](crew, vn, h, hb, pwv, pbv, xp, True, s, rows, d, d)
                crew.share(rows, write_cache)
                self_attention(crew, att, q, kp, vp, sc, lp, has_lineage, pos, rows, heads, hd, cap)
                comptime if pairs:
                    share_round(crew, hb, att, rows, d)
                _share_product[panels, pairs, wo.dtype, RESIDUAL](crew, x1, att, hb, pwo, pbo, xp, True, s, rows, d, d)
                _share_norm[pairs](crew, h, hb, x1, pln2_w, pln2_b, rows, d, e)
                _share_product[panels, pairs, wcq.dtype, SCALED](crew, q, h, hb, pwcq, pbcq, xp, True, s, rows, d, d)

                def copy_queries(r: Int) {var cqp, var q, var d}:
                    for c in range(d):
                        cqp.unsafe_store(r * d + c, q.unsafe_load(r * d + c))

                crew.share(rows, copy_queries)
                cross_attention(crew, att, q, ckp, cvp, order, starts, wins, groups, heads, hd, frames)
                comptime if pairs:
                    share_round(crew, hb, att, rows, d)
                _share_product[panels, pairs, wco.dtype, RESIDUAL](crew, x2, att, hb, pwco, pbco, x1, True, s, rows, d, d)
                _share_norm[pairs](crew, h, hb, x2, pln3_w, pln3_b, rows, d, e)
                _share_product[panels, pairs, w1.dtype, GELU](crew, hid, h, hb, pw1, pb1, xp, True, s, rows, f, d)
                comptime if pairs:
                    share_round(crew, hb, hid, rows, f)
                _share_product[panels, pairs, w2.dtype, RESIDUAL](crew, yp, hid, hb, pw2, pb2, x2, True, s, rows, d, f)

            team(_PHASES, block)
            hb.free()
        scratch.free()
        ints.free()
