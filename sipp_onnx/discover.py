"""Find the prunable layers of an ONNX graph.

A layer is a Gemm, MatMul or Conv node of the top-level graph whose weight operand is constant:
an initializer that no caller can override, or the output of a `Constant` node. A weight is
pruned only when every consumer is such a layer using it as its weight; anything else that reads
it (another op, a subgraph, a graph output, an excluded layer) would silently change, so the
weight is skipped with that reason. Every Gemm/MatMul/Conv that is not pruned is reported with
the reason, including nodes inside If/Loop/Scan subgraphs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from math import prod

import onnx
import onnx_graphsurgeon as gs

from .config import PRUNABLE_OP_TYPES
from .errors import ModelError
from .layers import BiasSlot, ConvGeometry, Discovery, Layer, PrunableWeight, SkippedCandidate, WeightLayout
from .modelio import np_dtype, tensor_protos

SUPPORTED_DTYPES = ("float32", "float16", "float64")


class _Rejected(Exception):
    """Internal: this node is not a prunable layer, for the given reason."""


def discover(
    model: onnx.ModelProto,
    op_types: Iterable[str] = PRUNABLE_OP_TYPES,
    exclude: Iterable[str] = (),
) -> Discovery:
    """Walk the top-level graph and classify every Gemm/MatMul/Conv node."""
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise ModelError(f"cannot read the model's graph: {str(exc).splitlines()[0]}") from None
    op_types = tuple(op_types)
    patterns = [re.compile(p) for p in exclude]
    graph_inputs = {v.name for v in model.graph.input}
    graph_outputs = {v.name for v in model.graph.output}
    sparse = {t.values.name for t in model.graph.sparse_initializer}
    protos = tensor_protos(model)
    ids = _node_ids(graph.nodes)
    index_of = {id(node): i for i, node in enumerate(graph.nodes)}

    skipped: list[SkippedCandidate] = []
    candidates: dict[str, list[tuple[gs.Node, Layer]]] = {}
    for node in graph.nodes:
        if node.op not in PRUNABLE_OP_TYPES:
            continue
        node_id = ids[id(node)]
        try:
            layer = _layer_of(node, node_id, graph_inputs, sparse, protos)
        except _Rejected as why:
            weight = node.inputs[1].name if len(node.inputs) > 1 else None
            skipped.append(SkippedCandidate(node_id, node.op, str(why), weight))
            continue
        layer = replace(layer, index=index_of[id(node)])
        try:
            layer = replace(
                layer, bias=_bias_slot(node, layer, index_of, graph_inputs, graph_outputs, sparse)
            )
        except _Rejected as why:
            layer = replace(layer, bias_problem=str(why))
        candidates.setdefault(layer.weight, []).append((node, layer))

    weights: list[PrunableWeight] = []
    for name, uses in candidates.items():
        reason = _sharing_problem(name, uses, graph, ids, graph_outputs, op_types, patterns)
        if reason is not None:
            skipped.extend(SkippedCandidate(layer.node, layer.op_type, reason, name) for _, layer in uses)
            continue
        proto = protos[name]
        source = "initializer" if any(t.name == name for t in model.graph.initializer) else "constant"
        weights.append(
            PrunableWeight(
                name,
                tuple(int(d) for d in proto.dims),
                str(np_dtype(proto.data_type)),
                source,
                tuple(layer for _, layer in uses),
            )
        )
    skipped.extend(_subgraph_candidates(graph, ids))
    return Discovery(tuple(weights), tuple(skipped))


def _node_ids(nodes: list[gs.Node]) -> dict[int, str]:
    """Unique, stable node identifiers: the name, or `<op>#<index>` if empty or repeated."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    return {
        id(node): node.name if node.name and counts[node.name] == 1 else f"{node.name or node.op}#{i}"
        for i, node in enumerate(nodes)
    }


def _constant_source(tensor: gs.Tensor, graph_inputs: set[str], sparse: set[str]) -> str:
    """Why `tensor` is not a usable constant weight, or '' if it is one."""
    if tensor.name in sparse:
        return f"weight {tensor.name!r} is a sparse initializer (not supported yet)"
    if isinstance(tensor, gs.Constant):
        if tensor.name in graph_inputs:
            return f"weight {tensor.name!r} is also a graph input, so a caller can override it"
        return ""
    producers = tensor.inputs
    if producers and producers[0].op == "Constant" and "value" in producers[0].attrs:
        return ""
    if not producers:
        return f"weight {tensor.name!r} is a graph input, not a constant"
    return f"weight {tensor.name!r} is computed at run time by {producers[0].op} node {producers[0].name!r}"


