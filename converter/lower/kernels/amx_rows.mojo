# Products of a few rows (decoder steps) in bfloat16 on Intel AMX tiles, the weight as stored
# (whisper_max.linear_rows_amx, and the fused decoder block's products): the tile helpers are
# amx.mojo's.
#
# The weight is the A operand, read as stored: a tile is 16 weight rows x 32 values of k (64
# bytes of each row, the row's stride apart), so nothing is repacked and each weight byte is read
# once per call whatever the number of rows. The rows of x are the B operand, rounded to
# bfloat16 and packed per call into chunks of 16 (pairs of k down, 16 rows across). A sum is one
# TDPBF16PS chain over k in ascending steps for every number of rows, M = 1 included: a row's
# result does not depend on the rows it is computed with (the padding columns are zeros).
#
# Measured (Intel Xeon, 2 cores, 2026-12-07, kernel_bench): one row reads the vocabulary's
# weight at ~26 GB/s where VDPBF16PS pair panels read it at ~40 GB/s; reading each tile as 1 KB
# contiguous (a tiled layout) measured the same, so the layout is not why. TDPBF16PS's sums
# differ from VDPBF16PS's in their last bits (70-90 % of outputs on random data), so a package
# cannot take pair panels for one row and tiles for many without breaking a row's bit-identity.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.memory import bitcast
from std.sys import inlined_assembly

from .amx import BLOCK, STEP, TILE, request_amx, tile_config, tile_release
from .rows import PLAIN, store
from .simd import V, bf16_bits
from .team import Crew, split, team


def pack_row(xb: UnsafePointer[UInt32, MutUntrackedOrigin], x: UnsafePointer[Float32, _], r: Int, k: Int):
    """Row r of x (its k float32 values at x, k a multiple of V: the AMX products take k in whole
    32s) rounded to bfloat16 into its column of the B tiles at xb: chunk c (k / 2 rows of 16
    words) holds rows 16 c .. 16 c + 15, word (q, col) the pair (x[16 c + col, 2 q], x[16 c + col,
    2 q + 1]). A row writes only its own column (the columns of absent rows keep their zeros,
    alloc_packed), but the 16 rows of a chunk share each 64-byte line of it."""
    var dst = xb + (r // TILE) * (k // 2) * TILE + r % TILE
    for i in range(0, k, V):
        var words = bitcast[DType.uint32, V // 2](bf16_bits[V](x.load[width=V](i)))
        for p in range(V // 2):
            dst.store((i // 2 + p) * TILE, words[p])


def alloc_packed(rows: Int, k: Int) -> UnsafePointer[UInt32, MutUntrackedOrigin]:
    """Zeros for the B tiles of `rows` rows of up to k values (pack_row): the columns past the
    last row stay zero whatever is packed."""
    var words = (rows + TILE - 1) // TILE * (k // 2) * TILE
    var xb = alloc[UInt32](max(1, words), alignment=64)
    for i in range(words):
        xb.store(i, UInt32(0))
    return xb


def share_pack(mut crew: Crew, xb: UnsafePointer[UInt32, MutUntrackedOrigin], x: UnsafePointer[Float32, _], rows: Int, k: Int):
    """x (rows, k) rounded to bfloat16 and packed as B tiles into xb (pack_row): one phase of
    `crew`'s team, a job a chunk of 16 rows (the rows of a chunk share every cache line of it:
    one worker writes them all)."""

    def job(c: Int) {var xb, var x, var rows, var k}:
        for r in range(c * TILE, min(rows, (c + 1) * TILE)):
            pack_row(xb, x + r * k, r, k)

    crew.share((rows + TILE - 1) // TILE, job)


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


def worker_tiles(pad_k: Int) -> UnsafePointer[Float32, MutUntrackedOrigin]:
    """A team worker's AMX state, at the start of its body: its tiles configured (tile_config)
    and a scratch of 4 tiles of sums (rows_blocks' tmp) then a pad for a partial last block of 32
    weight rows of up to pad_k columns (0 where every weight is whole blocks); free_tiles(scratch)
    at the end."""
    var scratch = alloc[Float32](4 * TILE * TILE + (BLOCK * pad_k + 1) // 2, alignment=64)
    tile_config()
    return scratch


def free_tiles(scratch: UnsafePointer[Float32, MutUntrackedOrigin]):
    """The end of worker_tiles: the tiles released (tile_release), the scratch freed."""
    tile_release()
    scratch.free()


def share_rows_amx[mode: Int, o: MutOrigin](
    mut crew: Crew, scratch: UnsafePointer[Float32, MutUntrackedOrigin], y: UnsafePointer[Float32, o], xb: UnsafePointer[UInt32, _], w: UnsafePointer[BFloat16, _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32, rows: Int, n: Int, k: Int,
):
    """y (rows, n) = the rows packed at xb (share_pack) times w (n, k) bfloat16 plus b, through
    the epilogue `mode` (rows.store), k a multiple of 32: one phase of `crew`'s team, a job a few
    of the weight's 32-row blocks (rows_blocks) on the worker's tiles. Which worker does a block
    changes nothing in it, so a row's result is the same whatever the rows beside it. `scratch` is
    the worker's (worker_tiles), its pad for k columns at least where n is not whole blocks."""
    var blocks = (n + BLOCK - 1) // BLOCK
    var per = split(blocks, 4)
    var pad = (scratch + 4 * TILE * TILE).bitcast[BFloat16]()

    def job(j: Int) {var scratch, var pad, var y, var xb, var w, var b, var res, var has_bias, var scale, var rows, var n, var k, var blocks, var per}:
        rows_blocks[mode](y, xb, w, b, res, has_bias, scale, rows, n, k, j * per, min(blocks, (j + 1) * per), pad, scratch)

    crew.share((blocks + per - 1) // per, job)


def linear_rows_amx[mode: Int, o: MutOrigin](
    y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], w: UnsafePointer[BFloat16, _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
) raises:
    """rows.share_linear on AMX for a bfloat16 w (n, k), k a multiple of 32, as a team of two
    phases: x rounded to bfloat16 and packed (share_pack); the weight's 32-row blocks shared."""
    if k % STEP != 0:
        raise Error("whisper_max AMX row products: the weight's columns must be a multiple of 32")
    if rows == 0:
        return
    request_amx()
    var xb = alloc_packed(rows, k)

    def run(mut crew: Crew) {var y, var x, var xb, var w, var b, var res, var has_bias, var scale, var rows, var n, var k}:
        var scratch = worker_tiles(k if n % BLOCK != 0 else 0)  # a pad for a partial last block only
        share_pack(crew, xb, x, rows, k)
        share_rows_amx[mode](crew, scratch, y, xb, w, b, res, has_bias, scale, rows, n, k)
        free_tiles(scratch)

    team(2, run)
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
