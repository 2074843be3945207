"""`check_pattern`: does each prunable layer already follow an N:M structured-sparsity pattern?

TensorRT's rule (for 2:4): for each output channel and each kernel position, every M consecutive
input channels hold at most N non-zeros. The groups are those of `pattern.groups`: along the
reduction axis of the layer as it reads its weight (a Gemm's according to `transB`, a MatMul's
first axis, a Conv's input channels per group at each kernel position), after any chain of
followed ops (Transpose, Cast, DequantizeLinear, ...), so a quantized weight's zero point counts
as zero. Nothing is run and nothing is written; the weights are read one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .discover import discover
from .layers import PrunableWeight, SkippedCandidate, to_rows
from .modelio import check_external_data, load_model, tensor_protos
from .pattern import Pattern, group_counts, pattern_problem
from .weightchain import read_weight


class CheckStatus(StrEnum):
    COMPLIES = "complies"
    VIOLATES = "violates"
    NOT_APPLICABLE = "not applicable"
    """The layer's input channels are not a multiple of M: it cannot follow the pattern."""
    NOT_CHECKED = "not checked"
    """Not a prunable layer (a skipped candidate of `discover`)."""


@dataclass(frozen=True)
class Violation:
    """Where the first group with more than N non-zeros is, in the layer's coordinates."""

    output: int
    """Output channel (row)."""
    kernel_position: tuple[int, ...]
    """Index into the Conv kernel, () for Gemm and MatMul."""
    input_channels: tuple[int, int]
    """The group's input channels, [start, stop) (within the channel group of a grouped Conv)."""
    nonzeros: int


@dataclass(frozen=True)
class LayerCheck:
    """One prunable weight (with every node that uses it), or one candidate that is not checked."""

    nodes: tuple[str, ...]
    op_type: str
    weight: str | None
    """The tensor the layers read (None for a skipped candidate without one)."""
    shape: tuple[int, ...]
    """As the layers read it; () for a candidate that is not checked."""
    status: CheckStatus
    reason: str = ""
    """Why the layer is not applicable or not checked."""
    stored: str = ""
    """The constant that holds the values when the layers read it through `via` ('' otherwise)."""
    via: str = ""
    groups: int = 0
    """Groups of M input channels (0 when not applicable or not checked)."""
    violating_groups: int = 0
    zero_fraction: float | None = None
    """Fraction of the weight's entries that are zero (None when not checked)."""
    first_violation: Violation | None = None

    @property
    def label(self) -> str:
        return ",".join(self.nodes)

    def to_dict(self) -> dict[str, Any]:
        v = self.first_violation
        return {
            "nodes": list(self.nodes),
            "op_type": self.op_type,
            "weight": self.weight,
            "stored": self.stored,
            "via": self.via,
            "shape": list(self.shape),
            "status": self.status.value,
            "reason": self.reason,
            "groups": self.groups,
            "violating_groups": self.violating_groups,
            "zero_fraction": self.zero_fraction,
            "first_violation": None
            if v is None
            else {
                "output": v.output,
                "kernel_position": list(v.kernel_position),
                "input_channels": list(v.input_channels),
                "nonzeros": v.nonzeros,
            },
        }