def _is_constant(tensor: gs.Tensor, graph_inputs: set[str], sparse: set[str]) -> bool:
    return _constant_source(tensor, graph_inputs, sparse) == ""


def _layer_of(
    node: gs.Node,
    node_id: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> Layer:
    """The Layer for a Gemm/MatMul/Conv node, or raise `_Rejected` with the reason."""
    if len(node.inputs) < 2 or not node.inputs[0].name or not node.inputs[1].name:
        raise _Rejected("missing an operand")
    act, weight = node.inputs[0], node.inputs[1]
    act_const = _is_constant(act, graph_inputs, sparse)
    weight_problem = _constant_source(weight, graph_inputs, sparse)
    if act_const and not weight_problem:
        raise _Rejected("both operands are constant (a constant-folding candidate, not a layer)")
    if act_const and node.op in ("MatMul", "Gemm"):
        raise _Rejected("only the left operand is constant: its rows are not output neurons of this node")
    if weight_problem:
        if node.op == "MatMul":
            raise _Rejected(f"both operands are activations (e.g. attention); {weight_problem}")
        raise _Rejected(weight_problem)
    proto = protos.get(weight.name)
    if proto is None:
        raise _Rejected(f"weight {weight.name!r} has no tensor value")
    shape = tuple(int(d) for d in proto.dims)
    dtype = str(np_dtype(proto.data_type))
    if dtype not in SUPPORTED_DTYPES:
        raise _Rejected(
            f"weight dtype {onnx.TensorProto.DataType.Name(proto.data_type).lower()} is not supported "
            f"(expected one of {', '.join(SUPPORTED_DTYPES)})"
        )
    if 0 in shape:
        raise _Rejected(f"weight {weight.name!r} is empty, shape {list(shape)}")
    if node.op == "MatMul":
        if len(shape) != 2:
            raise _Rejected(f"weight of rank {len(shape)} (only 2-D MatMul weights are layers)")
        return Layer(node_id, "MatMul", weight.name, act.name, shape, WeightLayout.COLUMNS)
    if node.op == "Gemm":
        if len(shape) != 2:
            raise _Rejected(f"Gemm weight of rank {len(shape)}, expected 2")
        layout = WeightLayout.ROWS if int(node.attrs.get("transB", 0)) else WeightLayout.COLUMNS
        return Layer(
            node_id,
            "Gemm",
            weight.name,
            act.name,
            shape,
            layout,
            transpose_input=bool(int(node.attrs.get("transA", 0))),
        )
    return _conv_layer(node, node_id, weight.name, act.name, shape)


def _conv_layer(node: gs.Node, node_id: str, weight: str, act: str, shape: tuple[int, ...]) -> Layer:
    if not 3 <= len(shape) <= 5:
        raise _Rejected(f"Conv weight of rank {len(shape)} (1-D to 3-D convolutions are supported)")
    n = len(shape) - 2
    attrs = node.attrs
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))
    if kernel != shape[2:]:
        raise _Rejected(f"kernel_shape {list(kernel)} does not match the weight {list(shape)}")
    group = int(attrs.get("group", 1))
    if group < 1 or shape[0] % group:
        raise _Rejected(f"group={group} does not divide the {shape[0]} output channels")
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise _Rejected(f"unknown auto_pad {auto_pad!r}")
    geom = ConvGeometry(
        kernel_shape=kernel,
        strides=tuple(int(s) for s in attrs.get("strides", (1,) * n)),
        dilations=tuple(int(d) for d in attrs.get("dilations", (1,) * n)),
        pads=tuple(int(p) for p in attrs.get("pads", (0,) * (2 * n))),
        auto_pad=auto_pad,
        group=group,
    )
    if len(geom.strides) != n or len(geom.dilations) != n or len(geom.pads) != 2 * n:
        raise _Rejected("strides/dilations/pads do not match the kernel rank")
    return Layer(node_id, "Conv", weight, act, shape, WeightLayout.CONV, conv=geom)


