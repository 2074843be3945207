"""The channel graph: which channels of an ONNX model can be removed, and what must move with them.

Every output channel of a weight layer (Conv, Gemm, MatMul with a constant weight) is a *node*.
The walk follows each layer output through the graph in topological order, carrying for every
tensor a *layout*: the node behind each position of its channel axis. Ops that only transform
values keep the layout (activations, pooling, BatchNormalization, a constant per-channel Add);
ops that move it say where (Transpose, Squeeze, Concat, Split, Slice, Flatten and Reshape into a
dense layer, where channel c owns a block of columns); ops that tie channels together join
nodes with union-find:

- a residual Add, or the Mul of an SE gate with its trunk, joins the nodes at equal positions;
- a grouped or depthwise Conv joins the input and output channels of each of its groups (a
  group is removed whole, and the `group` attribute changes with it);
- an attention block joins the Q, K and V channels of each head (the head is removed whole,
  with the output projection's rows, and the head count in every Reshape shape).

A set of joined nodes is a *component*: the unit of removal. Components whose nodes sit in the
same layers form a *group* (the 64 channels of a residual stream, the heads of one attention
layer). Anything the walk cannot map exactly *freezes* the nodes it touches, with the reason: a
graph output (the interface is fixed), LayerNormalization over the channel axis (the residual
width of a transformer), a Gather on the channel axis, a Reshape whose target is computed from a
changing dimension, an unknown or custom op.

Everything surgery must change is recorded as an *edit* on a node input (slice a constant along
an axis, rewrite one element of a shape constant, new Split sizes, new Slice bounds, a new
`group`), so that `surgery` never looks at the graph's structure again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from math import prod
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from ..layers import ConvGeometry
from ..modelio import read_tensor, tensor_protos
from ..patches import output_spatial

log = logging.getLogger(__name__)

UNARY_OPS = frozenset(
    [
        "Relu",
        "Sigmoid",
        "Tanh",
        "HardSwish",
        "HardSigmoid",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Erf",
        "Gelu",
        "Mish",
        "Abs",
        "Neg",
        "Sqrt",
        "Exp",
        "Log",
        "Reciprocal",
        "Identity",
        "Dropout",
        "Cast",
        "ThresholdedRelu",
        "Clip",
        "Sin",
        "Cos",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Not",
        "IsNaN",
        "IsInf",
    ]
)
"""Element-wise ops of one tensor: extra inputs (Clip's bounds, Dropout's ratio) are scalars."""
POOL_OPS = frozenset(
    ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"]
)
BINARY_OPS = frozenset(["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean"])
REDUCE_OPS = frozenset(
    [
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    ]
)
LAYER_OPS = frozenset(("Conv", "Gemm", "MatMul"))


# --------------------------------------------------------------------------------------------
# What the walk produces


@dataclass(frozen=True)
class Edit:
    """One change surgery makes to a node input, decided by the kept positions of `tensor`.

    kinds:
    - 'slice':   keep, along `axis` of the constant, the positions of `tensor` that are kept
                 (`repeat` > 1: each position owns that many consecutive entries, e.g. a conv
                 consumer's kernel columns are in the weight's own axes, so repeat is 1 there);
    - 'shape':   element `element` of the constant becomes kept(`tensor`) // `divisor`;
    - 'split':   the Split's sizes become the kept counts of its output tensors `tensors`;
    - 'bounds':  the Slice's start/end on the channel axis are recounted on kept(`tensor`);
    - 'group':   the Conv's `group` becomes kept(`tensor`) // `divisor`.
    """

    kind: str
    node: int
    input: int
    tensor: str
    axis: int = 0
    element: int = 0
    divisor: int = 1
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerInfo:
    """A Conv/Gemm/MatMul with a constant weight: its cost, and its role in the channel graph."""

    node: int
    name: str
    op: str
    weight: str
    input: str
    """The activation it reads."""
    output: str
    weight_shape: tuple[int, ...]
    kernel: int
    """Kernel positions (1 for Gemm/MatMul)."""
    groups: int
    positions: int | None
    """Output positions per sample (conv output pixels, tokens; 1 for Gemm); None: unknown until
    the calibration pass measures it."""
    in_layout: bool
    """Its input columns follow a layout (it is a consumer)."""
    out_layout: bool
    """Its output channels are nodes (it is a producer, or a grouped/depthwise conv)."""
    conv: ConvGeometry | None = None
    transpose_b: bool = False
    """Gemm transB: the weight is stored [N, K]."""
    bias: int | None = None
    """Input index of the bias (Conv, Gemm) when present."""
    bias_add: int | None = None
    """Node index of the Add holding a MatMul's bias (a constant of one value per output)."""

    @property
    def n_out(self) -> int:
        if self.op == "Conv" or self.transpose_b:
            return self.weight_shape[0]
        return self.weight_shape[-1]

    @property
    def fan_in(self) -> int:
        """Weights per output neuron (per group for grouped convs)."""
        if self.op == "Conv":
            return prod(self.weight_shape[1:])
        return self.weight_shape[1] if self.transpose_b else self.weight_shape[0]

    @property
    def grouped(self) -> bool:
        return self.groups > 1

    def macs(self, kept_out: int, kept_in: int, positions: int) -> int:
        """Multiply-adds per sample with `kept_out` outputs and `kept_in` input columns (channels
        for conv; for grouped convs the per-group fan-in does not change)."""
        per_in = self.kernel if self.op == "Conv" else 1
        fan = self.fan_in if self.grouped else kept_in * per_in
        return positions * kept_out * fan

    def params(self, kept_out: int, kept_in: int) -> int:
        per_in = self.kernel if self.op == "Conv" else 1
        fan = self.fan_in if self.grouped else kept_in * per_in
        return kept_out * fan + (kept_out if self.bias is not None or self.bias_add is not None else 0)

    @property
    def in_channels(self) -> int:
        """Input columns as the layout counts them (channels for conv)."""
        if self.op == "Conv":
            return self.weight_shape[1] * self.groups
        return self.fan_in


