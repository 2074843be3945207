"""Where a model's parameters are: the share `prune` can touch, and why the rest is not pruned.

Every stored constant (initializers, sparse initializers and `Constant` values, those of
subgraphs included) is counted once and attributed to the nodes that read it, through the ops
discovery follows between a stored constant and a layer (Transpose, Reshape, Cast,
DequantizeLinear, Concat of Slices, ...). What discovery found decides the first two kinds: a
prunable weight is one of `Discovery.weights`, a skipped candidate keeps its `SkippedCandidate`
reason; nothing here re-judges a layer. The other kinds name why a weight-bearing node is not
pruned (an embedding table is looked up, not multiplied; a bias is refitted with its layer).

Shapes, axes and indices (int64/bool tensors, or any tensor only read where an op expects
them) are not parameters: they are counted apart and left out of the share.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from math import prod
from typing import Any

import onnx

from .config import RECURRENT_OP_TYPES
from .discover import FOLLOWED_OPS, QUANTIZED_OPS, SUBGRAPH_OF_IF, UNSUPPORTED_QUANTIZED
from .layers import Discovery, SkippedCandidate
from .modelio import subgraphs

KINDS: dict[str, tuple[str, str]] = {
    "prunable": ("prunable layer weights", "pruned by `prune`"),
    "skipped": ("skipped candidates", "not pruned: see the skipped list for each reason"),
    "if_branch": (
        "layers inside If branches",
        "prunable by `prune` when the calibration data takes one branch (inspect has no data)",
    ),
    "embedding": ("Gather (embedding tables)", "not pruned: rows are looked up, not multiplied"),
    "other": ("other ops", "read by ops that are not layers sipp-onnx prunes"),
    "elementwise": (
        "elementwise constants",
        "operands of Add/Mul/... (scales, offsets, positional tables): not layers",
    ),
    "norm": ("normalization scales and shifts", "one value per channel: not pruned"),
    "bias": ("biases", "one value per output: not pruned (a pruned layer's bias is refitted)"),
    "quantization": ("quantization scales and zero points", "describe integer weights: not pruned"),
    "unused": ("unread constants", "read by no node (or only a graph output)"),
}
"""Kind -> (label, why). The order is the precedence when one tensor has readers of several kinds."""

_RANK = {kind: i for i, kind in enumerate(KINDS)}
_NOT_PARAMETER_DTYPES = (
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.STRING,
)
_INDEX_SLOTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ScatterND": (1,),
    "ScatterElements": (1,),
    "Pad": (1, 3),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Split": (1,),
    "OneHot": (1,),
    "Trilu": (1,),
    "CumSum": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL2": (1,),
}
"""Inputs that hold shapes, axes, indices or sizes, not values that reach the output."""
_NORM_SLOTS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (1, 2, 3, 4),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "RMSNormalization": (1,),
    "SimplifiedLayerNormalization": (1,),
    "SkipLayerNormalization": (2, 3, 4),
    "SkipSimplifiedLayerNormalization": (2, 3),
    "EmbedLayerNormalization": (5, 6),
}
_EMBEDDING_SLOTS: dict[str, tuple[int, ...]] = {"Gather": (0,), "EmbedLayerNormalization": (2, 3, 4)}
_BIAS_SLOTS: dict[str, tuple[int, ...]] = {
    "Gemm": (2,),
    "Conv": (2,),
    "ConvTranspose": (2,),
    "LSTM": (3,),
    "GRU": (3,),
    "RNN": (3,),
    "DynamicQuantizeLSTM": (3,),
    "QLinearConv": (8,),
    "QGemm": (6,),
}
_ELEMENTWISE = (
    *("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Sum", "Mean", "Clip", "Mod"),
    *("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitShift"),
)
_QUANTIZERS = ("DequantizeLinear", "QuantizeLinear")
_ATTENTION = ("Attention", "MultiHeadAttention", "QAttention", "PackedAttention")


@dataclass(frozen=True)
class TensorShare:
    """One stored constant: its size, the kind it counts as, and why."""

    name: str
    params: int
    dtype: str
    kind: str
    """A key of `KINDS`, or 'not_parameter' (shapes, axes, indices)."""
    reason: str
    nodes: tuple[str, ...]
    """The nodes that read it (through the followed ops)."""


@dataclass(frozen=True)
class CensusGroup:
    """The parameters of one kind (for 'other', of one reading op)."""

    kind: str
    label: str
    reason: str
    params: int
    tensors: int


@dataclass(frozen=True)
class Census:
    """The model's parameters by kind; `tensors` lists every constant (empty in a prune report)."""

    params_total: int
    """Values of every parameter tensor (shapes, axes and indices left out)."""
    params_prunable: int
    prunable_share: float
    groups: tuple[CensusGroup, ...]
    not_parameters: int
    """Values of shape/axis/index tensors (not counted in `params_total`)."""
    tensors: tuple[TensorShare, ...] = ()

    @property
    def if_branch_params(self) -> int:
        return sum(g.params for g in self.groups if g.kind == "if_branch")

    def summary(self) -> Census:
        """The census without its per-tensor list (what a prune report keeps)."""
        return replace(self, tensors=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def share_line(self) -> str:
        return (
            f"prunable: {count(self.params_prunable)} of {count(self.params_total)} parameters "
            f"({100 * self.prunable_share:.1f} %)"
        )

    def lines(self) -> list[str]:
        """The share, then where the rest lives, largest first."""
        out = [self.share_line()]
        rest = [g for g in self.groups if g.kind != "prunable"]
        width = max((len(g.label) for g in rest), default=0)
        for g in rest:
            out.append(f"  {g.label.ljust(width)}  {count(g.params):>8}  {g.reason}")
        if self.not_parameters:
            out.append(f"(shapes, axes and indices: {count(self.not_parameters)} values, not parameters)")
        return out


def count(n: int) -> str:
    """A parameter count for humans: 1,234 / 12.3 k / 13.5 M / 1.2 G."""
    if n < 10_000:
        return f"{n:,}"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:,}"  # unreachable


