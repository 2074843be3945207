"""Find the prunable layers of an ONNX graph.

A layer is a Gemm, MatMul, Conv or ConvTranspose node of the top-level graph whose weight operand
is constant:
an initializer that no caller can override, or the output of a `Constant` node; or an Einsum
with one such operand whose equation is a MatMul in disguise (see `einsum`); or the W or R of
an LSTM/GRU/RNN (see `recurrent`). A weight is
pruned only when every consumer is such a layer using it as its weight; anything else that reads
it (another op, a subgraph, a graph output, an excluded layer) would silently change, so the
weight is skipped with that reason. Every candidate node that is not pruned is reported with
the reason, including nodes inside If/Loop/Scan subgraphs.

Quantized layers (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul, com.microsoft QGemm)
are pruned through their dequantized view; see the section "Quantized ops" below.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from math import prod

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .config import PRUNABLE_OP_TYPES, RECURRENT_OP_TYPES
from .einsum import DenseEinsum, EinsumRejected, dense_einsum
from .errors import ModelError
from .layers import (
    BiasSlot,
    ChainStep,
    ConvGeometry,
    ConvTransposeGeometry,
    Discovery,
    InputQuantization,
    Layer,
    PrunableWeight,
    RecurrentGeometry,
    SkippedCandidate,
    WeightLayout,
)
from .modelio import np_dtype, read_tensor, tensor_protos

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
FOLLOWED_OPS = (
    "Identity",
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "DequantizeLinear",
    "Concat",
    "Mul",
)
"""Ops between a stored constant and a layer's weight that discovery follows (see weightchain).
Concat only of Slices of one tensor that cover it exactly once (a gate reordering); Mul only by
a constant per-tensor or per-axis scale (weight-only int8 exports: `Cast(int8) * scale`)."""
_FLOAT_DTYPES = SUPPORTED_DTYPES


class _Rejected(Exception):
    """Internal: this node is not a prunable layer, for the given reason."""


def discover(
    model: onnx.ModelProto,
    op_types: Iterable[str] = PRUNABLE_OP_TYPES,
    exclude: Iterable[str] = (),
) -> Discovery:
    """Walk the top-level graph and classify every candidate node (`PRUNABLE_OP_TYPES`)."""
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
    einsums: dict[str, DenseEinsum] = {}
    for node in graph.nodes:
        if node.op not in PRUNABLE_OP_TYPES or _foreign_domain(node):
            unsupported = _unsupported_quantized(node)
            if unsupported:
                skipped.append(SkippedCandidate(ids[id(node)], node.op, unsupported, _weight_name(node)))
            continue
        node_id = ids[id(node)]
        for slot in _weight_slots(node, graph_inputs, sparse):
            label = node_id if node.op not in RECURRENT_OP_TYPES else f"{node_id}/{'W' if slot == 1 else 'R'}"
            try:
                if node.op in RECURRENT_OP_TYPES:
                    layer = _recurrent_layer(
                        node, label, slot, graph_inputs, graph_outputs, sparse, protos, chains
                    )
                else:
                    layer = _layer_of(
                        node, node_id, graph_inputs, graph_outputs, sparse, protos, chains, einsums
                    )
            except _Rejected as why:
                weight = node.inputs[slot].name if len(node.inputs) > slot else None
                skipped.append(SkippedCandidate(label, node.op, str(why), weight))
                continue
            layer = replace(layer, index=index_of[id(node)])
            try:
                bias = _bias_slot(
                    node, layer, index_of, graph_inputs, graph_outputs, sparse, einsums.get(node_id)
                )
                layer = replace(layer, bias=bias)
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


def _weight_slot(node: gs.Node, graph_inputs: set[str], sparse: set[str]) -> int:
    """Input 1, except for a quantized op (its own slot) and an Einsum whose only constant operand
    is the first."""
    spec = QUANTIZED_OPS.get(node.op)
    if spec is not None:
        return spec.weight
    if node.op != "Einsum" or len(node.inputs) != 2:
        return 1
    first, second = (_constant_like(t, graph_inputs, sparse) for t in node.inputs)
    return 0 if first and not second else 1


def _constant_like(tensor: gs.Tensor, graph_inputs: set[str], sparse: set[str]) -> bool:
    """A constant, or computed from one by followed ops only."""
    return _is_constant(tensor, graph_inputs, sparse) or _chain_root(tensor, graph_inputs, sparse) is not None


def _layer_of(
    node: gs.Node,
    node_id: str,
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]],
    einsums: dict[str, DenseEinsum],
) -> Layer:
    """The Layer for a Gemm/MatMul/Conv/ConvTranspose/Einsum node, or `_Rejected` with the reason.

    A weight computed from a constant by followed ops is recorded in `chains`, how an Einsum
    reads its weight in `einsums`."""
    if node.op == "Einsum" and len(node.inputs) != 2:
        raise _Rejected(f"Einsum of {len(node.inputs)} operands (a dense layer has two)")
    if node.op in QUANTIZED_OPS:
        return _quantized_layer(node, node_id, graph_inputs, sparse, protos, chains)
    if len(node.inputs) < 2 or not node.inputs[0].name or not node.inputs[1].name:
        raise _Rejected("missing an operand")
    slot = _weight_slot(node, graph_inputs, sparse)
    act, weight = node.inputs[1 - slot], node.inputs[slot]
    act_const = _constant_like(act, graph_inputs, sparse)
    chain = _follow_chain(weight, graph_inputs, graph_outputs, sparse, protos)
    weight_problem = "" if chain is not None else _constant_source(weight, graph_inputs, sparse)
    if act_const and not weight_problem:
        raise _Rejected("both operands are constant (a constant-folding candidate, not a layer)")
    if act_const and node.op in ("MatMul", "Gemm"):
        raise _Rejected("only the left operand is constant: its rows are not output neurons of this node")
    if weight_problem:
        if node.op in ("MatMul", "Einsum"):
            raise _Rejected(f"both operands are activations (e.g. attention); {weight_problem}")
        raise _Rejected(weight_problem)
    shape = _weight_shape(weight, chain, protos, chains)
    if node.op == "Einsum":
        stored, steps = chain if chain is not None else (weight.name, ())
        layer, dense = _einsum_layer(node, node_id, slot, act, weight.name, shape)
        if layer.weight_shape != shape:  # read as its matrix through one more Reshape
            dtype = steps[-1].out_dtype if steps else str(np_dtype(protos[weight.name].data_type))
            chains[weight.name] = (stored, (*steps, ChainStep("Reshape", shape, layer.weight_shape, dtype)))
        einsums[node_id] = dense
        return layer
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


def _einsum_layer(
    node: gs.Node,
    node_id: str,
    slot: int,
    act: gs.Tensor,
    weight: str,
    shape: tuple[int, ...],
) -> tuple[Layer, DenseEinsum]:
    """An Einsum that is a dense layer (see `einsum`), its weight of `shape` read as the matrix
    `Layer.weight_shape`."""
    equation = node.attrs.get("equation", "")
    if isinstance(equation, bytes):
        equation = equation.decode()
    rank = len(act.shape) if act.shape is not None else None
    try:
        dense = dense_einsum(str(equation), slot, shape, rank)
    except EinsumRejected as why:
        raise _Rejected(f"equation {equation!r}: {why}") from None
    layer = Layer(
        node_id,
        "Einsum",
        weight,
        act.name,
        dense.matrix_shape,
        dense.layout,
        bias_problem=dense.bias_problem,
        input_axes=dense.input_axes,
        weight_input=slot,
    )
    return layer, dense


def _weight_shape(
    weight: gs.Tensor,
    chain: tuple[str, tuple[ChainStep, ...]] | None,
    protos: dict[str, onnx.TensorProto],
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]],
) -> tuple[int, ...]:
    """The shape of a constant weight (reached through `chain`, recorded in `chains`), or
    `_Rejected` when its dtype is not a float type or it is empty."""
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
    return shape


def _weight_slots(node: gs.Node, graph_inputs: set[str], sparse: set[str]) -> tuple[int, ...]:
    """The inputs of a prunable node that hold weights: W and R of a recurrent op, else one."""
    return (1, 2) if node.op in RECURRENT_OP_TYPES else (_weight_slot(node, graph_inputs, sparse),)


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}
RECURRENT_REFIT_PROBLEM = (
    "recurrent weights: mask and bias refit only (their inputs h_{t-1} are the op's own outputs, "
    "which a least-squares refit to the calibration states would change)"
)
"""Why R gets no least-squares refit. Measured on a captcha CRNN (BiLSTM 2x512, docs/benchmarks.md):
the refit of R is never better at the model's output and loses 3 points at 85 % sparsity."""