@dataclass
class ChannelGraph:
    """The result of the walk (see the module docstring)."""

    layouts: dict[str, np.ndarray]
    """Tensor -> channel node of each position along its channel axis."""
    axes: dict[str, int]
    """Tensor -> its channel axis, counted from the end (-1: last)."""
    parent: np.ndarray
    """Union-find forest over nodes (roots are components)."""
    frozen: dict[int, str]
    """Node -> why it must stay."""
    origin: list[int]
    """Node -> index (in `layers`) of the layer whose output created it."""
    layers: list[LayerInfo]
    edits: list[Edit]
    heads: dict[int, int] = field(default_factory=dict)
    """Node index of an attention block's output projection -> its head dim (for reports)."""
    notes: list[str] = field(default_factory=list)

    def find(self, nodes: np.ndarray) -> np.ndarray:
        """Component (root node) of each node."""
        out = np.asarray(nodes, dtype=np.int64).copy()
        while True:
            up = self.parent[out]
            if np.array_equal(up, out):
                return out
            out = up

    def component_of(self) -> np.ndarray:
        return self.find(np.arange(len(self.parent)))


# --------------------------------------------------------------------------------------------
# The walk


class _Stop(Exception):
    """Internal: the current node cannot be mapped; its layout inputs freeze with this reason."""


