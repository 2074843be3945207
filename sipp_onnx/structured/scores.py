"""How much each component matters, from the calibration statistics of its consumers.

Every score is a relative quantity, so that the allocator can compare components of different
layers (see `allocate`):

- 'pfp' (PFP, Liebenwein et al. 2020): the largest relative contribution a channel makes to any
  pre-activation of any consumer, over the calibration points: the max over rows and kernel
  positions of SiPP's weight sensitivities (`|w_ij a_j| / sum_k |w_ik a_k|`, reduced by max).
  A component with several positions in one consumer (a head's dims, the columns of a
  flattened channel) adds them up; over consumers the max is taken. Removing a set R changes
  each consumer output by at most the sum of R's scores times its absolute mass: the scores
  add up to an error bound.
- 'l1' (Li et al. 2017): the L1 norm of the channel's filters in the layers that produce it,
  as a share of its group's total (weights alone say nothing about other layers).
- 'act' (FLAP's fluctuation, Wanda-sp's activation-aware column norm): `Var(x_j) ||W_:,j||^2`,
  what removing the channel costs a consumer's output after the mean is folded into its bias,
  as a share of that consumer's total, summed over consumers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..layers import WeightLayout, to_rows
from ..sensitivity import LayerStatistics
from .channels import LayerInfo
from .groups import Plan

SCORES = ("pfp", "l1", "act")


def layer_rows(layer: LayerInfo, weight: np.ndarray) -> np.ndarray:
    """The weight as canonical rows `[N_out, K]` (conv: K = C_in/g * kernel)."""
    if layer.op == "Conv":
        return to_rows(weight, WeightLayout.CONV)
    return to_rows(weight, WeightLayout.ROWS if layer.transpose_b else WeightLayout.COLUMNS)


def per_position(layer: LayerInfo, columns: np.ndarray, reduce: str) -> np.ndarray:
    """Column statistic `[K]` of a consumer -> one value per input channel position."""
    per = layer.kernel if layer.op == "Conv" else 1
    blocks = columns.reshape(-1, per)
    return blocks.max(axis=1) if reduce == "max" else blocks.sum(axis=1)


def component_scores(
    plan: Plan,
    method: str,
    weights: Mapping[int, np.ndarray],
    stats: Mapping[int, LayerStatistics],
) -> np.ndarray:
    """One score per component (higher: more important). `weights` and `stats` are keyed by
    layer index; `stats` holds the consumers' calibration statistics."""
    n = len(plan.roots)
    score = np.zeros(n, dtype=np.float64)
    if method == "pfp":
        for i, layer in enumerate(plan.layers):
            comps = plan.layer_in[i]
            st = stats.get(i)
            if comps is None or st is None or st.sensitivity is None:
                continue
            # per consumer, a component's positions (a head's dims, a flattened channel's
            # columns) add up: together they bound its share of that consumer's output
            here = np.zeros(n, dtype=np.float64)
            np.add.at(here, comps, per_position(layer, st.sensitivity.max(axis=0), "max"))
            np.maximum(score, here, out=score)
        return score
    if method == "act":
        for i, layer in enumerate(plan.layers):
            comps = plan.layer_in[i]
            st = stats.get(i)
            if comps is None or st is None:
                continue
            rows = layer_rows(layer, weights[i]).astype(np.float64)
            points = max(st.points, 1)
            sq = np.asarray(st.input_sqnorm[0], dtype=np.float64) / points
            mean = st.input_sum[0] / points if st.input_sum is not None else np.zeros_like(sq)
            fluct = np.maximum(sq - mean**2, 0.0) * (rows**2).sum(axis=0)
            total = fluct.sum()
            if total > 0:
                np.add.at(score, comps, per_position(layer, fluct / total, "sum"))
        return score
    if method == "l1":
        for i, layer in enumerate(plan.layers):
            comps = plan.layer_out[i]
            if comps is None:
                continue
            np.add.at(score, comps, np.abs(layer_rows(layer, weights[i])).sum(axis=1))
        for group in plan.groups:
            total = score[group.components].sum()
            if total > 0:
                score[group.components] /= total
        return score
    raise ValueError(f"unknown score {method!r}; expected one of {SCORES}")


def scored_groups(plan: Plan, stats: Mapping[int, LayerStatistics]) -> set[int]:
    """Groups that have a consumer layer (whose statistics score and refit them)."""
    consumed = set()
    for i, comps in enumerate(plan.layer_in):
        if comps is not None and i in stats:
            consumed.update(plan.group_of[np.unique(comps)].tolist())
    return consumed