def _recurrent_layer(
    node: gs.Node,
    label: str,
    slot: int,
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]],
) -> Layer:
    """The W (`slot` 1) or R (`slot` 2) layer of an LSTM/GRU/RNN node, or `_Rejected`.

    W's points are the time steps of X; R's are the hidden states `h_{t-1}`, which calibration
    reads from the op's Y output (named in the calibration copy when the model leaves it unused).
    """
    if len(node.inputs) <= slot or not node.inputs[0].name or not node.inputs[slot].name:
        raise _Rejected("missing an operand")
    weight = node.inputs[slot]
    if node.op == "DynamicQuantizeLSTM":
        shape = _quantized_recurrent_weight(node, slot, graph_inputs, sparse, protos, chains)
    else:
        chain = _follow_chain(weight, graph_inputs, graph_outputs, sparse, protos)
        problem = "" if chain is not None else _constant_source(weight, graph_inputs, sparse)
        if problem:
            raise _Rejected(problem)
        shape = _weight_shape(weight, chain, protos, chains)
    attrs = node.attrs
    direction = attrs.get("direction", "forward")
    if isinstance(direction, bytes):
        direction = direction.decode()
    dirs = 2 if direction == "bidirectional" else 1
    hidden = int(attrs.get("hidden_size", 0))
    gates = _GATES[node.op]
    layout = int(attrs.get("layout", 0))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Rejected(f"unknown direction {direction!r}")
    if layout not in (0, 1):
        raise _Rejected(f"unknown layout {layout}")
    if len(shape) != 3 or shape[0] != dirs or (hidden and shape[1] != gates * hidden):
        raise _Rejected(
            f"weight of shape {list(shape)} does not fit {dirs} direction(s) of {gates} gate(s)"
            + (f" x hidden_size {hidden}" if hidden else "")
        )
    hidden = shape[1] // gates
    if slot == 2 and shape[2] != hidden:
        raise _Rejected(
            f"recurrent weight of shape {list(shape)}: its inputs are not the {hidden} hidden units"
        )
    if slot == 2 and node.op == "GRU" and not int(attrs.get("linear_before_reset", 0)):
        raise _Rejected(
            "GRU with linear_before_reset=0: the hidden gate's recurrent rows read r * h_{t-1}, "
            "which no tensor of the graph holds (the input weights W are pruned)"
        )
    initial_h = node.inputs[5].name if len(node.inputs) > 5 else ""
    lens = node.inputs[4].name if len(node.inputs) > 4 else ""
    geom = RecurrentGeometry(
        op=node.op,
        directions=dirs,
        reverse=direction == "reverse",
        hidden_size=hidden,
        gates=gates,
        layout=layout,
        hidden=slot == 2,
        initial_h=initial_h,
        sequence_lens=lens,
        sequence_lens_constant=bool(lens) and _is_constant(node.inputs[4], graph_inputs, sparse),
    )
    act = node.inputs[0].name
    if slot == 2:
        y = node.outputs[0].name if node.outputs else ""
        act = y or re.sub(r"[^0-9A-Za-z_]", "_", label) + "_sipp_Y"
        constant_h = bool(initial_h) and _is_constant(node.inputs[5], graph_inputs, sparse)
        geom = replace(geom, name_output=not y, initial_h_constant=constant_h)
        return Layer(
            label,
            node.op,
            weight.name,
            act,
            shape,
            WeightLayout.STACKED,
            recurrent=geom,
            weight_input=slot,
            refit_problem=RECURRENT_REFIT_PROBLEM,
        )
    return Layer(
        label, node.op, weight.name, act, shape, WeightLayout.STACKED, recurrent=geom, weight_input=slot
    )


