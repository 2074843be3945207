"""Find the prunable layers of an ONNX graph.

A layer is a Gemm, MatMul, Conv or ConvTranspose node of the top-level graph whose weight operand
is constant: an initializer that no caller can override, or the output of a `Constant` node. A weight is
pruned only when every consumer is such a layer using it as its weight; anything else that reads
it (another op, a subgraph, a graph output, an excluded layer) would silently change, so the
weight is skipped with that reason. Every such node that is not pruned is reported with
the reason, including nodes inside If/Loop/Scan subgraphs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from math import prod

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .config import PRUNABLE_OP_TYPES
from .errors import ModelError
from .layers import (
    BiasSlot,
    ChainStep,
    ConvGeometry,
    ConvTransposeGeometry,
    Discovery,
    Layer,
    PrunableWeight,
    SkippedCandidate,
    WeightLayout,
)
from .modelio import np_dtype, read_tensor, tensor_protos

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
FOLLOWED_OPS = ("Identity", "Transpose", "Reshape", "Cast", "DequantizeLinear")
"""Ops between a stored constant and a layer's weight that discovery follows (see weightchain)."""
_FLOAT_DTYPES = SUPPORTED_DTYPES


class _Rejected(Exception):
    """Internal: this node is not a prunable layer, for the given reason."""


def discover(
    model: onnx.ModelProto,
    op_types: Iterable[str] = PRUNABLE_OP_TYPES,
    exclude: Iterable[str] = (),
) -> Discovery:
    """Walk the top-level graph and classify every Gemm/MatMul/Conv/ConvTranspose node."""
    try:
        with _quiet_graphsurgeon():
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
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]] = {}
    for node in graph.nodes:
        if node.op not in PRUNABLE_OP_TYPES:
            continue
        node_id = ids[id(node)]
        try:
            layer = _layer_of(node, node_id, graph_inputs, graph_outputs, sparse, protos, chains)
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
        stored, chain = chains.get(name, (name, ()))
        source = "initializer" if any(t.name == stored for t in model.graph.initializer) else "constant"
        shape = uses[0][1].weight_shape
        dtype = chain[-1].out_dtype if chain else str(np_dtype(protos[name].data_type))
        layers = tuple(layer for _, layer in uses)
        weights.append(PrunableWeight(name, shape, dtype, source, layers, stored if chain else "", chain))
    skipped.extend(_subgraph_candidates(graph, ids))
    return Discovery(tuple(weights), tuple(skipped))


