"""`inspect_model`: what would be pruned, and what would not and why, without running anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from .census import Census, census
from .config import PRUNABLE_OP_TYPES
from .discover import discover
from .layers import Discovery, Layer
from .modelio import load_model


@dataclass(frozen=True)
class InspectReport:
    model: str
    discovery: Discovery
    census: Census | None = None
    """Where every parameter of the model is (see census.py)."""

    @property
    def prunable_params(self) -> int:
        return sum(w.size for w in self.discovery.weights)

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for weight in self.discovery.weights:
            for layer in weight.layers:
                layers.append(
                    {
                        "node": layer.node,
                        "op_type": layer.op_type,
                        "weight": weight.name,
                        "shape": list(weight.shape),
                        "params": weight.size,
                        "dtype": weight.dtype,
                        "source": weight.source,
                        "stored": weight.stored_name,
                        "via": weight.via,
                        "input": layer.input,
                        "shared_with": [other.node for other in weight.layers if other is not layer],
                        "conv": _geometry(layer),
                    }
                )
        out: dict[str, Any] = {
            "model": self.model,
            "prunable_params": self.prunable_params,
            "layers": layers,
            "skipped": [asdict(s) for s in self.discovery.skipped],
        }
        if self.census is not None:
            out["params_total"] = self.census.params_total
            out["prunable_share"] = self.census.prunable_share
            out["census"] = self.census.to_dict()
        return out

    def format_table(self) -> str:
        rows = [("node", "op", "weight", "shape", "params")]
        for entry in self.to_dict()["layers"]:
            rows.append(
                (
                    entry["node"],
                    entry["op_type"],
                    f"{entry['stored']} via {entry['via']}" if entry["via"] else entry["weight"],
                    "x".join(str(d) for d in entry["shape"]),
                    f"{entry['params']:,}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"{len(rows) - 1} prunable layer(s), {self.prunable_params:,} prunable parameters"]
        if self.census is not None:
            lines += [*self.census.lines(), ""]
        for i, row in enumerate(rows):
            lines.append(
                "  ".join(
                    c.rjust(w) if j == 4 else c.ljust(w)
                    for j, (c, w) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.discovery.skipped:
            lines.append("")
            lines.append(f"{len(self.discovery.skipped)} skipped candidate(s):")
            for s in self.discovery.skipped:
                lines.append(f"  {s.node} ({s.op_type}): {s.reason}")
        return "\n".join(lines)


def _geometry(layer: Layer) -> dict[str, Any] | None:
    return asdict(layer.conv) if layer.conv is not None else None


def inspect_model(
    model: str | Path | onnx.ModelProto,
    op_types: tuple[str, ...] = PRUNABLE_OP_TYPES,
    exclude: tuple[str, ...] = (),
) -> InspectReport:
    """List prunable layers and skipped candidates of a model (path or ModelProto), and where
    its parameters are."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    found = discover(proto, op_types, exclude)
    name = "<in-memory model>" if isinstance(model, onnx.ModelProto) else str(model)
    return InspectReport(name, found, census(proto, found))