def _bias_slot(
    node: gs.Node,
    layer: Layer,
    index_of: dict[int, int],
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
) -> BiasSlot:
    """Where the bias refit can shift this layer's outputs, or raise `_Rejected` with why not."""
    if node.op == "MatMul":
        out = node.outputs[0]
        consumers = list(out.outputs)
        if out.name in graph_outputs or len(consumers) != 1 or consumers[0].op != "Add":
            raise _Rejected("no bias: the MatMul output does not go to a single Add")
        add = consumers[0]
        slot = 1 if add.inputs[0] is out else 0
        return _existing_bias(
            add, slot, layer.n_out, index_of[id(add)], 1.0, graph_inputs, graph_outputs, sparse
        )
    scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if scale == 0.0:
        raise _Rejected("no bias: Gemm beta is 0")
    if len(node.inputs) > 2 and node.inputs[2].name:
        return _existing_bias(
            node, 2, layer.n_out, index_of[id(node)], scale, graph_inputs, graph_outputs, sparse
        )
    return BiasSlot(index_of[id(node)], 2, None, scale)


def _existing_bias(
    node: gs.Node,
    slot: int,
    n_out: int,
    index: int,
    scale: float,
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
) -> BiasSlot:
    tensor = node.inputs[slot]
    problem = _constant_source(tensor, graph_inputs, sparse)
    if problem:
        raise _Rejected(f"no bias to refit: {problem}")
    if len(tensor.outputs) != 1 or tensor.name in graph_outputs:
        raise _Rejected(f"no bias to refit: bias {tensor.name!r} is shared")
    shape = tuple(int(d) for d in tensor.shape) if isinstance(tensor, gs.Constant) else None
    if shape is None:
        values = tensor.inputs[0].attrs["value"]
        shape = tuple(int(d) for d in values.shape)
    if prod(shape) != n_out or (shape and shape[-1] != n_out):
        raise _Rejected(f"no bias to refit: bias {tensor.name!r} has shape {list(shape)}, not [{n_out}]")
    return BiasSlot(index, slot, tensor.name, scale)


def _sharing_problem(
    name: str,
    uses: list[tuple[gs.Node, Layer]],
    graph: gs.Graph,
    ids: dict[int, str],
    graph_outputs: set[str],
    op_types: tuple[str, ...],
    patterns: list[re.Pattern[str]],
) -> str | None:
    """Why the weight `name` must not be pruned, or None."""
    for _, layer in uses:
        if layer.op_type not in op_types:
            return f"op type {layer.op_type} not selected (--op-types {','.join(op_types)})"
        for pattern in patterns:
            if pattern.search(layer.node):
                return f"excluded by --exclude {pattern.pattern!r}" + (
                    "" if len(uses) == 1 else f" (node {layer.node!r} shares the weight)"
                )
    if name in graph_outputs:
        return f"weight {name!r} is also a graph output"
    layer_nodes = {id(node) for node, _ in uses}
    tensor = uses[0][0].inputs[1]
    top_level = {id(n) for n in graph.nodes}
    for consumer in tensor.outputs:
        slots = [i for i, t in enumerate(consumer.inputs) if t is tensor]
        if id(consumer) in layer_nodes and slots == [1]:
            continue
        where = "" if id(consumer) in top_level else " inside a subgraph"
        label = ids.get(id(consumer), consumer.name or consumer.op)
        return f"weight {name!r} is also read by {consumer.op} node {label!r}{where}"
    return None


def _subgraph_candidates(graph: gs.Graph, ids: dict[int, str]) -> list[SkippedCandidate]:
    """Gemm/MatMul/Conv nodes inside If/Loop/Scan bodies (not pruned yet), recursively."""
    found: list[SkippedCandidate] = []

    def walk(g: gs.Graph, owner: str) -> None:
        for node in g.nodes:
            label = node.name or f"{node.op} in {owner}"
            if node.op in PRUNABLE_OP_TYPES:
                weight = node.inputs[1].name if len(node.inputs) > 1 else None
                found.append(
                    SkippedCandidate(
                        label, node.op, f"inside a subgraph of {owner} (not supported yet)", weight
                    )
                )
            for value in node.attrs.values():
                for sub in value if isinstance(value, list) else [value]:
                    if isinstance(sub, gs.Graph):
                        walk(sub, f"{node.op} node {label!r}")

    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    walk(sub, f"{node.op} node {ids[id(node)]!r}")
    return found
