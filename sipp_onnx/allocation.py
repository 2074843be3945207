"""SiPP-Rand budget allocation (spec section 4), solved in NumPy.

For row parts r = (layer, row, sign) with summed sensitivity `S_r` the error bound of keeping
`m` sampled weights is

    eps_r(m) = 1/2 * ( sqrt((a_r/(3m))^2 + 2 a_r/m) + a_r/(3m) ),
    a_r      = 2 C ln(8 (L+1) K / delta) S_r,   C = 3, delta = 1e-16.

Minimising `sum_r c_r eps_r(m_r)` (c_r = 1/N_out of the layer) subject to `sum_r m_r = B`,
`0 <= m_r <= nnz_r` is convex. With `u = a/m`, stationarity reads

    c_r * F(u_r) / (2 a_r) = lambda,   F(u) = u^2 * ((u/9 + 1)/sqrt(u^2/9 + 2u) + 1/3),

and F is increasing, so `m_r(lambda) = a_r / F^-1(2 a_r lambda / c_r)` (clipped) and one
bisection on log(lambda) meets the budget. F^-1 is read from a dense log-log table: F is a
smooth near-power law (u^1.5/sqrt(2) for small u, 2u^2/3 for large u), so linear interpolation
in log space is accurate to well below the precision that matters for whole weight counts.
"""

from __future__ import annotations

import numpy as np

C_CONST = 3.0
DELTA = 1e-16

_LOG_U = np.linspace(np.log(1e-30), np.log(1e30), 8001)
_U = np.exp(_LOG_U)
_F = _U**2 * ((_U / 9 + 1) / np.sqrt(_U**2 / 9 + 2 * _U) + 1 / 3)
_LOG_F = np.log(_F)


def a_coefficient(sensitivity_sum: np.ndarray, patches: int, kernel_size: int) -> np.ndarray:
    """`a_r` of the spec for row parts of one layer."""
    log_term = np.log(8.0 * (patches + 1) * kernel_size / DELTA)
    return 2.0 * C_CONST * log_term * np.asarray(sensitivity_sum, dtype=np.float64)


def eps_bound(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """`eps_r(m)`; 0 where `a == 0`, inf where `m == 0 < a`."""
    a = np.asarray(a, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(m > 0, a / np.where(m > 0, m, 1), np.inf)
        eps = 0.5 * (np.sqrt((u / 3) ** 2 + 2 * u) + u / 3)
    return np.where(a == 0, 0.0, eps)


def _m_of_lambda(log_lam: float, a: np.ndarray, log_a_over_c: np.ndarray, nnz: np.ndarray) -> np.ndarray:
    """Unclipped-then-clipped optimum m_r for one multiplier (a > 0 rows only)."""
    log_target = np.log(2.0) + log_lam + log_a_over_c
    log_u = np.interp(log_target, _LOG_F, _LOG_U)
    return np.minimum(a / np.exp(log_u), nnz)


def allocate(a: np.ndarray, weight: np.ndarray, nnz: np.ndarray, budget: float) -> np.ndarray:
    """Continuous m_r minimising `sum weight_r * eps_r(m_r)` with `sum m_r = budget`.

    a, weight (c_r > 0), nnz: `[R]`. Row parts with `a == 0` get 0 (nothing to keep: their
    weights never contributed on the calibration data). Returns float m `[R]`.
    """
    a = np.asarray(a, dtype=np.float64)
    nnz = np.asarray(nnz, dtype=np.float64)
    m = np.zeros_like(a)
    live = a > 0
    if not live.any() or budget <= 0:
        return m
    if budget >= nnz[live].sum():
        m[live] = nnz[live]
        return m
    a_l, nnz_l = a[live], nnz[live]
    log_a_over_c = np.log(a_l) - np.log(np.asarray(weight, dtype=np.float64)[live])
    lo, hi = -300.0, 300.0  # log(lambda): total(lo) ~ all of nnz, total(hi) ~ 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        total = _m_of_lambda(mid, a_l, log_a_over_c, nnz_l).sum()
        if total > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    m[live] = _m_of_lambda(hi, a_l, log_a_over_c, nnz_l)
    return m


def draws_for_distinct(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Poisson draw rate n_r with expected distinct count `sum_j 1 - exp(-n p_rj) = m_r`.

    p: `[R, K]` sampling probabilities (rows sum to 1 over their support), m: `[R]` with
    `0 <= m_r < support size`. The left side is increasing and concave in n and below n, so
    Newton's method started at n = m approaches the root from below without overshooting.
    """
    n = np.asarray(m, dtype=np.float64).copy()
    active = n > 0
    for _ in range(100):
        if not active.any():
            break
        pa = p[active]
        na = n[active][:, None]
        e = np.exp(-na * pa)
        value = (np.where(pa > 0, 1.0 - e, 0.0)).sum(axis=1) - m[active]
        slope = (pa * e).sum(axis=1)
        step = np.where(slope > 0, -value / np.maximum(slope, 1e-300), 0.0)
        new = n[active] + np.maximum(step, 0.0)
        done = np.abs(step) <= 1e-9 * np.maximum(new, 1.0)
        n[active] = new
        idx = np.flatnonzero(active)
        active[idx[done]] = False
    return n
