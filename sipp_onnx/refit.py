"""Refit: give the kept weights new values so that a layer's output on the calibration data stays
as close as possible to the dense layer's (issue 5). The mask is not touched.

For a row `w0` of the dense layer, its pruned positions `P` and kept positions `S`, and the Gram
matrix `H = sum_p x_p x_p^T` of the layer's input points, the output error of a new row `w` is

    E(w) = sum_p ((w - w0) . x_p)^2 = (w - w0)^T H (w - w0).

With `w_P = 0` fixed, it is smallest at `w_S = w0_S + H_SS^-1 H_SP w0_P` (the optimal brain
surgeon / least-squares update). Two ways to get there:

- 'exact': one damped linear solve per row, batched (`np.linalg.solve` on stacked systems);
  used while the layer's total cost `N K^3` stays small.
- 'sparsegpt': the column-by-column sweep of SparseGPT (Frantar & Alistarh 2023) with a fixed
  mask: the upper Cholesky factor of `H^-1` propagates each pruned weight's error to the columns
  on its right, in blocks, so a whole layer costs `O(K^3 + N K^2)`. It only compensates to the
  right, so it is a little worse than the exact solve, but it scales to transformer layers.

Either way, a row whose refit would raise its (undamped) error keeps its masked values, so a
refit never makes a layer worse on the calibration data.

The bias refit removes the mean shift: with `d = w - w0` and `m` the mean input point, the
output's mean moves by `d . m`, and adding `-d . m` to the bias is the best constant correction.

This module imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMP = 0.01
"""Dampening, as a fraction of the mean diagonal of H (SparseGPT's default)."""
EXACT_FLOPS = 4e9
"""Largest `N K^3` (summed over groups) solved exactly; beyond it the SparseGPT sweep is used."""
SWEEP_BLOCK = 128


@dataclass(frozen=True)
class RefitOutcome:
    """New rows of one layer and what the refit did to its calibration error."""

    rows: np.ndarray
    """New canonical rows `[N, K]`, zero where the mask is."""
    bias_shift: np.ndarray | None
    """What to add to the layer's output (per output neuron) to undo the mean shift; None if the
    bias is not refitted."""
    error_before: float
    """Relative L2 error of the layer output on the calibration points with the mask alone:
    `sqrt(sum E(masked rows) / sum w0^T H w0)`."""
    error_after: float
    """The same after the refit (weights and, where refitted, bias)."""
    solver: str
    """'exact', 'sparsegpt', or 'none' (bias only)."""
    rows_refitted: int
    """Rows whose weights changed (rows that would have got worse are left as masked)."""


def quadratic_error(gram: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """`delta_i^T H delta_i` per row (float64), for `delta [n, K]`."""
    d = delta.astype(np.float64, copy=False)
    return np.einsum("ik,ik->i", d @ gram, d)


def damped(gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """`H + damp * mean(diag H) * I`, with dead inputs (zero diagonal) given a unit diagonal so the
    system stays positive definite (their weights see no input, so any value is as good)."""
    h = np.array(gram, dtype=np.float64)
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    idx = np.arange(h.shape[0])
    h[idx[dead], idx[dead]] = 1.0
    live = diag[~dead]
    h[idx, idx] += damp * (float(live.mean()) if live.size else 1.0)
    return h


def solve_exact(w0: np.ndarray, keep: np.ndarray, h: np.ndarray, chunk_bytes: int = 1 << 25) -> np.ndarray:
    """Rows minimising `(w - w0)^T h (w - w0)` with `w = 0` where `keep` is False (per row)."""
    n, k = w0.shape
    w0 = w0.astype(np.float64)
    out = np.where(keep, w0, 0.0)
    chunk = max(1, chunk_bytes // (8 * k * k))
    eye = np.eye(k, dtype=np.float64)
    for start in range(0, n, chunk):
        kp = keep[start : start + chunk]
        todo = kp.any(axis=1) & ~kp.all(axis=1)  # rows with something pruned and something kept
        if not todo.any():
            continue
        kp = kp[todo]
        pruned = ~kp
        rhs = (w0[start : start + chunk][todo] * pruned) @ h  # (H w0_P) for every row, [c, K]
        rhs[pruned] = 0.0
        both = kp[:, :, None] & kp[:, None, :]
        systems = np.where(both, h[None], 0.0) + pruned[:, :, None] * eye[None]
        delta = np.linalg.solve(systems, rhs[:, :, None])[:, :, 0]
        rows = np.flatnonzero(todo) + start
        out[rows] = np.where(kp, w0[rows] + delta, 0.0)
    return out


def solve_sweep(
    w0: np.ndarray, keep: np.ndarray, h: np.ndarray, block: int = SWEEP_BLOCK, dtype: type = np.float32
) -> np.ndarray:
    """SparseGPT's blocked column sweep with a fixed mask (see the module docstring).

    Runs in float32 like SparseGPT: the `K^3` factorisation is most of a large layer's refit
    and takes about a third of the float64 textbook route's time (see `inverse_cholesky_upper`).
    Where float32 cannot factor the damped `H` (it is not numerically positive definite), the
    sweep falls back to float64.
    The caller's never-increase check is in float64 either way.
    """
    try:
        return _sweep(w0, keep, h, block, dtype)
    except np.linalg.LinAlgError:
        if dtype is np.float64:
            raise
        return _sweep(w0, keep, h, block, np.float64)


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """The upper triangular `U` with `H^-1 = U^T U` (what the sweep needs), without forming `H^-1`.

    With `J` the order reversal, the Cholesky factor `L` of `J H J` gives `H = M M^T` for the upper
    triangular `M = J L J`, so `H^-1 = M^-T M^-1` and `U = M^-1`. One Cholesky factorisation and
    one triangular inverse (by blocks, in matrix products) cost about a third of `inv(H)` followed
    by `cholesky(H^-1)`, the textbook route.
    """
    flipped = cholesky_lower(h[::-1, ::-1])  # copies: no contiguous copy needed first
    return upper_inverse(np.ascontiguousarray(flipped[::-1, ::-1]))


def cholesky_lower(h: np.ndarray, block: int = 256) -> np.ndarray:
    """Lower Cholesky factor of the SPD `h`, by column blocks of `block`.

    Each step factors one diagonal block with LAPACK and moves the rest of the work into two
    matrix products (the panel against the block's inverse, and the trailing update); NumPy's
    LAPACK `potrf` runs at about a quarter of its matrix-product speed on these sizes, so this
    is about 3x faster for the 2304- and 4608-wide Gram matrices of ResNet-50. Raises
    `np.linalg.LinAlgError` like `np.linalg.cholesky` when a block is not positive definite.
    """
    n = h.shape[0]
    if n <= block:
        return np.linalg.cholesky(h)
    work = np.array(h, copy=True)
    out = np.zeros_like(work)
    for start in range(0, n, block):
        stop = min(n, start + block)
        diag = np.linalg.cholesky(work[start:stop, start:stop])
        out[start:stop, start:stop] = diag
        if stop == n:
            break
        panel = work[stop:, start:stop] @ np.linalg.inv(diag).T  # A21 L11^-T
        out[stop:, start:stop] = panel
        work[stop:, stop:] -= panel @ panel.T
    return out


def upper_inverse(m: np.ndarray, leaf: int = 128) -> np.ndarray:
    """Inverse of an upper triangular matrix by 2x2 blocks: `[[A, B], [0, C]]^-1 =
    [[A^-1, -A^-1 B C^-1], [0, C^-1]]`, so almost all the work is matrix products."""
    n = m.shape[0]
    if n <= leaf:
        return np.triu(np.linalg.inv(m))
    half = n // 2
    a_inv = upper_inverse(m[:half, :half], leaf)
    c_inv = upper_inverse(m[half:, half:], leaf)
    out = np.zeros_like(m)
    out[:half, :half] = a_inv
    out[half:, half:] = c_inv
    out[:half, half:] = -(a_inv @ m[:half, half:]) @ c_inv
    return out


def _sweep(w0: np.ndarray, keep: np.ndarray, h: np.ndarray, block: int, dtype: type) -> np.ndarray:
    hinv = inverse_cholesky_upper(h.astype(dtype))
    if not np.isfinite(hinv).all():
        raise np.linalg.LinAlgError("the inverse's Cholesky factor is not finite")
    return sweep_with(hinv, w0, keep, block)


def sweep_with(hinv: np.ndarray, w0: np.ndarray, keep: np.ndarray, block: int = SWEEP_BLOCK) -> np.ndarray:
    """The column sweep for a given factor `U` of `H^-1 = U^T U` (`inverse_cholesky_upper`), in
    the factor's dtype: one factorisation serves many masks (budgets.refit_curve)."""
    k = w0.shape[1]
    dtype = hinv.dtype.type
    w: np.ndarray = w0.astype(dtype, copy=True)
    zero = dtype(0)
    for i1 in range(0, k, block):
        i2 = min(k, i1 + block)
        w1 = w[:, i1:i2]  # a view: updated in place
        err = np.zeros_like(w1)
        u = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            e = np.where(keep[:, i1 + i], zero, col) / u[i, i]
            w1[:, i:] -= e[:, None] * u[i, i:][None, :]
            w1[:, i] = np.where(keep[:, i1 + i], w1[:, i], zero)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return np.where(keep, w, zero).astype(np.float64)


def refit_layer(
    w0: np.ndarray,
    masked: np.ndarray,
    gram: np.ndarray,
    input_sum: np.ndarray,
    points: int,
    *,
    weights: bool = True,
    bias: bool = True,
    damp: float = DAMP,
    exact_flops: float = EXACT_FLOPS,
    factors: dict[int, np.ndarray] | None = None,
) -> RefitOutcome:
    """Refit the kept entries of `masked` (rows `[N, K]`, zeros pruned) towards the dense `w0`.

    `gram [G, K, K]` and `input_sum [G, K]` are the sums over the `points` calibration points of
    each group's input (G = 1 except for grouped Conv, whose N rows split evenly into G groups).
    `factors`: group -> the sweep's float32 factor of the damped `H`, already computed (by the
    error allocation's `budgets.refit_curve`), so it is not factorised twice.
    """
    n, k = w0.shape
    groups = gram.shape[0]
    per = n // groups
    keep = masked != 0
    w0_64 = w0.astype(np.float64)
    new = masked.astype(np.float64)
    solver = "none"
    refitted = 0
    base = np.zeros(n)
    before = np.zeros(n)
    after = np.zeros(n)
    use_exact = n * k**3 <= exact_flops
    for g in range(groups):
        rows = slice(g * per, (g + 1) * per)
        h = gram[g].astype(np.float64)
        base[rows] = quadratic_error(h, w0_64[rows])
        before[rows] = quadratic_error(h, new[rows] - w0_64[rows])
        after[rows] = before[rows]
        if not weights or keep[rows].all():
            continue
        hd = damped(h, damp)
        if use_exact:
            cand = solve_exact(w0[rows], keep[rows], hd)
        elif factors is not None and g in factors and damp == DAMP:
            cand = sweep_with(factors[g], w0[rows], keep[rows]).astype(np.float64)
        else:
            cand = solve_sweep(w0[rows], keep[rows], hd)
        solver = "exact" if use_exact else "sparsegpt"
        cand_err = quadratic_error(h, cand - w0_64[rows])
        better = cand_err < before[rows]
        block = new[rows]
        block[better] = cand[better]
        new[rows] = block
        after[rows] = np.where(better, cand_err, before[rows])
        refitted += int(better.sum())
    shift = None
    if bias and points > 0:
        delta = new - w0_64
        mean = (input_sum.astype(np.float64) / points).repeat(per, axis=0)  # [N, K]
        drift = np.einsum("ik,ik->i", delta, mean)  # mean change of each output
        shift = -drift
        # sum_p (d.x_p - drift)^2 = d^T H d - points * drift^2
        after = np.maximum(after - points * drift**2, 0.0)
    total = float(base.sum())

    def rel(err: np.ndarray) -> float:
        return float(np.sqrt(err.sum() / total)) if total > 0 else 0.0

    return RefitOutcome(
        rows=new.astype(w0.dtype),
        bias_shift=shift,
        error_before=rel(before),
        error_after=rel(after),
        solver=solver,
        rows_refitted=refitted,
    )