def _quantized_recurrent_weight(
    node: gs.Node,
    slot: int,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]],
) -> tuple[int, ...]:
    """com.microsoft DynamicQuantizeLSTM stores W `[dirs, input, 4H]` and R `[dirs, H, 4H]` as
    int8 with a scale and zero point per direction (inputs 8-11); its X, states and outputs are
    float. Read as `(w - zp) * scale`, transposed to the LSTM's `[dirs, 4H, K]` (the chain's
    steps), it is an LSTM weight: pruned entries are written back as the zero point."""
    weight = node.inputs[slot]
    problem = _constant_source(weight, graph_inputs, sparse)
    if problem:
        raise _Rejected(problem)
    proto = protos.get(weight.name)
    if proto is None:
        raise _Rejected(f"weight {weight.name!r} has no tensor value")
    dtype = str(np_dtype(proto.data_type))
    shape = tuple(int(d) for d in proto.dims)
    if dtype not in _INT8 or len(shape) != 3:
        raise _Rejected(f"weight of dtype {dtype} and shape {list(shape)} (int8 [dirs, K, 4H] expected)")
    first = 8 if slot == 1 else 10
    names = []
    for index, what in ((first, "scale"), (first + 1, "zero point")):
        tensor = _input(node, index)
        if tensor is None:
            if what == "scale":
                raise _Rejected("no weight scale")
            names.append("")
            continue
        values = _small_constant(tensor, what, graph_inputs, sparse, protos)
        if tuple(int(d) for d in values.dims) not in ((), (1,), (shape[0],)):
            raise _Rejected(f"{what} of shape {list(values.dims)} (per-direction values are followed)")
        names.append(tensor.name)
    scale_dtype = str(np_dtype(protos[names[0]].data_type))
    transposed = (shape[0], shape[2], shape[1])
    steps = (
        ChainStep("DequantizeLinear", shape, shape, scale_dtype, scale=names[0], zero_point=names[1], axis=0),
        ChainStep("Transpose", shape, transposed, scale_dtype, perm=(0, 2, 1)),
    )
    chains[weight.name] = (weight.name, steps)
    return transposed


def _chain_root(tensor: gs.Tensor, graph_inputs: set[str], sparse: set[str]) -> gs.Tensor | None:
    """The constant that `tensor` is computed from through followed ops only, or None."""
    while not _is_constant(tensor, graph_inputs, sparse):
        producers = tensor.inputs
        if not producers or producers[0].op not in FOLLOWED_OPS or not producers[0].inputs:
            return None
        source = _step_source(producers[0])
        if source is None:
            return None
        tensor = source
    return tensor


def _step_source(node: gs.Node) -> gs.Tensor | None:
    """The tensor a followed op reads: its first input, or for a Concat the one tensor all its
    inputs are Slices of (None when they are not)."""
    if node.op == "Mul":
        if len(node.inputs) != 2:
            return None
        first, second = (_literal(t) for t in node.inputs)
        return node.inputs[0] if second else node.inputs[1] if first else None
    if node.op != "Concat":
        return node.inputs[0]
    slices = [t.inputs[0] if t.inputs else None for t in node.inputs]
    if not slices or any(s is None or s.op != "Slice" or not s.inputs for s in slices):
        return None
    sources = {id(s.inputs[0]) for s in slices if s is not None}
    return slices[0].inputs[0] if len(sources) == 1 and slices[0] is not None else None