@dataclass(frozen=True)
class _Stored:
    name: str
    size: int
    data_type: int


@dataclass(frozen=True)
class _Read:
    """A node reading a constant (or what followed ops made of it) at input `slot`."""

    node: onnx.NodeProto
    slot: int
    label: str
    top: bool
    in_if: bool
    owner: str


def census(model: onnx.ModelProto, found: Discovery) -> Census:
    """Attribute every stored constant of `model` to a kind, using `found` (from `discover`, or
    restated by branches.on_model) for the prunable weights and the skipped candidates."""
    readers = _readers(model)
    outputs = {v.name for v in model.graph.output}
    stored = list(_stored_tensors(model))
    constant = _constant_expressions(model, {t.name for t in stored})
    prunable = {w.stored_name: w for w in found.weights}
    biases = {
        layer.bias.tensor for w in found.weights for layer in w.layers if layer.bias and layer.bias.tensor
    }
    # The scales and zero points a pruned weight is read through (DequantizeLinear, a Mul by a
    # scale): they describe its integers and are kept as they are.
    chain_params = {
        name for w in found.weights for step in w.chain for name in (step.scale, step.zero_point) if name
    }
    by_weight: dict[str, SkippedCandidate] = {}
    by_node: dict[str, SkippedCandidate] = {}
    for s in found.skipped:
        if s.weight:
            by_weight.setdefault(s.weight, s)
        by_node.setdefault(s.node, s)
    shares = []
    for t in stored:
        weight = prunable.get(t.name)
        if weight is not None:
            nodes = tuple(layer.node for layer in weight.layers)
            via = f" via {weight.via}" if weight.via else ""
            shares.append(TensorShare(t.name, t.size, _dtype(t), "prunable", f"weight{via}", nodes))
            continue
        reads = list(_terminal_reads(t.name, readers, constant))
        nodes = tuple(dict.fromkeys(r.label for r in reads))
        if t.data_type in _NOT_PARAMETER_DTYPES or (reads and all(_is_index(r) for r in reads)):
            shares.append(
                TensorShare(t.name, t.size, _dtype(t), "not_parameter", "shape/axes/indices", nodes)
            )
            continue
        if t.name in biases:
            kind, reason = "bias", "bias of a pruned layer: refitted, not pruned"
        elif t.name in chain_params:
            kind, reason = "quantization", "scale or zero point of a pruned weight: kept"
        elif not reads:
            kind, reason = "unused", "a graph output" if t.name in outputs else "read by no node"
        else:
            kind, reason = min((_classify(r, by_weight, by_node) for r in reads), key=lambda kr: _RANK[kr[0]])
        shares.append(TensorShare(t.name, t.size, _dtype(t), kind, reason, nodes))
    return _summarize(shares)


