"""SiPP-Rand allocation maths against brute force and the defining equations."""

import itertools

import numpy as np
import pytest

from sipp_onnx.allocation import a_coefficient, allocate, draws_for_distinct, eps_bound


def test_eps_bound_matches_formula():
    a, m = 7.5, 3.0
    expected = 0.5 * (np.sqrt((a / (3 * m)) ** 2 + 2 * a / m) + a / (3 * m))
    assert eps_bound(np.array([a]), np.array([m]))[0] == pytest.approx(expected)
    assert eps_bound(np.array([0.0]), np.array([0.0]))[0] == 0.0
    assert np.isinf(eps_bound(np.array([1.0]), np.array([0.0]))[0])


def test_a_coefficient():
    got = a_coefficient(np.array([2.0]), patches=3, kernel_size=9)[0]
    assert got == pytest.approx(2 * 3 * np.log(8 * 4 * 9 / 1e-16) * 2.0)


def objective(a, c, m):
    return float((c * eps_bound(a, m)).sum())


def test_allocate_matches_brute_force_on_three_rows():
    a = np.array([3.0, 40.0, 0.5])
    c = np.array([1.0, 0.5, 2.0])
    nnz = np.array([10.0, 25.0, 8.0])
    budget = 18.0
    m = allocate(a, c, nnz, budget)
    assert m.sum() == pytest.approx(budget, rel=1e-6)
    assert np.all(m >= 0) and np.all(m <= nnz + 1e-9)
    best = np.inf
    grid = np.arange(0.05, 25.0, 0.05)
    for m1, m2 in itertools.product(grid[grid <= nnz[0]], grid[grid <= nnz[1]]):
        m3 = budget - m1 - m2
        if 0 < m3 <= nnz[2]:
            best = min(best, objective(a, c, np.array([m1, m2, m3])))
    assert objective(a, c, m) <= best + 1e-6


def test_allocate_stationarity_and_clipping():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 100, size=50)
    c = rng.uniform(0.01, 1, size=50)
    nnz = rng.integers(2, 40, size=50).astype(float)
    m = allocate(a, c, nnz, budget=0.4 * nnz.sum())
    assert m.sum() == pytest.approx(0.4 * nnz.sum(), rel=1e-6)
    h = 1e-6 * m
    slope = c * (eps_bound(a, m - h) - eps_bound(a, m + h)) / (2 * h)
    inside = m < nnz - 1e-6
    # Equal marginal gain for every unclipped row part; clipped ones gain at least as much.
    assert np.ptp(slope[inside]) / slope[inside].mean() < 1e-3
    assert np.all(slope[~inside] >= slope[inside].min() * (1 - 1e-3))


def test_allocate_edge_cases():
    a = np.array([0.0, 2.0, 3.0])
    c = np.ones(3)
    nnz = np.array([5.0, 4.0, 6.0])
    assert allocate(a, c, nnz, 0).sum() == 0
    full = allocate(a, c, nnz, 100)
    assert full.tolist() == [0.0, 4.0, 6.0]  # zero-sensitivity parts get nothing


def test_draws_for_distinct_solves_expected_count():
    rng = np.random.default_rng(1)
    p = rng.random((6, 30)) ** 4
    p[:, ::3] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    support = (p > 0).sum(axis=1)
    m = support * rng.uniform(0.05, 0.95, size=6)
    n = draws_for_distinct(p, m)
    expected = (1 - np.exp(-n[:, None] * p)).sum(axis=1)
    np.testing.assert_allclose(expected, m, rtol=1e-7)
    assert np.all(n >= m)
