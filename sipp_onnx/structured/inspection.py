"""`sipp-onnx inspect --structured`: the channel groups of a model, their sizes and MACs, and
why the frozen ones must stay. No calibration data: MACs are per sample at the sizes the graph
fixes (a layer whose sizes depend on the input, such as a transformer's sequence length, shows
no MACs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..modelio import load_model
from ..report import json_safe
from .groups import Plan
from .pipeline import structured_plan
from .report import GroupReport, format_groups


@dataclass(frozen=True)
class StructuredInspection:
    model: str
    groups: list[GroupReport]

    @property
    def prunable(self) -> int:
        return sum(1 for g in self.groups if g.frozen < g.units_before)

    def to_dict(self) -> dict[str, Any]:
        out = json_safe(asdict(self))
        out["prunable_groups"] = self.prunable
        return out

    def format_table(self) -> str:
        lines = [format_groups(self.groups, with_errors=False), ""]
        lines.append(f"{self.prunable} of {len(self.groups)} channel groups can be pruned")
        return "\n".join(lines)


def group_reports(plan: Plan) -> list[GroupReport]:
    """Per group, its dense sizes (nothing removed yet)."""
    keep = plan.all_kept()
    known = all(p for p in plan.positions.values())
    out = []
    for g in plan.groups:
        producers = plan.producers(g)
        macs = sum(plan.layer_macs(keep, i) for i in producers) if known else 0
        params = sum(plan.layer_params(keep, i) for i in producers)
        out.append(
            GroupReport(
                g.name,
                g.kind,
                g.size * g.width,
                g.size * g.width,
                g.size,
                g.size,
                macs,
                macs,
                params,
                params,
                tuple(plan.layers[i].name for i in g.layers),
                g.frozen,
                g.reasons,
            )
        )
    return out


def inspect_structured(model: str | Path, exclude: tuple[str, ...] = ()) -> StructuredInspection:
    path = Path(model)
    proto = load_model(path)
    plan = structured_plan(proto, path.parent, exclude)
    return StructuredInspection(str(path), group_reports(plan))
