"""The refit maths (sipp_onnx/refit.py) against direct least squares, and its guarantees."""

import numpy as np
import pytest
from builders import gaussian_calibration
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import naive_patches

from sipp_onnx.layers import ConvGeometry
from sipp_onnx.refit import (
    cholesky_lower,
    damped,
    inverse_cholesky_upper,
    refit_layer,
    solve_exact,
    solve_sweep,
    upper_inverse,
)
from sipp_onnx.sensitivity import ConvAccumulator, DenseAccumulator


def problem(n=6, k=9, points=40, keep_frac=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(points, k)) + 0.3  # non-zero mean: the bias refit has work to do
    w0 = rng.normal(size=(n, k))
    keep = rng.random((n, k)) < keep_frac
    keep[0] = True  # a row with nothing pruned
    keep[1] = False  # a row with nothing kept
    return x, w0, keep


def lstsq_rows(x, w0, keep):
    """Per row: argmin ||x[:, S] v - x w0_i|| over the kept columns S (numpy's lstsq)."""
    out = np.zeros_like(w0)
    for i in range(w0.shape[0]):
        s = np.flatnonzero(keep[i])
        if s.size:
            out[i, s] = np.linalg.lstsq(x[:, s], x @ w0[i], rcond=None)[0]
    return out


def layer_error(x, w0, w, shift=None):
    """Relative L2 error of the layer output on the points, by direct evaluation."""
    y0 = x @ w0.T
    y = x @ w.T + (0 if shift is None else shift[None, :])
    return np.linalg.norm(y - y0) / np.linalg.norm(y0)


def test_exact_solve_is_the_least_squares_solution():
    x, w0, keep = problem()
    got = solve_exact(w0, keep, x.T @ x)
    np.testing.assert_allclose(got, lstsq_rows(x, w0, keep), atol=1e-8)
    assert np.all(got[~keep] == 0)
    np.testing.assert_array_equal(got[0], w0[0])


def test_refit_layer_exact_matches_lstsq_and_reports_the_true_errors():
    x, w0, keep = problem(seed=3)
    masked = np.where(keep, w0, 0.0)
    out = refit_layer(w0, masked, (x.T @ x)[None], x.sum(0)[None], len(x), bias=False, damp=0.0)
    assert out.solver == "exact"
    np.testing.assert_allclose(out.rows, lstsq_rows(x, w0, keep), atol=1e-8)
    assert out.error_before == pytest.approx(layer_error(x, w0, masked), rel=1e-9)
    assert out.error_after == pytest.approx(layer_error(x, w0, out.rows), rel=1e-9)
    assert out.error_after < out.error_before


