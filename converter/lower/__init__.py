"""Lower whisper-max IR graphs to MAX Graph, one registered function per source op.

A lowering is `fn(ctx, node, *inputs, **attrs) -> TensorValue`: `inputs` are the MAX values of
the node's tensor inputs (None where the IR has ""), `attrs` its attributes. Registering an op
twice is an error; an op with no lowering fails naming it and the module it came from.

Bisection knobs (environment): WHISPER_MAX_LOWER_LOG=1 logs every node as it is lowered;
WHISPER_MAX_STOP_AFTER=<node name> makes that node's value the graph's only output.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Callable

import numpy as np
from max.dtype import DType
from max.graph import BufferType, DeviceRef, Dim, Graph, TensorType, TensorValue, Weight, ops

from .. import ir
from ..target import Target

log = logging.getLogger(__name__)

Lowering = Callable[..., TensorValue]
_REGISTRY: dict[str, Lowering] = {}


class LoweringError(RuntimeError):
    pass


def register(*op_names: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        for op in op_names:
            if op in _REGISTRY:
                raise LoweringError(f"{op} registered twice ({_REGISTRY[op].__module__} and {fn.__module__})")
            _REGISTRY[op] = fn
        return fn

    return deco


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


def max_dtype(name: str) -> DType:
    """An IR dtype name ("float32", "int64", "bfloat16") as MAX's DType."""
    if name == "bfloat16":  # numpy has no bfloat16
        return DType.bfloat16
    return DType.from_numpy(np.dtype(name))


def parse_dim(expr: ir.Dim) -> int | Dim:
    """An IR dim ("n + past", 1500) as a MAX dim; symbols become named MAX dims."""
    if isinstance(expr, int):
        return expr

    def ev(n: ast.AST):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name):
            return Dim(n.id)
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        raise LoweringError(f"dim expression {expr!r} has an unsupported part: {ast.dump(n)}")

    return ev(ast.parse(expr, mode="eval"))


class LoweringContext:
    def __init__(self, graph: ir.Graph, device: DeviceRef, target: Target):
        self.graph = graph
        self.device = device
        self.target = target  # the CPU compiled for (passes.select_kernels chose its kernels)
        # values also held in channels-last form (conv stem), so a later permute back is free
        self.nwc: dict[str, TensorValue] = {}
        self.env: dict[str, TensorValue] = {}  # IR value name -> MAX value, filled while lowering
        self._producers = {n.name: n for n in graph.nodes}
        self._scalars = {v.name for v in graph.inputs if v.type.shape == () and v.type.dtype == "int64"}
        self.weight_names = frozenset(w.name for w in graph.weights)

    def producer(self, name: str) -> ir.Node | None:
        """The IR node that computes `name` (None for inputs, weights and constants)."""
        return self._producers.get(name)

    def value(self, name: str) -> TensorValue:
        return self.env[name]

    def shape(self, t: ir.TensorType) -> list:
        return [parse_dim(d) for d in t.shape]

    def index(self, d: ir.Dim | Dim) -> TensorValue:
        """An int64 scalar holding a (possibly symbolic) size, for run-time slice bounds. A
        symbol that names an int64 scalar input of the graph (a cache position) is that input."""
        if isinstance(d, int):
            return ops.constant(np.int64(d), DType.int64, self.device)
        if ir.dim_symbols(d) & self._scalars:
            return self._eval_index(ast.parse(d, mode="eval").body, d)
        return ops.reshape(ops.shape_to_tensor([parse_dim(d) if isinstance(d, str) else d]), [])

    def _eval_index(self, n: ast.AST, expr: str) -> TensorValue:
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return ops.constant(np.int64(n.value), DType.int64, self.device)
        if isinstance(n, ast.Name):
            return self.env[n.id] if n.id in self._scalars else ops.reshape(ops.shape_to_tensor([Dim(n.id)]), [])
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](self._eval_index(n.left, expr), self._eval_index(n.right, expr))
        raise LoweringError(f"index expression {expr!r} has an unsupported part: {ast.dump(n)}")

    def const(self, value: float, like: TensorValue) -> TensorValue:
        return ops.constant(np.array(value, dtype=like.dtype.to_numpy()), like.dtype, self.device)


