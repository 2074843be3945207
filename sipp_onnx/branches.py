"""Layers inside `If` branches: which branch the calibration data takes, and a calibration copy
of the model with that branch inlined.

ONNX Runtime cannot return a tensor computed inside a subgraph, so a layer inside an If branch
cannot be calibrated where it is. When every calibration batch takes the same branch of an If
(its condition is checked on every batch, one ONNX Runtime pass per nesting level), a copy of the
model with the If replaced by that branch's nodes computes the same outputs on this data, and
every tensor keeps its name: discovery and capture run on the copy, while the pruned values are
written back by name into the original model's branch (its own initializers or Constant nodes).
The other branch is left unchanged. An If whose condition differs between batches is not
inlined: its layers are skipped with that reason (pruning each branch on the batches that take
it would need one calibration pass per branch combination). Ifs nested in a taken branch are
resolved the same way once their condition is a top-level tensor of the copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from .config import PRUNABLE_OP_TYPES, Provider
from .errors import CalibrationError
from .layers import Discovery, Layer, PrunableWeight, SkippedCandidate
from .modelio import subgraphs
from .runtime import add_outputs, make_session, run_error

log = logging.getLogger(__name__)

BRANCHES = ("then_branch", "else_branch")


@dataclass(frozen=True)
class InlinedIf:
    """One If replaced by one of its branches in the calibration copy."""

    position: int
    """The If's node index in the copy at the time it is inlined (steps replay in order)."""
    branch: str
    node: str
    """The If node's name (or `If#<position>`), for reports."""
    batches: int
    """Calibration batches checked: all of them take `branch`."""


@dataclass(frozen=True)
class BranchPlan:
    """How the calibration copy is made from the model, and what it means for its nodes."""

    steps: tuple[InlinedIf, ...]
    skipped: tuple[SkippedCandidate, ...] = ()
    """Candidates of branches the data does not take, or of Ifs it takes both ways."""
    origin: tuple[int, ...] = ()
    """For each node of the copy: the index of its top-level ancestor in the model."""
    top_level: tuple[bool, ...] = ()
    """For each node of the copy: whether it is a top-level node of the model itself."""
    untaken_names: frozenset[str] = field(default_factory=frozenset)
    """Tensor names the untaken branches read: a weight among them must not change."""

    def describe(self) -> list[str]:
        return [
            f"If {s.node!r}: every calibration batch ({s.batches}) takes its {s.branch}; its layers "
            f"are calibrated on an inlined copy and pruned in place, the other branch is unchanged"
            for s in self.steps
        ]


def candidate_count(graph: onnx.GraphProto) -> int:
    """Prunable-op nodes inside the subgraphs of `graph`'s nodes (any depth)."""
    total = 0
    for node in graph.node:
        for sub in subgraphs(node):
            total += sum(1 for n in sub.node if n.op_type in PRUNABLE_OP_TYPES) + candidate_count(sub)
    return total


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def _holds_candidates(node: onnx.NodeProto) -> bool:
    if node.op_type != "If":
        return False
    return any(
        any(n.op_type in PRUNABLE_OP_TYPES for n in sub.node) or candidate_count(sub)
        for sub in subgraphs(node)
    )


def _label(node: onnx.NodeProto, position: int) -> str:
    return node.name or f"If#{position}"


Batches = Callable[[], Iterator[dict[str, np.ndarray]]]


