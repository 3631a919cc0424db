# Products of a few rows (decoder steps) in bfloat16 on Intel AMX tiles, the weight as stored
# (whisper_max.linear_rows_amx, and the fused decoder block's products): the tile helpers are
# amx.mojo's.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.runtime import parallelism_level
from std.memory import stack_allocation
from std.sys import inlined_assembly

from .amx import BLOCK, STEP, TILE, request_amx, tile_config, tile_release
from .rows import PLAIN, store
from .simd import V, bf16_bits


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
    """rows.share_linear on AMX for a bfloat16 w (n, k), k a multiple of 32: x rounded to bfloat16, the
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
