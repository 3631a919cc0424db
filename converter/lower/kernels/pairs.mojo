# Products of a few rows (decoder steps) against a bfloat16 weight in pair panels, on
# AVX512_BF16's VDPBF16PS: the decoder steps of a bfloat16 package on CPUs without AMX.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.memory import stack_allocation

from .bf16 import NR, rows_bf16
from .rows import CHUNK_ROWS, PLAIN, share_panels, store_panel
from .simd import round_bf16
from .team import Crew, team


def share_linear_pairs[mode: Int, o: MutOrigin](
    mut crew: Crew, y: UnsafePointer[Float32, o], x: UnsafePointer[Float32, _], xb: UnsafePointer[BFloat16, MutUntrackedOrigin],
    w: UnsafePointer[BFloat16, _], b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool,
    scale: Float32, rows: Int, n: Int, k: Int,
):
    """rows x (k) times W (n, k)^T into y (rows, n) with the epilogue `mode` (rows.store_at), W
    bfloat16 in pair panels w (ceil(n / 64), k / 2, 64, 2) (runtime.weights.to_pairs: the two
    values of a column at k and k + 1 adjacent, VDPBF16PS's operand), k even (the caller
    checks), as two phases of `crew`'s team.

    x is rounded to bfloat16 (to nearest even) into xb (rows * k) once, one job a row; then the
    panels are shared as rows.share_panels' jobs, and every tile of 6 rows (bf16.rows_bf16)
    multiplies a whole panel with its 6 x 64 sums in registers: exact pair products, added in
    float32 in k order from zero, then the bias (rows.store_panel, share_linear_panels' epilogue).
    Each output is summed in that one order whatever the number of rows and its place among
    them, so a row's result is the same bits alone or among others. Against the float32
    products of weight panels (rows.share_linear_panels) it does half the instructions per
    multiply-add: a step of many rows (the engine's rows of many windows, beams) is bound by
    arithmetic, not by reading the weight."""

    share_round(crew, xb, x, rows, k)
    share_pair_products[mode](crew, y, xb, w, b, res, has_bias, scale, rows, n, k)


def share_round(mut crew: Crew, xb: UnsafePointer[BFloat16, MutUntrackedOrigin], x: UnsafePointer[Float32, _], rows: Int, k: Int):
    """xb = x (rows, k) rounded to bfloat16 (to nearest even), the operand of pair products: one
    phase of `crew`'s team, a job a row."""

    def job(r: Int) {var xb, var x, var k}:
        round_bf16(xb + r * k, x + r * k, k, 1.0)

    crew.share(rows, job)


def share_pair_products[mode: Int, o: MutOrigin](
    mut crew: Crew, y: UnsafePointer[Float32, o], xb: UnsafePointer[BFloat16, _], w: UnsafePointer[BFloat16, _],
    b: UnsafePointer[Float32, _], res: UnsafePointer[Float32, _], has_bias: Bool, scale: Float32,
    rows: Int, n: Int, k: Int,
):
    """share_linear_pairs' products, as one phase, from rows xb (rows, k) already rounded to
    bfloat16 (a decoder block rounds each input once for all the products that read it)."""

    def item(pn: Int, r0: Int, m: Int) {var y, var xb, var w, var b, var res, var has_bias, var scale, var n, var k}:
        var tot = stack_allocation[CHUNK_ROWS * NR, Float32, alignment=64]()
        rows_bf16[False](tot, NR, xb + r0 * k, k, w + pn * k * NR, b, m)
        store_panel[mode](y, res, tot, b, has_bias, scale, r0, m, pn * NR, n)

    share_panels(crew, rows, n, item)


@extensibility.register("whisper_max.linear_pairs")
struct LinearPairs:
    """y (rows, n) = x (rows, k) @ W^T + b (n) for a few rows (decoder steps), W (n, k) bfloat16
    given in pair panels w (ceil(n / 64), k / 2, 64, 2) (runtime.weights.to_pairs), on AVX512_BF16
    (VDPBF16PS): x rounded to bfloat16, exact pair products, float32 sums. A row's result is
    bit-identical whatever the number of rows (share_linear_pairs)."""

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        w: InputTensor[dtype=DType.bfloat16, rank=4, ...],
        b: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var k = x.dim_size(1)
        var n = b.dim_size(0)
        if w.dim_size(0) != (n + NR - 1) // NR or w.dim_size(1) * 2 != k or w.dim_size(2) != NR or w.dim_size(3) != 2:
            raise Error("whisper_max.linear_pairs: the weight is not (ceil(n / 64), k / 2, 64, 2) pair panels for x's k and the bias's n")
        if y.dim_size(0) != rows or y.dim_size(1) != n:
            raise Error("whisper_max.linear_pairs: the output is not (rows, n)")
        if k % 2 != 0:
            raise Error("whisper_max.linear_pairs: k must be even (pairs of k values)")
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()
        var wp = w.unsafe_ptr()
        var bp = b.unsafe_ptr()
        var xb = alloc[BFloat16](max(1, rows * k))

        def run(mut crew: Crew) {var yp, var xp, var xb, var wp, var bp, var rows, var n, var k}:
            share_linear_pairs[PLAIN](crew, yp, xp, xb, wp, bp, xp, True, 1.0, rows, n, k)

        team(2, run)
        xb.free()
