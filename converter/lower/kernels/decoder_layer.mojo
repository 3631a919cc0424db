# One decoder block for a few rows, one new token each: the step of the decoder, fused.
import extensibility
from extensibility import InputTensor, OutputTensor, _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.math import sqrt
from std.runtime import parallelism_level

from .amx import BLOCK, request_amx, tile_config, tile_release, TILE
from .amx_rows import linear_rows_amx, pack_rows, rows_blocks
from .rows import GELU, PANEL, PLAIN, RESIDUAL, SCALED, block_product, dot, linear, linear_panels, weight_row
from .simd import F32, V, softmax
from .layer_attention import cross_attention, self_attention
from .pairs import linear_pairs


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
                weight_row[dq, SCALED](dst, x, wq + j * d, bq.unsafe_load(j), bq, scale, rows, j, d, d)
            elif which == 1:
                weight_row[dk, SCALED](dst, x, wk + j * d, Float32(0), bq, scale, rows, j, d, d)
            else:
                weight_row[dv, PLAIN](dst, x, wv + j * d, bv.unsafe_load(j), bq, scale, rows, j, d, d)

    parallelize(work, tasks)


def _qkv_amx(
    qkv: UnsafePointer[Float32, MutUntrackedOrigin], x: UnsafePointer[Float32, _],
    wq: UnsafePointer[BFloat16, _], bq: UnsafePointer[Float32, _], wk: UnsafePointer[BFloat16, _],
    wv: UnsafePointer[BFloat16, _], bv: UnsafePointer[Float32, _], scale: Float32, rows: Int, d: Int,
) raises:
    """_qkv on AMX (amx.rows_blocks) for bfloat16 weights: x rounded to bfloat16 and packed
    once, the 32-row blocks of the three weights split across the workers in one dispatch."""
    request_amx()
    var xb = alloc[UInt32]((rows + TILE - 1) // TILE * (d // 2) * TILE)
    pack_rows(xb, x, rows, d)
    var per = d // BLOCK
    var blocks = 3 * per
    var tasks = max(1, min(parallelism_level(), blocks))

    def work(t: Int) {var qkv, var x, var xb, var wq, var bq, var wk, var wv, var bv, var scale, var rows, var d, var per, var blocks, var tasks}:
        var pad = alloc[BFloat16](0)  # d is whole blocks (the caller checks): nothing to pad
        var tmp = alloc[Float32](4 * TILE * TILE)
        var lo = t * blocks // tasks
        var hi = (t + 1) * blocks // tasks
        tile_config()
        for which in range(3):
            var a = max(lo, which * per) - which * per
            var z = min(hi, (which + 1) * per) - which * per
            if a >= z:
                continue
            var dst = qkv + which * rows * d  # x stands in for the unused residual
            if which == 0:
                rows_blocks[SCALED](dst, xb, wq, bq, x, True, scale, rows, d, d, a, z, pad, tmp)
            elif which == 1:
                rows_blocks[SCALED](dst, xb, wk, bq, x, False, scale, rows, d, d, a, z, pad, tmp)
            else:
                rows_blocks[PLAIN](dst, xb, wv, bv, x, True, scale, rows, d, d, a, z, pad, tmp)
        tile_release()
        tmp.free()
        pad.free()

    parallelize(work, tasks)
    xb.free()


def _linear[amx: Bool, panels: Bool, pairs: Bool, dt: DType, mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], w: UnsafePointer[Scalar[dt], _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
) raises:
    """rows.linear, or on AMX (amx.linear_rows_amx, x rounded to bfloat16) when `amx`, or on the
    weight in panels (rows.linear_panels) when `panels`, or on bfloat16 pair panels with
    VDPBF16PS (pairs.linear_pairs, x rounded to bfloat16) when `pairs`."""
    comptime if amx:
        linear_rows_amx[mode](y, x, w.bitcast[BFloat16](), b, res, has_bias, scale, rows, n, k)
    elif pairs:
        linear_pairs[mode](y, x, w.bitcast[BFloat16](), b, res, has_bias, scale, rows, n, k)
    elif panels:
        linear_panels[dt, mode](y, x, w, b, res, has_bias, scale, rows, n, k)
    else:
        linear[dt, mode](y, x, w, b, res, has_bias, scale, rows, n, k)


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

        for r in range(rows):
            _layer_norm(h + r * d, xp + r * d, ln1_w.unsafe_ptr(), ln1_b.unsafe_ptr(), d, e)
        comptime if pairs:  # three passes (one dispatch each) over the pair panels of q, k, v
            linear_pairs[SCALED](q, h, wq.unsafe_ptr().bitcast[BFloat16](), bq.unsafe_ptr(), xp, True, s, rows, d, d)
            linear_pairs[SCALED](q + rd, h, wk.unsafe_ptr().bitcast[BFloat16](), bq.unsafe_ptr(), xp, False, s, rows, d, d)
            linear_pairs[PLAIN](q + 2 * rd, h, wv.unsafe_ptr().bitcast[BFloat16](), bv.unsafe_ptr(), xp, True, s, rows, d, d)
        elif panels:  # three passes (one dispatch each) over the panels of q, k, v
            linear_panels[wq.dtype, SCALED](q, h, wq.unsafe_ptr(), bq.unsafe_ptr(), xp, True, s, rows, d, d)
            linear_panels[wk.dtype, SCALED](q + rd, h, wk.unsafe_ptr(), bq.unsafe_ptr(), xp, False, s, rows, d, d)
            linear_panels[wv.dtype, PLAIN](q + 2 * rd, h, wv.unsafe_ptr(), bv.unsafe_ptr(), xp, True, s, rows, d, d)
        elif amx:
            _qkv_amx(q, h, wq.unsafe_ptr().bitcast[BFloat16](), bq.unsafe_ptr(), wk.unsafe_ptr().bitcast[BFloat16](), wv.unsafe_ptr().bitcast[BFloat16](), bv.unsafe_ptr(), s, rows, d)
        else:
            _qkv[wq.dtype, wk.dtype, wv.dtype](q, h, wq.unsafe_ptr(), bq.unsafe_ptr(), wk.unsafe_ptr(), wv.unsafe_ptr(), bv.unsafe_ptr(), s, rows, d)
        for r in range(rows):
            for i in range(heads):
                var dst = ((dst_slot.unsafe_load(r) * heads + i) * cap + pos.unsafe_load(r)) * hd
                for c in range(hd):
                    (kp + dst).unsafe_store(c, (kn + r * d + i * hd).unsafe_load(c))
                    (vp + dst).unsafe_store(c, (vn + r * d + i * hd).unsafe_load(c))
        self_attention(att, q, kp, vp, sc, lp, has_lineage, pos, rows, heads, hd, cap)
        _linear[amx, panels, pairs, wo.dtype, RESIDUAL](x1, att, wo.unsafe_ptr(), bo.unsafe_ptr(), xp, True, s, rows, d, d)

        for r in range(rows):
            _layer_norm(h + r * d, x1 + r * d, ln2_w.unsafe_ptr(), ln2_b.unsafe_ptr(), d, e)
        _linear[amx, panels, pairs, wcq.dtype, SCALED](q, h, wcq.unsafe_ptr(), bcq.unsafe_ptr(), xp, True, s, rows, d, d)
        var cqp = cq.unsafe_ptr()  # the rows' scaled cross-attention queries: word timestamps' scores
        for i in range(rd):
            cqp.unsafe_store(i, q.unsafe_load(i))
        cross_attention(att, q, ckt.unsafe_ptr(), cv.unsafe_ptr(), order, starts, wins, groups, heads, hd, frames)
        _linear[amx, panels, pairs, wco.dtype, RESIDUAL](x2, att, wco.unsafe_ptr(), bco.unsafe_ptr(), x1, True, s, rows, d, d)

        for r in range(rows):
            _layer_norm(h + r * d, x2 + r * d, ln3_w.unsafe_ptr(), ln3_b.unsafe_ptr(), d, e)
        _linear[amx, panels, pairs, w1.dtype, GELU](hid, h, w1.unsafe_ptr(), b1.unsafe_ptr(), xp, True, s, rows, f, d)
        _linear[amx, panels, pairs, w2.dtype, RESIDUAL](y.unsafe_ptr(), hid, w2.unsafe_ptr(), b2.unsafe_ptr(), x2, True, s, rows, d, f)
        scratch.free()
        ints.free()
