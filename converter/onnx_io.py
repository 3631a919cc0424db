"""IR <-> ONNX, losslessly: one ONNX model per IR graph, for inspection in standard tools.

Each IR node becomes a node of the custom domain `aten` (op_type `linear.default` for
`aten.linear.default`; `whisper_max` for the ops that passes make) whose metadata carries the
module path; symbolic dims become dim_params ("n + past"); weights are graph inputs named by
their state-dict names (their data lives in weights.bin); constants are initializers. Attributes that ONNX cannot hold
exactly (floats are
fp32 there, None, bools, mixed int/str lists) are stored as JSON strings under `json:<name>`.
"""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.program import Role
from . import ir

DOMAIN = "aten"
DOMAINS = (DOMAIN, ir.OWN_DOMAIN)  # traced PyTorch ops; whisper-max's own (made by passes)
_META = "whisper_max."
_DTYPES = {
    "float32": TensorProto.FLOAT,
    "int64": TensorProto.INT64,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "bool": TensorProto.BOOL,
    "int32": TensorProto.INT32,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _value_info(name: str, t: ir.TensorType) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _DTYPES[t.dtype], list(t.shape))


def _type_of(vi: onnx.ValueInfoProto) -> ir.TensorType:
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
    return ir.TensorType(_NAMES[tt.elem_type], dims)


def _attr(key: str, v) -> onnx.AttributeProto:
    if isinstance(v, bool) or v is None or isinstance(v, float):
        return helper.make_attribute(f"json:{key}", json.dumps(v))
    if isinstance(v, int) or isinstance(v, str):
        return helper.make_attribute(key, v)
    if isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return helper.make_attribute(key, list(v))
    return helper.make_attribute(f"json:{key}", json.dumps(v))


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _attr_value(a: onnx.AttributeProto):
    if a.name.startswith("json:"):
        return a.name[5:], _tuples(json.loads(helper.get_attribute_value(a).decode()))
    v = helper.get_attribute_value(a)
    if a.type == onnx.AttributeProto.STRING:
        v = v.decode()
    elif a.type == onnx.AttributeProto.INTS:
        v = tuple(v)
    return a.name, v


def graph_to_onnx(g: ir.Graph, model_dims: dict, position: int = 0) -> onnx.ModelProto:
    types = g.types()
    nodes = []
    for n in g.nodes:
        domain, _, op_type = n.op.partition(".")
        if domain not in DOMAINS:
            raise ValueError(f"{n.name}: op {n.op} is outside the domains {DOMAINS}")
        node = helper.make_node(op_type, list(n.inputs), [n.name], name=n.name, domain=domain)
        node.attribute.extend(_attr(k, v) for k, v in n.attrs)
        helper.set_metadata_props(node, {"scope": n.scope})
        nodes.append(node)
    graph = helper.make_graph(
        nodes,
        g.name,
        inputs=[_value_info(v.name, v.type) for v in g.inputs + g.weights],
        outputs=[_value_info(v, types[v]) for _, v in g.outputs],
        initializer=[numpy_helper.from_array(c.data, c.name) for c in g.constants],
        value_info=[_value_info(n.name, n.type) for n in g.nodes],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21)] + [helper.make_opsetid(d, 1) for d in DOMAINS],
        producer_name="whisper-max",
    )
    helper.set_model_props(
        model,
        {
            _META + "inputs": json.dumps([v.name for v in g.inputs]),
            _META + "weights": json.dumps([v.name for v in g.weights]),
            _META + "outputs": json.dumps([list(o) for o in g.outputs]),
            _META + "dims": json.dumps([[d.name, d.min, d.max] for d in g.dims]),
            _META + "model_dims": json.dumps(model_dims, sort_keys=True),
            _META + "position": str(position),  # the graph's place in the program
        },
    )
    return model


def graph_from_onnx(model: onnx.ModelProto) -> tuple[ir.Graph, dict]:
    props = {p.key: p.value for p in model.metadata_props}
    try:
        in_names = json.loads(props[_META + "inputs"])
        w_names = json.loads(props[_META + "weights"])
        outputs = tuple(tuple(o) for o in json.loads(props[_META + "outputs"]))
        dims = tuple(ir.SymDim(*d) for d in json.loads(props[_META + "dims"]))
        model_dims = json.loads(props[_META + "model_dims"])
    except KeyError as e:
        raise ValueError(f"ONNX model {model.graph.name!r} was not written by whisper-max (missing {e})") from e
    g = model.graph
    vi = {v.name: _type_of(v) for v in list(g.input) + list(g.value_info)}
    nodes = []
    for n in g.node:
        if n.domain not in DOMAINS:
            raise ValueError(f"node {n.name}: domain {n.domain!r}, expected one of {DOMAINS}")
        scope = {p.key: p.value for p in n.metadata_props}["scope"]
        attrs = tuple(_attr_value(a) for a in n.attribute)
        nodes.append(ir.Node(n.name, f"{n.domain}.{n.op_type}", tuple(n.input), attrs, vi[n.output[0]], scope))
    graph = ir.Graph(
        g.name,
        tuple(ir.Value(name, vi[name]) for name in in_names),
        tuple(ir.Value(name, vi[name]) for name in w_names),
        tuple(ir.Constant(t.name, numpy_helper.to_array(t).copy()) for t in g.initializer),
        tuple(nodes),
        outputs,
        dims,
    )
    graph.validate()
    return graph, model_dims


def to_onnx_files(p: ir.Program) -> dict[str, bytes]:
    return {f"ir/{g.name}.onnx": graph_to_onnx(g, p.dims, i).SerializeToString() for i, g in enumerate(p.graphs)}


def from_onnx_files(files: dict[str, bytes]) -> ir.Program:
    graphs, dims = [], None
    for name in sorted(files):
        model = onnx.load_from_string(files[name])
        g, dims = graph_from_onnx(model)
        props = {q.key: q.value for q in model.metadata_props}
        # the program's graph order; packages from before it was recorded used this fixed one
        position = int(
            props.get(
                _META + "position",
                {Role.ENCODER: 0, Role.CROSS_KV: 1, Role.DECODER: 2, Role.ALIGNMENT: 3}.get(g.name, 9),
            )
        )
        graphs.append((position, g))
    graphs.sort(key=lambda pg: pg[0])
    return ir.Program(tuple(g for _, g in graphs), dims)
