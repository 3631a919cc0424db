# Peak arithmetic rates of this CPU, measured rather than taken from a datasheet: tight loops with
# no memory traffic, one per worker thread, for scripts/kernel_bench.py. Not part of a package.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.algorithm import parallelize
from std.ffi import external_call
from std.memory import stack_allocation
from std.sys import inlined_assembly, simd_width_of

comptime V = simd_width_of[DType.float32]()
# Independent FMA chains: more than latency (4) x ports (2), as BLIS/oneDNN kernels keep, and
# all in registers with the multiplier and addend: 24 of AVX-512's 32, 12 of AVX2's 16 (24
# chains there spill to the stack and measured 66 GFLOP/s a core on an AMD EPYC Zen 3, below
# MAX's own matmul).
comptime CHAINS = 24 if V >= 16 else 12


@extensibility.register("peak.fma")
struct PeakFMA:
    """out (workers) = a value that depends on every FMA: `iters` x CHAINS float32 FMAs of V
    lanes on each of `workers` threads (2 * V * CHAINS * iters flops each)."""

    @staticmethod
    def execute[target: StaticString, iters: Int](result: OutputTensor[dtype=DType.float32, rank=1, ...], seed: InputTensor[dtype=DType.float32, rank=1, ...], ctx: DeviceContext) raises:
        var op = result.unsafe_ptr()
        var s = seed.unsafe_ptr().load(0)

        def work(t: Int) {var op, var s}:
            var acc = stack_allocation[CHAINS * V, Float32, alignment=64]()
            comptime for i in range(CHAINS):
                acc.store(i * V, SIMD[DType.float32, V](s + Float32(i)))
            var m = SIMD[DType.float32, V](0.999999)
            var c = SIMD[DType.float32, V](1e-7)
            for _ in range(iters):
                comptime for i in range(CHAINS):
                    acc.store(i * V, acc.load[width=V](i * V).fma(m, c))
            var total = SIMD[DType.float32, V](0)
            comptime for i in range(CHAINS):
                total += acc.load[width=V](i * V)
            op.store(t, total.reduce_add())

        parallelize(work, result.dim_size(0))


@extensibility.register("peak.amx")
struct PeakAMX:
    """`iters` x 4 TDPBF16PS (16 x 16 x 32 x 2 flops each) on each of `workers` threads, tiles
    loaded once: the tile unit's rate with no memory traffic. out (workers) = one sum each."""

    @staticmethod
    def execute[target: StaticString, iters: Int](result: OutputTensor[dtype=DType.float32, rank=1, ...], seed: InputTensor[dtype=DType.float32, rank=1, ...], ctx: DeviceContext) raises:
        var rc = external_call["syscall", Int64](Int64(158), Int64(0x1023), Int64(18))
        if rc != 0:
            raise Error("peak.amx: Linux refused the AMX tile state")
        var op = result.unsafe_ptr()

        def work(t: Int) {var op}:
            var cfg = stack_allocation[64, UInt8, alignment=64]()
            for i in range(64):
                cfg[i] = 0
            cfg[0] = 1
            for i in range(8):
                cfg[16 + 2 * i] = 64
                cfg[48 + i] = 16
            var buf = stack_allocation[1024, Float32, alignment=64]()
            for i in range(1024):
                buf[i] = 0.0
            inlined_assembly["ldtilecfg ($0)", NoneType, constraints="r,~{memory}", has_side_effect=True](cfg)
            inlined_assembly["tilezero %tmm0", NoneType, constraints="~{memory}", has_side_effect=True]()
            inlined_assembly["tilezero %tmm1", NoneType, constraints="~{memory}", has_side_effect=True]()
            inlined_assembly["tilezero %tmm2", NoneType, constraints="~{memory}", has_side_effect=True]()
            inlined_assembly["tilezero %tmm3", NoneType, constraints="~{memory}", has_side_effect=True]()
            inlined_assembly["tileloadd ($0,$1,1), %tmm4", NoneType, constraints="r,r,~{memory}", has_side_effect=True](buf, Int(64))
            inlined_assembly["tileloadd ($0,$1,1), %tmm5", NoneType, constraints="r,r,~{memory}", has_side_effect=True](buf, Int(64))
            inlined_assembly["tileloadd ($0,$1,1), %tmm6", NoneType, constraints="r,r,~{memory}", has_side_effect=True](buf, Int(64))
            inlined_assembly["tileloadd ($0,$1,1), %tmm7", NoneType, constraints="r,r,~{memory}", has_side_effect=True](buf, Int(64))
            for _ in range(iters):
                inlined_assembly["tdpbf16ps %tmm6, %tmm4, %tmm0", NoneType, constraints="~{memory}", has_side_effect=True]()
                inlined_assembly["tdpbf16ps %tmm7, %tmm4, %tmm1", NoneType, constraints="~{memory}", has_side_effect=True]()
                inlined_assembly["tdpbf16ps %tmm6, %tmm5, %tmm2", NoneType, constraints="~{memory}", has_side_effect=True]()
                inlined_assembly["tdpbf16ps %tmm7, %tmm5, %tmm3", NoneType, constraints="~{memory}", has_side_effect=True]()
            inlined_assembly["tilestored %tmm0, ($0,$1,1)", NoneType, constraints="r,r,~{memory}", has_side_effect=True](buf, Int(64))
            inlined_assembly["tilerelease", NoneType, constraints="~{memory}", has_side_effect=True]()
            op.store(t, buf[0])

        parallelize(work, result.dim_size(0))
