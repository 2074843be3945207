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

`--allocation error` (the default for sipp-det) measures instead of bounding. For each layer,
the relative output error on the calibration data of pruning its n lowest-ranked weights (in
the method's own order) and refitting the rest as the refit will is measured at a grid of n
(`refit_curve`, on sampled rows); without Gram matrices the mask's per-weight costs
`w_ij^2 ||a_j||^2` are summed instead (`error_curve`). Summing per-weight optimal-brain-surgeon
costs was tried first and dropped: it underestimated deep cuts about tenfold. The per-layer
counts then minimise the summed relative errors under the global budget: the lower convex hull
of every layer's curve, its segments taken in order of error per weight (the Lagrangian
choice), the last one partially.

With `--ranking measured` (the default) sipp-det's curves are measured twice, in its own
sensitivity order and in Wanda's per-row `|w| ||a||` order, and each layer is pruned in the
order that measured the lower error at its count. A max-share sensitivity ranks a row's
weights by their worst case over the points; where the points vary a lot (conv patches) an
average-energy order can leave less error for the refit to absorb, elsewhere the worst case
wins. The measurement, not a rule per op type, decides (docs/algorithm.md has how often each
order was taken and what it did to accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .refit import damped, inverse_cholesky_upper, solve_exact, sweep_with

GRID = 101
"""Points of a layer's curve built from per-weight costs (every 1 % of its weights)."""
GRID_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
"""Where a layer's refit error is measured (fractions of what it may lose); the allocation
interpolates between them along the curve's convex hull."""
SAMPLE_ROWS = 32
"""Rows per layer the refit error is measured on."""
EXACT_WIDTH = 64
"""Rows up to this long are solved exactly (batched); longer ones by the sweep."""
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
    alternative: ErrorCurve | None = None
    """The same layer's curve under Wanda's order (`|w| ||a||`, the same fraction of every row),
    measured at the same counts: with `--ranking measured`, sipp-det prunes each layer in
    whichever order measures lower at its count (`envelope`, `prefers_alternative`)."""

    def envelope(self) -> ErrorCurve:
        """The lower of the own and the alternative curve at every count: what the layer costs
        when each count is pruned in the order that measured better there."""
        if self.alternative is None:
            return self
        return ErrorCurve(self.pruned, np.minimum(self.error, self.alternative.error))

    def prefers_alternative(self, pruned: int) -> bool:
        """Whether the alternative order measured strictly lower at `pruned` (interpolated
        between the measured counts; a tie keeps the method's own order)."""
        if self.alternative is None or pruned <= 0:
            return False
        own = np.interp(pruned, self.pruned, self.error)
        return bool(np.interp(pruned, self.alternative.pruned, self.alternative.error) < own)


def mask_cost(rows: np.ndarray, input_sqnorm: np.ndarray) -> tuple[np.ndarray, float]:
    """Each weight's output-error cost if pruned alone without a refit, `w_ij^2 ||a_j||^2`, and
    the sum of them (the curve's scale when no Gram matrix was measured: cross terms ignored)."""
    cost = rows.astype(np.float64) ** 2 * np.asarray(input_sqnorm, dtype=np.float64)
    return cost, float(cost.sum())


def _grid(most: int) -> np.ndarray:
    return np.unique(np.round(np.asarray(GRID_FRACTIONS) * most).astype(np.int64))


def _masks(
    key: np.ndarray, live: np.ndarray, per_row: bool, counts: np.ndarray, rows: np.ndarray | None = None
) -> list[np.ndarray]:
    """Kept masks pruning the `n` lowest keys (layer-wide, or `per_row` the same fraction of
    every row's live weights) for each n in `counts`, of the rows `rows` (default: all)."""
    ranked = np.where(live, key, np.inf)
    n_live = int(live.sum())
    if per_row:
        if rows is not None:
            ranked, live = ranked[rows], live[rows]
        order = np.argsort(ranked, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(ranked.shape[1])[None].repeat(ranked.shape[0], 0), axis=1)
        per_live = live.sum(axis=1, keepdims=True)
        return [live & (rank >= np.round(per_live * (n / n_live if n_live else 0.0))) for n in counts]
    # Layer-wide ranks of the chosen rows from one sort of every key (a sort is ~15x faster than
    # an argsort): the keys below, plus a share of the equal ones by position (ties are pruned
    # in position order, as a stable sort would, up to rounding).
    flat = ranked.ravel()
    ordered = np.sort(flat)
    picked = np.arange(key.shape[0]) if rows is None else np.asarray(rows)
    sub = ranked[picked]
    below = np.searchsorted(ordered, sub, side="left")
    equal = np.searchsorted(ordered, sub, side="right") - below
    position = (picked[:, None] * key.shape[1] + np.arange(key.shape[1])[None]) / max(1, flat.size)
    rank = below + np.floor(equal * position).astype(np.int64)
    live = live[picked]
    return [live & (rank >= n) for n in counts]


def refit_curve(
    rows: np.ndarray,
    key: np.ndarray,
    live: np.ndarray,
    gram: np.ndarray,
    refit: bool,
    per_row: bool,
    most: int,
    seed: int = 0,
    factors: dict[int, np.ndarray] | None = None,
) -> ErrorCurve:
    """The layer's relative squared output error on the calibration data after pruning its
    lowest keys and (with `refit`) re-solving the kept weights, at `GRID_FRACTIONS` of `most`.

    Measured, not modelled: the errors of separate weights do not add up (a row's kept weights
    compensate the first ones pruned almost fully, the last ones not at all; summing each
    weight's optimal-brain-surgeon cost underestimated a 97 %-pruned layer's error ten times).
    Rows are independent, so a sample of `SAMPLE_ROWS` rows gives the layer's ratio. Each mask
    is solved as the refit solves it (`refit.solve_exact` for short rows, the SparseGPT sweep
    for long ones, one factorisation per group for every mask), a row never worse than its mask.
    The curve is made non-decreasing: pruning more never counts as cheaper. `factors`, when
    given, receives each group's sweep factor for the refit to reuse (`refit_layer(factors=)`).
    """
    n = rows.shape[0]
    per = n // gram.shape[0]
    counts = _grid(most)
    sample = np.arange(n)
    if n > SAMPLE_ROWS:
        sample = np.sort(np.random.default_rng(seed).choice(n, SAMPLE_ROWS, replace=False))
    masks = np.stack(_masks(key, live, per_row, counts, sample))  # [G, R, K]
    w0 = rows[sample].astype(np.float64)
    errors = np.zeros(len(counts))
    energy = 0.0
    for g in np.unique(sample // per):
        mine = sample // per == g
        h = np.asarray(gram[g], dtype=np.float64)
        w = w0[mine]
        energy += float(((w @ h) * w).sum())
        keep = masks[:, mine].reshape(-1, w.shape[1])
        tiled = np.tile(w, (len(counts), 1))
        h32 = h.astype(np.float32)  # the errors only rank layers: float32 products suffice
        err = _quadratic(np.where(keep, 0.0, -tiled), h32)
        if refit:
            hd = damped(h)
            if w.shape[1] <= EXACT_WIDTH:
                new = solve_exact(tiled, keep, hd)
            else:
                known = factors.get(int(g)) if factors is not None else None
                factor = known if known is not None else _factor(hd)  # the alternative order's too
                if factors is not None and factor.dtype == np.float32:
                    factors[int(g)] = factor
                new = sweep_with(factor, tiled, keep)
            err = np.minimum(err, _quadratic(new.astype(np.float64) - tiled, h32))
        errors += err.reshape(len(counts), -1).sum(axis=1)
    scale = 1.0 / energy if energy > 0 else 0.0
    return ErrorCurve(counts, np.maximum.accumulate(errors * scale))


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


def _factor(hd: np.ndarray) -> np.ndarray:
    """The sweep's factor of the damped `H`: float32 as the refit's, float64 where float32
    cannot factor it (the refit falls back the same way)."""
    try:
        factor = inverse_cholesky_upper(hd.astype(np.float32))
        if np.isfinite(factor).all():
            return factor
    except np.linalg.LinAlgError:
        pass
    return inverse_cholesky_upper(hd)


def _quadratic(delta: np.ndarray, h32: np.ndarray) -> np.ndarray:
    """`d^T H d` per row, from float32 products summed in float64."""
    d = delta.astype(np.float32)
    return ((d @ h32) * d).sum(axis=1, dtype=np.float64)


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


def counts_from_curves(curves: Sequence[ErrorCurve], rows: Sequence[np.ndarray], keep: int) -> list[int]:
    """Weights to keep per tensor for `keep` in all (live weights counted), from their curves
    (each curve's envelope with its alternative, where it has one)."""
    return kept_counts(curves, [int(np.count_nonzero(r)) for r in rows], keep)


def kept_counts(curves: Sequence[ErrorCurve], lives: Sequence[int], keep: int) -> list[int]:
    """`counts_from_curves` for tensors of `lives` live weights each."""
    pruned = split_budget([c.envelope() for c in curves], max(0, sum(lives) - keep))
    return [live - p for live, p in zip(lives, pruned, strict=True)]


def floor_counts(sizes: Sequence[int], keep: int, layer_floor: float) -> list[int] | None:
    """Every tensor's minimum kept count under `layer_floor` (see PruneConfig.layer_floor)."""
    if layer_floor <= 0:
        return None
    total = sum(sizes)
    return [math.ceil(layer_floor * keep / total * size) for size in sizes]
