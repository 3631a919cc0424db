"""whisper-max's own kernels (Mojo, in kernels/), used through MAX custom ops.

The kernel package is precompiled once per source version (`mojo precompile`, ~2 s) into a
cache and given to every graph. MAX compiles the kernels a graph uses into it, and the exported
MEF carries their machine code: a package runs without this source or a compile.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from max.dtype import DType
from max.graph import TensorType, ops

from .. import ir
from . import LoweringError, register

KERNELS = Path(__file__).parent / "kernels"  # a Mojo package: __init__.mojo registers the ops


def _errors(stderr: str, context: int = 4) -> str:
    """The compiler's errors, each with the lines after it (the source line and its caret), before
    its many deprecation warnings; the tail of stderr when no line says error."""
    lines = stderr.splitlines()
    picked = [i + j for i, line in enumerate(lines) if ": error:" in line for j in range(context)]
    return "\n".join(lines[i] for i in dict.fromkeys(picked) if i < len(lines))[:6000] if picked else stderr[-3000:]


@cache
def kernel_library() -> Path:
    """The kernel package precompiled (.mojoc), built on first use; keyed by its sources."""
    from mojo.paths import subprocess_run_mojo

    sources = sorted(KERNELS.glob("*.mojo"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()[:16]
    out_dir = Path(
        os.environ.get("WHISPER_MAX_KERNEL_CACHE", Path(tempfile.gettempdir()) / f"whisper-max-kernels-{os.getuid()}")
    )
    out = out_dir / digest / "whisper_max_kernels.mojoc"  # the file's stem is the module's name
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{digest}.", dir=out_dir))  # built aside, then renamed
    tmp = tmp_dir / out.name
    proc = subprocess_run_mojo(["precompile", str(KERNELS), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise LoweringError(
            f"compiling whisper-max's Mojo kernels ({KERNELS}) failed (mojo exit {proc.returncode}); is the "
            f"mojo-compiler wheel that max installs present?\n{_errors(proc.stderr)}"
        )
    try:
        tmp_dir.rename(out.parent)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not out.is_file():
            raise
    return out


def _product(ctx, op: str, x, weight, bias, n=None):
    """x (..., k) float32 times weight (n, k), plus bias (n) (zeros if None) -> (..., n) float32,
    as the custom op `op` on x's rows flattened to (rows, k); `n` for a weight in another layout
    (panels)."""
    k, n = x.shape[-1], weight.shape[0] if n is None else n
    flat = ops.reshape(x, [-1, k])
    if bias is None:
        bias = ops.constant(np.zeros(int(n), np.float32), DType.float32, ctx.device)
    out_type = TensorType(DType.float32, [flat.shape[0], n], ctx.device)
    y = ops.custom(op, device=ctx.device, values=[flat, weight, bias], out_types=[out_type])[0].tensor
    return ops.reshape(y, [*x.shape[:-1], n])


@register(ir.LINEAR_ROWS, ir.LINEAR_ROWS_AMX, ir.LINEAR_BF16, ir.LINEAR_AMX)
def linear_kernel(ctx, node, x, weight, bias=None):
    """passes.select_kernels' products as their kernels: x (..., k) float32 times the weight (n, k)
    as stored, plus bias (n) -> (..., n) float32. whisper_max.linear_rows: one position per row,
    each weight row read once for all rows, a float16 or bfloat16 weight widened exactly;
    linear_rows_amx: a bfloat16 weight on AMX tiles, x rounded to bfloat16; linear_bf16 (AVX512_BF16)
    and linear_amx (tiles): many rows with a bfloat16 weight, x rounded to bfloat16, pair products
    summed in float32."""
    return _product(ctx, node.op, x, weight, bias)


@register(ir.LINEAR_PANELS)
def linear_panels(ctx, node, x, panels, bias=None):
    """passes.panel_products' node as the kernel whisper_max.linear_panels: x (..., k), one
    position per row, times W (n, k) given in panels (ceil(n / 64), k, 64), plus bias (n; zeros
    when absent) -> (..., n) float32."""
    n = node.type.shape[-1]
    if not isinstance(n, int) or int(panels.shape[0]) != -(-n // 64) or int(panels.shape[2]) != 64:
        raise LoweringError(
            f"{node.name}: weight panels of shape {[int(d) for d in panels.shape]} for {n} outputs; expected "
            f"({-(-n // 64) if isinstance(n, int) else '?'}, k, 64)"
        )
    if panels.dtype not in (DType.float32, DType.float16, DType.bfloat16):
        raise LoweringError(
            f"{node.name}: {panels.dtype} weight panels; whisper_max.linear_panels takes float32, float16 or bfloat16"
        )
    return _product(ctx, ir.LINEAR_PANELS, x, panels, bias, n)


@register(ir.LINEAR_PAIRS)
def linear_pairs(ctx, node, x, pairs, bias=None):
    """passes.panel_products' node as the kernel whisper_max.linear_pairs (AVX512_BF16): x (..., k),
    one position per row, rounded to bfloat16, times a bfloat16 W (n, k) given in pair panels
    (ceil(n / 64), k / 2, 64, 2), plus bias (n; zeros when absent) -> (..., n) float32."""
    n = node.type.shape[-1]
    shape = [int(d) for d in pairs.shape]
    if not isinstance(n, int) or len(shape) != 4 or shape[0] != -(-n // 64) or shape[2:] != [64, 2]:
        raise LoweringError(
            f"{node.name}: weight pair panels of shape {shape} for {n} outputs; expected "
            f"({-(-n // 64) if isinstance(n, int) else '?'}, k / 2, 64, 2)"
        )
    if pairs.dtype != DType.bfloat16:
        raise LoweringError(f"{node.name}: {pairs.dtype} weight pair panels; whisper_max.linear_pairs takes bfloat16")
    return _product(ctx, ir.LINEAR_PAIRS, x, pairs, bias, n)


@register(ir.DECODER_LAYER)
def decoder_layer(ctx, node, x, key_cache, value_cache, position, *operands, axis, heads, scale, eps, amx=False):
    """passes.fuse_decoder_layers' block as the kernel whisper_max.decoder_layer: x (rows, 1, d)
    -> (rows, 1, d), and the rows' cross-attention queries (rows, d) beside (cross_queries);
    writes the new key and value into the caches (slots, heads, capacity, hd).
    After the block's 23 operands may come the rows' lineage (passes.row_lineage) and then
    their windows (passes.engine_rows); the kernel takes both, empty when absent. `position` is
    a scalar (every row's) or one per row. `amx` (passes.select_kernels: bfloat16 weight
    matrices, not in panels, on a target with AMX): the block's products run on tiles, x rounded
    to bfloat16 before each product."""
    if axis != 2:
        raise ValueError(f"{node.name}: caches written along axis {axis}; the kernel writes along 2")
    if not 23 <= len(operands) <= 25:
        raise ValueError(f"{node.name}: {len(operands) + 4} operands; decoder_layer takes 27 to 29")
    d = x.shape[-1]
    flat = ops.reshape(x, [-1, d])
    absent = (np.zeros((0, int(key_cache.shape[2])), np.int32), np.zeros(0, np.int32))
    operands = (*operands, *(ops.constant(a, DType.int32, ctx.device) for a in absent[len(operands) - 23 :]))
    position = ops.reshape(position, [1]) if position.rank == 0 else position
    values = [key_cache, value_cache, flat, position, *operands]
    out_type = TensorType(DType.float32, [flat.shape[0], d], ctx.device)
    parameters = {"heads": int(heads), "scale": float(scale), "eps": float(eps), "amx": bool(amx)}
    y, queries = ops.inplace_custom(
        ir.DECODER_LAYER, device=ctx.device, values=values, out_types=[out_type, out_type], parameters=parameters
    )
    ctx.env[f"{node.name}/{ir.CROSS_QUERIES}"] = queries.tensor  # the kernel's second output (cross_queries)
    return ops.reshape(y.tensor, x.shape)


@register(ir.CROSS_QUERIES)
def cross_queries(ctx, node, layer):
    """The rows' cross-attention queries (rows, d) of the decoder_layer node `layer`: its kernel's
    second output (passes.cross_queries)."""
    return ctx.env[f"{node.inputs[0]}/{ir.CROSS_QUERIES}"]


@register(ir.ATTENTION_BF16, ir.ATTENTION_AMX)
def attention_bf16(ctx, node, q, k, v, heads, scale):
    """passes.fuse_encoder_attention's bfloat16 node as its kernel: whisper_max.attention_bf16
    (AVX512_BF16), or attention_amx (the same arithmetic on tiles) where select_kernels chose it."""
    out_type = TensorType(DType.float32, list(q.shape), ctx.device)
    return ops.custom(
        node.op,
        device=ctx.device,
        values=[q, k, v],
        out_types=[out_type],
        parameters={"heads": int(heads), "scale": float(scale)},
    )[0].tensor


@register(ir.ATTENTION)
def attention(ctx, node, q, k, v, heads, scale):
    """passes.fuse_encoder_attention's float32 node as the kernel whisper_max.attention."""
    out_type = TensorType(DType.float32, list(q.shape), ctx.device)
    return ops.custom(
        ir.ATTENTION,
        device=ctx.device,
        values=[q, k, v],
        out_types=[out_type],
        parameters={"heads": int(heads), "scale": float(scale)},
    )[0].tensor


@register(ir.SELECT_TOKENS)
def select_tokens(ctx, node, logits, rules, suppress, sampling, slots):
    """The kernel whisper_max.select_tokens; its output's middle dim is the length of `slots`."""
    out_type = TensorType(DType.float32, [logits.shape[0], slots.shape[0], 2], ctx.device)
    return ops.custom(
        ir.SELECT_TOKENS, device=ctx.device, values=[logits, rules, suppress, sampling], out_types=[out_type]
    )[0].tensor