def test_sweep_is_exact_when_pruned_weights_come_first():
    """With every pruned weight left of every kept one, each pruned weight's error is spread over
    all the kept ones (the sweep compensates to the right), so each step is an exact OBS update
    and the sweep equals the least-squares solution."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 8))
    w0 = rng.normal(size=(4, 8))
    keep = np.zeros((4, 8), dtype=bool)
    keep[:, 3:] = True
    h = x.T @ x
    np.testing.assert_allclose(
        solve_sweep(w0, keep, h, block=3, dtype=np.float64), lstsq_rows(x, w0, keep), atol=1e-8
    )


def test_sweep_blocks_do_not_change_the_result():
    x, w0, keep = problem(n=5, k=20, points=80, seed=7)
    h = damped(x.T @ x)
    one = solve_sweep(w0, keep, h, block=20, dtype=np.float64)
    np.testing.assert_allclose(solve_sweep(w0, keep, h, block=3, dtype=np.float64), one, atol=1e-9)
    np.testing.assert_allclose(solve_sweep(w0, keep, h, block=7, dtype=np.float64), one, atol=1e-9)
    assert np.all(one[~keep] == 0)


def test_float32_sweep_is_close_to_float64_and_falls_back_when_it_cannot_factor():
    x, w0, keep = problem(n=6, k=24, points=100, seed=8)
    h = damped(x.T @ x)
    ref = solve_sweep(w0, keep, h, block=5, dtype=np.float64)
    fast = solve_sweep(w0, keep, h, block=5)
    assert fast.dtype == np.float64 and np.all(fast[~keep] == 0)
    np.testing.assert_allclose(fast, ref, rtol=1e-3, atol=1e-4)
    # Rank one plus a tiny ridge: float64 factors it, float32 rounding loses positive definiteness.
    v = np.arange(1.0, 25.0)
    bad = np.outer(v, v) + 1e-5 * np.eye(24)
    np.testing.assert_allclose(
        solve_sweep(w0, keep, bad, block=5), solve_sweep(w0, keep, bad, block=5, dtype=np.float64)
    )


def test_bias_refit_restores_the_output_mean():
    x, w0, keep = problem(seed=11)
    masked = np.where(keep, w0, 0.0)
    out = refit_layer(w0, masked, (x.T @ x)[None], x.sum(0)[None], len(x), weights=False, bias=True)
    np.testing.assert_array_equal(out.rows, masked)
    assert out.solver == "none" and out.rows_refitted == 0
    np.testing.assert_allclose((x @ out.rows.T + out.bias_shift).mean(0), (x @ w0.T).mean(0), atol=1e-9)
    assert out.error_after == pytest.approx(layer_error(x, w0, masked, out.bias_shift), rel=1e-9)
    assert out.error_after <= out.error_before


def test_grouped_rows_use_their_own_group_statistics():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(30, 5)) + g for g in range(2)]
    w0 = rng.normal(size=(6, 5))
    keep = rng.random((6, 5)) < 0.5
    gram = np.stack([x.T @ x for x in xs])
    sums = np.stack([x.sum(0) for x in xs])
    out = refit_layer(w0, np.where(keep, w0, 0.0), gram, sums, 30, bias=False, damp=0.0)
    np.testing.assert_allclose(out.rows[:3], lstsq_rows(xs[0], w0[:3], keep[:3]), atol=1e-8)
    np.testing.assert_allclose(out.rows[3:], lstsq_rows(xs[1], w0[3:], keep[3:]), atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 6),
    k=st.integers(1, 12),
    points=st.integers(1, 30),
    keep_frac=st.floats(0.0, 1.0),
    sweep=st.booleans(),
    bias=st.booleans(),
    dead=st.booleans(),
)
def test_refit_never_increases_the_calibration_error(seed, n, k, points, keep_frac, sweep, bias, dead):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(points, k)) * rng.uniform(0.01, 10, size=k)
    if dead:
        x[:, 0] = 0.0  # an input that never fires
    w0 = rng.normal(size=(n, k))
    masked = np.where(rng.random((n, k)) < keep_frac, w0, 0.0)
    out = refit_layer(
        w0, masked, (x.T @ x)[None], x.sum(0)[None], points, bias=bias, exact_flops=-1 if sweep else 1e12
    )
    assert np.all(out.rows[masked == 0] == 0)  # the mask is kept
    assert np.all(np.isfinite(out.rows))
    direct_before = layer_error(x, w0, masked) if np.any(x @ w0.T) else 0.0
    direct_after = layer_error(x, w0, out.rows, out.bias_shift) if np.any(x @ w0.T) else 0.0
    assert direct_after <= direct_before * (1 + 1e-9) + 1e-12
    assert out.error_after <= out.error_before * (1 + 1e-12) + 1e-15


def test_dense_accumulator_gram_sums_every_token():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 6)).astype(np.float32)
    acc = DenseAccumulator(rows, gram=True)
    batches = [rng.normal(size=(3, 5, 6)).astype(np.float32) for _ in range(2)]
    for b in batches:
        acc.update(b)
    tokens = np.concatenate([b.reshape(-1, 6) for b in batches]).astype(np.float64)
    stats = acc.result()
    np.testing.assert_allclose(stats.gram[0], tokens.T @ tokens, rtol=1e-5)
    np.testing.assert_allclose(stats.input_sum[0], tokens.sum(0), rtol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("syrk_min", [1, 1000])
def test_conv_accumulator_gram_matches_naive_patches(monkeypatch, per_sample, syrk_min):
    """Every Gram route (per sample on the patches as they lie, or one copy of the batch; one
    syrk per group, or one batched product for narrow groups) gives the naive patches' sums."""
    import sipp_onnx.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "GRAM_SAMPLE_POINTS", 1 if per_sample else 1 << 30)
    monkeypatch.setattr(sensitivity, "SYRK_MIN_INPUTS", syrk_min)
    rng = np.random.default_rng(1)
    geom = ConvGeometry((3, 3), (2, 1), (1, 1), (1, 0, 1, 1), "NOTSET", 2)
    rows = rng.normal(size=(4, 2 * 9)).astype(np.float32)  # 4 out channels, 4 in channels, group 2
    x = rng.normal(size=(3, 4, 6, 5)).astype(np.float32)
    acc = ConvAccumulator(rows, geom, reduction="max", gram=True)
    acc.update(x)
    stats = acc.result()
    patches = naive_patches(x, (3, 3), (2, 1), (1, 1), (1, 0, 1, 1), "NOTSET", 2)
    for g in range(2):
        pts = np.concatenate([patches[b, g].T for b in range(3)])  # [B*L, d]
        np.testing.assert_allclose(stats.gram[g], pts.T @ pts, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats.input_sum[g], pts.sum(0), rtol=1e-4, atol=1e-4)


