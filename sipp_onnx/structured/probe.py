"""Each group's measured effect on the model's output, to put the groups' scores on one scale.

A score says how much a channel matters *to its consumers*, relative to their own outputs. How
much a consumer's error moves the model's output differs from layer to layer: an early
high-resolution layer's error passes through every later one, the last conv's is diluted by the
classifier. Comparing raw scores across groups therefore over-cuts some layers; normalising
them per group (each group's scores sum to 1) over-cuts others (on MiniLM it spares heads that
cost little, on PP-LCNet raw PFP cut the early layers and lost 7 points at 30 %).

Measuring is the principled way. For every group, its least important quarter and half (in
score order, compensated as the prune will be) are cut alone, and the model runs on a slice of
the first calibration batch: the relative error of its outputs at the two cuts. The group's
scores are then rescaled piecewise so that they add up to the measured errors: the first
quarter to the first error, the second to the increase, and the rest at the second slope times
the growth seen between the last two. Each slope is at least the one before, so a group's cost
per unit only rises as it is cut. Afterwards a score is "model output error per unit" in every
group, and the allocator's greedy compares like with like. Errors grow faster the deeper the
cut, so an extrapolation is not trusted: where the allocation cuts a group deeper than measured,
that cut is measured too and the allocation redone (a straight line through the half-way point
made cutting 95 % of MiniLM's last FFN look cheap). Cost: two model runs per group, plus one
per group and round that went deeper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

from ..calibration import BatchAxes, count_samples, take_samples
from ..config import Provider
from ..influence import Readout, divergence, readouts
from ..runtime import add_outputs, make_session
from .compensate import Compensation
from .groups import Plan
from .surgery import apply_surgery

log = logging.getLogger(__name__)

Compensate = Callable[[np.ndarray], dict[int, Compensation]]


def output_error(readouts: list[Readout], got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Mean over the float readouts of the square root of their divergence (influence.py: the
    relative L2 error of a plain output, sqrt(KL) of a squashed one's logits), each output
    weighted alike whatever its size (a [B, T*384] token output must not drown the [B, 384]
    pooled one). Errors of separate cuts add at most linearly (triangle inequality), so the
    allocator sums them; summing squared errors, their expectation for independent cuts,
    measured worse (MiniLM at 25 %: cosine 0.960 against 0.984)."""
    values = [
        np.sqrt(divergence(r, [a], [b]))
        for r, a, b in zip(readouts, got, want, strict=True)
        if np.asarray(b).dtype.kind == "f"
    ]
    return float(np.mean(values)) if values else 0.0


def _round_cut(count: int, fraction: float, chunk: int) -> int:
    return max(chunk, int(count * fraction) // chunk * chunk) if count > chunk else 0


class Probe:
    """Measured output errors of cutting each group alone, and the scores they rescale."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        plan: Plan,
        scores: np.ndarray,
        compensate: Compensate,
        feed: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        multiple: int,
        base_dir: Path | None = None,
        samples: int = 8,
        axes: BatchAxes | None = None,
    ) -> None:
        """`axes`: the feed's batch axis per input (see calibration.py; default axis 0)."""
        self.plan, self.scores = plan, scores.astype(np.float64)
        self.compensate, self.multiple, self.base_dir = compensate, multiple, base_dir
        axes = axes or {}
        self.feed = take_samples(feed, axes, 0, samples)
        # Outputs are compared before they are squashed (influence.logit_names): a confident
        # classifier's probabilities barely move whatever is cut.
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.readouts = readouts(proto.graph, opset)
        self.names = [r.name for r in self.readouts]
        self.proto = proto
        if any(name not in reference for name in self.names):
            self.proto = onnx.ModelProto()
            self.proto.CopyFrom(proto)
            add_outputs(self.proto, self.names)
        n = count_samples(feed, axes)
        on_first_axis = all(axis == 0 for axis in axes.values() if axis is not None) and all(
            name in reference and np.ndim(reference[name]) and np.shape(reference[name])[0] == n
            for name in self.names
        )
        if on_first_axis:  # the reference outputs of the first samples are a slice
            self.want = [np.asarray(reference[name])[:samples] for name in self.names]
        else:  # samples elsewhere (a state [2, batch, 128], a scalar output): run the dense model
            session, _ = make_session(self.proto, Provider.CPU, optimize=False, base_dir=base_dir)
            self.want = list(session.run(self.names, dict(self.feed)))
        self.errors: dict[int, dict[int, float]] = {}
        """Group -> {components cut: output error}."""
        self.runs = 0

    def order(self, g: int) -> np.ndarray:
        """The group's removable components, least important first."""
        group = self.plan.groups[g]
        removable = group.components[~self.plan.frozen[group.components]]
        return removable[np.argsort(self.scores[removable], kind="stable")]

    def measure(self, g: int, cut: int) -> None:
        """The output error with the `cut` least important components of group g removed."""
        measured = self.errors.setdefault(g, {})
        if cut <= 0 or cut in measured:
            return
        keep = self.plan.all_kept()
        keep[self.order(g)[:cut]] = False
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        apply_surgery(model, self.plan, keep, self.compensate(keep), base_dir=self.base_dir)
        session, _ = make_session(model, Provider.CPU, optimize=False, base_dir=self.base_dir)
        measured[cut] = output_error(self.readouts, session.run(self.names, dict(self.feed)), self.want)
        self.runs += 1
        log.debug("probe %s: %d cut -> output error %.4g", self.plan.groups[g].name, cut, measured[cut])

    def start(self, groups: set[int]) -> None:
        """The first two measurements of every group: its least important quarter and half."""
        for g in sorted(groups):
            chunk = max(1, -(-self.multiple // self.plan.groups[g].width))
            n = len(self.order(g))
            for fraction in (0.25, 0.5):
                self.measure(g, _round_cut(n, fraction, chunk))

    def beyond(self, keep: np.ndarray) -> list[tuple[int, int]]:
        """(group, cut) of the groups an allocation cut deeper than anything measured."""
        out = []
        for g, measured in self.errors.items():
            cut = int((~keep[self.order(g)]).sum())
            if measured and cut > max(measured):
                out.append((g, cut))
        return out

    def scaled(self) -> np.ndarray:
        """The scores rescaled piecewise by the measurements (see the module docstring)."""
        out = self.scores.copy()
        for g, measured in self.errors.items():
            if not measured:
                continue
            order = self.order(g)
            cuts = sorted(measured)
            errors = [measured[c] for c in cuts]
            floor = 1e-9 * float(self.scores[order].sum()) + 1e-30
            bounds = [0, *cuts, len(order)]
            slopes = []
            previous = 0.0
            for lo, hi, err in zip(bounds[:-2], bounds[1:-1], errors, strict=True):
                mass = max(float(self.scores[order[lo:hi]].sum()), floor)
                slopes.append(max(err - previous, 0.0) / mass)
                previous = err
            growth = errors[-1] / errors[-2] if len(errors) > 1 and errors[-2] > 0 else 1.0
            slopes.append(slopes[-1] * max(growth, 1.0))
            for i in range(1, len(slopes)):
                slopes[i] = max(slopes[i], slopes[i - 1])
            for lo, hi, slope in zip(bounds[:-1], bounds[1:], slopes, strict=True):
                out[order[lo:hi]] = np.maximum(self.scores[order[lo:hi]], floor) * max(slope, 1e-12)
        return out
