"""Results of a pruning run: typed per-layer and per-run reports, JSON and a text table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .census import Census
from .layers import SkippedCandidate
from .modelio import write_text_atomic
from .sizes import FileSize


@dataclass(frozen=True)
class SensitivityStats:
    """Summary of the sensitivities of a weight's non-zero entries."""

    min: float
    median: float
    mean: float
    max: float

    @classmethod
    def of(cls, sens: np.ndarray, weight: np.ndarray) -> SensitivityStats | None:
        values = sens[weight != 0].astype(np.float64)
        if values.size == 0:
            return None
        return cls(float(values.min()), float(np.median(values)), float(values.mean()), float(values.max()))


@dataclass(frozen=True)
class RefitReport:
    """What the refit did to one weight (see refit.py)."""

    how: str
    """'exact' or 'sparsegpt' (weights re-solved), 'bias' (bias only), 'none', 'skipped'."""
    note: str = ""
    """Why something was not done (no bias slot, shared weight)."""
    error_before: float | None = None
    """Relative L2 error of the layer output on the calibration data, mask alone."""
    error_after: float | None = None
    """The same after the refit."""
    rows_refitted: int = 0
    bias: str | None = None
    """The bias tensor that was shifted (or added)."""


@dataclass(frozen=True)
class LayerReport:
    """What happened to one pruned weight tensor."""

    weight: str
    nodes: tuple[str, ...]
    op_type: str
    shape: tuple[int, ...]
    params: int
    nonzero_before: int
    kept: int
    sparsity: float
    sensitivity: SensitivityStats | None
    bound: float | None
    """Largest per-row-part error bound of spec section 5 (see select.SelectedWeight). A row part
    is (row, sign of the weight); the bound is relative to the part's own sum with signed terms,
    and to the row's absolute mass with absolute terms."""
    sampled_row_parts: int = 0
    reduction: str | None = None
    """How the sensitivities were reduced over points (None without sensitivities)."""
    refit: RefitReport | None = None
    stored: str = ""
    """The constant that was rewritten, when the layers read it through ops (see `via`)."""
    via: str = ""
    """The followed ops from `stored` to `weight`, e.g. 'DequantizeLinear -> Transpose[1, 0]'."""
    pattern: str = ""
    """With an N:M pattern: the pattern applied, or 'not applied: <why>' (left unpruned)."""
    stored_as: str = "dense"
    """'sparse' when written as an ONNX sparse initializer (--store sparse)."""
    score_note: str = ""
    """Why this weight was ranked by something else than its sensitivities (see budgets.py)."""
    ranking: str | None = None
    """With `--ranking measured`: 'sensitivity' or 'wanda', the order this weight was pruned in
    (the one whose measured error was lower at its count); None where no choice was made."""
    influence: float | None = None
    """With `--allocation output`: the measured model-output error per unit of this weight's
    own relative error at its count (influence.py); None where not measured."""


@dataclass(frozen=True)
class OutputCheck:
    """Pruned vs original model output on the first calibration batch."""

    output: str
    rel_l2_error: float
    cosine: float


