"""Selection methods: exact budgets, Det top-k, Rand unbiasedness, reproducibility, nesting."""

import numpy as np
import pytest

from sipp_onnx.select import WeightScores, budget, row_top, select


def make_weights(seed=0, shapes=((12, 30), (8, 12), (5, 8)), zeros=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for i, (n, k) in enumerate(shapes):
        w = rng.normal(size=(n, k)).astype(np.float32)
        if zeros:
            w[rng.random(w.shape) < zeros] = 0
        s = (rng.random((n, k)) ** 2 / k * 3).astype(np.float32) * (w != 0)
        out.append(WeightScores(w, s, rng.random((n, k)) + 0.1, patches=1 + i, kernel_size=1 + 2 * i))
    return out


def zeros_fraction(selected):
    total = sum(s.rows.size for s in selected)
    return sum(int(np.count_nonzero(s.rows == 0)) for s in selected) / total


METHODS = ["sipp-det", "sipp-rand", "sipp-hybrid", "magnitude", "wanda"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_every_method_reaches_the_target(method, sparsity):
    selected = select(make_weights(), method, sparsity, seed=3)
    assert abs(zeros_fraction(selected) - sparsity) <= 0.005


@pytest.mark.parametrize("method", METHODS)
def test_existing_zeros_count_and_stay_zero(method):
    weights = make_weights(zeros=0.2)
    selected = select(weights, method, 0.5, seed=1)
    assert abs(zeros_fraction(selected) - 0.5) <= 0.005
    for w, s in zip(weights, selected, strict=True):
        assert np.all(s.rows[w.rows == 0] == 0)
        # A kept weight never changes sign (the two sign parts never mix).
        nz = s.rows != 0
        assert np.all(np.sign(s.rows[nz]) == np.sign(w.rows[nz]))


def test_det_keeps_the_global_top_sensitivities_unchanged():
    weights = make_weights()
    selected = select(weights, "sipp-det", 0.6)
    all_s = np.concatenate([w.sensitivity.ravel() for w in weights])
    keep = budget(all_s.size, 0.6)
    threshold = np.sort(all_s)[::-1][keep - 1]
    for w, s in zip(weights, selected, strict=True):
        kept = s.rows != 0
        np.testing.assert_array_equal(s.rows[kept], w.rows[kept])
        assert np.all(w.sensitivity[kept] >= threshold)
        assert np.all(w.sensitivity[~kept] <= threshold)
    assert sum(int(np.count_nonzero(s.rows)) for s in selected) == keep


def test_det_bound_is_the_largest_pruned_sensitivity_sum():
    weights = make_weights()
    for w, s in zip(weights, select(weights, "sipp-det", 0.5), strict=True):
        pruned = np.where(s.rows == 0, w.sensitivity, 0).astype(np.float64)
        parts = [np.where(w.rows > 0, pruned, 0).sum(1), np.where(w.rows < 0, pruned, 0).sum(1)]
        assert s.bound == pytest.approx(max(p.max() for p in parts))


def test_magnitude_is_global_top_abs():
    weights = make_weights()
    selected = select(weights, "magnitude", 0.5)
    all_w = np.abs(np.concatenate([w.rows.ravel() for w in weights]))
    threshold = np.sort(all_w)[::-1][budget(all_w.size, 0.5) - 1]
    for w, s in zip(weights, selected, strict=True):
        kept = s.rows != 0
        assert np.all(np.abs(w.rows[kept]) >= threshold)
        assert np.all(np.abs(w.rows[~kept]) <= threshold)


def test_wanda_is_per_row_top_k_of_its_score():
    weights = make_weights(shapes=((10, 20), (6, 20)))
    selected = select(weights, "wanda", 0.5)
    for w, s in zip(weights, selected, strict=True):
        score = np.abs(w.rows) * np.sqrt(w.input_sqnorm)
        for i in range(w.rows.shape[0]):
            kept = s.rows[i] != 0
            assert kept.sum() == 10  # exactly half of each 20-long row
            assert score[i][kept].min() >= score[i][~kept].max()


@pytest.mark.parametrize("method", ["sipp-rand", "sipp-hybrid"])
def test_sampling_is_reproducible_per_seed(method):
    weights = make_weights()
    a = select(weights, method, 0.6, seed=7)
    b = select(weights, method, 0.6, seed=7)
    c = select(weights, method, 0.6, seed=8)
    assert all(np.array_equal(x.rows, y.rows) for x, y in zip(a, b, strict=True))
    if sum(x.sampled_row_parts for x in a):
        assert not all(np.array_equal(x.rows, y.rows) for x, y in zip(a, c, strict=True))


def test_rand_kept_sets_are_nested_across_sparsities():
    """The kept set only grows with the budget: the smoothness the budget search relies on."""
    weights = make_weights()
    previous = None
    for sparsity in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4):
        masks = [s.rows != 0 for s in select(weights, "sipp-rand", sparsity, seed=5)]
        if previous is not None:
            assert all(np.all(p <= m) for p, m in zip(previous, masks, strict=True))
        previous = masks


def test_rand_is_unbiased_per_weight():
    """E[new w_j] = w_j for every weight of a sampled row part (mean over seeds)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 12)).astype(np.float32)
    s = (rng.random((3, 12)) + 0.05).astype(np.float32) / 12
    weights = [WeightScores(w, s, np.ones_like(w))]
    draws = np.stack([select(weights, "sipp-rand", 0.6, seed=seed)[0].rows for seed in range(600)])
    mean = draws.mean(axis=0)
    stderr = draws.std(axis=0) / np.sqrt(len(draws))
    sampled = draws.std(axis=0) > 0
    assert sampled.sum() > 20
    z = np.abs(mean - w)[sampled] / np.maximum(stderr[sampled], 1e-12)
    assert np.mean(z < 3.5) > 0.97


def test_hybrid_chooses_det_for_concentrated_and_sampling_for_flat_rows():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 40)).astype(np.float32)
    concentrated = np.full(w.shape, 1e-6, np.float32)
    concentrated[:, :3] = 0.3  # a few weights carry each row
    det = select([WeightScores(w, concentrated, np.ones_like(w))], "sipp-hybrid", 0.5, seed=0)[0]
    assert det.sampled_row_parts == 0
    kept = det.rows != 0
    np.testing.assert_array_equal(det.rows[kept], w[kept])
    # Flat sensitivities over long rows: the sampling bound eps(m) ~ 90 S/m beats the
    # deterministic 3 * (tail sum) once m is large.
    wide = rng.normal(size=(4, 1200)).astype(np.float32)
    flat = np.full(wide.shape, 1e-3, np.float32)
    sampled = select([WeightScores(wide, flat, np.ones_like(wide))], "sipp-hybrid", 0.5, seed=0)[0]
    assert sampled.sampled_row_parts > 0
    assert np.any((sampled.rows != 0) & (sampled.rows != wide))  # rescaled by the estimator


def test_layer_floor_keeps_a_share_of_a_layer_the_threshold_would_wipe_out():
    rng = np.random.default_rng(0)
    big = WeightScores(rows=rng.normal(size=(20, 50)), sensitivity=rng.uniform(0.5, 1.0, size=(20, 50)))
    small = WeightScores(rows=rng.normal(size=(10, 10)), sensitivity=rng.uniform(0.0, 0.01, size=(10, 10)))
    plain = select([big, small], "sipp-det", 0.5)
    assert plain[1].kept == 0  # every score of `small` is below every score of `big`
    floored = select([big, small], "sipp-det", 0.5, layer_floor=0.5)
    keep = budget(1100, 0.5)
    assert floored[0].kept + floored[1].kept == keep
    assert floored[1].kept == int(np.ceil(0.5 * keep / 1100 * 100))  # half the average density
    # the floor keeps the layer's own best entries
    kept = floored[1].rows != 0
    assert small.sensitivity[kept].min() >= small.sensitivity[~kept].max()
    for method in ("magnitude", "sipp-det"):
        off = select([big, small], method, 0.5, layer_floor=0.0)
        same = select([big, small], method, 0.5)
        assert all(np.array_equal(a.rows, b.rows) for a, b in zip(off, same, strict=True))


def slow_row_top(score, tiebreak, k):
    """One row at a time: sort by (score desc, tiebreak desc, position asc), keep the first k."""
    mask = np.zeros(score.shape, dtype=bool)
    for i in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda j: (-score[i, j], -tiebreak[i, j], j))
        mask[i, order[: max(0, int(k[i]))]] = True
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_row_top_equals_a_full_sort_per_row_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, width = 40, 9
    # Few distinct values, so many rows have ties at their threshold.
    score = rng.integers(0, 4, size=(n, width)).astype(np.float64)
    tiebreak = rng.integers(0, 3, size=(n, width)).astype(np.float64)
    k = rng.integers(-1, width + 2, size=n)
    np.testing.assert_array_equal(row_top(score, tiebreak, k), slow_row_top(score, tiebreak, k))
    unique = rng.permutation(n * width).reshape(n, width).astype(np.float64)
    np.testing.assert_array_equal(row_top(unique, tiebreak, k), slow_row_top(unique, tiebreak, k))


def _slow_global_top(keys, weights, keep, floors=None):
    """The rule written out: one sorted list over every weight (key desc, |w| desc, position)."""
    entries = []
    position = 0
    for i, (key, w) in enumerate(zip(keys, weights, strict=True)):
        order = "F" if w.flags.f_contiguous and not w.flags.c_contiguous else "C"  # memory order
        for j, (k, v) in enumerate(zip(key.ravel(order), w.ravel(order), strict=True)):
            if v != 0:
                entries.append((i, j, float(k), abs(float(v)), position + j))
        position += w.size
    keep = min(keep, len(entries))
    reserved = set()
    for i, floor in enumerate(floors or ()):
        mine = sorted((e for e in entries if e[0] == i), key=lambda e: (-e[2], -e[3], e[4]))
        reserved |= {(e[0], e[1]) for e in mine[: min(floor, len(mine), keep)]}
    order = sorted(
        entries,
        key=lambda e: (
            (e[0], e[1]) not in reserved,
            -e[2] if (e[0], e[1]) not in reserved else 0,
            -e[3],
            e[4],
        ),
    )
    masks = [np.zeros(w.shape, dtype=bool, order="F" if w.flags.f_contiguous else "C") for w in weights]
    for i, j, *_ in order[:keep]:
        masks[i].reshape(-1, order="F" if masks[i].flags.f_contiguous else "C")[j] = True
    return masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("floors", [None, "some", "all"])
def test_global_top_equals_one_sorted_list(seed, floors):
    """The radix select over the weights (no concatenation) against a plain sort, with ties in
    keys and magnitudes, zero weights, -0.0 keys, a transposed view, and floors that fill part or
    all of the budget."""
    from sipp_onnx.select import _global_top

    rng = np.random.default_rng(seed)
    shapes = [(7, 9), (4, 13), (1, 5), (6, 6)]
    weights = [rng.choice([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], size=s).astype(np.float32) for s in shapes]
    keys = [rng.choice([0.0, -0.0, 0.25, 0.5, 1e-30, 7.0, 1e300], size=s) for s in shapes]
    keys[1] = rng.random(shapes[1]).astype(np.float32)  # float32 keys are widened exactly
    # A transposed view (a MatMul's rows): ties go by its memory order, the stored tensor's.
    weights[3], keys[3] = weights[3].T.copy().T, keys[3].T.copy().T
    with np.errstate(over="ignore"):
        narrow = [k.astype(np.float32) for k in keys]  # 1e300 -> inf, 1e-30 stays: still ordered
    total = sum(w.size for w in weights)
    for keep in (0, 1, 17, total // 2, total - 3, total + 5):
        floor = None if floors is None else [3, 0, 2, 5] if floors == "some" else [keep] * 4
        want = _slow_global_top(keys, weights, keep, floor)
        for g, w in zip(_global_top(keys.__getitem__, weights, keep, floor), want, strict=True):
            np.testing.assert_array_equal(g, w)
        want = _slow_global_top(narrow, weights, keep, floor)
        for g, w in zip(_global_top(narrow.__getitem__, weights, keep, floor, True), want, strict=True):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("method", ["sipp-det", "magnitude", "wanda"])
def test_in_place_selection_equals_the_copy(method):
    """In place, the given rows are the result; counts and bounds are taken before zeroing."""
    copied = select(make_weights(zeros=0.1), method, 0.6, layer_floor=0.25)
    weights = make_weights(zeros=0.1)
    in_place = select(weights, method, 0.6, layer_floor=0.25, in_place=True)
    for c, p, w in zip(copied, in_place, weights, strict=True):
        assert p.rows is w.rows
        np.testing.assert_array_equal(c.rows, p.rows)
        assert (c.kept, c.bound) == (p.kept, p.bound)