def plan_branches(
    model: onnx.ModelProto, batches: Batches, provider: Provider, base_dir: Path | None = None
) -> BranchPlan:
    """Check which branch every calibration batch takes of each If that holds layers, and plan
    the inlining of the consistent ones (nested Ifs as they surface)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    steps: list[InlinedIf] = []
    skipped: list[SkippedCandidate] = []
    untaken: set[str] = set()
    origin = list(range(len(work.graph.node)))
    top = [True] * len(work.graph.node)
    frozen: set[str] = set()  # conditions seen taking both ways (not inlined)
    while True:
        ifs = [
            i
            for i, n in enumerate(work.graph.node)
            if _holds_candidates(n) and n.input and n.input[0] not in frozen
        ]
        if not ifs:
            break
        taken = _conditions(work, [work.graph.node[i].input[0] for i in ifs], batches, provider, base_dir)
        inlined_any = False
        for i in sorted(ifs, reverse=True):  # later positions first: earlier ones stay valid
            node = work.graph.node[i]
            values = taken[node.input[0]]
            label = _label(node, i)
            if len(values) != 1:
                frozen.add(node.input[0])
                counts = ", ".join(f"{n} batch(es) the {b}" for b, n in sorted(values.items()))
                reason = (
                    f"inside If {label!r}, whose branch the calibration data does not agree on ({counts}): "
                    "calibrate with data that takes one branch to prune it"
                )
                skipped += _candidates(node, reason)
                continue
            ((branch, count),) = values.items()
            other = BRANCHES[1 - BRANCHES.index(branch)]
            skipped += _candidates(
                node,
                f"inside the {other} of If {label!r}, which no calibration batch takes: left unchanged",
                only=other,
            )
            untaken |= _read_names(_branch(node, other))
            added = inline_if(work, i, branch)
            origin[i : i + 1] = [origin[i]] * added
            top[i : i + 1] = [False] * added
            steps.append(InlinedIf(i, branch, label, count))
            inlined_any = True
        if not inlined_any:
            break
    return BranchPlan(tuple(steps), tuple(skipped), tuple(origin), tuple(top), frozenset(untaken))


def _conditions(
    model: onnx.ModelProto, names: list[str], batches: Batches, provider: Provider, base_dir: Path | None
) -> dict[str, dict[str, int]]:
    """For each condition tensor: branch -> how many calibration batches take it."""
    added = add_outputs(model, names)
    try:
        session, _ = make_session(model, provider, optimize=False, base_dir=base_dir)
    finally:
        if added:
            del model.graph.output[-added:]
    counts: dict[str, dict[str, int]] = {name: {} for name in names}
    for index, feed in enumerate(batches()):
        try:
            values = session.run(names, feed)
        except Exception as exc:
            raise CalibrationError(
                f"ONNX Runtime failed on calibration batch {index}: {run_error(exc)}"
            ) from None
        for name, value in zip(names, values, strict=True):
            branch = BRANCHES[0] if bool(np.asarray(value).reshape(-1)[0]) else BRANCHES[1]
            counts[name][branch] = counts[name].get(branch, 0) + 1
    return counts


def _candidates(node: onnx.NodeProto, reason: str, only: str | None = None) -> list[SkippedCandidate]:
    """The prunable-op nodes of an If's branches (or of branch `only`), at any depth."""
    out: list[SkippedCandidate] = []

    def walk(graph: onnx.GraphProto) -> None:
        for n in graph.node:
            if n.op_type in PRUNABLE_OP_TYPES:
                weight = n.input[1] if len(n.input) > 1 else None
                out.append(SkippedCandidate(n.name or n.op_type, n.op_type, reason, weight))
            for sub in subgraphs(n):
                walk(sub)

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH and (only is None or attr.name == only):
            walk(attr.g)
    return out


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the nodes of `graph` read, at any depth."""
    names: set[str] = set()
    for n in graph.node:
        names.update(t for t in n.input if t)
        for sub in subgraphs(n):
            names |= _read_names(sub)
    return names


def inline_if(model: onnx.ModelProto, position: int, branch: str) -> int:
    """Replace the If at `position` by the nodes of its `branch` (and one Identity per output),
    in place; returns how many nodes took its place. Every tensor keeps its name: ONNX forbids a
    subgraph to reuse an outer scope's names, so nothing clashes."""
    graph = model.graph
    node = graph.node[position]
    sub = _branch(node, branch)
    nodes = list(sub.node)
    nodes += [
        onnx.helper.make_node(
            "Identity", [inner.name], [outer], name=f"{node.name or 'If'}_sipp_{branch}_{k}"
        )
        for k, (inner, outer) in enumerate(zip(sub.output, node.output, strict=True))
        if outer
    ]
    graph.initializer.extend(sub.initializer)
    graph.sparse_initializer.extend(sub.sparse_initializer)
    graph.value_info.extend(sub.value_info)
    rest = list(graph.node[position + 1 :])
    del graph.node[position:]
    graph.node.extend(nodes)
    graph.node.extend(rest)
    return len(nodes)


def calibration_model(model: onnx.ModelProto, plan: BranchPlan) -> onnx.ModelProto:
    """A copy of `model` with the plan's branches inlined (same tensor names)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for step in plan.steps:
        inline_if(copy, step.position, step.branch)
    return copy


def on_model(found: Discovery, plan: BranchPlan) -> Discovery:
    """Discovery on the calibration copy, restated for the model itself: node positions of the
    model, weights that an untaken branch also reads skipped, and the plan's skipped candidates.

    A bias the refit would have to add to a node inside a branch is refused (the node has no
    top-level position to add it at); an existing bias is shifted by name like any tensor."""
    weights: list[PrunableWeight] = []
    skipped = list(found.skipped)
    for weight in found.weights:
        if weight.stored_name in plan.untaken_names or weight.name in plan.untaken_names:
            reason = (
                f"weight {weight.stored_name!r} is also read inside an If branch that the calibration "
                "data does not take"
            )
            skipped.extend(
                SkippedCandidate(layer.node, layer.op_type, reason, weight.name) for layer in weight.layers
            )
            continue
        layers = tuple(_layer_on_model(layer, plan) for layer in weight.layers)
        weights.append(replace(weight, layers=layers))
    return Discovery(tuple(weights), (*skipped, *plan.skipped))


def _layer_on_model(layer: Layer, plan: BranchPlan) -> Layer:
    bias, problem = layer.bias, layer.bias_problem
    if bias is not None:
        if bias.tensor is None and not plan.top_level[bias.node_index]:
            bias, problem = None, "no bias to refit: the node has none and lies inside an If branch"
        else:
            bias = replace(bias, node_index=plan.origin[bias.node_index])
    return replace(layer, index=plan.origin[layer.index], bias=bias, bias_problem=problem)
