"""Results of a structured prune (and of `inspect --structured`): per group and in total."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..modelio import write_text_atomic
from ..report import OutputCheck, json_safe
from ..sizes import FileSize
from .latency import Latency


@dataclass(frozen=True)
class GroupReport:
    """One channel group: what it had, what it kept, and what that cost its consumers."""

    name: str
    kind: str
    channels_before: int
    channels_after: int
    """Channels (neurons, head dims) per producing layer."""
    units_before: int
    units_after: int
    """Removable units: channels, heads, or conv groups."""
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    """Of the layers whose outputs are these channels."""
    layers: tuple[str, ...]
    frozen: int = 0
    reasons: tuple[str, ...] = ()
    error_none: float | None = None
    error_after: float | None = None
    """Largest relative output error of its consumers on the calibration data: with the channels
    dropped, and after compensation."""
    compensation: str = ""


@dataclass(frozen=True)
class StructuredReport:
    model: str
    output: str | None
    score: str
    compensation: str
    target: str
    sparsity_target: float
    channel_multiple: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    groups: list[GroupReport]
    samples: int = 0
    provider: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    verification: list[OutputCheck] = field(default_factory=list)
    latency_before: list[Latency] = field(default_factory=list)
    latency_after: list[Latency] = field(default_factory=list)
    size_before: FileSize | None = None
    size_after: FileSize | None = None
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    """The calibration inputs whose samples are not on axis 0: batch axis, or None (constant)."""

    @property
    def macs_removed(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_removed(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = json_safe(asdict(self))
        out["macs_removed"] = self.macs_removed
        out["params_removed"] = self.params_removed
        return out

    def write_json(self, path: str | Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def format_table(self) -> str:
        return format_groups(self.groups, with_errors=True)

    def summary(self) -> list[str]:
        lines = [
            f"structured ({self.score} scores, {self.compensation}): MACs {_h(self.macs_before)} -> "
            f"{_h(self.macs_after)} ({self.macs_removed:.1%} removed, target {self.sparsity_target:.1%} of "
            f"{self.target}), params {_h(self.params_before)} -> {_h(self.params_after)} "
            f"({self.params_removed:.1%} removed)"
        ]
        for before, after in zip(self.latency_before, self.latency_after, strict=True):
            lines.append(
                f"ONNX Runtime latency, batch {before.batch}: {before.seconds * 1e3:.2f} ms -> "
                f"{after.seconds * 1e3:.2f} ms ({before.seconds / after.seconds:.2f}x, "
                f"median of {after.runs})"
            )
        return lines


def _h(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_groups(groups: list[GroupReport], with_errors: bool) -> str:
    """A text table, one group per line; frozen groups show their first reason."""
    header = f"{'group':44s} {'kind':8s} {'units':>11s} {'channels':>11s} {'MACs':>17s}"
    if with_errors:
        header += f" {'error':>15s}"
    lines = [header]
    for g in groups:
        name = g.name if len(g.name) <= 44 else "..." + g.name[-41:]
        units = (
            f"{g.units_before}" if g.units_after == g.units_before else f"{g.units_before}->{g.units_after}"
        )
        chans = (
            f"{g.channels_before}"
            if g.channels_after == g.channels_before
            else f"{g.channels_before}->{g.channels_after}"
        )
        macs = (
            _h(g.macs_before) if g.macs_after == g.macs_before else f"{_h(g.macs_before)}->{_h(g.macs_after)}"
        )
        line = f"{name:44s} {g.kind:8s} {units:>11s} {chans:>11s} {macs:>17s}"
        if with_errors:
            err = "" if g.error_after is None else f"{g.error_none:.3f}->{g.error_after:.3f}"
            line += f" {err:>15s}"
        if g.frozen:
            what = "all" if g.frozen == g.units_before else f"{g.frozen}"
            line += f"  [{what} kept: {g.reasons[0] if g.reasons else ''}]"
        lines.append(line)
    return "\n".join(lines)