@dataclass
class PruneReport:
    """Everything a user needs to judge and reproduce a pruning run."""

    model: str
    output: str | None
    method: str
    reduction: str
    terms: str
    refit: str
    sequential: bool
    mask_input: str | None
    """Graph input whose zeros marked padding tokens (not calibration points)."""
    layer_floor: float
    max_points: int | None
    seed: int
    sparsity_target: float
    sparsity_achieved: float
    params_total: int
    params_kept: int
    samples: int
    samples_available: int
    recommended_samples: int | None
    batch_size: int
    provider: str | None
    timings: dict[str, float]
    layers: list[LayerReport]
    skipped: list[SkippedCandidate]
    verification: list[OutputCheck] = field(default_factory=list)
    unused_calibration_arrays: tuple[str, ...] = ()
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    """The calibration inputs whose samples are not on axis 0: their batch axis, or None for a
    constant fed whole with every batch (inferred or from `--batch-axis`)."""
    per_sample_inputs: dict[str, list[int]] = field(default_factory=dict)
    """The calibration inputs given one per sample (array rank = input rank + 1): the shape of
    one sample's input. Calibration then ran one sample per batch."""
    branches: list[str] = field(default_factory=list)
    """One line per If whose branch the calibration data takes (inlined for calibration)."""
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    pattern: str = "unstructured"
    """'unstructured' or the N:M pattern (then `sparsity_target` is 1 - N/M of the layers it fits)."""
    size_before: FileSize | None = None
    """The input model's files (or serialized model) on disk and DEFLATE-compressed."""
    size_after: FileSize | None = None
    """The written output's files (None when nothing was written)."""
    allocation: str = "global"
    """How the target was split across tensors: global, sipp, error, output (see budgets.py and
    influence.py), or
    'sampling' (sipp-rand/-hybrid's own bound) and 'pattern' (N:M)."""
    census: Census | None = None
    """Where the model's parameters are: the prunable share and the kinds of the rest (see
    census.py; without the per-tensor list, which `sipp-onnx inspect --json` gives)."""
    max_times_kernel: str | None = None
    """Which max-times route measured the sensitivities ('c-avx512', 'c-avx2', 'c-portable' or
    'numpy'; see maxtimes.py); None when no sensitivities were measured."""

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def write_json(self, path: str | Path) -> None:
        """Write the report atomically (a temporary file renamed into place)."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def format_table(self) -> str:
        """Per-layer table plus totals, for humans."""
        header: tuple[str, ...] = (
            "layer",
            "op",
            "weight shape",
            "params",
            "kept",
            "sparsity",
            "s mean",
            "s max",
            "bound",
        )
        refit = any(layer.refit is not None for layer in self.layers)
        if refit:
            header += ("out err",)
        influence = any(layer.influence is not None for layer in self.layers)
        if influence:
            header += ("influence",)
        rows = [header]
        for layer in self.layers:
            s = layer.sensitivity
            row: tuple[str, ...] = (
                ",".join(layer.nodes),
                layer.op_type,
                "x".join(str(d) for d in layer.shape),
                f"{layer.params:,}",
                f"{layer.kept:,}",
                f"{layer.sparsity:.1%}",
                f"{s.mean:.2e}" if s else "-",
                f"{s.max:.2e}" if s else "-",
                f"{layer.bound:.3g}" if layer.bound is not None else "-",
            )
            if refit:
                row += (_refit_cell(layer.refit),)
            if influence:
                row += (f"{layer.influence:.3g}" if layer.influence is not None else "-",)
            rows.append(row)
        total = (
            "total",
            "",
            "",
            f"{self.params_total:,}",
            f"{self.params_kept:,}",
            f"{self.sparsity_achieved:.1%}",
        )
        rows.append(total + ("",) * (len(header) - len(total)))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = []
        for i, row in enumerate(rows):
            cells = [
                str(c).ljust(w) if j < 3 else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        ranked = [layer for layer in self.layers if layer.ranking is not None]
        wanda = sum(layer.ranking == "wanda" for layer in ranked)
        if ranked:
            lines.append(
                f"ranking: {wanda} of {len(ranked)} tensors pruned in Wanda's |w|*||a|| order, the rest "
                "by sensitivity (the order with the lower measured error at each tensor's count)"
            )
        noted = [layer for layer in self.layers if layer.score_note]
        lines += [f"note: {','.join(layer.nodes)}: {layer.score_note}" for layer in noted]
        return "\n".join(lines)


def _refit_cell(refit: RefitReport | None) -> str:
    """'before -> after' relative output error of a refitted layer, or why there is none."""
    if refit is None or refit.error_before is None or refit.error_after is None:
        return "-" if refit is None else refit.how
    return f"{refit.error_before:.3f} -> {refit.error_after:.3f}"


def json_safe(value: Any) -> Any:
    """JSON-safe: tuples to lists, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
