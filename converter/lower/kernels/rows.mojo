# Products of a few rows (decoder steps) against a stored weight, bound by reading the weight.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.math import erf
from std.memory import stack_allocation

from .simd import F32, V, wide, wide1
from .team import Crew, split, team


@extensibility.register("whisper_max.linear_rows")
struct LinearRows:
    """y (rows, n) = x (rows, k) @ w (n, k)^T + b (n), for a few rows (decoder steps).

    Matrix-vector work is bound by reading w: each weight row is loaded from memory once and
    multiplied with every row of x from cache, the n weight rows split across the runtime's
    workers. w is float32, or float16 or bfloat16 widened exactly to float32 as it is read; x, b and the
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
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var bp = b.unsafe_ptr()

        def run(mut crew: Crew) {var yp, var xp, var wp, var bp, var rows, var n, var k}:
            share_linear[w.dtype, PLAIN](crew, yp, xp, wp, bp, xp, True, 1.0, rows, n, k)

        team(1, run)


def dot[dt: DType](a: UnsafePointer[Scalar[dt], _], x: UnsafePointer[Float32, _], k: Int) -> Float32:
    """sum(a[:k] * x[:k]) with a widened to float32: four vector sums over blocks of 4 V, then
    V-wide and single tails."""
    var k4v = k - k % (4 * V)
    var k16 = k - k % V
    var a0 = SIMD[F32, V](0)
    var a1 = SIMD[F32, V](0)
    var a2 = SIMD[F32, V](0)
    var a3 = SIMD[F32, V](0)
    for c in range(0, k4v, 4 * V):
        a0 += wide(a, c) * x.unsafe_load[width=V](c)
        a1 += wide(a, c + V) * x.unsafe_load[width=V](c + V)
        a2 += wide(a, c + 2 * V) * x.unsafe_load[width=V](c + 2 * V)
        a3 += wide(a, c + 3 * V) * x.unsafe_load[width=V](c + 3 * V)
    for c in range(k4v, k16, V):
        a0 += wide(a, c) * x.unsafe_load[width=V](c)
    var s = ((a0 + a1) + (a2 + a3)).reduce_add()
    for c in range(k16, k):
        s += wide1(a, c) * x.unsafe_load(c)
    return s


def _dot4[dt: DType](a: UnsafePointer[Scalar[dt], _], x: UnsafePointer[Float32, _], k: Int) -> SIMD[F32, 4]:
    """sum(a[:k] * x[i * k : i * k + k]) for four consecutive rows i of x: each V-wide block of a
    is loaded and widened once for the four (a beam step's rows share every weight row). Each
    row is summed exactly as dot sums it (the same blocks, accumulators, order and tail), so a
    row's result does not depend on the rows it is decoded with: alone, in a group of four, or
    among the remainder."""
    var k4v = k - k % (4 * V)
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
    for c in range(0, k4v, 4 * V):
        var w0 = wide(a, c)
        var w1 = wide(a, c + V)
        var w2 = wide(a, c + 2 * V)
        var w3 = wide(a, c + 3 * V)
        p0 += w0 * x.unsafe_load[width=V](c)
        p1 += w1 * x.unsafe_load[width=V](c + V)
        p2 += w2 * x.unsafe_load[width=V](c + 2 * V)
        p3 += w3 * x.unsafe_load[width=V](c + 3 * V)
        q0 += w0 * x1.unsafe_load[width=V](c)
        q1 += w1 * x1.unsafe_load[width=V](c + V)
        q2 += w2 * x1.unsafe_load[width=V](c + 2 * V)
        q3 += w3 * x1.unsafe_load[width=V](c + 3 * V)
        r0 += w0 * x2.unsafe_load[width=V](c)
        r1 += w1 * x2.unsafe_load[width=V](c + V)
        r2 += w2 * x2.unsafe_load[width=V](c + 2 * V)
        r3 += w3 * x2.unsafe_load[width=V](c + 3 * V)
        t0 += w0 * x3.unsafe_load[width=V](c)
        t1 += w1 * x3.unsafe_load[width=V](c + V)
        t2 += w2 * x3.unsafe_load[width=V](c + 2 * V)
        t3 += w3 * x3.unsafe_load[width=V](c + 3 * V)
    for c in range(k4v, k16, V):
        var w = wide(a, c)
        p0 += w * x.unsafe_load[width=V](c)
        q0 += w * x1.unsafe_load[width=V](c)
        r0 += w * x2.unsafe_load[width=V](c)
        t0 += w * x3.unsafe_load[width=V](c)
    var s0 = ((p0 + p1) + (p2 + p3)).reduce_add()
    var s1 = ((q0 + q1) + (q2 + q3)).reduce_add()
    var s2 = ((r0 + r1) + (r2 + r3)).reduce_add()
    var s3 = ((t0 + t1) + (t2 + t3)).reduce_add()
    for c in range(k16, k):
        var wc = wide1(a, c)
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
def store_at[mode: Int, w: Int, o: MutOrigin](y: UnsafePointer[Float32, o], res: UnsafePointer[Float32, _], at: Int, sum: SIMD[F32, w], scale: Float32):
    """y[at : at + w] = the epilogue `mode` of sum (x @ w^T + b at w consecutive columns)."""
    var s = sum
    comptime if mode == SCALED:
        s = s * scale
    elif mode == GELU:
        s = 0.5 * s * (1.0 + erf(s * 0.7071067811865476))
    elif mode == RESIDUAL:
        s = res.unsafe_load[width=w](at) + s
    y.unsafe_store(at, s)


@always_inline
def store[mode: Int, o: MutOrigin](y: UnsafePointer[Float32, o], res: UnsafePointer[Float32, _], r: Int, j: Int, n: Int, sum: Float32, scale: Float32):
    """y[r, j] = the epilogue `mode` of sum (x @ w^T + b at row r, column j)."""
    store_at[mode, 1](y, res, r * n + j, sum, scale)


def weight_row[dt: DType, mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], row: UnsafePointer[Scalar[dt], _], bias: Float32,
    res: UnsafePointer[Float32, _], scale: Float32, rows: Int, j: Int, n: Int, k: Int,
):
    """Column j of y (rows, n): weight row `row` (k) times every row of x (rows, k), plus bias,
    through the epilogue `mode`; four rows per pass over the weight row, then one at a time."""
    var r4 = rows - rows % 4
    for r0 in range(0, r4, 4):
        var s4 = _dot4(row, x + r0 * k, k)
        for i in range(4):
            store[mode](y, res, r0 + i, j, n, s4[i] + bias, scale)
    for r in range(r4, rows):
        store[mode](y, res, r, j, n, dot(row, x + r * k, k) + bias, scale)


comptime ROW_JOB = 64  # weight rows of one job of share_linear


def share_linear[dt: DType, mode: Int, o: MutOrigin](
    mut crew: Crew, y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], w: UnsafePointer[Scalar[dt], _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
):
    """rows x (k) times w (n, k)^T into y (rows, n), with the epilogue `mode`, as one phase of
    `crew`'s team: a job is the columns of ROW_JOB weight rows, each weight row read once for all
    rows (weight_row)."""

    def job(j: Int) {var y, var x, var w, var b, var res, var has_bias, var scale, var rows, var n, var k}:
        for jj in range(j * ROW_JOB, min(n, (j + 1) * ROW_JOB)):
            weight_row[dt, mode](y, x, w + jj * k, b.unsafe_load(jj) if has_bias else Float32(0), res, scale, rows, jj, n, k)

    crew.share((n + ROW_JOB - 1) // ROW_JOB, job)


comptime PANEL = 64  # output columns of one panel of a weight in panels (runtime.package.PANEL)
# One register tile: R rows x NV vectors of columns, R * NV sums + NV panel vectors + one
# broadcast held in registers. MR rows at most: 6 x 4 (29 of AVX-512's 32), or 6 x 2 on AVX2
# (15 of its 16; a 3 x 4 tile there needs 17 and spills one every step).
comptime MR = 6
# rows whose sums of one panel share_linear_panels keeps on the stack (24 KB) while the blocks of k
# add to them; more rows (an encoder's 1500 a window) are done in chunks of this many, each
# over the whole panel, which stays in L2
comptime CHUNK_ROWS = 96


def tile_vectors(rows: Int) -> Int:
    """NV, the vectors of columns in a register tile of `rows` rows. Each vector of sums is one
    chain of dependent FMAs (a step's sum needs the last one's), so a tile of few rows is bound
    by the FMA's latency unless it keeps enough chains: one row on AVX2 takes the whole panel (8
    chains; each panel vector is used once, so 8 sums and a temporary), two rows 4 (13 registers),
    more rows 2; on AVX-512 every tile is the whole panel (4 vectors of 16)."""
    if V >= 16:
        return PANEL // V
    if rows == 1:
        return PANEL // V
    if rows == 2:
        return 4
    return 2


@always_inline
def _tile[dt: DType, R: Int, NV: Int](
    tot: UnsafePointer[Float32, MutUntrackedOrigin], ldt: Int, x: UnsafePointer[Float32, _], ldx: Int,
    panel: UnsafePointer[Scalar[dt], _], ldp: Int, kb: Int, kl: Int, first: Bool,
):
    """tot[i, 0:NV V] (rows ldt apart) = (first) or += the sums over c in kb ..< kb + kl of
    x[i, c] * panel[c, 0:NV V] for i < R (x rows ldx apart, panel rows ldp apart), the R x NV V
    sums in registers, each summed in c order."""
    var acc = stack_allocation[R * NV * V, Float32, alignment=64]()
    var b = stack_allocation[NV * V, Float32, alignment=64]()
    comptime for i in range(R * NV):
        acc.store(i * V, SIMD[F32, V](0))
    for c in range(kb, kb + kl):
        var p = panel + c * ldp
        comptime for q in range(NV):
            b.store(q * V, wide(p, q * V))
        comptime for i in range(R):
            var a = SIMD[F32, V](x.unsafe_load(i * ldx + c))
            comptime for q in range(NV):
                acc.store((i * NV + q) * V, a.fma(b.load[width=V](q * V), acc.load[width=V]((i * NV + q) * V)))
    comptime for i in range(R):
        comptime for q in range(NV):
            var o = i * ldt + q * V
            if first:
                tot.store(o, acc.load[width=V]((i * NV + q) * V))
            else:
                tot.store(o, tot.load[width=V](o) + acc.load[width=V]((i * NV + q) * V))


@always_inline
def _tiles[dt: DType, R: Int](
    tot: UnsafePointer[Float32, MutUntrackedOrigin], ldt: Int, x: UnsafePointer[Float32, _], ldx: Int,
    panel: UnsafePointer[Scalar[dt], _], ldp: Int, kb: Int, kl: Int, first: Bool,
):
    """R rows of block_product, all PANEL columns, in register tiles of tile_vectors(R) vectors."""
    comptime NV = tile_vectors(R)
    comptime for cw in range(0, PANEL, NV * V):
        _tile[dt, R, NV](tot + cw, ldt, x, ldx, panel + cw, ldp, kb, kl, first)


def block_product[dt: DType](
    tot: UnsafePointer[Float32, MutUntrackedOrigin], ldt: Int, x: UnsafePointer[Float32, _], ldx: Int, rows: Int,
    panel: UnsafePointer[Scalar[dt], _], ldp: Int, kb: Int, kl: Int, first: Bool,
):
    """tot[0:rows, 0:PANEL] (rows ldt apart) = (first) or += x[0:rows, kb:kb + kl] (rows ldx
    apart) @ panel[kb:kb + kl, 0:PANEL] (rows ldp apart): tiles of MR rows, then one tile of the
    rest. Each sum runs in c order, whatever `rows` is and whatever tile holds it."""
    var r0 = 0
    while r0 + MR <= rows:
        _tiles[dt, MR](tot + r0 * ldt, ldt, x + r0 * ldx, ldx, panel, ldp, kb, kl, first)
        r0 += MR
    var rest = rows - r0
    comptime for R in range(1, MR):
        if rest == R:
            _tiles[dt, R](tot + r0 * ldt, ldt, x + r0 * ldx, ldx, panel, ldp, kb, kl, first)


def store_panel[mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], res: UnsafePointer[Float32, _], tot: UnsafePointer[Float32, _],
    b: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32, r0: Int, m: Int, c0: Int, n: Int,
):
    """y[r0 + i, c0 + c] = the epilogue `mode` of tot[i, c] (rows PANEL apart) plus the bias, for
    the m rows of one panel's sums and its columns below n: V columns at a time, the same for
    every row, then one at a time."""
    var valid = min(PANEL, n - c0)
    var whole = valid - valid % V
    for i in range(m):
        var r = r0 + i
        for c in range(0, whole, V):
            var bias = b.unsafe_load[width=V](c0 + c) if has_bias else SIMD[F32, V](0)
            store_at[mode, V](y, res, r * n + c0 + c, tot.unsafe_load[width=V](i * PANEL + c) + bias, scale)
        for c in range(whole, valid):
            var bias = b.unsafe_load(c0 + c) if has_bias else Float32(0)
            store[mode](y, res, r, c0 + c, n, tot.unsafe_load(i * PANEL + c) + bias, scale)


def share_panels[F: def(Int, Int, Int) -> None](mut crew: Crew, rows: Int, n: Int, item: F):
    """item(pn, r0, m) for every panel pn of n columns (PANEL each) and chunk of rows r0 ..< r0 + m
    (CHUNK_ROWS, the last one shorter) of `rows`, as one phase of `crew`'s team: jobs of a few
    consecutive items (panel-major, so a job reads neighbouring panels). The job split of every
    product in panels (share_linear_panels, pairs.share_pair_products); which worker does an item changes no
    bit of it."""
    var panels = (n + PANEL - 1) // PANEL
    var chunks = (rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    var items = panels * chunks
    var per = split(items, 16)

    def job(j: Int) {var rows, var chunks, var items, var per, ref item}:
        for it in range(j * per, min(items, (j + 1) * per)):
            var r0 = (it % chunks) * CHUNK_ROWS
            item(it // chunks, r0, min(CHUNK_ROWS, rows - r0))

    crew.share((items + per - 1) // per, job)


def share_linear_panels[dt: DType, mode: Int, o: MutOrigin](
    mut crew: Crew, y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], w: UnsafePointer[Scalar[dt], _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
):
    """rows x (k) times W (n, k)^T into y (rows, n) with the epilogue `mode`, W given in panels
    w (ceil(n / PANEL), k, PANEL) (runtime.weights.to_panels), as one phase of `crew`'s team
    (share_panels). For each block of PANEL values of k, every tile of rows multiplies the
    block while it is in L1, its sums in registers. Each output is summed in one order whatever
    the number of rows and its place among them: the products of a block in k order, the
    blocks' sums added in k order, then the bias; so a row's result is the same bits alone or
    among others, and whichever chunk of CHUNK_ROWS rows holds it."""

    def item(pn: Int, r0: Int, m: Int) {var y, var x, var w, var b, var res, var has_bias, var scale, var n, var k}:
        # the sums of one panel for one chunk of rows, on the stack (an allocation per item
        # costs more than a one-row product of a small matrix here; a chunk's sums stay in
        # L1/L2 while every block of k adds to them)
        var tot = stack_allocation[CHUNK_ROWS * PANEL, Float32, alignment=64]()
        var panel = w + pn * k * PANEL
        for kb in range(0, k, PANEL):
            block_product(tot, PANEL, x + r0 * k, k, m, panel, PANEL, kb, min(PANEL, k - kb), kb == 0)
        store_panel[mode](y, res, tot, b, has_bias, scale, r0, m, pn * PANEL, n)

    share_panels(crew, rows, n, item)


@extensibility.register("whisper_max.linear_panels")
struct LinearPanels:
    """y (rows, n) = x (rows, k) @ W^T + b (n) for a few rows (decoder steps), W (n, k) given in
    panels w (ceil(n / 64), k, 64) (runtime.weights.to_panels), float32, float16 or bfloat16
    (widened exactly as it is read); x, b and the sums float32. A row's result is bit-identical whatever
    the number of rows (share_linear_panels)."""

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[rank=3, ...],
        b: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var k = x.dim_size(1)
        var n = b.dim_size(0)
        if w.dim_size(0) != (n + PANEL - 1) // PANEL or w.dim_size(1) != k or w.dim_size(2) != PANEL:
            raise Error("whisper_max.linear_panels: the weight is not (ceil(n / 64), k, 64) panels for x's k and the bias's n")
        if y.dim_size(0) != rows or y.dim_size(1) != n:
            raise Error("whisper_max.linear_panels: the output is not (rows, n)")
        comptime if w.dtype != DType.float32 and w.dtype != DType.float16 and w.dtype != DType.bfloat16:
            raise Error("whisper_max.linear_panels: float32, float16 or bfloat16 panels only")
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var bp = b.unsafe_ptr()

        def run(mut crew: Crew) {var yp, var xp, var wp, var bp, var rows, var n, var k}:
            share_linear_panels[w.dtype, PLAIN](crew, yp, xp, wp, bp, xp, True, 1.0, rows, n, k)

        team(1, run)
