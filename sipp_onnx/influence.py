"""Each weight's measured influence on the model's output, to weight the error allocation.

The error allocation (budgets.py) splits the budget so that the summed *layer* errors are least:
every layer's relative output error counts the same. The model does not weigh them alike. A
transformer's projections write into a residual stream much larger than themselves, Q and K act
through a softmax, an FFN's first matrix feeds a GELU that passes little of a small change; a
conv's error is diluted or amplified by everything after it. On all-MiniLM-L6-v2 the summed
layer error gave 0.689 cosine at 70 % while Wanda's uniform ratio gave 0.759.

So the influence is measured. Each weight alone is pruned to the count the allocation gives it,
as the prune will (its mask, its refit and bias shift), and the model runs on a few calibration
samples: the relative squared error of the model's outputs divided by the layer's own error at
that count is the weight's *gain*, the model-output error per unit of layer error. The curves
are multiplied by their gains and the budget split again; a weight whose count moved away from
every count measured is measured at its new count too (a gain is interpolated between the
counts measured, flat beyond them), for at most `ROUNDS` rounds. Errors grow faster than
linearly in deep cuts, so the gain at one count does not carry far; the rounds measure where
the allocation actually goes.

Gains measured one weight at a time assume the weights' errors add. Where they do not (on
PP-LCNet every single layer's cut barely moved the logits, gains of 0.001, yet cutting many of
them together deeply broke the model), the weighted split is worse than the plain one. So both
splits are finally measured whole, every weight pruned together, and the one with the lower
output error is kept.

Outputs are read before they are squashed: a Softmax, LogSoftmax or Sigmoid output (or an
ArgMax/TopK of one, or a softmax written out as Exp / sum) is read at its input. Probabilities
saturate: on a confident classifier nearly every layer's change leaves them where they were,
every gain looks like 0 and the allocation then cuts exactly the layers that decide the class.

One ONNX Runtime session serves every measurement: in a copy of the dense model each pruned
weight's stored tensor (and bias) is also a graph input, so a measurement is one run with one
tensor fed, not a new session. A weight that cannot be fed so (inside an If branch, a bias the
refit would have to create) is measured without that part or, if its weight cannot be fed at
all, takes the median gain of the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .budgets import ErrorCurve, kept_counts
from .config import Provider
from .modelio import np_dtype
from .runtime import add_outputs, make_session

log = logging.getLogger(__name__)

ROUNDS = 3
"""At most this many measure-and-split rounds."""
SAMPLES = 16
"""Calibration samples each measurement runs on."""
NEAR = 0.2
"""A count whose pruned and kept entries are both within this fraction of one already measured
is not measured again."""
MAX_BYTES = 2**30
"""`--allocation auto` measures influences only for models of at most this many bytes of
prunable weights (as float32): the probe session holds a second copy of the model, and the
measured prunes kept for the whole-model checks (`weigh_curves(cache_bytes=)`) at most one more."""
FEEDABLE = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
    }
)
"""Element types a NumPy array can feed to ONNX Runtime (bfloat16 and float8 cannot)."""
BUDGET = 2.0
"""The measurements' model runs may take about this many times the calibration pass (its
capture and statistics); beyond it, fewer samples are measured (at least one). A detector on
480 x 480 pages ran 16 pages per measurement, 130 times: 465 s against 4 s for the error
allocation."""
BUDGET_FLOOR_S = 60.0
"""...and only when the runs would take more than this many seconds: below it the sample count
never depends on the machine's timing (an in-memory and an external-data copy of one model
prune alike)."""
FLOOR = 0.01
"""No gain below this fraction of the median gain."""
_SQUASH = {"Softmax", "LogSoftmax", "Sigmoid"}
_PICK = {"ArgMax", "ArgMin", "TopK"}
_PASS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}


@dataclass(frozen=True)
class Readout:
    """A tensor the probe compares, and how: 'plain' (relative squared error), 'softmax' (the
    mean KL divergence of the softmax along `axis`, dense to pruned) or 'sigmoid' (the mean
    binary KL divergence of each element)."""

    name: str
    kind: str = "plain"
    axis: int = -1


def readouts(graph: onnx.GraphProto, opset: int = 17) -> list[Readout]:
    """What to compare for each graph output: the logits of the Softmax, LogSoftmax or Sigmoid
    it comes from (through reshapes, casts, ArgMax or TopK) or of a softmax written out as
    `Exp(x) / sum`, compared as distributions; else the output itself. Duplicates removed."""
    producer = {out: node for node in graph.node for out in node.output}
    out: list[Readout] = []
    for output in graph.output:
        name, found = output.name, None
        for _ in range(16):
            node = producer.get(name)
            if node is None or not node.input:
                break
            if node.op_type in _SQUASH:
                axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
                kind = "sigmoid" if node.op_type == "Sigmoid" else "softmax"
                found = Readout(node.input[0], kind, int(axis))
                break
            if node.op_type == "Div":
                top = producer.get(node.input[0])
                if top is not None and top.op_type == "Exp":
                    found = Readout(top.input[0], "softmax", -1)
                break
            if node.op_type not in _PASS | _PICK:
                break
            name = node.input[0]
        pick = found if found is not None else Readout(output.name)
        if pick.name not in {r.name for r in out}:
            out.append(pick)
    return out


def logit_names(graph: onnx.GraphProto) -> list[str]:
    """The names of `readouts`: the logits where an output is squashed, else the output."""
    return [r.name for r in readouts(graph)]


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def divergence(readout: Readout, got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """How far `got` is from `want` (one array per run) as `readout` says. A relative squared
    error for plain tensors; for logits, the mean KL divergence of the distributions: an L2
    over a many-class classifier's logits is dominated by classes that never matter, and the
    probabilities themselves saturate."""
    if readout.kind == "plain":
        num = den = 0.0
        for g, w in zip(got, want, strict=True):
            a64, b64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
            num += float(((a64 - b64) ** 2).sum())
            den += float((b64**2).sum())
        return num / (den if den > 0 else 1.0)
    total, count = 0.0, 0
    for g, w in zip(got, want, strict=True):
        q, p = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if readout.kind == "softmax":
            lp, lq = _log_softmax(p, readout.axis), _log_softmax(q, readout.axis)
            kl = (np.exp(lp) * (lp - lq)).sum(axis=readout.axis)
        else:  # sigmoid: log(sigma(x)) = -softplus(-x)
            lp1, lq1 = -np.logaddexp(0.0, -p), -np.logaddexp(0.0, -q)
            lp0, lq0 = -np.logaddexp(0.0, p), -np.logaddexp(0.0, q)
            kl = np.exp(lp1) * (lp1 - lq1) + np.exp(lp0) * (lp0 - lq0)
        total += float(kl.sum())
        count += kl.size
    return total / max(count, 1)


def output_divergence(
    readout_list: Sequence[Readout], got: Sequence[Sequence[np.ndarray]], want: Sequence[Sequence[np.ndarray]]
) -> float:
    """Mean over the float readouts of their `divergence` (`got[run][readout]`), each readout
    weighted alike (a [B, T, 384] token output must not drown a [B, 384] pooled one)."""
    values = [
        divergence(r, [g[t] for g in got], [w[t] for w in want])
        for t, r in enumerate(readout_list)
        if want and np.asarray(want[0][t]).dtype.kind == "f"
    ]
    return float(np.mean(values)) if values else 0.0


class OutputProbe:
    """The dense model with chosen tensors fed per run; the outputs' relative squared error."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        tensors: set[str],
        feeds: Sequence[Mapping[str, np.ndarray]],
        base_dir: Path | None = None,
        provider: Provider = Provider.CPU,
    ) -> None:
        """`tensors`: the names that may be fed (top-level initializers or Constant outputs;
        others are left out of `feedable`). `feeds`: the calibration batches to run on."""
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.readouts = readouts(graph, opset)
        self.outputs = [r.name for r in self.readouts]
        add_outputs(model, self.outputs)
        self.feedable = self._expose(graph, tensors)
        self.dtypes = {t.name: np_dtype(t.data_type) for t in graph.initializer if t.name in self.feedable}
        self.session, _ = make_session(model, provider, base_dir=base_dir)
        self.feeds = [dict(feed) for feed in feeds]
        t0 = time.perf_counter()
        self.want = [self.session.run(self.outputs, feed) for feed in self.feeds]
        self.seconds = time.perf_counter() - t0
        """One measurement's model runs, timed on the dense reference."""
        self.runs = 0

    @staticmethod
    def _expose(graph: onnx.GraphProto, tensors: set[str]) -> set[str]:
        """Make each wanted initializer (or Constant node value) an overridable graph input."""
        inputs = {i.name for i in graph.input}
        for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in tensors]:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is None:
                continue
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            graph.node.remove(node)
        out = set()
        for tensor in graph.initializer:
            if tensor.name in tensors and tensor.data_type in FEEDABLE:
                if tensor.name not in inputs:
                    graph.input.append(
                        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                    )
                out.add(tensor.name)
        return out

    def error(self, values: Mapping[str, np.ndarray]) -> float:
        """The outputs' `output_divergence` with `values` fed for their tensors."""
        fed = {name: np.ascontiguousarray(v, dtype=self.dtypes[name]) for name, v in values.items()}
        self.runs += 1
        got = [self.session.run(self.outputs, {**feed, **fed}) for feed in self.feeds]
        return output_divergence(self.readouts, got, self.want)