def _summarize(shares: list[TensorShare]) -> Census:
    params = [s for s in shares if s.kind != "not_parameter"]
    total = sum(s.params for s in params)
    prunable = sum(s.params for s in params if s.kind == "prunable")
    groups: dict[tuple[str, str], list[TensorShare]] = {}
    for s in params:  # 'other' is grouped by its reason, written "<label>: <why>"
        key = (s.kind, s.reason if s.kind == "other" else "")
        groups.setdefault(key, []).append(s)
    out = []
    for (kind, reason), members in groups.items():
        label, why = KINDS[kind]
        if kind == "other":
            label, why = reason.split(": ", 1) if ": " in reason else (label, reason)
        out.append(CensusGroup(kind, label, why, sum(m.params for m in members), len(members)))
    out.sort(key=lambda g: (g.kind != "prunable", -g.params))
    not_params = sum(s.params for s in shares if s.kind == "not_parameter")
    share = prunable / total if total else 0.0
    return Census(total, prunable, share, tuple(out), not_params, tuple(shares))


def _classify(
    read: _Read, by_weight: dict[str, SkippedCandidate], by_node: dict[str, SkippedCandidate]
) -> tuple[str, str]:
    """(kind, reason) of one reading node's input."""
    node, slot, op = read.node, read.slot, read.node.op_type
    domain = node.domain or ""
    if (op in UNSUPPORTED_QUANTIZED and domain == "com.microsoft") or slot in _weight_slots(node):
        name = node.input[slot]
        skipped = by_weight.get(name) or by_node.get(read.label) or by_node.get(_recurrent_label(read))
        if skipped is not None:
            in_if = skipped.reason.startswith(SUBGRAPH_OF_IF)
            return ("if_branch" if in_if else "skipped"), skipped.reason
        if read.in_if:
            return "if_branch", f"inside a subgraph of {read.owner}"
        if not read.top:
            return "skipped", f"inside a subgraph of {read.owner}"
        return "skipped", f"{op} weight not discovered as a layer"
    if slot in _EMBEDDING_SLOTS.get(op, ()):
        return "embedding", "an embedding table: rows are looked up, not multiplied; not pruned"
    if slot in _NORM_SLOTS.get(op, ()):
        return "norm", f"{op} scale or shift"
    if slot in _BIAS_SLOTS.get(op, ()):
        return "bias", f"bias of {op} (its layer is not pruned)"
    if _quantization_slot(node, slot):
        return "quantization", f"{op} scale or zero point"
    if op in _ELEMENTWISE:
        return "elementwise", f"operand of {op}"
    if op in _ATTENTION:
        return "other", f"{op} (fused attention): packed QKV weights of a fused op, not pruned"
    if op in RECURRENT_OP_TYPES:
        return "other", f"{op} states and peepholes: initial states, peephole weights; not pruned"
    if op == "PRelu":
        return "other", "PRelu slopes: one per channel, not pruned"
    return "other", f"{op} (input {slot}): not a layer sipp-onnx prunes"


def _weight_slots(node: onnx.NodeProto) -> tuple[int, ...]:
    """The inputs of a candidate node that discovery treats as weights."""
    op = node.op_type
    spec = QUANTIZED_OPS.get(op)
    if spec is not None:
        return (spec.weight,)
    if op in RECURRENT_OP_TYPES:
        return (1, 2)
    if op == "Einsum":
        return (0, 1)
    return (1,) if op in ("Gemm", "MatMul", "Conv", "ConvTranspose") else ()


def _quantization_slot(node: onnx.NodeProto, slot: int) -> bool:
    op = node.op_type
    if op in ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"):
        return slot in (1, 2)
    if op == "DynamicQuantizeLSTM":
        return slot >= 8
    return op in QUANTIZED_OPS or op.startswith("QLinear")


def _recurrent_label(read: _Read) -> str:
    return f"{read.label}/{'W' if read.slot == 1 else 'R'}"