def test_gram_uses_every_position_when_the_max_reduction_is_capped():
    """`max_points` bounds the max-times work only: the Gram matrix, its sum and its point count
    still cover every position (a subset cost magika 2.6 points at 90 %)."""
    rng = np.random.default_rng(4)
    geom = ConvGeometry((3, 3), (2, 1), (1, 1), (1, 0, 1, 1), "NOTSET", 1)
    rows = rng.normal(size=(3, 4 * 9)).astype(np.float32)
    x = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
    acc = ConvAccumulator(rows, geom, reduction="max", gram=True, max_points_per_sample=3)
    acc.update(x)
    stats = acc.result()
    patches = naive_patches(x, (3, 3), (2, 1), (1, 1), (1, 0, 1, 1), "NOTSET", 1)  # L = 12
    pts = np.concatenate([patches[b, 0].T for b in range(2)])
    assert stats.points == 24
    np.testing.assert_allclose(stats.gram[0], pts.T @ pts, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.input_sum[0], pts.sum(0), rtol=1e-4, atol=1e-4)


def test_gram_is_not_kept_unless_asked():
    acc = DenseAccumulator(np.ones((2, 3), dtype=np.float32))
    acc.update(gaussian_calibration((3,), n=4))
    assert acc.result().gram is None and acc.result().input_sum is None


@pytest.mark.parametrize("k", [1, 7, 130, 300])
def test_inverse_cholesky_factor_equals_the_textbook_route(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2 * k + 3, k))
    h = damped(x.T @ x)
    u = inverse_cholesky_upper(h)
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-8, atol=1e-12)
    assert np.all(np.tril(u, -1) == 0)
    m = np.triu(rng.normal(size=(k, k))) + 3 * k * np.eye(k)
    np.testing.assert_allclose(upper_inverse(m, leaf=2) @ m, np.eye(k), atol=1e-12)


@pytest.mark.parametrize("n,block", [(1, 4), (4, 4), (5, 4), (13, 4), (40, 7), (300, 256)])
def test_blocked_cholesky_equals_lapack(n, block):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n + 5, n))
    h = damped(x.T @ x)
    got = cholesky_lower(h, block=block)
    np.testing.assert_allclose(got, np.linalg.cholesky(h), rtol=1e-9, atol=1e-11)
    assert np.all(np.triu(got, 1) == 0)
    with pytest.raises(np.linalg.LinAlgError):
        cholesky_lower(-h, block=block)
