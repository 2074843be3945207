"""`sweep`: the accuracy (or fidelity) kept at each sparsity by each method, from one calibration
pass per model.

Users choose a pruner by one picture: the metric against sparsity, one line per method, the
dense model as the reference. The calibration statistics (sensitivities, Wanda's norms, the
refit's Gram matrices) do not depend on the sparsity or the method, so `prepare` runs once and
every point is only a selection, a refit and an evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from .calibration import CalibrationSource
from .config import Allocation, Method, PruneConfig, Refit
from .errors import ConfigError
from .evaluate import Comparison, Reference
from .modelio import write_text_atomic
from .pipeline import Progress, apply, prepare
from .report import json_safe

log = logging.getLogger(__name__)

METRICS = ("accuracy", "top1_agreement", "cosine")
SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.png")


@dataclass(frozen=True)
class Variant:
    """One line of the sweep: a selection method, what happens to the kept weights, and (when
    not the run's own) how the budget is split across layers."""

    method: Method
    refit: Refit
    allocation: Allocation | None = None

    @property
    def label(self) -> str:
        label = self.method.value if self.refit is Refit.NONE else f"{self.method.value}+{self.refit.value}"
        return label if self.allocation is None else f"{label}@{self.allocation.value}"

    def config(self, base: PruneConfig, sparsity: float) -> PruneConfig:
        """`base` with this variant's method, refit and allocation, at `sparsity`."""
        return replace(
            base,
            method=self.method,
            refit=self.refit,
            sparsity=sparsity,
            allocation=self.allocation or base.allocation,
        )

    @classmethod
    def parse(cls, text: str, default_refit: Refit | str) -> Variant:
        """'METHOD', 'METHOD+REFIT' (default: `default_refit`), either with '@ALLOCATION', e.g.
        'magnitude+obs' or 'sipp-det+obs@error'."""
        body, _, allocation = text.strip().partition("@")
        method, _, refit = body.partition("+")
        try:
            return cls(
                Method(method), Refit(refit or default_refit), Allocation(allocation) if allocation else None
            )
        except ValueError:
            methods = ", ".join(m.value for m in Method)
            refits = ", ".join(r.value for r in Refit)
            allocations = ", ".join(a.value for a in Allocation)
            raise ConfigError(
                f"bad method {text!r}: expected METHOD[+REFIT][@ALLOCATION] with METHOD one of {methods}, "
                f"REFIT one of {refits} and ALLOCATION one of {allocations}"
            ) from None


@dataclass(frozen=True)
class SweepPoint:
    variant: str
    sparsity: float
    """Target sparsity."""
    achieved: float
    metric: float
    comparison: Comparison
    seconds: float
    """Selection + refit + rewrite (the calibration pass is shared)."""
    max_layer_sparsity: float | None = None
    """Sparsity of the most pruned weight tensor (a layer wiped out shows as 1.0)."""


@dataclass
class SweepResult:
    model: str
    metric: str
    dense: float
    """The dense model's metric (1 for fidelity metrics: the model agrees with itself)."""
    sparsities: list[float]
    variants: list[str]
    points: list[SweepPoint]
    calibration_passes: int
    prepare_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def value(self, variant: str, sparsity: float) -> float:
        """The metric of one point; NaN where the variant was not run at that sparsity."""
        return next(
            (p.metric for p in self.points if p.variant == variant and p.sparsity == sparsity), float("nan")
        )

    def max_sparsity_within(self, variant: str, tolerance: float = 0.01) -> float | None:
        """Largest swept sparsity at which `variant` keeps its metric within `tolerance`
        (relative) of the dense model's, None if none does."""
        ok = [
            p.sparsity
            for p in self.points
            if p.variant == variant and p.metric >= self.dense * (1 - tolerance) - 1e-12
        ]
        return max(ok) if ok else None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SweepResult:
        """Inverse of `to_dict` (e.g. to re-plot a sweep.json)."""
        fields = {k: v for k, v in doc.items() if k not in ("points", "within_1pct")}
        points = [
            SweepPoint(**{**p, "comparison": Comparison(**p["comparison"])}) for p in doc.get("points", [])
        ]
        return cls(**fields, points=points)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["within_1pct"] = {v: self.max_sparsity_within(v) for v in self.variants}
        return doc

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            [
                "model",
                "variant",
                "sparsity",
                "achieved",
                self.metric,
                "dense",
                "rel_l2_error",
                "cosine",
                "seconds",
            ]
        )
        for p in self.points:
            writer.writerow(
                [
                    self.model,
                    p.variant,
                    p.sparsity,
                    f"{p.achieved:.6f}",
                    f"{p.metric:.6f}",
                    f"{self.dense:.6f}",
                    f"{p.comparison.rel_l2_error:.6f}",
                    f"{p.comparison.cosine:.6f}",
                    f"{p.seconds:.4f}",
                ]
            )
        return buf.getvalue()

    def format_table(self) -> str:
        """Metric per variant (rows) and sparsity (columns), plus the largest sparsity within 1 %."""
        scale, unit = (100.0, "%") if self.metric == "accuracy" else (1.0, "")
        head = ["method"] + [f"{s:.0%}" for s in self.sparsities] + ["max within 1%"]
        rows = [head]
        for v in self.variants:
            cells = [f"{self.value(v, s) * scale:.2f}{unit}" for s in self.sparsities]
            best = self.max_sparsity_within(v)
            rows.append([v, *cells, f"{best:.0%}" if best is not None else "-"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"{self.metric} on the evaluation data; dense model: {self.dense * scale:.2f}{unit}"]
        for i, row in enumerate(rows):
            lines.append(
                "  ".join(
                    c.ljust(w) if j == 0 else c.rjust(w)
                    for j, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _metric(comparison: Comparison, metric: str) -> float:
    value = {
        "accuracy": comparison.accuracy,
        "top1_agreement": comparison.top1_agreement,
        "cosine": comparison.cosine,
    }[metric]
    if value is None:
        raise ConfigError(f"metric {metric!r} is not available for this model and data")
    return float(value)


def sweep(
    model: str | Path | onnx.ModelProto,
    calibration: CalibrationSource,
    evaluation: CalibrationSource,
    variants: Sequence[Variant],
    sparsities: Sequence[float],
    config: PruneConfig | None = None,
    *,
    metric: str | None = None,
    labels_key: str = "labels",
    output_name: str | None = None,
    progress: Progress | None = None,
    point_done: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Prune `model` at every sparsity with every variant and evaluate each result.

    `metric` defaults to accuracy when the evaluation data has labels, else the top-1 agreement
    with the dense model for classifier outputs `[N, C]`, else the mean cosine similarity.
    """
    if not variants:
        raise ConfigError("no method to sweep")
    if not sparsities or any(not 0 <= s < 1 for s in sparsities):
        raise ConfigError(f"sparsities must be in [0, 1), got {list(sparsities)}")
    if metric is not None and metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    config = config or PruneConfig()
    if config.structure is not None:  # the pattern sets the sparsity: one point per variant
        sparsities = [config.sparsity]
    base = replace(config, sparsity=max(max(sparsities), 0.5), verify=False, sequential=False)
    t0 = time.perf_counter()
    prepared = prepare(
        model,
        calibration,
        base,
        progress,
        sensitivity=any(v.method.value.startswith("sipp") for v in variants),
        gram=any(v.refit is not Refit.NONE for v in variants),
        statistics=any(
            v.method is Method.WANDA
            or replace(
                base, method=v.method, allocation=v.allocation or base.allocation
            ).effective_allocation.curves
            for v in variants
        ),
    )
    prepare_seconds = time.perf_counter() - t0
    dense = Reference(
        prepared.proto,
        evaluation,
        labels_key=labels_key,
        output=output_name,
        base_dir=prepared.base_dir,
        batch_axes=dict(base.batch_axes),
    )
    points: list[SweepPoint] = []
    chosen = metric
    for variant in variants:
        for sparsity in sparsities:
            t1 = time.perf_counter()
            result = apply(prepared, variant.config(base, sparsity))
            seconds = time.perf_counter() - t1
            comparison = dense.compare(result.model, result.base_dir)
            if chosen is None:
                if comparison.accuracy is not None:
                    chosen = "accuracy"
                else:
                    chosen = "top1_agreement" if comparison.top1_agreement is not None else "cosine"
            point = SweepPoint(
                variant.label,
                sparsity,
                result.report.sparsity_achieved,
                _metric(comparison, chosen),
                comparison,
                seconds,
                max(layer.sparsity for layer in result.report.layers),
            )
            points.append(point)
            log.info("%s at %.0f%%: %s %.4f", point.variant, sparsity * 100, chosen, point.metric)
            if point_done is not None:
                point_done(point)
    assert chosen is not None
    dense_value = (
        float(dense.score.accuracy) if chosen == "accuracy" and dense.score.accuracy is not None else 1.0
    )
    source = str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>"
    return SweepResult(
        model=source,
        metric=chosen,
        dense=dense_value,
        sparsities=list(sparsities),
        variants=[v.label for v in variants],
        points=points,
        calibration_passes=1 if prepared.stats else 0,
        prepare_seconds=prepare_seconds,
        settings={
            "reduction": base.reduction.value,
            "terms": base.terms.value,
            "seed": base.seed,
            "samples": prepared.samples,
            "provider": prepared.provider,
            "evaluation_samples": dense.score.samples,
            "output": dense.output,
        },
    )


def write_sweep(result: SweepResult, out_dir: Path, plot: bool = True) -> list[Path]:
    """Write sweep.json, sweep.csv and (with matplotlib) sweep.png into `out_dir`, atomically.
    Returns the written paths; the plot is skipped (and logged) when matplotlib is missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / SWEEP_FILES[0], out_dir / SWEEP_FILES[1]]
    write_text_atomic(written[0], json.dumps(json_safe(result.to_dict()), indent=2) + "\n")
    write_text_atomic(written[1], result.to_csv())
    if plot:
        from .plot import PlotUnavailable, plot_sweep

        try:
            written.append(plot_sweep(result, out_dir / SWEEP_FILES[2]))
        except PlotUnavailable as exc:
            log.warning("%s", exc)
    return written
