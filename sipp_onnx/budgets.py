"""Per-layer budgets: how one global sparsity target is split across the weight tensors.

`--allocation global` (the original rule) keeps the weights with the largest scores over the
whole model under one threshold. For SiPP's relative shares that is biased by fan-in: a weight's
share of its output is about 1/K, so one threshold over shares prunes the wide layers hardest,
whatever they do for the model (a MobileNetV3 recognizer's 240-480-input pointwise convs all
ended at the layer floor while its 25-input depthwise convs kept 90-98 %).

`--allocation sipp` is SiPP's own rule (Baykal, Liebenwein et al. 2022, section 4; torchprune's
allocator): one error level eps is shared by every layer, and every row prunes its least
sensitive weights for as long as their summed sensitivity -- the row's relative error bound --
stays within eps. A weight's key is that cumulative sum (`bound_keys`), so the eps meeting the
global budget is simply the global threshold on the keys: no search. A row whose shares are all
about 1/K now prunes a fraction eps of itself whatever K is.

`--allocation error` measures instead of bounding. For each layer, the output error of pruning
its n lowest-ranked weights (in the method's own order) is read off the calibration statistics
for every n at once: with the refit, each pruned weight costs its optimal-brain-surgeon saliency
`w_ij^2 / [H^-1]_jj` (the output error left after the other weights of the row compensate
for it), without it `w_ij^2 H_jj`; both relative to the layer's output energy `w_i^T H w_i`.
The per-layer counts then minimise the summed relative errors under the global budget: the
lower convex hull of every layer's curve, its segments taken in order of cost per weight
(the Lagrangian choice), the last one partially.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .refit import damped

log = logging.getLogger(__name__)

GRID = 101
"""Points of each layer's error curve (every 1 % of its weights); the allocation interpolates
between them."""
UNINFORMATIVE_ROWS = 0.5
"""A weight whose sensitivities are constant over the non-zero entries of more than this share of
its rows carries no ranking (one-hot inputs give every occurring weight a share of 1)."""


def bound_keys(sensitivity: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Per weight, the summed sensitivity of itself and every weight of its row ranked below it
    (ascending sensitivity, ties: smaller `magnitude` first): the row's error bound if it and
    everything below it were pruned. Keeping the largest keys under one threshold eps is SiPP's
    shared-eps allocation. float64 `[N, K]`."""
    sens = np.asarray(sensitivity, dtype=np.float64)
    order = np.lexsort((np.asarray(magnitude, dtype=np.float64), sens), axis=1)
    out = np.empty_like(sens)
    np.put_along_axis(out, order, np.cumsum(np.take_along_axis(sens, order, axis=1), axis=1), axis=1)
    return out


def uninformative(sensitivity: np.ndarray, rows: np.ndarray) -> bool:
    """True when most rows give all their weights of positive sensitivity the same one (one-hot
    or constant inputs): the max over points then only says which inputs ever occurred."""
    sens = np.asarray(sensitivity, dtype=np.float64)
    live = (rows != 0) & (sens > 0)  # inputs that never fired have 0: not a ranking either
    if not live.any():
        return False
    high = np.where(live, sens, -np.inf).max(axis=1)
    low = np.where(live, sens, np.inf).min(axis=1)
    has = live.any(axis=1)
    flat = has & (high - low <= 1e-6 * np.maximum(np.abs(high), 1e-30))
    return bool(flat.sum() > UNINFORMATIVE_ROWS * has.sum())


def norm_shares(rows: np.ndarray, input_sqnorm: np.ndarray) -> np.ndarray:
    """`|w_ij| ||a_j|| / sum_k |w_ik| ||a_k||`: each weight's share of its row's mass in the
    L2 sense (Wanda's score, normalised per row), the stand-in sensitivity of an uninformative
    weight. Rows sum to 1, the scale of a relative share, so the allocation can compare it."""
    score = np.abs(rows).astype(np.float64) * np.sqrt(np.asarray(input_sqnorm, dtype=np.float64))
    total = score.sum(axis=1, keepdims=True)
    return (score / np.where(total > 0, total, 1.0)).astype(np.float32)


@dataclass(frozen=True)
class ErrorCurve:
    """A layer's relative output error against the number of its weights pruned."""

    pruned: np.ndarray
    """int64 counts, increasing from 0."""
    error: np.ndarray
    """Relative squared output error at each count (0 at 0)."""