@dataclass(frozen=True)
class PatternReport:
    model: str
    pattern: Pattern
    layers: tuple[LayerCheck, ...]

    def _with(self, status: CheckStatus) -> list[LayerCheck]:
        return [layer for layer in self.layers if layer.status is status]

    @property
    def complying(self) -> list[LayerCheck]:
        return self._with(CheckStatus.COMPLIES)

    @property
    def violating(self) -> list[LayerCheck]:
        return self._with(CheckStatus.VIOLATES)

    @property
    def not_applicable(self) -> list[LayerCheck]:
        return self._with(CheckStatus.NOT_APPLICABLE)

    @property
    def not_checked(self) -> list[LayerCheck]:
        return self._with(CheckStatus.NOT_CHECKED)

    @property
    def ok(self) -> bool:
        """True when no layer that can follow the pattern breaks it."""
        return not self.violating

    def summary(self) -> str:
        p = self.pattern.label
        applicable = len(self.complying) + len(self.violating)
        parts = [f"{len(self.complying)} of {applicable} layer{'s' * (applicable != 1)} comply"]
        if applicable == 0:
            parts = ["no layer can follow the pattern" if self.layers else "no layer to check"]
        if self.violating:
            shown = ", ".join(
                f"{layer.label}: {layer.violating_groups} of {layer.groups} groups"
                for layer in self.violating[:3]
            )
            more = f", {len(self.violating) - 3} more" if len(self.violating) > 3 else ""
            verb = "violates" if len(self.violating) == 1 else "violate"
            parts.append(f"{len(self.violating)} {verb} ({shown}{more})")
        if self.not_applicable:
            parts.append(f"{len(self.not_applicable)} not applicable")
        if self.not_checked:
            parts.append(f"{len(self.not_checked)} not checked")
        return f"{p}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pattern": self.pattern.label,
            "ok": self.ok,
            "counts": {s.value: len(self._with(s)) for s in CheckStatus},
            "summary": self.summary(),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def format_table(self) -> str:
        n, m = self.pattern.n, self.pattern.m
        lines = [
            f"{self.pattern.label} structured sparsity: at most {n} non-zeros in every {m} consecutive "
            "input channels (per output channel and kernel position)"
        ]
        rows = [("node", "op", "weight", "shape", "zeros", "violating", "status")]
        for layer in self.layers:
            if layer.status is CheckStatus.NOT_CHECKED:
                continue
            rows.append(
                (
                    layer.label,
                    layer.op_type,
                    f"{layer.stored} via {layer.via}" if layer.via else str(layer.weight),
                    "x".join(str(d) for d in layer.shape),
                    f"{layer.zero_fraction:.1%}" if layer.zero_fraction is not None else "-",
                    f"{layer.violating_groups}/{layer.groups}" if layer.groups else "-",
                    layer.status.value + (f": {layer.reason}" if layer.reason else ""),
                )
            )
        if len(rows) > 1:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for i, row in enumerate(rows):
                lines.append(
                    "  ".join(
                        c.rjust(w) if j in (4, 5) else c.ljust(w)
                        for j, (c, w) in enumerate(zip(row, widths, strict=True))
                    ).rstrip()
                )
                if i == 0:
                    lines.append("  ".join("-" * w for w in widths))
        if self.violating:
            lines.append("")
        for layer in self.violating:
            v = layer.first_violation
            if v is None:  # pragma: no cover - a violating layer always has one
                continue
            where = f", kernel position {list(v.kernel_position)}" if v.kernel_position else ""
            lines.append(
                f"{layer.label}: first violation at output channel {v.output}{where}, input channels "
                f"{v.input_channels[0]}-{v.input_channels[1] - 1} ({v.nonzeros} non-zeros)"
            )
        if self.not_checked:
            lines.append("")
            lines.append(f"{len(self.not_checked)} not checked (not prunable layers):")
            for layer in self.not_checked:
                lines.append(f"  {layer.label} ({layer.op_type}): {layer.reason}")
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)


def check_pattern(
    model: str | Path | onnx.ModelProto, pattern: Pattern, base_dir: str | Path | None = None
) -> PatternReport:
    """Check every prunable layer of `model` (a path or a ModelProto) against `pattern`.

    External tensors are read from `base_dir`: by default the model file's directory; a
    ModelProto with external tensors needs it given.
    """
    if isinstance(model, onnx.ModelProto):
        name, proto = "<in-memory model>", model
        directory = Path(base_dir) if base_dir is not None else None
    else:
        name, proto = str(model), load_model(model)
        directory = Path(base_dir) if base_dir is not None else Path(model).parent
        check_external_data(proto, directory)
    found = discover(proto)
    protos = tensor_protos(proto)
    checks = [_check_weight(weight, protos, directory, pattern) for weight in found.weights]
    checks += [_not_checked(s) for s in found.skipped]
    return PatternReport(name, pattern, tuple(checks))


def _check_weight(
    weight: PrunableWeight, protos: dict[str, onnx.TensorProto], base_dir: Path | None, pattern: Pattern
) -> LayerCheck:
    layer = weight.primary
    op_types = dict.fromkeys(use.op_type for use in weight.layers)
    values = read_weight(weight, protos, base_dir)
    check = LayerCheck(
        nodes=tuple(use.node for use in weight.layers),
        op_type=",".join(op_types),
        weight=weight.name,
        shape=weight.shape,
        status=CheckStatus.NOT_APPLICABLE,
        stored=weight.stored,
        via=weight.via,
        zero_fraction=1.0 - int(np.count_nonzero(values)) / values.size,
    )
    problem = pattern_problem(layer.fan_in, layer.kernel_size, pattern)
    if problem:
        return replace(check, reason=problem)
    counts = group_counts(to_rows(values, layer.layout, groups=layer.groups), layer.kernel_size, pattern.m)
    bad = counts > pattern.n
    violating = int(np.count_nonzero(bad))
    first = None
    if violating:
        out, position, group = (int(i) for i in np.argwhere(bad)[0])
        kernel = layer.conv.kernel_shape if layer.conv is not None else ()
        first = Violation(
            out,
            tuple(int(i) for i in np.unravel_index(position, kernel)) if kernel else (),
            (group * pattern.m, (group + 1) * pattern.m),
            int(counts[out, position, group]),
        )
    return replace(
        check,
        status=CheckStatus.VIOLATES if violating else CheckStatus.COMPLIES,
        groups=prod(counts.shape),
        violating_groups=violating,
        first_violation=first,
    )


def _not_checked(skipped: SkippedCandidate) -> LayerCheck:
    return LayerCheck(
        (skipped.node,), skipped.op_type, skipped.weight, (), CheckStatus.NOT_CHECKED, skipped.reason
    )
