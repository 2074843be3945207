"""Which components to remove for one global target, spread unevenly across groups.

Every group is cut in steps that keep its channel count a multiple of `multiple` (8 by default:
odd counts make ONNX Runtime and TensorRT kernels slower), from its least important components
up. Each step costs the summed scores of what it removes (a relative error: see `scores`) and
saves the MACs (or parameters) the layers it touches lose. A greedy pass takes, each time, the
step that costs least per MAC saved, anywhere in the model, re-pricing a step when earlier
removals changed its savings (a consumer's MACs shrink with its producer's), until the target is
met: the Lagrangian choice for "the least summed error for the MACs removed". A group always keeps
at least one multiple; frozen components are never removed.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import numpy as np

from .groups import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    keep: np.ndarray
    """Boolean per component."""
    before: int
    after: int
    """MACs (or parameters) of the weight layers, dense and pruned."""
    target: str


def _cost_fn(plan: Plan, target: str):  # type: ignore[no-untyped-def]
    return plan.layer_macs if target == "macs" else plan.layer_params


def allocate(
    plan: Plan,
    scores: np.ndarray,
    sparsity: float,
    target: str = "macs",
    multiple: int = 8,
    allowed: set[int] | None = None,
) -> Allocation:
    """Remove components until at least `sparsity` of the weight layers' MACs (or parameters,
    `target='params'`) is gone, or nothing more can be removed. `allowed`: groups that may be
    cut (default: every prunable group)."""
    cost = _cost_fn(plan, target)
    keep = plan.all_kept()
    n_layers = len(plan.layers)
    per_layer = np.array([cost(keep, i) for i in range(n_layers)], dtype=np.int64)
    before = int(per_layer.sum())
    goal = before * (1.0 - sparsity)
    current = before
    orders: dict[int, np.ndarray] = {}
    steps: dict[int, int] = {}
    chunk: dict[int, int] = {}
    for group in plan.groups:
        if not group.prunable or (allowed is not None and group.index not in allowed):
            continue
        removable = group.components[~plan.frozen[group.components]]
        order = removable[np.argsort(scores[removable], kind="stable")]
        orders[group.index] = order
        chunk[group.index] = max(1, -(-multiple // group.width))
        steps[group.index] = 0

    def step_of(g: int) -> np.ndarray | None:
        """The next components group g would lose: down to the next multiple of its chunk."""
        group = plan.groups[g]
        m = chunk[g]
        done = steps[g]
        kept_now = group.size - done
        floor_keep = max(m, group.frozen)
        next_keep = ((kept_now - 1) // m) * m
        if next_keep < floor_keep:
            return None
        count = kept_now - next_keep
        order = orders[g]
        if done + count > len(order):
            return None
        return order[done : done + count]

    def price(g: int) -> tuple[float, np.ndarray, dict[int, int]] | None:
        comps = step_of(g)
        if comps is None:
            return None
        keep[comps] = False
        touched = plan.groups[g].layers
        after = {i: cost(keep, i) for i in touched}
        keep[comps] = True
        saved = sum(int(per_layer[i]) - after[i] for i in touched)
        if saved <= 0:
            return None
        return float(scores[comps].sum()) / saved, comps, after

    heap: list[tuple[float, int]] = []
    for g in orders:
        priced = price(g)
        if priced is not None:
            heapq.heappush(heap, (priced[0], g))
    while heap and current > goal:
        value, g = heapq.heappop(heap)
        priced = price(g)
        if priced is None:
            continue
        if priced[0] > value * (1 + 1e-9) and heap and priced[0] > heap[0][0]:
            heapq.heappush(heap, (priced[0], g))  # its savings changed: re-queue at its price
            continue
        _, comps, after = priced
        keep[comps] = False
        steps[g] += len(comps)
        for i, value_after in after.items():
            current -= int(per_layer[i]) - value_after
            per_layer[i] = value_after
        again = price(g)
        if again is not None:
            heapq.heappush(heap, (again[0], g))
    if current > goal:
        log.warning(
            "structured target not reached: %.1f%% of the %s removed (asked %.1f%%); the rest is frozen "
            "or at its group's minimum",
            100 * (1 - current / before) if before else 0.0,
            target,
            100 * sparsity,
        )
    return Allocation(keep, before, current, target)