def saliency(rows: np.ndarray, gram: np.ndarray | None, input_sqnorm: np.ndarray) -> tuple[np.ndarray, float]:
    """Each weight's output-error cost if pruned, and the layer's output energy `sum_i w_i^T H w_i`.

    With the Gram matrices `[G, K, K]` (the refit will run): the optimal-brain-surgeon cost
    `w^2 / [H^-1]_jj` on the damped H the refit uses; without them, the mask-only cost
    `w^2 ||a_j||^2`."""
    w = rows.astype(np.float64)
    if gram is None:
        cost = w**2 * np.asarray(input_sqnorm, dtype=np.float64)
        return cost, float(cost.sum())
    groups = gram.shape[0]
    per = w.shape[0] // groups
    cost = np.empty_like(w)
    energy = 0.0
    for g in range(groups):
        part = slice(g * per, (g + 1) * per)
        h = np.asarray(gram[g], dtype=np.float64)
        energy += float(np.einsum("ik,ik->", w[part] @ h, w[part]))
        inverse_diag = np.diagonal(np.linalg.inv(damped(h)))
        cost[part] = w[part] ** 2 / np.maximum(inverse_diag, 1e-300)
    return cost, energy


def error_curve(
    cost: np.ndarray, energy: float, key: np.ndarray, live: np.ndarray, per_row: bool, most: int
) -> ErrorCurve:
    """The curve of pruning the lowest `key` first, layer-wide or (`per_row`, Wanda) the same
    fraction of every row; at most `most` weights pruned."""
    n_live = int(live.sum())
    most = max(0, min(most, n_live))
    counts = np.unique(np.linspace(0, most, GRID).round().astype(np.int64))
    scale = 1.0 / energy if energy > 0 else 0.0
    if not per_row:
        order = np.argsort(np.where(live, key, np.inf).ravel(), kind="stable")[:n_live]  # lowest first
        summed = np.concatenate([[0.0], np.cumsum(cost.ravel()[order])])
        return ErrorCurve(counts, summed[counts] * scale)
    n, width = cost.shape
    order = np.argsort(np.where(live, key, np.inf), axis=1, kind="stable")
    summed = np.concatenate([np.zeros((n, 1)), np.cumsum(np.take_along_axis(cost, order, 1), 1)], 1)
    errors = []
    for c in counts:
        per = min(width, int(round(c / n))) if n else 0
        errors.append(summed[:, per].sum() * scale)
    return ErrorCurve(counts, np.array(errors))


def _hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (x increasing)."""
    out: list[int] = []
    for i in range(len(x)):
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                out.pop()
            else:
                break
        out.append(i)
    return out


def split_budget(curves: Sequence[ErrorCurve], prune: int) -> list[int]:
    """Weights to prune per layer, `prune` in all (or every curve's end if fewer), with the least
    summed error: hull segments of all layers in order of error per weight, the last partially."""
    segments = []  # (slope, layer, n_from, n_to)
    for i, curve in enumerate(curves):
        x, y = curve.pruned.astype(np.float64), curve.error
        idx = _hull(x, y)
        for a, b in zip(idx[:-1], idx[1:], strict=False):
            segments.append(((y[b] - y[a]) / (x[b] - x[a]), i, int(x[a]), int(x[b])))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    out = [0] * len(curves)
    left = prune
    for _slope, i, lo, hi in segments:
        if left <= 0:
            break
        take = min(hi - lo, left)
        out[i] = lo + take
        left -= take
    return out


def error_counts(
    costs: Sequence[tuple[np.ndarray, float]],
    keys: Sequence[np.ndarray],
    rows: Sequence[np.ndarray],
    keep: int,
    per_row: bool,
    floors: Sequence[int] | None = None,
) -> list[int]:
    """Weights to keep per tensor for `keep` in all, from the measured error curves."""
    lives = [r != 0 for r in rows]
    total_live = sum(int(v.sum()) for v in lives)
    curves = []
    for i, ((cost, energy), key, live) in enumerate(zip(costs, keys, lives, strict=True)):
        floor = floors[i] if floors else 0
        curves.append(error_curve(cost, energy, key, live, per_row, int(live.sum()) - floor))
    pruned = split_budget(curves, max(0, total_live - keep))
    return [int(v.sum()) - p for v, p in zip(lives, pruned, strict=True)]


def floor_counts(sizes: Sequence[int], keep: int, layer_floor: float) -> list[int] | None:
    """Every tensor's minimum kept count under `layer_floor` (see PruneConfig.layer_floor)."""
    if layer_floor <= 0:
        return None
    total = sum(sizes)
    return [math.ceil(layer_floor * keep / total * size) for size in sizes]
