"""The CPU a program is compiled for, and which of our kernels each kind of CPU runs.

MAX compiles a graph for the host CPU, and so do our kernels: the package records the host's
features (runtime.manifest.Target.host) and runs only where they are all present. Mojo cannot
always tell which instructions the host has (under KVM a Sapphire Rapids reports a Rocket Lake
model number and Mojo enables neither AVX512_BF16 nor AMX), so the choice between kernel kinds
is made here, from /proc/cpuinfo's flags, and passes.select_kernels names the kernel each op runs:

| kind of CPU | products of many rows with a bfloat16 weight, bfloat16 attention |
|---|---|
| AMX-BF16 (Intel Xeon Sapphire Rapids and later) | whisper_max.linear_amx, attention_amx (tiles) |
| AVX512_BF16 without AMX (AMD Zen 4, Zen 5) | whisper_max.linear_bf16, attention_bf16 (VDPBF16PS) |
| neither (AMD Zen 3, older Intel) | refused: convert with --dtype float32 there |

float32 programs run the same kernels everywhere (MAX's, and ours for the decoder steps).
"""

from __future__ import annotations

from ..runtime.manifest import Target

__all__ = ["Target", "amx", "bfloat16", "bfloat16_kernels"]


def amx(target: Target) -> bool:
    """Whether bfloat16 products run on AMX tiles there."""
    return target.has("amx_tile", "amx_bf16")


def bfloat16(target: Target) -> bool:
    """Whether the target has any kernel of ours for bfloat16 arithmetic (AMX or AVX512_BF16)."""
    return amx(target) or target.has("avx512_bf16")


def bfloat16_kernels(target: Target) -> str:
    """The kind of our bfloat16 kernels for the target: "amx" or "bf16"."""
    if amx(target):
        return "amx"
    if target.has("avx512_bf16"):
        return "bf16"
    raise ValueError(f"this CPU ({target}) has neither AMX-BF16 nor AVX512_BF16 for bfloat16 arithmetic")