def _conform(out: TensorValue, node: ir.Node, ctx: LoweringContext) -> TensorValue:
    """Check the lowered value against the IR type; give symbolic dims the IR's names."""
    want_dtype = max_dtype(node.type.dtype)
    if out.dtype != want_dtype:
        raise LoweringError(
            f"{node.name} ({node.op}, module {node.scope}): lowered dtype {out.dtype}, IR says {node.type.dtype}"
        )
    if len(out.shape) != len(node.type.shape):
        raise LoweringError(
            f"{node.name} ({node.op}, module {node.scope}): lowered rank {len(out.shape)}, IR says {node.type}"
        )
    want = ctx.shape(node.type)
    if [str(d) for d in out.shape] == [str(Dim(d)) for d in want]:
        return out
    for got, exp in zip(out.shape, want):
        if isinstance(exp, int) and str(got).lstrip("-").isdigit() and int(str(got)) != exp:
            raise LoweringError(
                f"{node.name} ({node.op}, module {node.scope}): lowered shape {out.shape}, IR says {node.type}"
            )
    return ops.rebind(out, want, message=f"{node.name}: shape differs from the traced {node.type}")


def lower_graph(
    g: ir.Graph,
    module=None,
    name: str | None = None,
    taps: tuple[str, ...] = (),
    device: DeviceRef | None = None,
    target: Target | None = None,
) -> Graph:
    """Build the MAX graph for `g`; `taps` are IR values added as extra outputs after g's own.
    `target` (default: this host) is the CPU compiled for: passes.select_kernels gives g's
    products and attention to the kernels it runs (converter/target.py) before lowering."""
    from ..passes.kernels import select_kernels
    from . import activation, cache, cast, conv, custom, elementwise, embedding, linear, norm, shape  # noqa: F401 (registers)

    device = device or DeviceRef.CPU()
    target = target or Target.host()
    g = select_kernels(g, target)
    ctx = LoweringContext(g, device, target)
    state = g.state_inputs()  # written in place: buffers, not values
    in_types = [
        (BufferType if v.name in state else TensorType)(max_dtype(v.type.dtype), ctx.shape(v.type), device)
        for v in g.inputs
    ]
    stop_after = os.environ.get("WHISPER_MAX_STOP_AFTER")
    verbose = os.environ.get("WHISPER_MAX_LOWER_LOG") == "1"
    kwargs = {"module": module} if module is not None else {}
    with Graph(name or g.name, input_types=in_types, custom_extensions=[custom.kernel_library()], **kwargs) as mg:
        env = ctx.env
        env.update(
            {v.name: mg.inputs[i].buffer if v.name in state else mg.inputs[i].tensor for i, v in enumerate(g.inputs)}
        )
        for w in g.weights:
            env[w.name] = mg.add_weight(Weight(w.name, max_dtype(w.type.dtype), ctx.shape(w.type), device))
        for c in g.constants:
            env[c.name] = ops.constant(c.data, DType.from_numpy(c.data.dtype), device)
        for node in g.nodes:
            fn = _REGISTRY.get(node.op)
            if fn is None:
                raise LoweringError(
                    f"no lowering for {node.op} (node {node.name}, module {node.scope}, graph {g.name}); add one with "
                    f"@register({node.op!r}) in converter/lower/"
                )
            if verbose:
                log.info("lower %s = %s%s", node.name, node.op, node.inputs)
            args = [env[i] if i else None for i in node.inputs]
            try:
                out = fn(ctx, node, *args, **dict(node.attrs))
            except LoweringError:
                raise
            except Exception as e:  # MAX raises ValueError/TypeError from op builders
                raise LoweringError(
                    f"lowering {node.op} failed at {node.name} (module {node.scope}, graph {g.name}): {e}"
                ) from e
            env[node.name] = _conform(out, node, ctx)
            if node.name == stop_after:
                mg.output(env[node.name])
                return mg
        mg.output(*[env[v] for _, v in g.outputs], *[env[t] for t in taps])
    return mg


def compile_with_kernels(session, module):
    """Compile a MAX module of lowered graphs with whisper-max's kernel library (the custom ops
    lowering may have used; a module, unlike a graph, does not carry it)."""
    from .custom import kernel_library

    return session.compile(module, custom_extensions=[kernel_library()])