def interpolated_gain(measured: Mapping[int, float], pruned: np.ndarray) -> np.ndarray:
    """A weight's gain at each count of `pruned`, log-linear between the counts measured and
    flat beyond them."""
    counts = sorted(measured)
    logs = np.log([max(measured[c], 1e-30) for c in counts])
    return np.exp(np.interp(pruned.astype(np.float64), np.asarray(counts, dtype=np.float64), logs))


def needs_measuring(measured: Mapping[int, float], pruned: int, live: int) -> bool:
    """Whether `pruned` (of `live` entries) is away from every count measured: near one only
    if both the pruned and the kept count are within `NEAR` of it, relatively (at 90 %
    sparsity 604 -> 205 kept is a 3x deeper cut though only 5 % of the layer moves)."""
    if pruned <= 0:
        return False
    kept = live - pruned
    return not any(
        abs(pruned - p) <= NEAR * max(p, 1) and abs(kept - (live - p)) <= NEAR * max(live - p, 1)
        for p in measured
    )


def fill_gains(gains: Sequence[dict[int, float]]) -> list[dict[int, float]]:
    """Weights never measured take the median (in log space) of the others' gains; no gain is
    below `FLOOR` times that median (a weight whose change never reached the outputs of the
    few samples measured is not therefore free)."""
    seen = [g for measured in gains for g in measured.values() if g > 0]
    median = float(np.exp(np.median(np.log(seen)))) if seen else 1.0
    low = FLOOR * median
    return [{n: max(g, low) for n, g in measured.items()} if measured else {0: median} for measured in gains]


