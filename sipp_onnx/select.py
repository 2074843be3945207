"""From scores to kept weights: SiPP-Det/-Rand/-Hybrid (spec section 4) and the baselines.

All methods work on the canonical rows `[N, K]` of every prunable weight at once and return new
rows. `keep = round((1 - sparsity) * total)` weights stay non-zero over all weights together.
Deterministic methods keep values unchanged; Rand rescales sampled weights to keep every row
part's pre-activation unbiased.

Sampling (Rand, and Hybrid's sampled row parts) is Poissonized: a row part with draw rate n
keeps weight j iff `E_j <= n p_j`, with one Exp(1) variable `E_j` per weight from a generator
seeded by (seed, weight index). That is exactly sampling Poisson(n) indices i.i.d. from p, the
spec's with-replacement sampling with a Poisson number of draws; it costs O(row) however large n
is, every weight's inclusion is independent, and the kept set only grows with n. So the kept
count moves smoothly and monotonically with the budget (the search below relies on it) and the
same seed gives the same model. A kept weight's count is `1 + Poisson(n p_j - E_j)` (the
arrivals after its first one), and its new value `w_j * count_j / (n p_j)` has expectation
`w_j`. Each weight belongs to exactly one sign part, so the two parts of a row are computed
element-wise side by side and never overwrite each other.

This module imports numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from .allocation import a_coefficient, allocate, draws_for_distinct, eps_bound
from .budgets import ErrorCurve, bound_keys, counts_from_curves, floor_counts
from .pattern import Pattern, group_mask, pattern_problem


@dataclass(frozen=True)
class WeightScores:
    """Inputs of the selection for one prunable weight, in canonical rows `[N, K]`."""

    rows: np.ndarray
    sensitivity: np.ndarray | None = None
    input_sqnorm: np.ndarray | None = None
    patches: int = 1
    """L of the layer (1 for Gemm/MatMul)."""
    kernel_size: int = 1
    """prod(kernel_shape) for Conv, 1 for Gemm/MatMul."""


@dataclass(frozen=True)
class SelectedWeight:
    """New canonical rows of one weight and what the selection says about them."""

    rows: np.ndarray
    kept: int
    bound: float | None
    """Largest error bound over the weight's row parts (spec section 5): the sum of pruned
    sensitivities for deterministic masks, eps_r(m_r) for sampled row parts; None without
    sensitivities."""
    sampled_row_parts: int = 0
    ranking: str | None = None
    """Set when the error allocation pruned this weight in another order than the method's own
    ('wanda': its measured error was lower at this count; see `budgets.ErrorCurve`)."""


def budget(total: int, sparsity: float) -> int:
    """Number of weights to keep for a target sparsity."""
    return int(round((1.0 - sparsity) * total))


def _det_bound(sens: np.ndarray | None, rows: np.ndarray, keep: np.ndarray) -> float | None:
    """max over row parts of the summed sensitivity of pruned weights."""
    if sens is None:
        return None
    pruned = np.where(keep, 0.0, sens.astype(np.float64))
    pos = np.where(rows > 0, pruned, 0.0).sum(axis=1)
    neg = np.where(rows < 0, pruned, 0.0).sum(axis=1)
    return float(max(pos.max(initial=0.0), neg.max(initial=0.0)))


def _top(key: np.ndarray, absw: np.ndarray, keep: int) -> np.ndarray:
    """Mask of the `keep` largest `key` entries (ties: larger `absw`, then earlier position).

    A partition finds the keep-th largest key in O(n); only the entries tied with it are sorted,
    which gives the same set as a full lexicographic sort.
    """
    mask = np.zeros(key.shape, dtype=bool)
    if keep <= 0:
        return mask
    threshold = np.partition(key, key.size - keep)[key.size - keep]
    mask = key > threshold
    tied = np.flatnonzero(key == threshold)
    need = keep - int(mask.sum())
    mask[tied[np.lexsort((tied, -absw[tied]))[:need]]] = True
    return mask


def _global_top(
    key_of: Callable[[int], np.ndarray],
    weights: Sequence[np.ndarray],
    keep: int,
    floors: Sequence[int] | None = None,
    narrow: bool = False,
) -> list[np.ndarray]:
    """Masks keeping the `keep` largest keys over all weights (ties: larger |w| first, then the
    earlier position: weight by weight, each in its memory order, which is the stored tensor's
    order for the row views of `layers.to_rows`). Zero weights are never kept.

    `key_of(i)` gives weight i's non-negative keys, in weight i's layout; it is called a few
    times per weight instead of concatenating every key (the concatenation, its float64 copy and
    a partition of it cost 30 bytes per parameter: 19 GB at 625 M). The threshold is found by a
    radix select on the keys' bit patterns (monotone for non-negative floats), 16 bits per pass
    over the weights: float64 keys, or float32 ones with `narrow` (exact when every key is
    float32: half the passes). Arrays are walked in memory order, so a transposed view is
    never copied. `floors[i]`: weight i keeps at least its own top `floors[i]` entries whatever
    the global threshold says (one threshold alone can wipe out a layer whose scores are
    uniformly small).
    """
    orders = [_memory_order(w) for w in weights]

    def flat(x: np.ndarray, i: int) -> np.ndarray:
        return x.reshape((-1,), order=orders[i])

    live = [int(np.count_nonzero(w)) for w in weights]
    keep = min(keep, sum(live))
    masks = [np.zeros(w.shape, dtype=bool, order=o) for w, o in zip(weights, orders, strict=True)]
    if keep <= 0:
        return masks
    for i, floor in enumerate(floors or ()):
        take = min(floor, live[i], keep)
        if take > 0:
            key = flat(_live_key(key_of(i), weights[i], np.float64), i)
            flat(masks[i], i)[:] = _top(key, np.abs(flat(weights[i], i)), take)
    need = keep - sum(int(m.sum()) for m in masks)

    def settle(tied: list[tuple[int, np.ndarray]], count: int) -> list[np.ndarray]:
        flat_masks = [flat(m, i) for i, m in enumerate(masks)]
        _take_ties(flat_masks, [flat(w, i) for i, w in enumerate(weights)], tied, count)
        return masks

    if need <= 0:  # the floors alone fill the budget: the reserved entries tie at the top
        reserved = [(i, np.flatnonzero(flat(m, i))) for i, m in enumerate(masks)]
        masks = [np.zeros_like(m) for m in masks]
        return settle(reserved, keep)

    ftype, utype = (np.float32, np.uint32) if narrow else (np.float64, np.uint64)
    width = 32 if narrow else 64

    def candidates(i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Weight i's keys as flat bits, and which entries compete for the threshold (None: all)."""
        key = np.add(key_of(i), ftype(0.0), dtype=ftype)  # -0.0 -> +0.0: bit order is value order
        compete = flat(weights[i], i) != 0
        if floors:
            compete &= ~flat(masks[i], i)
        return flat(key, i).view(utype), None if compete.all() else compete

    prefix, remaining = 0, need
    for shift in range(width - 16, -1, -16):
        counts = np.zeros(1 << 16, dtype=np.int64)
        for i in range(len(weights)):
            bits, compete = candidates(i)
            chosen = bits if compete is None else bits[compete]
            if shift < width - 16:
                chosen = chosen[(chosen >> utype(shift + 16)) == utype(prefix)]
            digits = chosen >> utype(shift)
            if shift < width - 16:  # the top digit is all that is left after the shift
                digits &= utype(0xFFFF)
            counts += np.bincount(digits, minlength=1 << 16)
        from_top = np.cumsum(counts[::-1])
        j = int(np.searchsorted(from_top, remaining))
        remaining -= int(from_top[j - 1]) if j > 0 else 0
        prefix = (prefix << 16) | (0xFFFF - j)
    threshold = utype(prefix)
    tied: list[tuple[int, np.ndarray]] = []
    for i in range(len(weights)):
        bits, compete = candidates(i)
        above, equal = bits > threshold, bits == threshold
        if compete is not None:
            above &= compete
            equal &= compete
        flat(masks[i], i)[:] |= above
        tied.append((i, np.flatnonzero(equal)))
    return settle(tied, remaining)


