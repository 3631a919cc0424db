"""Our products against the peak this CPU measures, on a Whisper encoder's shapes.

    python scripts/kernel_bench.py [--package tiny.en.maxpkg] [--windows 1] [--repeats 20] [--out bench.json]

First the peaks, measured here by tight loops with no memory traffic (scripts/peak): float32 FMA
(24 chains of V lanes, 12 on AVX2) and, on CPUs with AMX, TDPBF16PS (4 tiles of sums). Then each product of
an encoder layer (x (windows * n_audio_ctx, k) @ w (n, k)^T + b, and the attention of all heads)
through every kernel this CPU can run: MAX's float32 matmul (and attention of graph ops), ours
on float32 weight panels (whisper_max.linear_panels; for the attention, whisper_max.attention),
our bfloat16 kernels (AVX512_BF16's VDPBF16PS, AMX tiles).
Printed: the minimum time of `--repeats` calls, GFLOP/s, and the share of the peak of its own
instruction kind on all workers. Last, the products of a decoder step
(vocabulary, MLP) for 1, 5 and 32 rows against float16 weight panels (whisper_max.linear_panels)
and the bfloat16 kinds this CPU runs, with the rate the weight is read at. The CPU is printed
first; this machine is shared, so a run is only compared with the peaks of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_EN = {
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_ctx": 1500,
    "n_text_state": 384,
    "n_vocab": 51864,
}  # when no --package
STEP_ROWS = (1, 5, 32)  # rows of a decoder call: greedy, beam 5, the engine's rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(model, inputs, repeats: int) -> float:
    model.execute(*inputs)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.execute(*inputs)
        best = min(best, time.perf_counter() - t)
    return best


class _Setup:
    """What every part of the run shares: the shapes, the kernels this CPU runs, the workers."""

    def __init__(self, args) -> None:
        from whisper_max.converter.target import Target, amx
        from whisper_max.runtime.package import Package

        self.args = args
        self.dims = Package.open(args.package).manifest.model.dims if args.package else TINY_EN
        self.d, self.heads, self.ctx = (self.dims[k] for k in ("n_audio_state", "n_audio_head", "n_audio_ctx"))
        self.m = args.windows * self.ctx
        self.target = Target.host()
        self.amx = amx(self.target)
        bf16 = ["bf16"] if "avx512_bf16" in self.target.features else []
        self.kinds = ["fp32", "panels"] + (["amx"] if self.amx else []) + bf16
        self.workers = os.cpu_count()
        self.peak_lib = ROOT / "scripts" / "peak"
        d = self.d
        self.shapes = {"qkv": (d, 3 * d), "out": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
        t = self.dims["n_text_state"]
        self.steps = {"vocab": (t, self.dims["n_vocab"]), "fc1": (t, 4 * t), "fc2": (4 * t, t)}  # a step's (k, n)
        # the steps' weights: float16 panels (float32 packages), bfloat16 panels read in float32 and
        # bfloat16 pair panels on VDPBF16PS (bfloat16 packages without AMX)
        bf16_steps = ["panels_bf16", "pairs_bf16"] if "avx512_bf16" in self.target.features else []
        # and the stored bfloat16 weight on AMX tiles (bfloat16 packages on AMX)
        self.step_kinds = ["panels_f16", *bf16_steps] + (["rows_amx"] if self.amx else [])
        self.iters = {"fma": 2_000_000, "amx": 200_000} if self.amx else {"fma": 2_000_000}


def _peak_graphs(s: _Setup, mod) -> None:
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, ops

    dev = DeviceRef.CPU()
    for name, it in s.iters.items():
        for w in (1, s.workers):
            with Graph(
                f"peak_{name}_{w}",
                input_types=[TensorType(DType.float32, [1], dev)],
                custom_extensions=[s.peak_lib],
                module=mod,
            ) as g:
                out = ops.custom(
                    f"peak.{name}",
                    device=dev,
                    values=[g.inputs[0].tensor],
                    out_types=[TensorType(DType.float32, [w], dev)],
                    parameters={"iters": it},
                )
                g.output(out[0].tensor)


def _linear_graph(mod, name: str, k: int, n: int, weight: str, bias: str, dtype, shape: list, op: str | None) -> None:
    """A graph `name`: x (m, k) times the weight `weight` (n outputs, of `dtype` and `shape` in
    the kernel's layout) plus the bias `bias`: our kernel `op`, or MAX's matmul when op is None."""
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, Weight, ops

    from whisper_max.converter.lower.custom import kernel_library

    dev = DeviceRef.CPU()
    with Graph(
        name,
        input_types=[TensorType(DType.float32, ["m", k], dev)],
        custom_extensions=[kernel_library()],
        module=mod,
    ) as g:
        x = g.inputs[0].tensor
        w = g.add_weight(Weight(weight, dtype, shape, dev))
        b = g.add_weight(Weight(bias, DType.float32, [n], dev))
        if op is None:
            y = x @ ops.transpose(w, 0, 1) + b
        else:
            out_types = [TensorType(DType.float32, [x.shape[0], n], dev)]
            y = ops.custom(op, device=dev, values=[x, w, b], out_types=out_types)[0].tensor
        g.output(y)


def _product_graphs(s: _Setup, mod) -> None:
    from max.dtype import DType

    from whisper_max.converter import ir

    ops = {"fp32": None, "panels": ir.LINEAR_PANELS, "amx": ir.LINEAR_AMX, "bf16": ir.LINEAR_BF16}
    for label, (k, n) in s.shapes.items():
        for kind in s.kinds:  # "panels": float32 weight panels (whisper_max.linear_panels)
            dtype = DType.float32 if kind in ("fp32", "panels") else DType.bfloat16
            shape = [-(-n // 64), k, 64] if kind == "panels" else [n, k]
            weight, bias = f"{label}.{kind}.weight", f"{label}.{kind}.bias"
            _linear_graph(mod, f"{label}_{kind}", k, n, weight, bias, dtype, shape, ops[kind])


def _attention_graphs(s: _Setup, mod) -> None:
    from max.dtype import DType
    from max.graph import DeviceRef, Graph, TensorType, ops

    from whisper_max.converter import ir
    from whisper_max.converter.lower.custom import kernel_library

    dev = DeviceRef.CPU()
    windows, ctx, d, heads = s.args.windows, s.ctx, s.d, s.heads
    qkv_type = TensorType(DType.float32, [windows, ctx, d], dev)
    for kind in s.kinds:  # "panels": our float32 kernel (whisper_max.attention)
        with Graph(
            f"attention_{kind}", input_types=[qkv_type] * 3, custom_extensions=[kernel_library()], module=mod
        ) as g:
            q, k_, v = (i.tensor for i in g.inputs)
            scale = float((d // heads) ** -0.25)
            if kind == "fp32":

                def split(t):
                    return ops.permute(ops.reshape(t, [windows, ctx, heads, d // heads]), [0, 2, 1, 3])

                scores = (split(q) * scale) @ ops.permute(split(k_) * scale, [0, 1, 3, 2])
                y = ops.reshape(ops.permute(ops.softmax(scores) @ split(v), [0, 2, 1, 3]), [windows, ctx, d])
            else:
                op = {"amx": ir.ATTENTION_AMX, "bf16": ir.ATTENTION_BF16, "panels": ir.ATTENTION}[kind]
                y = ops.custom(
                    op, device=dev, values=[q, k_, v], out_types=[qkv_type], parameters={"heads": heads, "scale": scale}
                )[0].tensor
            g.output(y)


def _step_graphs(s: _Setup, mod) -> None:
    from max.dtype import DType

    from whisper_max.converter import ir

    for label, (k, n) in s.steps.items():
        for kind in s.step_kinds:
            dtype = DType.float16 if kind == "panels_f16" else DType.bfloat16
            shape = {"pairs_bf16": [-(-n // 64), k // 2, 64, 2], "rows_amx": [n, k]}.get(kind, [-(-n // 64), k, 64])
            op = {"pairs_bf16": ir.LINEAR_PAIRS, "rows_amx": ir.LINEAR_ROWS_AMX}.get(kind, ir.LINEAR_PANELS)
            weight, bias = f"step.{label}.{kind}", f"step.{label}.bias"
            _linear_graph(mod, f"step_{label}_{kind}", k, n, weight, bias, dtype, shape, op)


def _weights(s: _Setup, rng) -> dict:
    from max.driver import Buffer
    from max.dtype import DType

    from whisper_max.runtime.weights import to_bfloat16, to_pairs, to_panels

    registry = {}
    for label, (k, n) in s.steps.items():
        w = rng.standard_normal((n, k), dtype=np.float32)
        for kind in s.step_kinds:
            if kind == "panels_f16":
                registry[f"step.{label}.{kind}"] = to_panels(w.astype(np.float16))
            elif kind == "panels_bf16":
                registry[f"step.{label}.{kind}"] = to_bfloat16(to_panels(w))
            elif kind == "rows_amx":
                registry[f"step.{label}.{kind}"] = to_bfloat16(w)
            else:
                bits = to_bfloat16(w).view(DType.uint16).to_numpy()
                registry[f"step.{label}.{kind}"] = Buffer.from_numpy(to_pairs(bits)).view(DType.bfloat16)
        registry[f"step.{label}.bias"] = rng.standard_normal(n, dtype=np.float32)
    for label, (k, n) in s.shapes.items():
        w = (rng.standard_normal((n, k), dtype=np.float32) * np.float32(k**-0.5)).astype(np.float32)
        for kind in s.kinds:
            registry[f"{label}.{kind}.weight"] = (
                w if kind == "fp32" else to_panels(w) if kind == "panels" else to_bfloat16(w)
            )
            registry[f"{label}.{kind}.bias"] = rng.standard_normal(n, dtype=np.float32)
    return registry


def _peaks(s: _Setup, models, results: dict) -> dict:
    from max.driver import Buffer

    seed = Buffer.from_numpy(np.ones(1, np.float32))
    peaks = {}
    for name, it in s.iters.items():
        lanes = 16 if "avx512f" in s.target.features else 8  # scripts/peak's V: simd_width_of[float32]
        chains = 24 if lanes == 16 else 12  # scripts/peak's CHAINS
        per_call = 2 * chains * lanes * it if name == "fma" else 4 * 16 * 16 * 32 * 2 * it  # flops per worker
        for w in (1, s.workers):
            sec = timed(models[f"peak_{name}_{w}"], [seed], 3)
            rate = per_call * w / sec / 1e9
            peaks[("amx" if name == "amx" else "fma", w)] = rate
            results["peaks"][f"{name}_{w}"] = rate
            print(f"peak {name:4s} {w} worker{'s' if w > 1 else ' '}: {rate:8.0f} GFLOP/s")
    return peaks


def _encoder_products(s: _Setup, models, peaks: dict, rng, results: dict) -> None:
    from max.driver import Buffer

    m, repeats = s.m, s.args.repeats
    x = {k: Buffer.from_numpy(rng.standard_normal((m, k), dtype=np.float32)) for k in {k for k, _ in s.shapes.values()}}
    print(f"\nproducts of {m} rows ({s.args.windows} window{'s' if s.args.windows > 1 else ''}), min of {repeats}:")
    for label, (k, n) in s.shapes.items():
        for kind in s.kinds:
            sec = timed(models[f"{label}_{kind}"], [x[k]], repeats)
            rate = 2 * m * k * n / sec / 1e9
            peak = peaks[("amx" if kind == "amx" else "fma", s.workers)]
            # VDPBF16PS: the share of the FMA peak it could reach at its own rate is not measured
            # here; its row is read against the FMA peak
            print(
                f"  {label:4s} {m}x{k} @ {k}x{n} {kind:5s} {sec * 1e3:7.2f} ms {rate:7.0f} GFLOP/s  "
                f"{100 * rate / peak:5.1f}% of the {'AMX' if kind == 'amx' else 'FMA'} peak"
            )
            results["products"].append(
                {"name": label, "m": m, "k": k, "n": n, "kernel": kind, "ms": sec * 1e3, "gflops": rate}
                | {"share_of_peak": rate / peak}
            )
    windows, ctx, d, heads = s.args.windows, s.ctx, s.d, s.heads
    q = [Buffer.from_numpy(rng.standard_normal((windows, ctx, d), dtype=np.float32)) for _ in range(3)]
    flops = 4 * windows * heads * ctx * ctx * (d // heads)
    for kind in s.kinds:
        sec = timed(models[f"attention_{kind}"], q, repeats)
        rate = flops / sec / 1e9
        peak = peaks[("amx" if kind == "amx" else "fma", s.workers)]
        print(
            f"  attention {heads} heads x {ctx} x {ctx} {kind:5s} {sec * 1e3:7.2f} ms {rate:7.0f} GFLOP/s  "
            f"{100 * rate / peak:5.1f}% of the {'AMX' if kind == 'amx' else 'FMA'} peak"
        )
        results["products"].append(
            {"name": "attention", "kernel": kind, "ms": sec * 1e3, "gflops": rate, "share_of_peak": rate / peak}
        )


def _step_products(s: _Setup, models, peaks: dict, rng, results: dict) -> None:
    from max.driver import Buffer

    print(
        "\ndecoder-step products (whisper_max.linear_panels on float16 or bfloat16 weight panels; "
        "linear_pairs on bfloat16 pair panels; linear_rows_amx on the bfloat16 weight), "
        f"rows {', '.join(map(str, STEP_ROWS))}, min of {s.args.repeats}:"
    )
    for label, (k, n) in s.steps.items():
        for rows in STEP_ROWS:
            x = Buffer.from_numpy(rng.standard_normal((rows, k), dtype=np.float32))
            for kind in s.step_kinds:
                sec = timed(models[f"step_{label}_{kind}"], [x], s.args.repeats)
                rate = 2 * rows * k * n / sec / 1e9
                gbs = 2 * k * n / sec / 1e9  # the weight's bytes, read once per call
                share = rate / peaks[("fma", s.workers)]
                print(
                    f"  {label:5s} {rows:2d}x{k} @ {k}x{n} {kind:11s} {sec * 1e3:7.3f} ms {rate:7.0f} GFLOP/s  "
                    f"{100 * share:5.1f}% of the FMA peak  weight read at {gbs:5.1f} GB/s"
                )
                results["products"].append(
                    {"name": f"step_{label}", "m": rows, "k": k, "n": n, "kernel": kind, "ms": sec * 1e3}
                    | {"gflops": rate, "share_of_peak": share, "weight_gb_per_s": gbs}
                )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", help="read the encoder's dims from this package (default: tiny.en's)")
    ap.add_argument("--windows", type=int, default=1, help="30 s windows in one call (rows = windows * n_audio_ctx)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from max.engine import InferenceSession
    from max.graph import Module

    from whisper_max.converter.lower.custom import kernel_library

    s = _Setup(args)
    mod = Module()
    for build in (_peak_graphs, _product_graphs, _attention_graphs, _step_graphs):
        build(s, mod)
    rng = np.random.default_rng(0)
    registry = _weights(s, rng)
    session = InferenceSession()
    print(f"CPU: {cpu_name()}, {s.workers} workers; kernels: {', '.join(s.kinds)}; compiling ...", flush=True)
    t = time.perf_counter()
    compiled = session.compile(mod, custom_extensions=[kernel_library(), s.peak_lib])
    print(f"compiled in {time.perf_counter() - t:.0f} s", flush=True)
    results: dict = {
        "cpu": cpu_name(),
        "features": sorted(s.target.features),
        "workers": s.workers,
        "rows": s.m,
        "peaks": {},
        "products": [],
    }
    models = session.init_all(compiled, weights_registry=registry)
    peaks = _peaks(s, models, results)
    _encoder_products(s, models, peaks, rng, results)
    _step_products(s, models, peaks, rng, results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