def scaled(curve: ErrorCurve, measured: Mapping[int, float]) -> ErrorCurve:
    """`curve` (and its alternative) times the weight's gain at each count, kept non-decreasing."""
    gain = interpolated_gain(measured, curve.pruned)
    alternative = curve.alternative
    if alternative is not None:
        alternative = replace(alternative, error=np.maximum.accumulate(alternative.error * gain))
    return replace(curve, error=np.maximum.accumulate(curve.error * gain), alternative=alternative)


@dataclass(frozen=True)
class Influence:
    """What the measured allocation found: the weighted curves and each weight's gains."""

    curves: list[ErrorCurve]
    gains: list[dict[int, float]]
    """Per weight, pruned count -> measured gain (empty: not measured, the median was used)."""
    runs: int
    rounds: int
    joint: dict[str, float]
    """The measured output error with every weight pruned together at the split of the plain
    curves ('plain') and of the weighted ones ('weighted'); the lower one's curves are used."""
    chosen: str
    """'weighted' or 'plain'."""


def weigh_curves(
    curves: Sequence[ErrorCurve],
    lives: Sequence[int],
    keep: int,
    feedable: Sequence[bool],
    prune_alone: Callable[[int, int], Mapping[str, np.ndarray]],
    probe: OutputProbe,
    cache_bytes: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Influence:
    """Measure and split for up to `ROUNDS` rounds (see the module docstring).

    `lives[i]`: weight i's live entries; `keep`: entries kept in all; `feedable[i]`: whether
    weight i can be measured; `prune_alone(i, kept)`: the tensors to feed for weight i pruned
    alone to `kept` entries (its stored weight, its shifted bias). Up to `cache_bytes` of its
    results are kept for the whole-model checks, which then need no second refit of a weight
    at a count already measured (the plain split's counts are the first round's). `progress`
    is told (stage, done, total) after each measurement."""
    cache: dict[tuple[int, int], Mapping[str, np.ndarray]] = {}
    held = 0

    def pruned(i: int, kept: int) -> Mapping[str, np.ndarray]:
        nonlocal held
        got = cache.get((i, kept))
        if got is None:
            got = prune_alone(i, kept)
            size = sum(np.asarray(v).nbytes for v in got.values())
            if held + size <= cache_bytes:
                cache[(i, kept)] = got
                held += size
        return got

    gains: list[dict[int, float]] = [{} for _ in curves]
    weighted = list(curves)
    rounds = 0
    for rounds in range(1, ROUNDS + 1):  # noqa: B007 - the count is reported
        kept = kept_counts(weighted, lives, keep)
        todo = [
            i
            for i, (n, k) in enumerate(zip(lives, kept, strict=True))
            if feedable[i] and needs_measuring(gains[i], n - k, n)
        ]
        if not todo:
            rounds -= 1
            break
        for step, i in enumerate(todo, 1):
            if progress is not None:
                progress(f"influence round {rounds}", step, len(todo))
            count = lives[i] - kept[i]
            own = float(np.interp(count, curves[i].envelope().pruned, curves[i].envelope().error))
            if own <= 0:  # the layer's change is nil on the calibration data: nothing to scale
                continue
            gains[i][count] = probe.error(pruned(i, kept[i])) / own
        log.debug("influence round %d: %d weights measured", rounds, len(todo))
        filled = fill_gains(gains)
        weighted = [scaled(c, g) for c, g in zip(curves, filled, strict=True)]
    joint: dict[str, float] = {}
    splits = {"plain": kept_counts(curves, lives, keep), "weighted": kept_counts(weighted, lives, keep)}
    if splits["weighted"] != splits["plain"]:
        for label, kept in splits.items():
            fed: dict[str, np.ndarray] = {}
            for i, (n, k) in enumerate(zip(lives, kept, strict=True)):
                if k < n:
                    fed.update(pruned(i, k))
            joint[label] = probe.error(fed)
    chosen = "plain" if joint and joint["plain"] < joint["weighted"] else "weighted"
    log.debug("influence: joint output errors %s, %s split chosen", joint, chosen)
    return Influence(
        weighted if chosen == "weighted" else list(curves), gains, probe.runs, rounds, joint, chosen
    )