def _is_index(read: _Read) -> bool:
    return read.slot in _INDEX_SLOTS.get(read.node.op_type, ())


def _dtype(t: _Stored) -> str:
    return onnx.TensorProto.DataType.Name(t.data_type).lower()


def _stored_tensors(model: onnx.ModelProto) -> Iterator[_Stored]:
    """Every stored constant, each name once (top-level and subgraphs)."""
    seen: set[str] = set()
    for graph in _graphs(model.graph):
        found: list[_Stored] = [_Stored(t.name, prod(t.dims), t.data_type) for t in graph.initializer]
        found += [_Stored(s.values.name, prod(s.dims), s.values.data_type) for s in graph.sparse_initializer]
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                found += _constant_value(node)
        for t in found:
            if t.name not in seen:
                seen.add(t.name)
                yield t


def _constant_value(node: onnx.NodeProto) -> list[_Stored]:
    name = node.output[0]
    for attr in node.attribute:
        if attr.name == "value":
            return [_Stored(name, prod(attr.t.dims), attr.t.data_type)]
        if attr.name == "sparse_value":
            return [_Stored(name, prod(attr.sparse_tensor.dims), attr.sparse_tensor.values.data_type)]
        if attr.name in ("value_float", "value_floats"):
            return [_Stored(name, max(len(attr.floats), 1), onnx.TensorProto.FLOAT)]
        if attr.name in ("value_int", "value_ints"):
            return [_Stored(name, max(len(attr.ints), 1), onnx.TensorProto.INT64)]
    return []


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _graphs(sub)


def _readers(model: onnx.ModelProto) -> dict[str, list[_Read]]:
    """Tensor name -> the nodes reading it, in every scope (a subgraph reads outer names)."""
    out: dict[str, list[_Read]] = {}

    def walk(graph: onnx.GraphProto, top: bool, in_if: bool, owner: str) -> None:
        labels = _top_labels(graph.node) if top else None
        for i, node in enumerate(graph.node):
            label = labels[i] if labels is not None else node.name or f"{node.op_type} in {owner}"
            for slot, name in enumerate(node.input):
                if name:
                    out.setdefault(name, []).append(_Read(node, slot, label, top, in_if, owner))
            for sub in subgraphs(node):
                walk(sub, False, in_if or node.op_type == "If", f"{node.op_type} node {label!r}")

    walk(model.graph, True, False, "")
    return out


def _top_labels(nodes: Any) -> list[str]:
    """Discovery's node identifiers: the name, or `<op>#<index>` if empty or repeated."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.name] = counts.get(node.name, 0) + 1
    return [
        node.name if node.name and counts[node.name] == 1 else f"{node.name or node.op_type}#{i}"
        for i, node in enumerate(nodes)
    ]


def _terminal_reads(name: str, readers: dict[str, list[_Read]], constant: set[str]) -> Iterator[_Read]:
    """The reads of `name` where it meets run-time data: through the ops discovery follows from a
    constant to a layer (and the Slices of a Concat of Slices), and through any op whose inputs
    are all constants (a weight computed from constants, e.g. `Cast(int8) * scale`). Shapes,
    axes and indices, and a DequantizeLinear's scale and zero point, end where they are read."""
    stack, seen = [name], {name}
    while stack:
        for read in readers.get(stack.pop(), []):
            op, out = read.node.op_type, read.node.output
            terminal = _is_index(read) or (op in _QUANTIZERS and read.slot in (1, 2))
            follow = (
                (op in FOLLOWED_OPS and (read.slot == 0 or op == "Concat"))
                or (op == "Slice" and read.slot == 0)
                or (bool(out) and out[0] in constant)
            )
            if follow and not terminal and out and out[0]:
                if out[0] not in seen:
                    seen.add(out[0])
                    stack.append(out[0])
                continue
            yield read


def _constant_expressions(model: onnx.ModelProto, stored: set[str]) -> set[str]:
    """Tensor names computed from stored constants only (nodes in topological order)."""
    constant = set(stored)

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            subs = list(subgraphs(node))
            for sub in subs:
                walk(sub)
            inputs = [i for i in node.input if i]
            if inputs and not subs and all(i in constant for i in inputs) and "Random" not in node.op_type:
                constant.update(o for o in node.output if o)

    walk(model.graph)
    return constant