@dataclass(frozen=True)
class _Heads:
    """A tensor inside an attention block: `nodes [H, D]` with the head axis and (for Q, K, V and
    the context) the head-dim axis; `d_axis` None for scores, whose D is one representative."""

    rank: int
    h_axis: int
    d_axis: int | None
    nodes: np.ndarray


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's inferred shape (None for unknown dims) from ONNX shape inference.

    Run on a copy without the big tensors' bytes (their dims are enough), so that it works on
    models whose weights are external or over 2 GB.
    """
    light = onnx.ModelProto()
    light.CopyFrom(model) if model.ByteSize() < (1 << 30) else _copy_light(model, light)
    for tensor in light.graph.initializer:
        if prod(tensor.dims) > 4096:
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(name)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:  # a model ORT runs may still confuse ONNX's inference
        log.debug("shape inference failed: %s", exc)
        inferred = light
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        t = value.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _copy_light(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    """Copy `model` without initializer bytes (a big in-memory model cannot be copied whole)."""
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    graph.node.extend(model.graph.node)
    for tensor in model.graph.initializer:
        copy = graph.initializer.add()
        copy.name, copy.data_type = tensor.name, tensor.data_type
        copy.dims.extend(tensor.dims)
        if prod(tensor.dims) <= 4096:
            copy.CopyFrom(tensor)


class _Walker:
    def __init__(self, model: onnx.ModelProto, base_dir: str | None) -> None:
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self.protos = tensor_protos(model)
        self.shapes = infer_shapes(model)
        self.initializers = {t.name for t in self.graph.initializer}
        self.graph_inputs = {v.name for v in self.graph.input}
        self.constant_nodes = {
            n.output[0]: i for i, n in enumerate(self.graph.node) if n.op_type == "Constant" and n.output
        }
        self.readers: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.graph.node):
            for name in node.input:
                if name:
                    self.readers[name] = self.readers.get(name, 0) + 1
                    self.consumers.setdefault(name, []).append(i)
        self.sub_reads = _subgraph_reads(self.graph)
        self.layouts: dict[str, np.ndarray] = {}
        self.axes: dict[str, int] = {}
        self.heads: dict[str, _Heads] = {}
        self.parent: list[int] = []
        self.origin: list[int] = []
        self.frozen: dict[int, str] = {}
        self.layers: list[LayerInfo] = []
        self.edits: list[Edit] = []
        self.head_dims: dict[int, int] = {}
        self._values: dict[str, np.ndarray | None] = {}

    # -- nodes and union-find

    def fresh(self, count: int, layer: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        self.origin.extend([layer] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def root(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the nodes of `a` and `b` position by position (a one-node side joins them all)."""
        a, b = np.broadcast_arrays(np.ravel(a), np.ravel(b))
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def freeze(self, nodes: np.ndarray, reason: str) -> None:
        for n in np.ravel(nodes).tolist():
            self.frozen.setdefault(n, reason)

    def freeze_tensor(self, name: str, reason: str) -> None:
        if name in self.layouts:
            self.freeze(self.layouts[name], reason)
        if name in self.heads:
            self.freeze(self.heads[name].nodes, reason)

    # -- graph facts

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return len(shape) if shape is not None else None

    def is_constant(self, name: str) -> bool:
        if name in self.constant_nodes:
            return True
        return name in self.initializers and name not in self.graph_inputs

    def value(self, name: str) -> np.ndarray | None:
        """A small constant's values (None if `name` is not a readable constant)."""
        if name not in self._values:
            proto = self.protos.get(name) if self.is_constant(name) else None
            try:
                self._values[name] = read_tensor(proto, self.base_dir) if proto is not None else None
            except Exception:
                self._values[name] = None
        return self._values[name]

    def channel(self, name: str) -> bool:
        return name in self.layouts or name in self.heads

    def set_layout(self, name: str, nodes: np.ndarray, axis: int) -> None:
        self.layouts[name] = nodes
        self.axes[name] = axis

    def label(self, index: int) -> str:
        node = self.graph.node[index]
        return node.name or f"{node.op_type}#{index}"

    # -- the walk

    def run(self) -> ChannelGraph:
        for index, node in enumerate(self.graph.node):
            if node.op_type == "Constant":
                continue
            inputs = [name for name in node.input if name and self.channel(name)]
            try:
                self.visit(index, node)
            except _Stop as why:
                for name in inputs:
                    self.freeze_tensor(name, f"{why} (node {self.label(index)!r})")
                for name in node.output:
                    self.layouts.pop(name, None)
                    self.heads.pop(name, None)
        for name in self.sub_reads:
            self.freeze_tensor(name, "read inside a subgraph (If/Loop/Scan)")
        for value in self.graph.output:
            self.freeze_tensor(value.name, f"reaches the graph output {value.name!r}")
        return ChannelGraph(
            layouts=self.layouts,
            axes=self.axes,
            parent=np.asarray([self.root(i) for i in range(len(self.parent))], dtype=np.int64),
            frozen=self.frozen,
            origin=self.origin,
            layers=self.layers,
            edits=self.edits,
            heads=self.head_dims,
        )

    def visit(self, index: int, node: onnx.NodeProto) -> None:
        op = node.op_type
        ins = list(node.input)
        channel_inputs = [name for name in ins if name and self.channel(name)]
        if op in LAYER_OPS:
            self.layer(index, node)
            return
        if not channel_inputs:
            return
        if node.domain not in ("", "ai.onnx"):
            raise _Stop(f"custom op {node.domain}::{op}")
        if op == "Shape":
            self.shape_op(index, node)
        elif op in UNARY_OPS:
            self.unary(node)
        elif op in POOL_OPS:
            self.pool(node)
        elif op == "BatchNormalization":
            self.per_channel_inputs(index, node, range(1, 5))
        elif op == "InstanceNormalization":
            self.per_channel_inputs(index, node, range(1, 3))
        elif op == "PRelu" or op in BINARY_OPS:
            self.binary(index, node)
        elif op == "Concat":
            self.concat(node)
        elif op == "Split":
            self.split(index, node)
        elif op == "Slice":
            self.slice(index, node)
        elif op == "Transpose":
            self.transpose(node)
        elif op in ("Squeeze", "Unsqueeze"):
            self.squeeze(node)
        elif op == "Flatten":
            self.flatten(node)
        elif op == "Reshape":
            self.reshape(index, node)
        elif op in REDUCE_OPS:
            self.reduce(node)
        elif op in ("Softmax", "LogSoftmax", "Hardmax"):
            self.softmax(node)
        elif op == "Pad":
            self.pad(node)
        elif op in ("Resize", "Upsample"):
            self.resize(node)
        elif op == "Gather":
            self.gather(node)
        elif op == "LayerNormalization":
            raise _Stop("LayerNormalization normalizes over the channel axis")
        else:
            raise _Stop(f"{op} is not mapped")

    # -- handlers

    def require_plain(self, name: str) -> tuple[np.ndarray, int]:
        if name in self.heads:
            raise _Stop("attention tensor used outside the head map")
        return self.layouts[name], self.axes[name]

    def unary(self, node: onnx.NodeProto) -> None:
        first = node.input[0]
        if any(self.channel(n) for n in node.input[1:] if n):
            raise _Stop(f"{node.op_type} with a per-channel bound")
        self.pass_through(first, node.output[0])
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            self.pass_through(first, node.output[1])

    def pass_through(self, src: str, dst: str) -> None:
        if src in self.heads:
            self.heads[dst] = self.heads[src]
        elif src in self.layouts:
            self.set_layout(dst, self.layouts[src], self.axes[src])

    def pool(self, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        rank = self.rank(node.input[0])
        if rank is None or axis != 1 - rank:
            raise _Stop(f"{node.op_type} over a tensor whose channel axis is not axis 1")
        self.set_layout(node.output[0], nodes, axis)
        if len(node.output) > 1 and node.output[1]:
            self.set_layout(node.output[1], nodes, axis)

    def per_channel_inputs(self, index: int, node: onnx.NodeProto, params: range) -> None:
        nodes, axis = self.require_plain(node.input[0])
        rank = self.rank(node.input[0])
        if rank is None or axis != 1 - rank:
            raise _Stop(f"{node.op_type} over a tensor whose channel axis is not axis 1")
        for i in params:
            if i < len(node.input) and node.input[i]:
                if not self.is_constant(node.input[i]):
                    raise _Stop(f"{node.op_type} parameter {node.input[i]!r} is not a constant")
                self.edits.append(Edit("slice", index, i, node.input[0], axis=0))
        self.set_layout(node.output[0], nodes, axis)

    def binary(self, index: int, node: onnx.NodeProto) -> None:
        out = node.output[0]
        rank = self.rank(out)
        if rank is None:
            raise _Stop(f"{node.op_type} output of unknown rank")
        plain = [n for n in node.input if n and n in self.layouts]
        headed = [n for n in node.input if n and n in self.heads]
        if plain and headed:
            raise _Stop("attention tensor combined with a channel tensor")
        if headed:
            self.binary_heads(node, headed, rank)
            return
        axis = self.axes[plain[0]]
        first = self.layouts[plain[0]]
        for name in plain[1:]:
            other = self.layouts[name]
            if self.axes[name] != axis or len(other) != len(first):
                if len(other) == 1 or len(first) == 1:
                    raise _Stop(f"{node.op_type} broadcasts a one-channel layer output")
                raise _Stop(f"{node.op_type} of tensors whose channel axes differ")
            self.union(first, other)
        for i, name in enumerate(node.input):
            if not name or name in self.layouts:
                continue
            size = self.dim_at(name, axis)
            if size in (None, 0):
                raise _Stop(f"{node.op_type} operand {name!r} of unknown shape")
            if size == 1:
                continue
            if size != len(first):
                raise _Stop(f"{node.op_type} operand {name!r} does not match the channels")
            if not self.is_constant(name):
                raise _Stop(f"{node.op_type} with {name!r}, whose channels cannot be removed")
            self.edits.append(Edit("slice", index, i, plain[0], axis=len(self.shape(name) or ()) + axis))
        self.set_layout(out, first, axis)

    def dim_at(self, name: str, axis: int) -> int | None:
        """The size of `name` along `axis` (from the end) after right-aligned broadcasting: 1
        when `name` has fewer dims; 0 when its shape is unknown."""
        shape = self.shape(name)
        if shape is None:
            value = self.value(name)
            shape = value.shape if value is not None else None
        if shape is None:
            return 0
        if len(shape) < -axis:
            return 1
        return shape[axis]

    def binary_heads(self, node: onnx.NodeProto, headed: list[str], rank: int) -> None:
        first = self.heads[headed[0]]
        for name in headed[1:]:
            other = self.heads[name]
            if (other.h_axis, other.d_axis) != (first.h_axis, first.d_axis):
                raise _Stop("attention tensors of different layouts combined")
            self.union(first.nodes, other.nodes)
        for name in node.input:
            if not name or name in self.heads:
                continue
            for axis in (first.h_axis, first.d_axis):
                if axis is None:
                    continue
                size = self.dim_at(name, axis - rank)
                if size != 1:
                    raise _Stop(f"{node.op_type} operand {name!r} varies along heads")
        self.heads[node.output[0]] = first

    def concat(self, node: onnx.NodeProto) -> None:
        out = node.output[0]
        rank = self.rank(out)
        if rank is None:
            raise _Stop("Concat output of unknown rank")
        axis = _attr(node, "axis", 0)
        axis = axis - rank if axis >= 0 else axis
        parts, channel_axis = [], None
        for name in node.input:
            if name in self.heads:
                raise _Stop("attention tensor concatenated")
            if name in self.layouts:
                channel_axis = self.axes[name] if channel_axis is None else channel_axis
                if self.axes[name] != channel_axis:
                    raise _Stop("Concat of tensors whose channel axes differ")
        if channel_axis != axis:  # along another axis: every input must carry the same channels
            layouts = [self.layouts.get(n) for n in node.input]
            if (
                any(lay is None for lay in layouts)
                or len({len(lay) for lay in layouts if lay is not None}) != 1
            ):
                raise _Stop("Concat along another axis of tensors that are not all channel tensors")
            for lay in layouts[1:]:
                self.union(layouts[0], lay)  # type: ignore[arg-type]
            self.set_layout(out, layouts[0], channel_axis)  # type: ignore[arg-type]
            return
        for name in node.input:
            if name in self.layouts:
                parts.append(self.layouts[name])
                continue
            size = self.dim_at(name, axis)
            if not size:
                raise _Stop(f"Concat input {name!r} of unknown size")
            extra = self.fresh(size, -1)
            self.freeze(extra, f"channels concatenated from {name!r}, which is not a layer output")
            parts.append(extra)
        self.set_layout(out, np.concatenate(parts), axis)

    def split(self, index: int, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        rank = self.rank(node.input[0])
        if rank is None:
            raise _Stop("Split of unknown rank")
        split_axis = _attr(node, "axis", 0)
        split_axis = split_axis - rank if split_axis >= 0 else split_axis
        if split_axis != axis:
            for out in node.output:
                if out:
                    self.set_layout(out, nodes, axis)
            return
        sizes = None
        if len(node.input) > 1 and node.input[1]:
            value = self.value(node.input[1])
            if value is None:
                raise _Stop("Split sizes are computed at run time")
            sizes = [int(s) for s in value.ravel()]
        elif _has_attr(node, "split"):
            sizes = list(_attr(node, "split", []))
        else:
            outs = [o for o in node.output]
            if len(nodes) % len(outs):
                raise _Stop("uneven Split without sizes")
            sizes = [len(nodes) // len(outs)] * len(outs)
        if sum(sizes) != len(nodes) or len(sizes) != len(node.output):
            raise _Stop("Split sizes do not match the channels")
        start = 0
        for out, size in zip(node.output, sizes, strict=True):
            if out:
                self.set_layout(out, nodes[start : start + size], axis)
            start += size
        self.edits.append(Edit("split", index, 1, node.input[0], tensors=tuple(node.output)))

    def slice(self, index: int, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        rank = self.rank(node.input[0])
        if rank is None:
            raise _Stop("Slice of unknown rank")
        values = [self.value(n) if i < len(node.input) and n else None for i, n in enumerate(node.input)]
        starts, ends = values[1] if len(values) > 1 else None, values[2] if len(values) > 2 else None
        if starts is None or ends is None:
            raise _Stop("Slice bounds are computed at run time")
        axes = values[3] if len(values) > 3 and node.input[3] else np.arange(len(starts))
        if axes is None:
            raise _Stop("Slice axes are computed at run time")
        steps = values[4] if len(values) > 4 and node.input[4] else np.ones(len(starts), np.int64)
        if steps is None:
            raise _Stop("Slice steps are computed at run time")
        positive = [int(a) % rank for a in axes.ravel()]
        channel = rank + axis
        if channel not in positive:
            self.set_layout(node.output[0], nodes, axis)
            return
        k = positive.index(channel)
        if int(steps.ravel()[k]) != 1:
            raise _Stop("Slice with a step on the channel axis")
        n = len(nodes)
        start, end = int(starts.ravel()[k]), int(ends.ravel()[k])
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(0, min(n, end + n if end < 0 else end))
        self.set_layout(node.output[0], nodes[start:end], axis)
        self.edits.append(Edit("bounds", index, k, node.input[0], element=start, divisor=end))

    def transpose(self, node: onnx.NodeProto) -> None:
        name = node.input[0]
        rank = self.rank(name)
        if rank is None:
            raise _Stop("Transpose of unknown rank")
        perm = list(_attr(node, "perm", list(range(rank - 1, -1, -1))))
        if name in self.heads:
            h = self.heads[name]
            d = perm.index(h.d_axis) if h.d_axis is not None else None
            self.heads[node.output[0]] = _Heads(h.rank, perm.index(h.h_axis), d, h.nodes)
            return
        nodes, axis = self.layouts[name], self.axes[name]
        self.set_layout(node.output[0], nodes, perm.index(rank + axis) - rank)

    def squeeze(self, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        rank, out_rank = self.rank(node.input[0]), self.rank(node.output[0])
        if rank is None or out_rank is None:
            raise _Stop(f"{node.op_type} of unknown rank")
        axes = self.axes_of(node, out_rank if node.op_type == "Unsqueeze" else rank)
        if axes is None:
            raise _Stop(f"{node.op_type} axes are computed at run time")
        channel = rank + axis
        if node.op_type == "Squeeze":
            if channel in axes:
                raise _Stop("Squeeze of the channel axis")
            new = channel - sum(1 for a in axes if a < channel)
        else:
            kept = [i for i in range(out_rank) if i not in axes]
            new = kept[channel]
        self.set_layout(node.output[0], nodes, new - out_rank)

    def axes_of(self, node: onnx.NodeProto, rank: int) -> list[int] | None:
        if _has_attr(node, "axes"):
            return [int(a) % rank for a in _attr(node, "axes", [])]
        if len(node.input) > 1 and node.input[1]:
            value = self.value(node.input[1])
            return None if value is None else [int(a) % rank for a in value.ravel()]
        if node.op_type == "Squeeze":
            shape = self.shape(node.input[0])
            if shape is None or None in shape:
                return None
            return [i for i, d in enumerate(shape) if d == 1]
        return list(range(rank)) if node.op_type.startswith("Reduce") else None

    def flatten(self, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        shape = self.shape(node.input[0])
        if shape is None:
            raise _Stop("Flatten of unknown shape")
        rank = len(shape)
        at = _attr(node, "axis", 1) % rank if rank else 0
        channel = rank + axis
        if channel < at:
            raise _Stop("Flatten merges the channel axis into the leading dims")
        inner = shape[channel + 1 :]
        outer = shape[at:channel]
        if None in inner or None in outer or prod(outer) != 1:  # type: ignore[arg-type]
            raise _Stop("Flatten of a tensor with unknown sizes after the channel axis")
        self.set_layout(node.output[0], np.repeat(nodes, prod(inner)), -1)  # type: ignore[arg-type]

    def reduce(self, node: onnx.NodeProto) -> None:
        name = node.input[0]
        nodes, axis = self.require_plain(name)
        rank = self.rank(name)
        if rank is None:
            raise _Stop(f"{node.op_type} of unknown rank")
        axes = self.axes_of(node, rank)
        if axes is None:
            raise _Stop(f"{node.op_type} axes are computed at run time")
        channel = rank + axis
        if channel in axes:
            raise _Stop(f"{node.op_type} over the channel axis")
        if _attr(node, "keepdims", 1):
            self.set_layout(node.output[0], nodes, axis)
            return
        new = channel - sum(1 for a in axes if a < channel)
        self.set_layout(node.output[0], nodes, new - (rank - len(axes)))

    def softmax(self, node: onnx.NodeProto) -> None:
        name = node.input[0]
        rank = self.rank(name)
        if rank is None:
            raise _Stop(f"{node.op_type} of unknown rank")
        at = _attr(node, "axis", -1) % rank
        if name in self.heads:
            h = self.heads[name]
            if at in (h.h_axis, h.d_axis):
                raise _Stop(f"{node.op_type} over the head axis")
            self.heads[node.output[0]] = h
            return
        if at == rank + self.axes[name]:
            raise _Stop(f"{node.op_type} over the channel axis")
        self.pass_through(name, node.output[0])

    def pad(self, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        rank = self.rank(node.input[0])
        pads = _attr(node, "pads", None)
        if pads is None and len(node.input) > 1 and node.input[1]:
            value = self.value(node.input[1])
            pads = None if value is None else [int(p) for p in value.ravel()]
        if rank is None or pads is None:
            raise _Stop("Pad with pads computed at run time")
        if len(node.input) > 3 and node.input[3]:
            raise _Stop("Pad with explicit axes")
        channel = rank + axis
        if pads[channel] or pads[channel + rank]:
            raise _Stop("Pad of the channel axis")
        self.set_layout(node.output[0], nodes, axis)

    def resize(self, node: onnx.NodeProto) -> None:
        nodes, axis = self.require_plain(node.input[0])
        if len(node.input) > 3 and node.input[3]:
            raise _Stop("Resize to explicit sizes")
        self.set_layout(node.output[0], nodes, axis)

    def gather(self, node: onnx.NodeProto) -> None:
        name = node.input[0]
        nodes, axis = self.require_plain(name)
        rank = self.rank(name)
        indices = self.rank(node.input[1])
        if rank is None or indices is None:
            raise _Stop("Gather of unknown rank")
        at = _attr(node, "axis", 0) % rank
        if at == rank + axis:
            raise _Stop("Gather on the channel axis")
        if at > rank + axis:
            self.set_layout(node.output[0], nodes, axis)
            return
        raise _Stop("Gather before the channel axis")

    def shape_op(self, index: int, node: onnx.NodeProto) -> None:
        """Shape of a channel tensor: allowed when every use reads only other dims (batch and
        sequence sizes), which do not change."""
        name = node.input[0]
        rank = self.rank(name)
        if rank is None:
            raise _Stop("Shape of a tensor whose channels change")
        channel = self.heads[name].h_axis if name in self.heads else rank + self.axes[name]
        start = _attr(node, "start", 0) % (rank + 1) if _has_attr(node, "start") else 0
        end = _attr(node, "end", rank) if _has_attr(node, "end") else rank
        end = end % (rank + 1) if end < 0 else min(end, rank)
        if not start <= channel < end:
            return
        for user in self.consumers.get(node.output[0], []):
            gather = self.graph.node[user]
            indices = self.value(gather.input[1]) if gather.op_type == "Gather" else None
            if indices is None or _attr(gather, "axis", 0) != 0:
                raise _Stop("Shape of a channel tensor is used whole")
            if any(int(i) % (end - start) + start == channel for i in indices.ravel()):
                raise _Stop("the channel count is read with Shape")

    # -- Reshape: into a dense layer, heads, and back

    def reshape(self, index: int, node: onnx.NodeProto) -> None:
        name, out = node.input[0], node.output[0]
        in_shape, out_shape = self.shape(name), self.shape(out)
        if in_shape is None or out_shape is None:
            raise _Stop("Reshape of unknown rank")
        if name in self.heads:
            self.merge_heads(index, node, self.heads[name], in_shape, out_shape)
            return
        nodes, axis = self.layouts[name], self.axes[name]
        rank, out_rank = len(in_shape), len(out_shape)
        channel = rank + axis
        c = len(nodes)
        inner = in_shape[channel + 1 :]
        if axis == -1 and out_rank == rank + 1 and out_shape[-1] and out_shape[-2]:
            heads, dim = out_shape[-2], out_shape[-1]
            if heads * dim == c and None not in out_shape[-2:]:
                self.split_heads(index, node, nodes, heads, dim, rank)
                return
        if None in inner:
            raise _Stop("Reshape of a tensor with unknown sizes after the channel axis")
        lead_in = in_shape[:channel]
        # where the channel axis goes: same leading dims, then C (kept) or C * inner (merged)
        for b in range(out_rank):
            if out_shape[:b] != lead_in[:b] or len(lead_in) != b:
                continue
            rest = out_shape[b + 1 :]
            if out_shape[b] == c and None not in rest and prod(rest) == prod(inner):  # type: ignore[arg-type]
                self.shape_edit(index, node, b, name, 1, channel)
                self.set_layout(out, nodes, b - out_rank)
                return
            if out_shape[b] == c * prod(inner) and (not rest or prod(rest) == 1):  # type: ignore[arg-type]
                self.shape_edit(index, node, b, out, 1, None)
                self.set_layout(out, np.repeat(nodes, prod(inner)), b - out_rank)  # type: ignore[arg-type]
                return
        raise _Stop("Reshape that splits or merges the channel axis with others")

    def shape_edit(
        self, index: int, node: onnx.NodeProto, element: int, tensor: str, divisor: int, same_axis: int | None
    ) -> None:
        """Record the rewrite of element `element` of the Reshape's target shape: -1 needs none;
        0 copies the input's dim at the same index (fine only where that is the channel axis)."""
        source = self.shape_source(index, node, element)
        if source is None:
            raise _Stop("Reshape target computed at run time")
        at, slot, where, current = source
        if current == -1:
            return
        if current == 0 and not _attr(node, "allowzero", 0):
            if same_axis == element:
                return
            raise _Stop("Reshape target copies a dimension that changes")
        self.edits.append(Edit("shape", at, slot, tensor, element=where, divisor=divisor))

    def shape_source(
        self, index: int, node: onnx.NodeProto, element: int
    ) -> tuple[int, int, int, int] | None:
        """(node index, input index, element in that input, current value) of the constant that
        gives element `element` of a Reshape's target: the target itself, or an input of the
        Concat that builds it."""
        target = node.input[1]
        value = self.value(target)
        if value is not None:
            return index, 1, element, int(value.ravel()[element])
        producer = self.producer_of(target)
        if producer is None or self.graph.node[producer].op_type != "Concat":
            return None
        concat = self.graph.node[producer]
        offset = 0
        for i, part in enumerate(concat.input):
            shape = self.shape(part)
            part_value = self.value(part)
            size = shape[0] if shape and len(shape) == 1 and shape[0] else None
            if part_value is not None:
                size = part_value.size
            if size is None:
                return None
            if offset <= element < offset + size:
                if part_value is None:
                    return None
                return producer, i, element - offset, int(part_value.ravel()[element - offset])
            offset += size
        return None

    def producer_of(self, name: str) -> int | None:
        if not hasattr(self, "_producers"):
            self._producers = {o: i for i, n in enumerate(self.graph.node) for o in n.output if o}
        return self._producers.get(name)

    def split_heads(
        self, index: int, node: onnx.NodeProto, nodes: np.ndarray, heads: int, dim: int, rank: int
    ) -> None:
        self.shape_edit(index, node, rank - 1, node.input[0], dim, None)
        source = self.shape_source(index, node, rank)
        if source is None or source[3] not in (-1, dim):
            raise _Stop("head split whose head size is not a constant")
        self.heads[node.output[0]] = _Heads(rank + 1, rank - 1, rank, nodes.reshape(heads, dim))

    def merge_heads(
        self,
        index: int,
        node: onnx.NodeProto,
        h: _Heads,
        in_shape: tuple[int | None, ...],
        out_shape: tuple[int | None, ...],
    ) -> None:
        rank = len(in_shape)
        if h.d_axis != rank - 1 or h.h_axis != rank - 2 or len(out_shape) != rank - 1:
            raise _Stop("attention output merged in an order the head map does not follow")
        merged = h.nodes.reshape(-1)
        self.shape_edit(index, node, rank - 2, node.output[0], 1, None)
        self.set_layout(node.output[0], merged, -1)

    # -- weight layers

    def layer(self, index: int, node: onnx.NodeProto) -> None:
        op = node.op_type
        ins = list(node.input)
        if len(ins) < 2 or not ins[0] or not ins[1]:
            raise _Stop(f"{op} missing an operand")
        act, weight = ins[0], ins[1]
        if op == "MatMul" and act in self.heads and weight in self.heads:
            self.attention_matmul(node)
            return
        if op == "MatMul" and not self.is_constant(weight) and not self.is_constant(act):
            self.activation_matmul(node)
            return
        if not self.is_constant(weight) or act in self.heads:
            if self.channel(weight) or self.channel(act):
                raise _Stop(f"{op} whose weight is not a constant")
            return
        proto = self.protos.get(weight)
        if proto is None:
            raise _Stop(f"{op} weight without a value")
        shape = tuple(int(d) for d in proto.dims)
        shared = self.readers.get(weight, 0) > 1 or weight in self.sub_reads
        out = node.output[0]
        in_shape, out_shape = self.shape(act), self.shape(out)
        info: LayerInfo
        if op == "Conv":
            info = self.conv_info(index, node, shape, in_shape, out_shape)
        else:
            info = self.dense_info(index, node, shape, in_shape)
        layer = len(self.layers)
        problem = ""
        if shared:
            problem = f"weight {weight!r} is shared"
        elif proto.data_type not in _FLOAT_TYPES:
            problem = f"weight {weight!r} is not a float tensor"
        elif op == "Gemm" and _attr(node, "transA", 0):
            problem = "Gemm with transA"
        elif op == "MatMul" and len(shape) != 2:
            problem = f"MatMul weight of rank {len(shape)}"
        elif op == "Conv" and len(shape) < 3:
            problem = "Conv weight of rank < 3"
        if problem:
            self.layers.append(info)
            self.freeze_tensor(act, problem)
            return
        if info.grouped:
            self.grouped_conv(index, node, info, layer)
            return
        consumer = act in self.layouts
        if consumer:
            nodes, axis = self.layouts[act], self.axes[act]
            rank = self.rank(act)
            want = (1 - rank) if op == "Conv" and rank else -1
            if axis != want or len(nodes) != info.in_channels:
                self.freeze(nodes, f"{op} node {self.label(index)!r} reads them on another axis")
                consumer = False
            else:
                w_axis = 1 if op == "Conv" else (1 if info.transpose_b else 0)
                self.edits.append(Edit("slice", index, 1, act, axis=w_axis))
        out_nodes = self.fresh(info.n_out, layer)
        out_axis = (1 - len(out_shape)) if op == "Conv" and out_shape else -1
        self.set_layout(out, out_nodes, out_axis)
        w_axis = 0 if op == "Conv" or info.transpose_b else 1
        self.edits.append(Edit("slice", index, 1, out, axis=w_axis))
        bias = None
        if op in ("Conv", "Gemm") and len(ins) > 2 and ins[2]:
            size = self.dim_at(ins[2], -1)
            if not self.is_constant(ins[2]) or self.readers.get(ins[2], 0) > 1:
                self.freeze(out_nodes, f"bias {ins[2]!r} is not a constant of its own")
            elif size == info.n_out:
                bias = 2
                self.edits.append(Edit("slice", index, 2, out, axis=len(self.shape(ins[2]) or (1,)) - 1))
            elif size != 1:
                self.freeze(out_nodes, f"bias {ins[2]!r} does not broadcast over the outputs")
        self.layers.append(_replace(info, in_layout=consumer, out_layout=True, bias=bias))

    def conv_info(
        self,
        index: int,
        node: onnx.NodeProto,
        shape: tuple[int, ...],
        in_shape: tuple[int | None, ...] | None,
        out_shape: tuple[int | None, ...] | None,
    ) -> LayerInfo:
        n = max(0, len(shape) - 2)
        geom = ConvGeometry(
            kernel_shape=tuple(int(k) for k in _attr(node, "kernel_shape", shape[2:])),
            strides=tuple(int(s) for s in _attr(node, "strides", (1,) * n)),
            dilations=tuple(int(d) for d in _attr(node, "dilations", (1,) * n)),
            pads=tuple(int(p) for p in _attr(node, "pads", (0,) * (2 * n))),
            auto_pad=_attr(node, "auto_pad", "NOTSET"),
            group=int(_attr(node, "group", 1)),
        )
        positions = None
        if out_shape is not None and len(out_shape) == n + 2 and None not in out_shape[2:]:
            positions = prod(out_shape[2:])  # type: ignore[arg-type]
        elif in_shape is not None and len(in_shape) == n + 2 and None not in in_shape[2:]:
            positions = prod(output_spatial(geom, tuple(in_shape[2:])))  # type: ignore[arg-type]
        return LayerInfo(
            index,
            self.label(index),
            "Conv",
            node.input[1],
            node.input[0],
            node.output[0],
            shape,
            prod(shape[2:]),
            geom.group,
            positions,
            False,
            False,
            conv=geom,
        )

    def dense_info(
        self,
        index: int,
        node: onnx.NodeProto,
        shape: tuple[int, ...],
        in_shape: tuple[int | None, ...] | None,
    ) -> LayerInfo:
        positions: int | None = 1
        if node.op_type == "MatMul":
            tokens = in_shape[1:-1] if in_shape is not None else None
            positions = prod(tokens) if tokens is not None and None not in tokens else None  # type: ignore[arg-type]
        bias_add = None
        if node.op_type == "MatMul":
            users = self.consumers.get(node.output[0], [])
            if len(users) == 1 and self.graph.node[users[0]].op_type == "Add":
                add = self.graph.node[users[0]]
                other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                if self.is_constant(other) and self.dim_at(other, -1) == shape[-1]:
                    bias_add = users[0]
        return LayerInfo(
            index,
            self.label(index),
            node.op_type,
            node.input[1],
            node.input[0],
            node.output[0],
            shape,
            1,
            1,
            positions,
            False,
            False,
            transpose_b=bool(_attr(node, "transB", 0)),
            bias_add=bias_add,
        )

    def grouped_conv(self, index: int, node: onnx.NodeProto, info: LayerInfo, layer: int) -> None:
        """A grouped or depthwise conv passes channels through: group k's input and output
        channels are one unit, removed together (the group count shrinks)."""
        act, out = node.input[0], node.output[0]
        g = info.groups
        out_nodes = self.fresh(info.n_out, layer)
        out_shape = self.shape(out)
        self.set_layout(out, out_nodes, (1 - len(out_shape)) if out_shape else -3)
        if act not in self.layouts or len(self.layouts[act]) != info.in_channels:
            self.freeze(
                out_nodes, f"grouped conv {self.label(index)!r} reads channels that cannot be removed"
            )
            self.layers.append(_replace(info, out_layout=True))
            return
        in_nodes = self.layouts[act]
        for k, (a, b) in enumerate(zip(in_nodes.reshape(g, -1), out_nodes.reshape(g, -1), strict=True)):
            del k
            self.union(a[:1], a)
            self.union(a[:1], b)
        per = info.n_out // g
        self.edits.append(Edit("slice", index, 1, out, axis=0))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = 2
            self.edits.append(Edit("slice", index, 2, out, axis=0))
        self.edits.append(Edit("group", index, 0, out, divisor=per))
        self.layers.append(_replace(info, out_layout=True, bias=bias))

    def activation_matmul(self, node: onnx.NodeProto) -> None:
        """MatMul of two activations outside a multi-head map (single-head attention): the
        contracted axis joins A's last-axis channels with B's second-to-last ones (Q and K share
        their dims); B's last-axis channels pass through to the output (V's dims to the context)."""
        a, b = node.input[0], node.input[1]
        if a in self.heads or b in self.heads:
            raise _Stop("attention MatMul of an unexpected layout")
        if a in self.layouts and b in self.layouts:
            if self.axes[a] != -1 or self.axes[b] != -2 or len(self.layouts[a]) != len(self.layouts[b]):
                raise _Stop("MatMul of two activations whose channels are not the contracted axis")
            self.union(self.layouts[a], self.layouts[b])
            return
        if b in self.layouts and self.axes[b] == -1 and a not in self.layouts:
            self.set_layout(node.output[0], self.layouts[b], -1)
            return
        if a in self.layouts or b in self.layouts:
            raise _Stop("MatMul of two activations whose channels are not the contracted axis")

    def attention_matmul(self, node: onnx.NodeProto) -> None:
        a, b = self.heads[node.input[0]], self.heads[node.input[1]]
        rank = a.rank
        if b.rank != rank or a.h_axis != b.h_axis or a.h_axis >= rank - 2:
            raise _Stop("attention MatMul of an unexpected layout")
        if a.nodes.shape[0] != b.nodes.shape[0]:
            raise _Stop("attention MatMul of different head counts")
        if a.d_axis == rank - 1 and b.d_axis == rank - 2:  # scores = Q K^T
            if a.nodes.shape[1] != b.nodes.shape[1]:
                raise _Stop("attention scores of different head sizes")
            for qa, kb in zip(a.nodes, b.nodes, strict=True):
                self.union(qa[:1], qa)
                self.union(qa[:1], kb)
            self.heads[node.output[0]] = _Heads(rank, a.h_axis, None, a.nodes[:, :1])
            return
        if a.d_axis is None and b.d_axis == rank - 1:  # context = P V
            for pa, vb in zip(a.nodes, b.nodes, strict=True):
                self.union(pa, vb[:1])
                self.union(vb[:1], vb)
            self.heads[node.output[0]] = _Heads(rank, a.h_axis, rank - 1, b.nodes)
            return
        raise _Stop("attention MatMul of an unexpected layout")


_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


def _replace(info: LayerInfo, **changes: Any) -> LayerInfo:
    return replace(info, **changes)


def _has_attr(node: onnx.NodeProto, name: str) -> bool:
    return any(a.name == name for a in node.attribute)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside If/Loop/Scan bodies (outer-scope tensors among them)."""
    names: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            names.update(n for n in node.input if n)
            for a in node.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                walk(a.g)
            for sub in a.graphs:
                walk(sub)
    return names


def build_channel_graph(model: onnx.ModelProto, base_dir: str | None = None) -> ChannelGraph:
    """Walk `model`'s top-level graph (see the module docstring)."""
    return _Walker(model, base_dir).run()


def iter_nodes(nodes: np.ndarray) -> Iterator[int]:
    yield from np.ravel(nodes).tolist()