@contextlib.contextmanager
def _quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon prints its warnings (e.g. on any bfloat16 tensor) on stdout, which is
    the CLI's JSON and tables: only its critical messages are let through."""
    previous = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.CRITICAL
    try:
        yield
    finally:
        G_LOGGER.severity = previous


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
    graph_outputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]],
) -> Layer:
    """The Layer for a Gemm/MatMul/Conv/ConvTranspose node, or raise `_Rejected` with the reason.

    A weight computed from a constant by followed ops is recorded in `chains`."""
    if len(node.inputs) < 2 or not node.inputs[0].name or not node.inputs[1].name:
        raise _Rejected("missing an operand")
    act, weight = node.inputs[0], node.inputs[1]
    act_const = _is_constant(act, graph_inputs, sparse) or _chain_root(act, graph_inputs, sparse) is not None
    chain = _follow_chain(weight, graph_inputs, graph_outputs, sparse, protos)
    weight_problem = "" if chain is not None else _constant_source(weight, graph_inputs, sparse)
    if act_const and not weight_problem:
        raise _Rejected("both operands are constant (a constant-folding candidate, not a layer)")
    if act_const and node.op in ("MatMul", "Gemm"):
        raise _Rejected("only the left operand is constant: its rows are not output neurons of this node")
    if weight_problem:
        if node.op == "MatMul":
            raise _Rejected(f"both operands are activations (e.g. attention); {weight_problem}")
        raise _Rejected(weight_problem)
    if chain is not None:
        chains[weight.name] = chain
        shape, dtype = chain[1][-1].out_shape, chain[1][-1].out_dtype
    else:
        proto = protos.get(weight.name)
        if proto is None:
            raise _Rejected(f"weight {weight.name!r} has no tensor value")
        shape = tuple(int(d) for d in proto.dims)
        dtype = str(np_dtype(proto.data_type))
    if dtype not in SUPPORTED_DTYPES:
        if chain is None:
            dtype = onnx.TensorProto.DataType.Name(protos[weight.name].data_type).lower()
        raise _Rejected(
            f"weight dtype {dtype} is not supported (expected one of {', '.join(SUPPORTED_DTYPES)})"
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
    if node.op == "ConvTranspose":
        return _conv_transpose_layer(node, node_id, weight.name, act.name, shape)
    return _conv_layer(node, node_id, weight.name, act.name, shape)


def _chain_root(tensor: gs.Tensor, graph_inputs: set[str], sparse: set[str]) -> gs.Tensor | None:
    """The constant that `tensor` is computed from through followed ops only, or None."""
    while not _is_constant(tensor, graph_inputs, sparse):
        producers = tensor.inputs
        if not producers or producers[0].op not in FOLLOWED_OPS or not producers[0].inputs:
            return None
        tensor = producers[0].inputs[0]
    return tensor


def _follow_chain(
    weight: gs.Tensor,
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> tuple[str, tuple[ChainStep, ...]] | None:
    """(stored constant, steps) when `weight` is computed from a constant by followed ops only.

    None when it is a constant itself or is not computed from one (its usual reason then
    applies); raises `_Rejected` when the chain exists but cannot be pruned through.
    """
    if _is_constant(weight, graph_inputs, sparse):
        return None
    root = _chain_root(weight, graph_inputs, sparse)
    if root is None:
        return None
    nodes: list[gs.Node] = []
    tensor = weight
    while tensor is not root:
        node = tensor.inputs[0]
        nodes.append(node)
        tensor = node.inputs[0]
        if len(tensor.outputs) != 1 or tensor.name in graph_outputs:
            raise _Rejected(
                f"weight {weight.name!r} is computed from {root.name!r} through {tensor.name!r}, "
                "which something else also reads"
            )
    proto = protos.get(root.name)
    if proto is None:
        raise _Rejected(f"weight {weight.name!r} is computed from {root.name!r}, which has no tensor value")
    shape = tuple(int(d) for d in proto.dims)
    dtype = str(np_dtype(proto.data_type))
    steps = []
    for node in reversed(nodes):
        try:
            step = _chain_step(node, shape, dtype, graph_inputs, sparse, protos)
        except _Rejected as why:
            raise _Rejected(
                f"weight {weight.name!r} comes from {root.name!r} through {node.op}: {why}"
            ) from None
        steps.append(step)
        shape, dtype = step.out_shape, step.out_dtype
    return root.name, tuple(steps)


def _chain_step(
    node: gs.Node,
    shape: tuple[int, ...],
    dtype: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> ChainStep:
    """One followed op applied to a stored tensor of `shape` and `dtype`, or `_Rejected`."""
    if node.op == "Identity":
        return ChainStep("Identity", shape, shape, dtype)
    if node.op == "Transpose":
        perm = tuple(int(p) for p in node.attrs.get("perm", range(len(shape) - 1, -1, -1)))
        if sorted(perm) != list(range(len(shape))):
            raise _Rejected(f"perm {list(perm)} does not fit rank {len(shape)}")
        return ChainStep("Transpose", shape, tuple(shape[p] for p in perm), dtype, perm=perm)
    if node.op == "Reshape":
        return ChainStep("Reshape", shape, _reshaped(node, shape, graph_inputs, sparse, protos), dtype)
    if node.op == "Cast":
        to = str(np_dtype(int(node.attrs.get("to", 0))))
        if dtype not in _FLOAT_DTYPES or to not in _FLOAT_DTYPES:
            raise _Rejected(f"a cast from {dtype} to {to} (only casts between float types keep zeros)")
        return ChainStep("Cast", shape, shape, to)
    return _dequantize_step(node, shape, dtype, graph_inputs, sparse, protos)


def _small_constant(
    tensor: gs.Tensor,
    what: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> onnx.TensorProto:
    if not _is_constant(tensor, graph_inputs, sparse) or tensor.name not in protos:
        raise _Rejected(f"its {what} {tensor.name!r} is not a constant")
    return protos[tensor.name]


def _reshaped(
    node: gs.Node,
    shape: tuple[int, ...],
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> tuple[int, ...]:
    if len(node.inputs) < 2:
        raise _Rejected("no shape input")
    proto = _small_constant(node.inputs[1], "shape", graph_inputs, sparse, protos)
    try:
        target = [int(d) for d in read_tensor(proto).ravel()]
    except Exception:
        raise _Rejected("its shape cannot be read") from None
    allowzero = int(node.attrs.get("allowzero", 0))
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(target)]
    if out.count(-1) == 1:
        known = prod(d for d in out if d != -1)
        out[out.index(-1)] = prod(shape) // known if known else -1
    if any(d < 0 for d in out) or prod(out) != prod(shape):
        raise _Rejected(f"shape {target} does not fit {list(shape)}")
    return tuple(out)


def _dequantize_step(
    node: gs.Node,
    shape: tuple[int, ...],
    dtype: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> ChainStep:
    if dtype not in ("int8", "uint8", "int16", "uint16", "int32", "uint32"):
        raise _Rejected(f"quantized type {dtype} (8, 16 and 32-bit integers are followed)")
    if int(node.attrs.get("block_size", 0)):
        raise _Rejected("blocked quantization (block_size) is not followed")
    if len(node.inputs) < 2:
        raise _Rejected("no scale")
    scale = _small_constant(node.inputs[1], "scale", graph_inputs, sparse, protos)
    zero = ""
    if len(node.inputs) > 2 and node.inputs[2].name:
        zero_proto = _small_constant(node.inputs[2], "zero point", graph_inputs, sparse, protos)
        if str(np_dtype(zero_proto.data_type)) != dtype:
            raise _Rejected("its zero point's type differs from the weight's")
        zero = node.inputs[2].name
    axis = int(node.attrs.get("axis", 1))
    if not -len(shape) <= axis < len(shape):
        raise _Rejected(f"axis {axis} does not fit rank {len(shape)}")
    axis %= len(shape)
    dims = tuple(int(d) for d in scale.dims)
    if prod(dims) != 1 and dims != (shape[axis],):
        raise _Rejected(f"scale of shape {list(dims)} (per-tensor or per-axis scales are followed)")
    out = str(np_dtype(int(node.attrs.get("output_dtype", 0)) or scale.data_type))
    return ChainStep(
        "DequantizeLinear", shape, shape, out, scale=node.inputs[1].name, zero_point=zero, axis=axis
    )


def _conv_layer(node: gs.Node, node_id: str, weight: str, act: str, shape: tuple[int, ...]) -> Layer:
    if not 3 <= len(shape) <= 5:
        raise _Rejected(f"Conv weight of rank {len(shape)} (1-D to 3-D convolutions are supported)")
    geom = _conv_geometry(node, shape, "output")
    return Layer(node_id, "Conv", weight, act, shape, WeightLayout.CONV, conv=geom)


def _conv_transpose_layer(
    node: gs.Node, node_id: str, weight: str, act: str, shape: tuple[int, ...]
) -> Layer:
    """A ConvTranspose: weight `[C_in, C_out/G, k...]`, rows per output channel (CONV_TRANSPOSE)."""
    if not 3 <= len(shape) <= 5:
        raise _Rejected(f"ConvTranspose weight of rank {len(shape)} (1-D to 3-D convolutions are supported)")
    geom = _conv_geometry(node, shape, "input")
    n = geom.spatial_rank
    if min(geom.strides) < 1 or min(geom.dilations) < 1:
        raise _Rejected(f"strides {list(geom.strides)} / dilations {list(geom.dilations)} below 1")
    adjust = tuple(int(a) for a in node.attrs.get("output_padding", (0,) * n))
    out_shape = tuple(int(o) for o in node.attrs.get("output_shape", ()))
    if len(adjust) != n:
        raise _Rejected(f"output_padding {list(adjust)} does not match the kernel rank {n}")
    if any(a < 0 for a in adjust):
        raise _Rejected(f"negative output_padding {list(adjust)}")
    if out_shape and (len(out_shape) not in (n, n + 2) or min(out_shape[-n:]) < 1):
        raise _Rejected(f"output_shape {list(out_shape)} does not fit {n} spatial axes")
    geom = ConvTransposeGeometry(**vars(geom), output_padding=adjust, output_shape=out_shape)
    return Layer(node_id, "ConvTranspose", weight, act, shape, WeightLayout.CONV_TRANSPOSE, conv=geom)


def _conv_geometry(node: gs.Node, shape: tuple[int, ...], channels: str) -> ConvGeometry:
    """The attributes Conv and ConvTranspose share, checked against the weight (whose first
    axis, the `channels` ones, the groups split)."""
    n = len(shape) - 2
    attrs = node.attrs
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))
    if kernel != shape[2:]:
        raise _Rejected(f"kernel_shape {list(kernel)} does not match the weight {list(shape)}")
    group = int(attrs.get("group", 1))
    if group < 1 or shape[0] % group:
        raise _Rejected(f"group={group} does not divide the {shape[0]} {channels} channels")
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
    return geom


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
    """Gemm/MatMul/Conv/ConvTranspose nodes inside If/Loop/Scan bodies (not pruned yet), recursively."""
    found: list[SkippedCandidate] = []

    def walk(g: gs.Graph, owner: str) -> None:
        for node in g.nodes:
            label = node.name or f"{node.op} in {owner}"
            if node.op in PRUNABLE_OP_TYPES:
                weight = node.inputs[1].name if len(node.inputs) > 1 else None
                found.append(
                    SkippedCandidate(
                        label,
                        node.op,
                        f"inside a subgraph of {owner}: ONNX Runtime cannot return a subgraph's tensors, "
                        "so its inputs cannot be captured for calibration",
                        weight,
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
