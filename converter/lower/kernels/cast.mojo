# float32 -> bfloat16 rounding as a graph op: cross K/V stored in bfloat16 (bfloat16 packages).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.runtime import parallelism_level

from .simd import V, round_bf16


@extensibility.register("whisper_max.to_bfloat16")
struct ToBFloat16:
    """y (n) = x (n) rounded to bfloat16, to nearest even (simd.bf16_bits on the float32 bits,
    what VCVTNEPS2BF16 gives for finite x), the n values split across the workers. MAX's own
    cast lowers through LLVM's float32 -> bfloat16 vector conversion, which aborts the compile
    on some CPUs (an Intel Xeon with AMX and AVX512_FP16), so the rounding is ours."""

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[dtype=DType.bfloat16, rank=1, ...],
        x: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var n = x.dim_size(0)
        if y.dim_size(0) != n:
            raise Error("whisper_max.to_bfloat16: input and output sizes differ")
        var tasks = max(1, min(parallelism_level(), n // (1 << 16)))
        var chunk = (n + tasks - 1) // tasks
        chunk = (chunk + V - 1) // V * V
        var yp = y.unsafe_ptr()
        var xp = x.unsafe_ptr()

        def work(t: Int) {var yp, var xp, var n, var chunk}:
            var lo = min(n, t * chunk)
            round_bf16(yp + lo, xp + lo, min(n, lo + chunk) - lo, 1.0)

        parallelize(work, tasks)