def _memory_order(array: np.ndarray) -> Literal["C", "F"]:
    """'F' for a Fortran-ordered array (a transposed view), else 'C'."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def _live_key(key: np.ndarray, weight: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """Keys as `dtype` (a new array: -0.0 made +0.0, so bit order is value order); zero weights -inf."""
    out = np.add(key, dtype(0.0), dtype=dtype)
    out[weight == 0] = -np.inf
    return out


def _take_ties(
    masks: list[np.ndarray], weights: list[np.ndarray], tied: list[tuple[int, np.ndarray]], count: int
) -> None:
    """Set `count` of the tied entries (weight i, flat positions) in the flat `masks`: larger |w|
    first, then the earlier position."""
    if count <= 0:
        return
    which = np.concatenate([np.full(pos.size, i) for i, pos in tied])
    where = np.concatenate([pos for _, pos in tied])
    magnitude = np.concatenate([np.abs(weights[i][pos]) for i, pos in tied])
    order = np.lexsort((where, which, -magnitude))[:count]
    for i in np.unique(which[order]):
        masks[i][where[order][which[order] == i]] = True


def select_global(
    weights: Sequence[WeightScores], keep: int, by: str, layer_floor: float = 0.0, in_place: bool = False
) -> list[SelectedWeight]:
    """SiPP-Det (`by='sensitivity'`), SiPP-Det with the shared-eps allocation (`by='bound'`:
    see `budgets.bound_keys`) or global magnitude pruning (`by='magnitude'`).

    With `layer_floor` f, every weight keeps at least f times the average kept fraction.
    """
    rows = [w.rows for w in weights]
    if by == "sensitivity":
        scores = [_require(w.sensitivity, "sensitivity") for w in weights]

        def key_of(i: int) -> np.ndarray:
            return scores[i]
    elif by == "bound":
        scores = [_require(w.sensitivity, "sensitivity") for w in weights]

        def key_of(i: int) -> np.ndarray:
            return bound_keys(scores[i], np.abs(rows[i]))
    else:
        scores = rows

        def key_of(i: int) -> np.ndarray:
            return np.abs(rows[i])

    narrow = by != "bound" and all(score.dtype == np.float32 for score in scores)
    floors = floor_counts([r.size for r in rows], keep, layer_floor)
    masks = _global_top(key_of, rows, keep, floors, narrow)
    out = []
    for w, m in zip(weights, masks, strict=True):
        kept, bound = int(np.count_nonzero(m & (w.rows != 0))), _det_bound(w.sensitivity, w.rows, m)
        out.append(SelectedWeight(_masked(w.rows, m, in_place), kept, bound))  # masked last: in place
    return out


def pattern_score(w: WeightScores, method: str) -> np.ndarray:
    """What an N:M group keeps the top of: the sensitivity for the SiPP methods (the pattern
    fixes every group's count, so nothing is left to sample), |w| for magnitude, and Wanda's
    |w| * ||x||."""
    if method.startswith("sipp"):
        return _require(w.sensitivity, "sensitivity")
    if method == "wanda":
        return np.abs(w.rows).astype(np.float64) * np.sqrt(_require(w.input_sqnorm, "input norm"))
    if method == "magnitude":
        return np.abs(w.rows)
    raise ValueError(f"unknown method {method!r}")


def select_pattern(
    weights: Sequence[WeightScores], method: str, pattern: Pattern, in_place: bool = False
) -> list[SelectedWeight]:
    """Keep the `pattern.n` highest scores of every group of `pattern.m` weights along each
    weight's reduction axis; a weight the pattern does not fit is returned unchanged."""
    out = []
    for w in weights:
        if pattern_problem(w.rows.shape[1], w.kernel_size, pattern):
            out.append(SelectedWeight(w.rows, int(np.count_nonzero(w.rows)), None))
            continue
        mask = group_mask(pattern_score(w, method), np.abs(w.rows), w.kernel_size, pattern)
        mask &= w.rows != 0
        kept, bound = int(mask.sum()), _det_bound(w.sensitivity, w.rows, mask)
        out.append(SelectedWeight(_masked(w.rows, mask, in_place), kept, bound))
    return out


def _masked(rows: np.ndarray, keep: np.ndarray, in_place: bool) -> np.ndarray:
    """`rows` with the entries outside `keep` zeroed: a copy, or `rows` itself."""
    if in_place and rows.flags.writeable:
        rows[~keep] = 0
        return rows
    return np.where(keep, rows, 0).astype(rows.dtype, copy=False)


def _require(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"this method needs {what} statistics")
    return value


def _row_ranks(score: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Rank of each element within its row by descending score (ties: larger tiebreak)."""
    order = np.lexsort((-tiebreak, -score), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(score.shape[1])[None, :].repeat(score.shape[0], 0), axis=1)
    return ranks


def row_top(score: np.ndarray, tiebreak: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Mask of the `k[i]` largest entries of each row `i` of `score` (ties: larger `tiebreak`,
    then earlier position): the same mask as ranking every row with `_row_ranks`.

    A partition per distinct `k` finds each row's k-th largest score in O(K); only rows with
    ties at that threshold are ranked in full. On ResNet-50's 25 M weights this is about 5x
    faster than sorting every row.
    """
    n, width = score.shape
    k = np.clip(np.asarray(k, dtype=np.int64), 0, width)
    mask = np.zeros(score.shape, dtype=bool)
    mask[k >= width] = True
    inner = np.flatnonzero((k > 0) & (k < width))
    if inner.size == 0:
        return mask
    kth = np.unique(width - k[inner])
    part = np.partition(score[inner], kth, axis=1)
    threshold = part[np.arange(inner.size), width - k[inner]][:, None]
    sub = score[inner]
    above = sub > threshold
    tied = sub == threshold
    need = k[inner] - above.sum(axis=1)
    exact = tied.sum(axis=1) == need  # every tied entry is kept: no tie to break
    chosen = above | (tied & exact[:, None])
    ambiguous = np.flatnonzero(~exact)
    if ambiguous.size:
        rows = inner[ambiguous]
        chosen[ambiguous] = _row_ranks(score[rows], tiebreak[rows]) < k[rows][:, None]
    mask[inner] = chosen
    return mask


def select_wanda(weights: Sequence[WeightScores], keep: int, in_place: bool = False) -> list[SelectedWeight]:
    """Wanda: score |w_ij| * ||X_j||_2, top-k within each output row.

    Per-row counts follow the global keep fraction with the largest-remainder rule, so the total
    kept is exactly `keep` (as long as rows have enough non-zero weights).
    """
    total = sum(w.rows.size for w in weights)
    fraction = keep / total if total else 0.0
    lengths = np.concatenate([np.full(w.rows.shape[0], w.rows.shape[1]) for w in weights])
    ideal = fraction * lengths
    counts = np.floor(ideal).astype(np.int64)
    extra = keep - int(counts.sum())
    if extra > 0:
        order = np.argsort(-(ideal - counts), kind="stable")
        counts[order[:extra]] += 1
    results, start = [], 0
    for w in weights:
        n = w.rows.shape[0]
        k = counts[start : start + n]
        start += n
        absw = np.abs(w.rows).astype(np.float64)
        score = absw * np.sqrt(_require(w.input_sqnorm, "input norm"))
        score = np.where(absw > 0, score, -1.0)  # zero weights last
        mask = row_top(score, absw, k)
        mask &= w.rows != 0
        bound = _det_bound(w.sensitivity, w.rows, mask)
        results.append(SelectedWeight(_masked(w.rows, mask, in_place), int(mask.sum()), bound))
    return results


@dataclass
class _RowParts:
    """Per-weight row-part quantities for Rand/Hybrid (index 0: positive part, 1: negative)."""

    rows: np.ndarray
    sens: np.ndarray
    part_of: list[np.ndarray]  # boolean [N, K] membership masks per sign
    sums: np.ndarray  # [2, N] S_r
    nnz: np.ndarray  # [2, N]
    support: np.ndarray  # [2, N] weights with s > 0
    a: np.ndarray  # [2, N]
    exp_draws: np.ndarray  # [N, K] E_j ~ Exp(1)
    rng_counts: np.random.Generator


def _row_parts(w: WeightScores, index: int, seed: int) -> _RowParts:
    sens = _require(w.sensitivity, "sensitivity").astype(np.float64)
    parts = [w.rows > 0, w.rows < 0]
    sums = np.stack([np.where(p, sens, 0).sum(axis=1) for p in parts])
    nnz = np.stack([p.sum(axis=1) for p in parts]).astype(np.float64)
    support = np.stack([(p & (sens > 0)).sum(axis=1) for p in parts]).astype(np.float64)
    a = a_coefficient(sums, w.patches, w.kernel_size)
    rng = np.random.default_rng([seed, index, 0])
    exp_draws = rng.standard_exponential(size=w.rows.shape)
    return _RowParts(
        w.rows, sens, parts, sums, nnz, support, a, exp_draws, np.random.default_rng([seed, index, 1])
    )


def _sample(rp: _RowParts, m: np.ndarray, sampled: np.ndarray, final: bool) -> tuple[np.ndarray, np.ndarray]:
    """Poissonized sampling of the row parts flagged in `sampled` ([2, N]) with targets m.

    Returns the kept mask and (when `final`) the new values for all elements of sampled parts.
    Row parts whose target reaches their support are kept unchanged by the caller.
    """
    n_rows, k = rp.rows.shape
    keep = np.zeros((n_rows, k), dtype=bool)
    values = np.zeros((n_rows, k), dtype=np.float64)
    for sign in (0, 1):
        rows_idx = np.flatnonzero(sampled[sign])
        if rows_idx.size == 0:
            continue
        member = rp.part_of[sign][rows_idx]
        s = np.where(member, rp.sens[rows_idx], 0.0)
        p = s / rp.sums[sign, rows_idx][:, None]
        n = draws_for_distinct(p, m[sign, rows_idx])
        rate = n[:, None] * p
        hit = member & (rp.exp_draws[rows_idx] <= rate)
        keep[rows_idx] |= hit
        if final:
            extra = rp.rng_counts.poisson(np.where(hit, rate - rp.exp_draws[rows_idx], 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                scaled = rp.rows[rows_idx] * (1.0 + extra) / rate
            values[rows_idx] = np.where(hit, scaled, values[rows_idx])
    return keep, values


def _det_topm(rp: _RowParts, m_int: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic top-m per row part: kept mask and the part's tail sum `sum_{j not in top m} s`."""
    keep = np.zeros(rp.rows.shape, dtype=bool)
    tails = np.zeros_like(rp.sums)
    absw = np.abs(rp.rows).astype(np.float64)
    for sign in (0, 1):
        member = rp.part_of[sign]
        score = np.where(member, rp.sens, -np.inf)
        top = member & row_top(score, absw, m_int[sign])
        keep |= top
        tails[sign] = rp.sums[sign] - np.where(top, rp.sens, 0).sum(axis=1)
    return keep, tails


def select_sampled(
    weights: Sequence[WeightScores], keep: int, seed: int, hybrid: bool
) -> list[SelectedWeight]:
    """SiPP-Rand (`hybrid=False`) or SiPP-Hybrid, reaching `keep` within a small tolerance.

    The allocation budget is searched (bisection) until the realised kept count is within
    0.1 % of the total of the target; the realised count is monotone in the budget for Rand.
    """
    parts = [_row_parts(w, i, seed) for i, w in enumerate(weights)]
    total = sum(w.rows.size for w in weights)
    nnz_total = float(sum(rp.nnz.sum() for rp in parts))
    keep = min(keep, int(nnz_total))
    layer_weight = np.concatenate([np.full(rp.a.size, 1.0 / rp.rows.shape[0]) for rp in parts])
    a_all = np.concatenate([rp.a.ravel() for rp in parts])
    nnz_all = np.concatenate([rp.nnz.ravel() for rp in parts])

    def plan(alloc_budget: float, final: bool) -> tuple[int, list[SelectedWeight]]:
        m_all = allocate(a_all, layer_weight, nnz_all, alloc_budget)
        kept_total, results, start = 0, [], 0
        for rp in parts:
            m = m_all[start : start + rp.a.size].reshape(rp.a.shape)
            start += rp.a.size
            whole = (m >= rp.support - 0.5) & (rp.nnz > 0) & (m > 0)
            keep_mask = np.zeros(rp.rows.shape, dtype=bool)
            for sign in (0, 1):
                keep_mask |= rp.part_of[sign] & whole[sign][:, None]
            sampled = ~whole & (m > 0)
            bounds = np.where(whole, 0.0, eps_bound(rp.a, m))
            det_part = np.zeros_like(sampled)
            if hybrid:
                m_int = np.rint(m).astype(np.int64)
                det_keep, tails = _det_topm(rp, m_int)
                det_part = sampled & (3.0 * tails <= eps_bound(rp.a, np.maximum(m, 1.0)))
                for sign in (0, 1):
                    keep_mask |= det_keep & det_part[sign][:, None] & rp.part_of[sign]
                bounds = np.where(det_part, tails, bounds)
                sampled &= ~det_part
            hit, values = _sample(rp, m, sampled, final)
            keep_mask |= hit
            kept_total += int(keep_mask.sum())
            if final:
                sampled_el = np.zeros(rp.rows.shape, dtype=bool)
                for sign in (0, 1):
                    sampled_el |= rp.part_of[sign] & sampled[sign][:, None]
                new = np.where(sampled_el, values, np.where(keep_mask, rp.rows, 0.0))
                results.append(
                    SelectedWeight(
                        new.astype(rp.rows.dtype),
                        int(np.count_nonzero(new)),
                        float(bounds.max(initial=0.0)),
                        int(sampled.sum()),
                    )
                )
        return kept_total, results

    tolerance = max(1, int(0.001 * total))
    lo, hi = 0.0, nnz_total
    guess = float(keep)
    best_budget, best_err = guess, None
    for _ in range(40):
        kept, _unused = plan(guess, final=False)
        err = kept - keep
        if best_err is None or abs(err) < abs(best_err):
            best_budget, best_err = guess, err
        if abs(err) <= tolerance:
            break
        if err > 0:
            hi = guess
        else:
            lo = guess
        guess = 0.5 * (lo + hi)
    results = plan(best_budget, final=True)[1]
    return _fix_count(results, weights, keep, band=int(0.004 * total))


def _fix_count(
    results: list[SelectedWeight], weights: Sequence[WeightScores], keep: int, band: int
) -> list[SelectedWeight]:
    """Bring the kept count within `band` of `keep` when the search could not.

    On small models one row part switching to 'keep whole' moves the count by several weights,
    so no budget lands exactly. The surplus is dropped from the least sensitive kept weights;
    a deficit is filled with the most sensitive pruned ones at their original value.
    """
    kept = sum(int(np.count_nonzero(r.rows)) for r in results)
    error = kept - keep
    if abs(error) <= band:
        return results
    error -= band if error > 0 else -band
    rows = [r.rows.copy() for r in results]
    sens = np.concatenate([_require(w.sensitivity, "sensitivity").ravel() for w in weights]).astype(
        np.float64
    )
    new = np.concatenate([r.ravel() for r in rows])
    old = np.concatenate([w.rows.ravel() for w in weights])
    if error > 0:
        candidates = np.flatnonzero(new != 0)
        chosen = candidates[np.argsort(sens[candidates], kind="stable")[:error]]
        new[chosen] = 0
    else:
        candidates = np.flatnonzero((new == 0) & (old != 0))
        chosen = candidates[np.argsort(-sens[candidates], kind="stable")[:-error]]
        new[chosen] = old[chosen]
    out, start = [], 0
    for r in results:
        part = new[start : start + r.rows.size].reshape(r.rows.shape).astype(r.rows.dtype)
        start += r.rows.size
        out.append(SelectedWeight(part, int(np.count_nonzero(part)), r.bound, r.sampled_row_parts))
    return out


def select(
    weights: Sequence[WeightScores],
    method: str,
    sparsity: float,
    seed: int = 0,
    layer_floor: float = 0.0,
    in_place: bool = False,
    pattern: Pattern | None = None,
    allocation: str = "global",
    curves: Sequence[ErrorCurve] | None = None,
) -> list[SelectedWeight]:
    """Prune all `weights` together to `sparsity` with `method` (a `Method` value), or, with an
    N:M `pattern`, every weight it fits to that pattern (`sparsity` then unused).

    `allocation` (see `budgets`) applies to sipp-det, magnitude and wanda; sipp-rand and
    sipp-hybrid always split the budget by their own sampling bound. 'global': today's rule
    (one threshold; Wanda's uniform ratio); 'sipp': SiPP's shared eps (sipp-det only); 'error':
    per-tensor counts from each tensor's measured error curve (`curves`, in the method's own
    order, capped by the layer floor: see `budgets.refit_curve`), then the method within each."""
    if pattern is not None:
        return select_pattern(weights, method, pattern, in_place)
    keep = budget(sum(w.rows.size for w in weights), sparsity)
    if allocation == "global" or method in ("sipp-rand", "sipp-hybrid"):
        return select_count(weights, method, keep, seed, layer_floor, in_place)
    if allocation == "sipp":
        if method != "sipp-det":
            raise ValueError(f"the sipp allocation needs sipp-det's sensitivities, not {method}")
        return select_global(weights, keep, by="bound", layer_floor=layer_floor, in_place=in_place)
    if allocation != "error" or curves is None:
        raise ValueError(f"allocation {allocation!r} needs error curves" if curves is None else allocation)
    counts = counts_from_curves(curves, [w.rows for w in weights], keep)
    return select_counts(weights, method, counts, curves, seed, in_place)


def select_counts(
    weights: Sequence[WeightScores],
    method: str,
    counts: Sequence[int],
    curves: Sequence[ErrorCurve],
    seed: int = 0,
    in_place: bool = False,
) -> list[SelectedWeight]:
    """Keep `counts[i]` weights of each weight i by `method` within it; sipp-det's layers whose
    curve measured Wanda's order lower at that count (`ErrorCurve.prefers_alternative`) are
    pruned in Wanda's order, their SiPP bound computed for the mask chosen."""
    out = []
    for w, k, curve in zip(weights, counts, curves, strict=True):
        if curve.alternative is None or not curve.prefers_alternative(int(np.count_nonzero(w.rows)) - k):
            out.append(select_count([w], method, k, seed, 0.0, in_place)[0])
            continue
        signs = np.sign(w.rows).astype(np.int8)  # `in_place` zeroes w.rows; the bound needs signs
        sel = select_count([w], "wanda", k, seed, 0.0, in_place)[0]
        # The SiPP bound of the mask actually chosen, from the sensitivities.
        out.append(replace(sel, bound=_det_bound(w.sensitivity, signs, sel.rows != 0), ranking="wanda"))
    return out


def select_count(
    weights: Sequence[WeightScores],
    method: str,
    keep: int,
    seed: int = 0,
    layer_floor: float = 0.0,
    in_place: bool = False,
) -> list[SelectedWeight]:
    """Keep `keep` weights of all `weights` together with `method` (a `Method` value).
    `layer_floor` applies to the global-threshold methods (sipp-det, magnitude). `in_place`:
    the mask-only methods (sipp-det, magnitude, wanda) zero the pruned entries of the given
    rows themselves instead of copying them (a model's worth of memory less)."""
    if method == "sipp-det":
        return select_global(weights, keep, by="sensitivity", layer_floor=layer_floor, in_place=in_place)
    if method == "magnitude":
        return select_global(weights, keep, by="magnitude", layer_floor=layer_floor, in_place=in_place)
    if method == "wanda":
        return select_wanda(weights, keep, in_place)
    if method in ("sipp-rand", "sipp-hybrid"):
        return select_sampled(weights, keep, seed, hybrid=method == "sipp-hybrid")
    raise ValueError(f"unknown method {method!r}")
