"""Apply a structured prune to a model: compensated consumer weights, then the edits.

`apply_surgery(model, plan, keep, compensations, slice_channels=True)` rewrites `model` in
place. With `slice_channels=False` only the compensation is written (consumer weights with zeros
in the pruned columns and their new biases) and nothing is removed: the *masked* model, whose
outputs the sliced one must reproduce (the tests' oracle).

Constants are sliced where they are: an initializer or a `Constant` node's value read by this
node alone is rewritten in place (keeping external data external); one read elsewhere too is
copied into a new initializer for this node first, so the other reader never changes. Shape,
Split and Slice constants always get new initializers for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..layers import WeightLayout, from_rows
from ..modelio import read_tensor, tensor_protos, write_tensor
from .channels import Edit, LayerInfo
from .compensate import Compensation
from .groups import Plan


@dataclass
class _Context:
    model: onnx.ModelProto
    protos: dict[str, onnx.TensorProto]
    base_dir: Path | None
    readers: dict[str, int]
    taken: set[str]
    orphaned: set[str] = field(default_factory=set)

    def unique(self, base: str) -> str:
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}{n}"
        self.taken.add(name)
        return name

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.protos[name], self.base_dir)

    def exclusive(self, node: onnx.NodeProto, slot: int) -> onnx.TensorProto:
        """The tensor `node.input[slot]`, copied to a new initializer first if anything else
        reads it."""
        name = node.input[slot]
        if self.readers.get(name, 0) <= 1:
            return self.protos[name]
        values = self.read(name)
        return self.new_initializer(node, slot, values, name)

    def new_initializer(
        self, node: onnx.NodeProto, slot: int, values: np.ndarray, base: str
    ) -> onnx.TensorProto:
        old = node.input[slot]
        name = self.unique(f"{base}_sipp_s")
        tensor = numpy_helper.from_array(np.ascontiguousarray(values), name)
        self.model.graph.initializer.append(tensor)
        tensor = self.model.graph.initializer[-1]
        self.protos[name] = tensor
        node.input[slot] = name
        self.readers[old] = self.readers.get(old, 1) - 1
        self.readers[name] = 1
        if self.readers[old] <= 0:
            self.orphaned.add(old)
        return tensor

    def drop_orphans(self) -> None:
        """Remove the initializers and Constant nodes that only the rewritten inputs read."""
        gone = {name for name in self.orphaned if self.readers.get(name, 0) <= 0}
        if not gone:
            return
        inits = [t for t in self.model.graph.initializer if t.name not in gone]
        if len(inits) != len(self.model.graph.initializer):
            del self.model.graph.initializer[:]
            self.model.graph.initializer.extend(inits)
        nodes = [n for n in self.model.graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
        if len(nodes) != len(self.model.graph.node):
            del self.model.graph.node[:]
            self.model.graph.node.extend(nodes)


def _context(model: onnx.ModelProto, base_dir: Path | None) -> _Context:
    readers: dict[str, int] = {}
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    for node in model.graph.node:
        taken.update(node.output)
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for value in model.graph.output:
        readers[value.name] = readers.get(value.name, 0) + 1
    return _Context(model, tensor_protos(model), base_dir, readers, taken)


def weight_layout(layer: LayerInfo) -> WeightLayout:
    if layer.op == "Conv":
        return WeightLayout.CONV
    return WeightLayout.ROWS if layer.transpose_b else WeightLayout.COLUMNS


def apply_surgery(
    model: onnx.ModelProto,
    plan: Plan,
    keep: np.ndarray,
    compensations: Mapping[int, Compensation],
    *,
    slice_channels: bool = True,
    base_dir: Path | None = None,
) -> None:
    """Rewrite `model` (see the module docstring). `compensations` is keyed by layer index."""
    ctx = _context(model, base_dir)
    nodes = model.graph.node
    edits = list(plan.graph.edits)
    for i, comp in compensations.items():
        layer = plan.layers[i]
        node = nodes[layer.node]
        tensor = ctx.exclusive(node, 1)
        dtype = tensor.data_type
        values = from_rows(comp.rows, weight_layout(layer), layer.weight_shape)
        write_tensor(tensor, values.astype(helper.tensor_dtype_to_np_dtype(dtype)))
        if comp.bias_shift is not None and _shift_bias(ctx, plan, i, comp.bias_shift):
            layer = plan.layers[i]
            if layer.out_layout:  # a bias added to a layer whose outputs are pruned too
                edits.append(Edit("slice", layer.node, 2, layer.output, axis=0))
    if not slice_channels:
        return
    by_input: dict[tuple[int, int], list[Edit]] = {}
    for edit in edits:
        by_input.setdefault((edit.node, edit.input), []).append(edit)
    for (index, slot), edits in by_input.items():
        node = nodes[index]
        kind = edits[0].kind
        if kind == "slice":
            mask_edits = [(e.axis, plan.kept_positions(keep, e.tensor)) for e in edits]
            if all(m.all() for _, m in mask_edits):
                continue
            tensor = ctx.exclusive(node, slot)
            values = read_tensor(tensor, base_dir)
            for axis, mask in mask_edits:
                values = np.compress(mask, values, axis=axis)
            write_tensor(tensor, values)
        elif kind == "shape":
            values = ctx.read(node.input[slot]).copy()
            flat = values.reshape(-1)
            for e in edits:
                flat[e.element] = int(plan.kept_positions(keep, e.tensor).sum()) // e.divisor
            ctx.new_initializer(node, slot, values, node.input[slot])
        elif kind == "split":
            _split(ctx, node, plan, keep, edits[0])
        elif kind == "bounds":
            _bounds(ctx, node, plan, keep, edits[0])
        elif kind == "group":
            e = edits[0]
            groups = int(plan.kept_positions(keep, e.tensor).sum()) // e.divisor
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = groups
    _drop_value_info(model, plan)
    ctx.drop_orphans()


def _shift_bias(ctx: _Context, plan: Plan, i: int, shift: np.ndarray) -> bool:
    """Add `shift` (one value per output of layer i) to its bias, adding a bias where it has none
    (then True: the new bias must be sliced with the layer's outputs)."""
    layer = plan.layers[i]
    node = ctx.model.graph.node[layer.node]
    if layer.bias_add is not None:
        add = ctx.model.graph.node[layer.bias_add]
        slot = 0 if add.input[1] == layer.output else 1
    elif len(node.input) > 2 and node.input[2]:
        add, slot = node, 2
    else:  # Conv / Gemm without a bias: a new one of the weight's dtype
        dtype = helper.tensor_dtype_to_np_dtype(ctx.protos[node.input[1]].data_type)
        name = ctx.unique(f"{layer.output}_sipp_bias")
        ctx.model.graph.initializer.append(numpy_helper.from_array(shift.astype(dtype), name))
        ctx.protos[name] = ctx.model.graph.initializer[-1]
        ctx.readers[name] = 1
        while len(node.input) < 2:
            node.input.append("")
        node.input.append(name)
        return True
    tensor = ctx.exclusive(add, slot)
    current = read_tensor(tensor, ctx.base_dir)
    scale = 1.0
    if add is node and layer.op == "Gemm":
        scale = next((a.f for a in node.attribute if a.name == "beta"), 1.0) or 1.0
    new = current.astype(np.float64) + np.broadcast_to(shift / scale, current.shape[-1:])
    write_tensor(tensor, new.astype(current.dtype))
    return False


def _split(ctx: _Context, node: onnx.NodeProto, plan: Plan, keep: np.ndarray, edit: Edit) -> None:
    sizes = np.array([int(plan.kept_positions(keep, t).sum()) for t in edit.tensors], dtype=np.int64)
    for attr in node.attribute:
        if attr.name == "split":
            del attr.ints[:]
            attr.ints.extend(sizes.tolist())
            return
    for attr in list(node.attribute):
        if attr.name == "num_outputs":
            node.attribute.remove(attr)
    name = ctx.unique(f"{node.output[0]}_sipp_split")
    ctx.model.graph.initializer.append(numpy_helper.from_array(sizes, name))
    ctx.protos[name] = ctx.model.graph.initializer[-1]
    if len(node.input) > 1:
        node.input[1] = name
    else:
        node.input.append(name)


def _bounds(ctx: _Context, node: onnx.NodeProto, plan: Plan, keep: np.ndarray, edit: Edit) -> None:
    kept = plan.kept_positions(keep, edit.tensor)
    start, end = int(kept[: edit.element].sum()), int(kept[: edit.divisor].sum())
    for slot, value in ((1, start), (2, end)):
        values = ctx.read(node.input[slot]).copy()
        values.reshape(-1)[edit.input] = value
        ctx.new_initializer(node, slot, values, node.input[slot])


def _drop_value_info(model: onnx.ModelProto, plan: Plan) -> None:
    """Shapes recorded for tensors whose channels changed are stale: drop them (shape inference
    recomputes them)."""
    changed = set(plan.graph.layouts)
    keep_info = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_info)