def _literal(tensor: gs.Tensor) -> bool:
    """Stored in the graph (an initializer or a Constant node's value); graph inputs aside,
    which `_chain_step` checks when it reads the value."""
    return isinstance(tensor, gs.Constant) or bool(tensor.inputs and tensor.inputs[0].op == "Constant")


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
        source = _step_source(node)
        assert source is not None  # _chain_root found the way
        # Only the chain reads what it passes through (a Concat's Slices: the Slices themselves).
        readers = [source] if node.op != "Concat" else list(node.inputs)
        shared = [t for t in readers if len(t.outputs) != 1 or t.name in graph_outputs]
        if node.op == "Concat" and {id(c) for c in source.outputs} != {id(t.inputs[0]) for t in node.inputs}:
            shared.append(source)
        tensor = source
        if shared:
            raise _Rejected(
                f"weight {weight.name!r} is computed from {root.name!r} through {shared[0].name!r}, "
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
    if node.op in ("Squeeze", "Unsqueeze"):
        return ChainStep(node.op, shape, _squeezed(node, shape, graph_inputs, sparse, protos), dtype)
    if node.op == "Concat":
        axis, index = _reordering(node, shape, graph_inputs, sparse, protos)
        return ChainStep("Concat", shape, shape, dtype, axis=axis, index=index)
    if node.op == "Cast":
        to = str(np_dtype(int(node.attrs.get("to", 0))))
        if dtype in _INTEGERS and to in _FLOAT_DTYPES:
            # An integer weight made float (weight-only quantization): a DequantizeLinear with
            # scale 1 and zero point 0; refitted values are rounded back to the integers.
            return ChainStep("DequantizeLinear", shape, shape, to, label="Cast")
        if dtype not in _FLOAT_DTYPES or to not in _FLOAT_DTYPES:
            raise _Rejected(f"a cast from {dtype} to {to} (only casts to float keep zeros exactly)")
        return ChainStep("Cast", shape, shape, to)
    if node.op == "Mul":
        return _scale_step(node, shape, dtype, graph_inputs, sparse, protos)
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


_INTEGERS = ("int8", "uint8", "int16", "uint16", "int32", "uint32")


def _scale_step(
    node: gs.Node,
    shape: tuple[int, ...],
    dtype: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> ChainStep:
    """A Mul of the weight by a constant, non-zero, per-tensor or per-axis scale (it broadcasts
    without growing the weight): one to one, zero onto zero, undone by dividing."""
    source = _step_source(node)
    factor = node.inputs[1] if source is node.inputs[0] else node.inputs[0]
    proto = _small_constant(factor, "scale", graph_inputs, sparse, protos)
    dims = tuple(int(d) for d in proto.dims)
    if dtype not in _FLOAT_DTYPES:
        raise _Rejected(f"a Mul of a {dtype} weight (float weights are followed)")
    offset = len(shape) - len(dims)
    if offset < 0 or any(d not in (1, shape[offset + i]) for i, d in enumerate(dims)):
        raise _Rejected(f"a scale of shape {list(dims)} that does not broadcast onto {list(shape)}")
    axes = [offset + i for i, d in enumerate(dims) if d != 1]
    if len(axes) > 1:
        raise _Rejected(f"a scale of shape {list(dims)} (per-tensor or per-axis scales are followed)")
    values = read_tensor(proto)
    if values.dtype.kind != "f" or not np.isfinite(values).all() or (values == 0).any():
        raise _Rejected("a scale that is not a finite, non-zero float")
    return ChainStep("Mul", shape, shape, dtype, scale=factor.name, axis=axes[0] if axes else 0)


def _reordering(
    node: gs.Node,
    shape: tuple[int, ...],
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> tuple[int, tuple[int, ...]]:
    """(axis, order) of a Concat of Slices of one tensor that takes every index along `axis`
    exactly once: `order[i]` is the source index of output position i (e.g. PyTorch's LSTM gate
    reordering, i f g o -> i o f g)."""
    rank = len(shape)
    axis = int(node.attrs.get("axis", 0)) % rank
    order: list[int] = []
    for t in node.inputs:
        piece = t.inputs[0]
        args = [
            [
                int(v)
                for v in read_tensor(_small_constant(a, "slice bound", graph_inputs, sparse, protos)).ravel()
            ]
            if a.name
            else None
            for a in piece.inputs[1:]
        ]
        starts, ends = args[0], args[1]
        axes = args[2] if len(args) > 2 and args[2] is not None else list(range(len(starts or [])))
        steps = args[3] if len(args) > 3 and args[3] is not None else [1] * len(axes)
        if starts is None or ends is None or [a % rank for a in axes] != [axis] or steps != [1]:
            raise _Rejected("a Slice that is not a plain range along the Concat's axis")
        size = shape[axis]
        start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (starts[0], ends[0]))
        order.extend(range(start, end))
    if sorted(order) != list(range(shape[axis])):
        raise _Rejected(f"its Slices do not cover axis {axis} of {list(shape)} exactly once")
    return axis, tuple(order)


def _squeezed(
    node: gs.Node,
    shape: tuple[int, ...],
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> tuple[int, ...]:
    """The shape after a Squeeze/Unsqueeze (axes from input 1, or the attribute before opset 13)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        proto = _small_constant(node.inputs[1], "axes", graph_inputs, sparse, protos)
        axes = [int(a) for a in read_tensor(proto).ravel()]
    else:
        axes = [int(a) for a in node.attrs.get("axes", [])]
    if node.op == "Squeeze":
        if not axes:
            return tuple(d for d in shape if d != 1)
        rank = len(shape)
        drop = {a % rank for a in axes if -rank <= a < rank}
        if len(drop) != len(axes) or any(shape[a] != 1 for a in drop):
            raise _Rejected(f"axes {axes} do not fit shape {list(shape)}")
        return tuple(d for i, d in enumerate(shape) if i not in drop)
    rank = len(shape) + len(axes)
    add = {a % rank for a in axes if -rank <= a < rank}
    if not axes or len(add) != len(axes):
        raise _Rejected(f"axes {axes} do not fit rank {rank}")
    dims = iter(shape)
    return tuple(1 if i in add else next(dims) for i in range(rank))


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
    einsum: DenseEinsum | None = None,
) -> BiasSlot:
    """Where the bias refit can shift this layer's outputs, or raise `_Rejected` with why not."""
    if node.op in QUANTIZED_OPS:
        return _quantized_bias(node, layer, index_of, graph_inputs, graph_outputs, sparse)
    if layer.recurrent is not None:
        return _recurrent_bias(node, layer, index_of[id(node)], graph_inputs, graph_outputs, sparse)
    if einsum is not None and einsum.bias_problem:
        raise _Rejected(einsum.bias_problem)
    if node.op in ("MatMul", "Einsum"):
        out = node.outputs[0]
        consumers = list(out.outputs)
        if out.name in graph_outputs or len(consumers) != 1 or consumers[0].op != "Add":
            raise _Rejected(f"no bias: the {node.op} output does not go to a single Add")
        add = consumers[0]
        slot = 1 if add.inputs[0] is out else 0
        return _existing_bias(
            add,
            slot,
            layer.n_out,
            index_of[id(add)],
            1.0,
            graph_inputs,
            graph_outputs,
            sparse,
            einsum.free if einsum is not None else None,
        )
    scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if scale == 0.0:
        raise _Rejected("no bias: Gemm beta is 0")
    if len(node.inputs) > 2 and node.inputs[2].name:
        return _existing_bias(
            node, 2, layer.n_out, index_of[id(node)], scale, graph_inputs, graph_outputs, sparse
        )
    return BiasSlot(index_of[id(node)], 2, None, scale)


def _recurrent_bias(
    node: gs.Node,
    layer: Layer,
    index: int,
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
) -> BiasSlot:
    """A recurrent op's B `[dirs, 2 * gates * hidden]` holds W's bias, then R's: each layer
    shifts its own part (a GRU's R part of the hidden gate sits inside `r * (...)`, exactly
    where R's output is)."""
    geom = layer.recurrent
    assert geom is not None
    width = geom.gates * geom.hidden_size
    part = (width, 2 * width) if geom.hidden else (0, width)
    if len(node.inputs) <= 3 or not node.inputs[3].name:
        return BiasSlot(index, 3, None, part=part)
    tensor = node.inputs[3]
    problem = _constant_source(tensor, graph_inputs, sparse)
    if problem:
        raise _Rejected(f"no bias to refit: {problem}")
    if len(tensor.outputs) != 1 or tensor.name in graph_outputs:
        raise _Rejected(f"no bias to refit: bias {tensor.name!r} is shared")
    value = tensor if isinstance(tensor, gs.Constant) else tensor.inputs[0].attrs["value"]
    shape = tuple(int(d) for d in value.shape)
    if shape != (geom.directions, 2 * width):
        raise _Rejected(f"no bias to refit: B has shape {list(shape)}")
    return BiasSlot(index, 3, tensor.name, part=part)


def _existing_bias(
    node: gs.Node,
    slot: int,
    n_out: int,
    index: int,
    scale: float,
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
    free: tuple[int, ...] | None = None,
) -> BiasSlot:
    """`free`: an Einsum's output neuron dims, which its bias must match (leading 1s aside)."""
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
    if free is not None and len(free) > 1:
        if _strip_ones(shape) != _strip_ones(free):
            raise _Rejected(
                f"no bias to refit: bias {tensor.name!r} has shape {list(shape)}, not {list(free)}"
            )
    elif prod(shape) != n_out or (shape and shape[-1] != n_out):
        raise _Rejected(f"no bias to refit: bias {tensor.name!r} has shape {list(shape)}, not [{n_out}]")
    return BiasSlot(index, slot, tensor.name, scale)


def _strip_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape without its leading 1s (what a broadcast bias must match)."""
    start = next((i for i, d in enumerate(shape) if d != 1), len(shape))
    return tuple(shape[start:])


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
    if len({layer.weight_shape for _, layer in uses}) > 1:
        views = ", ".join(sorted({str(list(layer.weight_shape)) for _, layer in uses}))
        return f"weight {name!r} is read as matrices of different shapes ({views}) by its Einsum uses"
    layer_slots = {id(node): layer.weight_input for node, layer in uses}
    tensor = uses[0][0].inputs[uses[0][1].weight_input]
    top_level = {id(n) for n in graph.nodes}
    for consumer in tensor.outputs:
        slots = [i for i, t in enumerate(consumer.inputs) if t is tensor]
        if id(consumer) in layer_slots and slots == [layer_slots[id(consumer)]]:
            continue
        where = "" if id(consumer) in top_level else " inside a subgraph"
        label = ids.get(id(consumer), consumer.name or consumer.op)
        return f"weight {name!r} is also read by {consumer.op} node {label!r}{where}"
    return None


SUBGRAPH_OF_IF = "inside a subgraph of If node"
"""How the reason of a candidate inside an If branch starts (`prune` may still reach it)."""


def _subgraph_candidates(graph: gs.Graph, ids: dict[int, str]) -> list[SkippedCandidate]:
    """Candidate nodes inside If/Loop/Scan bodies (not pruned where they are), recursively."""
    found: list[SkippedCandidate] = []

    def walk(g: gs.Graph, owner: str) -> None:
        for node in g.nodes:
            label = node.name or f"{node.op} in {owner}"
            if node.op in PRUNABLE_OP_TYPES:
                weight = _weight_name(node)
                if owner.startswith("If node"):
                    reason = (
                        f"inside a subgraph of {owner}: `prune` calibrates it on a copy with the branch "
                        "inlined when every calibration batch takes that branch (inspect has no data)"
                    )
                else:
                    reason = (
                        f"inside a subgraph of {owner}: ONNX Runtime cannot return a subgraph's tensors, "
                        "so its inputs cannot be captured for calibration"
                    )
                found.append(SkippedCandidate(label, node.op, reason, weight))
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


# --- Quantized ops --------------------------------------------------------------------------
#
# A quantized layer computes, in its dequantized view, the float layer `W x` with
# `W = (w - w_zero_point) * w_scale` and `x = (x_q - x_zero_point) * x_scale`: that is what it is
# pruned as. The weight is read and written through a DequantizeLinear-like chain step (see
# weightchain: pruned entries become the zero point, refitted values are requantized with the
# same scale), and the captured integer input is dequantized before the accumulators see it.
#
# Why the input is dequantized with its own per-batch scale (DynamicQuantizeLinear's output 1,
# captured with the input) rather than used as integers: SiPP's relative shares do not depend on
# a positive per-tensor input scale, but the refit's Gram matrices and the bias shift do; a
# dynamic scale differs from batch to batch, so sums of raw integers over batches would weigh
# the batches wrongly and give the bias shift the wrong units. Why not DynamicQuantizeLinear's
# float input instead: the dequantized integers are exactly what the op multiplies (rounding
# included), so the refit fits the layer as it runs.


@dataclass(frozen=True)
class _QuantSpec:
    """Input slots of a quantized layer op (None: the op has no such input)."""

    domain: str
    float_op: str
    """The float op whose geometry it has: Conv, MatMul or Gemm."""
    x_scale: int | None
    x_zero: int
    weight: int
    w_scale: int | None
    w_zero: int
    bias: int | None
    """An int32 bias with scale `x_scale * w_scale` (QLinearConv, QGemm)."""


QUANTIZED_OPS: dict[str, _QuantSpec] = {
    "ConvInteger": _QuantSpec("", "Conv", None, 2, 1, None, 3, None),
    "MatMulInteger": _QuantSpec("", "MatMul", None, 2, 1, None, 3, None),
    "QLinearConv": _QuantSpec("", "Conv", 1, 2, 3, 4, 5, 8),
    "QLinearMatMul": _QuantSpec("", "MatMul", 1, 2, 3, 4, 5, None),
    "QGemm": _QuantSpec("com.microsoft", "Gemm", 1, 2, 3, 4, 5, 6),
}

UNSUPPORTED_QUANTIZED: dict[str, str] = {
    "QAttention": "its packed int8 QKV weight has no single input per output (not pruned)",
    "DynamicQuantizeMatMul": "a fused dynamic-quantization MatMul (not pruned yet)",
    "MatMulIntegerToFloat": "a fused integer MatMul with float output (not pruned yet)",
    "MatMulNBits": "blocked low-bit weight quantization (not pruned)",
    "MatMulBnb4": "blocked 4-bit weight quantization (not pruned)",
    "QOrderedMatMul": "an ordered-layout int8 MatMul (not pruned)",
    "QEmbedLayerNormalization": "quantized embedding tables (not pruned)",
    "GatherBlockQuantized": "blocked quantized embedding table (not pruned)",
}
"""com.microsoft ops holding quantized weights that discovery reports instead of pruning."""

_DEFAULT_DOMAINS = ("", "ai.onnx")
_INT8 = ("int8", "uint8")


def _foreign_domain(node: gs.Node) -> bool:
    """A node named like a prunable op but from another domain than that op's."""
    spec = QUANTIZED_OPS.get(node.op)
    if node.op == "DynamicQuantizeLSTM":
        return (node.domain or "") != "com.microsoft"
    want = (spec.domain,) if spec is not None and spec.domain else _DEFAULT_DOMAINS
    return (node.domain or "") not in want


def _unsupported_quantized(node: gs.Node) -> str:
    """Why a quantized op that holds a weight is not pruned ('' for other ops)."""
    domain = node.domain or ""
    if node.op in UNSUPPORTED_QUANTIZED and domain == "com.microsoft":
        return f"com.microsoft {node.op}: {UNSUPPORTED_QUANTIZED[node.op]}"
    if node.op in PRUNABLE_OP_TYPES:
        return f"{node.op} of domain {domain or 'ai.onnx'!r} is not the op discovery knows"
    return ""


def _weight_name(node: gs.Node) -> str | None:
    spec = QUANTIZED_OPS.get(node.op)
    slot = spec.weight if spec is not None else 1
    return node.inputs[slot].name if len(node.inputs) > slot and node.inputs[slot].name else None


def _input(node: gs.Node, slot: int | None) -> gs.Tensor | None:
    if slot is None or len(node.inputs) <= slot or not node.inputs[slot].name:
        return None
    return node.inputs[slot]


def _quantized_layer(
    node: gs.Node,
    node_id: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
    chains: dict[str, tuple[str, tuple[ChainStep, ...]]],
) -> Layer:
    """The Layer of a quantized op, its weight's dequantization recorded in `chains`."""
    spec = QUANTIZED_OPS[node.op]
    act, weight = _input(node, 0), _input(node, spec.weight)
    if act is None or weight is None:
        raise _Rejected("missing an operand")
    problem = _constant_source(weight, graph_inputs, sparse)
    if problem:
        if spec.float_op == "MatMul":
            raise _Rejected(f"both operands are activations (e.g. attention); {problem}")
        raise _Rejected(problem)
    if _is_constant(act, graph_inputs, sparse):
        raise _Rejected("both operands are constant (a constant-folding candidate, not a layer)")
    proto = protos.get(weight.name)
    if proto is None:
        raise _Rejected(f"weight {weight.name!r} has no tensor value")
    dtype = str(np_dtype(proto.data_type))
    if dtype not in _INT8:
        raise _Rejected(f"quantized weight of type {dtype} (int8 and uint8 are pruned)")
    shape = tuple(int(d) for d in proto.dims)
    if 0 in shape:
        raise _Rejected(f"weight {weight.name!r} is empty, shape {list(shape)}")
    layer = _float_geometry(node, spec, node_id, weight.name, act.name, shape)
    quant = _input_quantization(node, spec, act, graph_inputs, sparse, protos)
    layer = replace(layer, op_type=node.op, input_quant=quant, weight_input=spec.weight)
    axis = 1 if layer.layout is WeightLayout.COLUMNS else 0  # the output axis of the stored weight
    zero = _weight_parameter(node, spec.w_zero, "zero point", layer, dtype, graph_inputs, sparse, protos)
    if spec.w_scale is not None:
        scale = _weight_parameter(node, spec.w_scale, "scale", layer, "", graph_inputs, sparse, protos)
        label = "(w - zero point) * scale"
    else:
        scale = _scale_after(node, quant, layer, graph_inputs, sparse, protos)
        label = "(w - zero point) * scale of the Mul after" if scale else "(w - zero point), scale unknown"
    if not scale:
        # Sensitivities and each row's refit do not depend on a row's scale; the error allocation
        # then compares rows and layers in integer units, and the bias shift would have none.
        layer = replace(
            layer, bias_problem="no bias refit: the weight scale is unknown, so the output shift has no units"
        )
    out_dtype = str(np_dtype(protos[scale].data_type)) if scale else "float32"
    step = ChainStep(
        "DequantizeLinear", shape, shape, out_dtype, scale=scale, zero_point=zero, axis=axis, label=label
    )
    chains[weight.name] = (weight.name, (step,))
    return layer


def _float_geometry(
    node: gs.Node, spec: _QuantSpec, node_id: str, weight: str, act: str, shape: tuple[int, ...]
) -> Layer:
    """The Layer the float op of the same geometry would have."""
    if spec.float_op == "Conv":
        return _conv_layer(node, node_id, weight, act, shape)
    if len(shape) != 2:
        raise _Rejected(f"weight of rank {len(shape)} (only 2-D {node.op} weights are layers)")
    if spec.float_op == "MatMul":
        return Layer(node_id, node.op, weight, act, shape, WeightLayout.COLUMNS)
    layout = WeightLayout.ROWS if int(node.attrs.get("transB", 0)) else WeightLayout.COLUMNS
    transpose = bool(int(node.attrs.get("transA", 0)))
    return Layer(node_id, node.op, weight, act, shape, layout, transpose_input=transpose)


def _input_quantization(
    node: gs.Node,
    spec: _QuantSpec,
    act: gs.Tensor,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> InputQuantization:
    """The activation's scale and zero point: per-tensor constants, or the run-time outputs of
    a DynamicQuantizeLinear (per tensor by definition), else `_Rejected`."""
    zero = _input(node, spec.x_zero)
    if zero is not None:
        _activation_parameter(zero, 2, "zero point", graph_inputs, sparse, protos)
    if spec.x_scale is not None:
        scale = _input(node, spec.x_scale)
        if scale is None:
            raise _Rejected("no activation scale")
        _activation_parameter(scale, 1, "scale", graph_inputs, sparse, protos)
        return InputQuantization(scale.name, zero.name if zero is not None else "")
    producer = act.inputs[0] if act.inputs else None
    if producer is not None and producer.op == "DynamicQuantizeLinear" and len(producer.outputs) > 1:
        name = producer.outputs[1].name
    elif producer is not None and producer.op == "QuantizeLinear" and _input(producer, 1) is not None:
        name = producer.inputs[1].name
        _activation_parameter(producer.inputs[1], 1, "scale", graph_inputs, sparse, protos)
    else:
        source = f"{producer.op} node {producer.name!r}" if producer is not None else "a graph input"
        raise _Rejected(
            f"the activation's scale is unknown: {node.op} has none and its input comes from {source}, "
            "not a DynamicQuantizeLinear or QuantizeLinear"
        )
    return InputQuantization(name, zero.name if zero is not None else "")


def _activation_parameter(
    tensor: gs.Tensor,
    output: int,
    what: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> None:
    """Reject an activation scale/zero point that is not one value per tensor."""
    if _is_constant(tensor, graph_inputs, sparse) and tensor.name in protos:
        size = prod(int(d) for d in protos[tensor.name].dims)
        if size != 1:
            raise _Rejected(
                f"activation {what} {tensor.name!r} has {size} values (per-row or per-channel "
                "activation quantization is not supported)"
            )
        return
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "DynamicQuantizeLinear" or producer.outputs[output] is not tensor:
        source = f"{producer.op} node {producer.name!r}" if producer is not None else "a graph input"
        raise _Rejected(
            f"activation {what} {tensor.name!r} comes from {source} (only constants and "
            "DynamicQuantizeLinear outputs are known to be per tensor)"
        )


def _weight_parameter(
    node: gs.Node,
    slot: int,
    what: str,
    layer: Layer,
    dtype: str,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> str:
    """The constant weight scale or zero point at `slot` ('' for an absent zero point): per
    tensor or per output channel, of the weight's type (zero point) or positive (scale)."""
    tensor = _input(node, slot)
    if tensor is None:
        if what == "scale":
            raise _Rejected("no weight scale")
        return ""
    if not _is_constant(tensor, graph_inputs, sparse) or tensor.name not in protos:
        raise _Rejected(
            f"weight {what} {tensor.name!r} is not a constant (pruned entries are written as the "
            "zero point, refitted ones requantized with the scale: both must be known)"
        )
    proto = protos[tensor.name]
    values = read_tensor(proto)
    if values.size not in (1, layer.n_out):
        raise _Rejected(
            f"weight {what} {tensor.name!r} has {values.size} values, not 1 or {layer.n_out} "
            "(blocked or per-input quantization is not supported)"
        )
    if what == "zero point" and str(values.dtype) != dtype:
        raise _Rejected(f"weight zero point of type {values.dtype}, the weight is {dtype}")
    if what == "scale" and not (
        values.dtype.kind == "f" and np.isfinite(values).all() and (values > 0).all()
    ):
        raise _Rejected(f"weight scale {tensor.name!r} is not positive and finite")
    return tensor.name


def _output_mul(node: gs.Node) -> gs.Node | None:
    """The Mul that scales an integer op's output: op -> Cast (to float) -> Mul, else None.
    Older quantize_dynamic versions add the int32 bias first: op -> Add -> Cast -> Mul."""
    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        out = out.outputs[0].outputs[0]
    casts = out.outputs
    if len(casts) != 1 or casts[0].op != "Cast":
        return None
    muls = casts[0].outputs[0].outputs
    return muls[0] if len(muls) == 1 and muls[0].op == "Mul" else None


def _scale_after(
    node: gs.Node,
    quant: InputQuantization,
    layer: Layer,
    graph_inputs: set[str],
    sparse: set[str],
    protos: dict[str, onnx.TensorProto],
) -> str:
    """The weight scale of a ConvInteger/MatMulInteger, found where quantize_dynamic puts it:
    op -> Cast -> Mul by `x_scale * w_scale`, the product a Mul of the activation's scale and a
    constant. '' when the graph has another form."""
    mul = _output_mul(node)
    if mul is None:
        return ""
    cast_out = next(t for t in mul.inputs if t.inputs and t.inputs[0].op == "Cast")
    factor = mul.inputs[1] if mul.inputs[0] is cast_out else mul.inputs[0]
    product = factor.inputs[0] if factor.inputs else None
    if product is None or product.op != "Mul" or len(product.inputs) != 2:
        return ""
    names = [t.name for t in product.inputs]
    if quant.scale not in names:
        return ""
    other = product.inputs[1 - names.index(quant.scale)]
    if not _is_constant(other, graph_inputs, sparse) or other.name not in protos:
        return ""
    values = read_tensor(protos[other.name])
    if values.size not in (1, layer.n_out) or values.dtype.kind != "f" or not (values > 0).all():
        return ""
    if values.size > 1 and layer.conv is not None and values.shape[0] != layer.n_out:
        return ""  # a per-channel factor must lie along the output's channel axis
    return other.name


def _quantized_bias(
    node: gs.Node,
    layer: Layer,
    index_of: dict[int, int],
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
) -> BiasSlot:
    """The int32 bias of QLinearConv/QGemm (scale `x_scale * w_scale`), or the float bias Add
    after an integer op's output Mul; `_Rejected` where the refit cannot shift the outputs."""
    spec = QUANTIZED_OPS[node.op]
    if layer.bias_problem:  # set by _quantized_layer
        raise _Rejected(layer.bias_problem)
    if spec.x_scale is None:
        return _bias_after_mul(node, layer, index_of, graph_inputs, graph_outputs, sparse)
    if spec.bias is None:
        raise _Rejected(f"no bias: {node.op} has no bias input and its output is requantized")
    if node.op == "QGemm" and float(node.attrs.get("alpha", 1.0)) != 1.0:
        raise _Rejected("no bias refit: QGemm alpha is not 1 (the bias scale would differ)")
    bias = _input(node, spec.bias)
    if bias is None:
        raise _Rejected(f"no bias to refit: {node.op} has no int32 bias input (none is added)")
    x_scale, w_scale = _input(node, spec.x_scale), _input(node, spec.w_scale)
    if x_scale is None or w_scale is None or not isinstance(x_scale, gs.Constant):
        raise _Rejected("no bias refit: the activation scale is not a constant initializer")
    if not isinstance(w_scale, gs.Constant):
        raise _Rejected("no bias refit: the weight scale is not a constant initializer")
    slot = _existing_bias(
        node, spec.bias, layer.n_out, index_of[id(node)], 1.0, graph_inputs, graph_outputs, sparse
    )
    scales = _values(x_scale).reshape(-1) * _values(w_scale).reshape(-1)
    per_out = np.broadcast_to(scales, (layer.n_out,))
    return replace(slot, scale=tuple(float(v) for v in per_out))


def _bias_after_mul(
    node: gs.Node,
    layer: Layer,
    index_of: dict[int, int],
    graph_inputs: set[str],
    graph_outputs: set[str],
    sparse: set[str],
) -> BiasSlot:
    """quantize_dynamic's float bias: op -> Cast -> Mul -> Add(bias), the bias a constant or
    (ConvInteger) a Reshape of one to `[1, C, 1, ...]`."""
    mul = _output_mul(node)
    if mul is None:
        raise _Rejected("no bias: the integer output is not Cast then scaled by one Mul")
    out = mul.outputs[0]
    adds = list(out.outputs)
    if out.name in graph_outputs or len(adds) != 1 or adds[0].op != "Add":
        raise _Rejected("no bias: the scaled output does not go to a single Add")
    add = adds[0]
    slot = 1 if add.inputs[0] is out else 0
    tensor = add.inputs[slot]
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Reshape" and not _is_constant(tensor, graph_inputs, sparse):
        if len(tensor.outputs) != 1 or tensor.name in graph_outputs:
            raise _Rejected(f"no bias to refit: bias {tensor.name!r} is shared")
        shape = producer.inputs[1] if len(producer.inputs) > 1 else None
        dims = [int(d) for d in _values(shape).reshape(-1)] if isinstance(shape, gs.Constant) else []
        if dims.count(-1) == 1 and prod(d for d in dims if d != -1) == 1:
            dims[dims.index(-1)] = layer.n_out
        channel = len(dims) - 1 - (layer.conv.spatial_rank if layer.conv is not None else 0)
        if channel < 0 or dims[channel] != layer.n_out or prod(dims) != layer.n_out:
            raise _Rejected(f"no bias to refit: bias {tensor.name!r} is reshaped to {dims}, not per channel")
        index = index_of[id(add)]
        base = _existing_bias(producer, 0, layer.n_out, index, 1.0, graph_inputs, graph_outputs, sparse)
        return replace(base, input_index=slot)
    return _existing_bias(add, slot, layer.n_out, index_of[id(add)], 1.0, graph_inputs, graph_outputs, sparse)


def _values(tensor: gs.Constant) -> np.ndarray:
    """A small graphsurgeon constant's values (loaded if lazy), as float64 or int64."""
    values = tensor.values
    array = np.asarray(values.load() if hasattr(values, "load") else values)
    return array.astype(np.float64 if array.dtype.kind == "f" else np.int64)
