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
comptime CHAINS = 24  # independent FMA chains: > latency (4) x ports (2), as BLIS/oneDNN kernels


@extensibility.register("peak.fma")
struct PeakFMA:
    """out (workers) = a value that depends on every FMA: `iters` x 24 float32 FMAs of V lanes
    on each of `workers` threads (2 * V * 24 * iters flops each)."""

    @staticmethod
    def execute[target: StaticString, iters: Int](result: OutputTensor[dtype=DType.float32, rank=1, ...], seed: InputTensor[dtype=DType.float32, rank=1, ...], ctx: DeviceContext) raises:
        var op = result.unsafe_ptr()
        var s = seed.unsafe_ptr().load(0)

        def work(t: Int) {var op, var s}:
            var acc = stack_allocation[CHAINS * V, Float32, alignment=64]()
            var a0 = SIMD[DType.float32, V](s); var a1 = a0 + 1; var a2 = a0 + 2; var a3 = a0 + 3
            var a4 = a0 + 4; var a5 = a0 + 5; var a6 = a0 + 6; var a7 = a0 + 7
            var a8 = a0 + 8; var a9 = a0 + 9; var a10 = a0 + 10; var a11 = a0 + 11
            var a12 = a0 + 12; var a13 = a0 + 13; var a14 = a0 + 14; var a15 = a0 + 15
            var a16 = a0 + 16; var a17 = a0 + 17; var a18 = a0 + 18; var a19 = a0 + 19
            var a20 = a0 + 20; var a21 = a0 + 21; var a22 = a0 + 22; var a23 = a0 + 23
            var m = SIMD[DType.float32, V](0.999999)
            var c = SIMD[DType.float32, V](1e-7)
            for _ in range(iters):
                a0 = a0.fma(m, c); a1 = a1.fma(m, c); a2 = a2.fma(m, c); a3 = a3.fma(m, c)
                a4 = a4.fma(m, c); a5 = a5.fma(m, c); a6 = a6.fma(m, c); a7 = a7.fma(m, c)
                a8 = a8.fma(m, c); a9 = a9.fma(m, c); a10 = a10.fma(m, c); a11 = a11.fma(m, c)
                a12 = a12.fma(m, c); a13 = a13.fma(m, c); a14 = a14.fma(m, c); a15 = a15.fma(m, c)
                a16 = a16.fma(m, c); a17 = a17.fma(m, c); a18 = a18.fma(m, c); a19 = a19.fma(m, c)
                a20 = a20.fma(m, c); a21 = a21.fma(m, c); a22 = a22.fma(m, c); a23 = a23.fma(m, c)
            var total = (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11) + (a12 + a13 + a14 + a15 + a16 + a17 + a18 + a19 + a20 + a21 + a22 + a23)
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
