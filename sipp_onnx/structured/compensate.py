"""What a consumer does about the input channels it loses.

For a consumer with canonical rows `W [N, K]`, calibration inputs with mean `mu` and covariance
`C = H / P - mu mu^T` (`H`, `P`: the Gram matrix and point count of the unstructured refit's
statistics), and kept columns S (pruned P):

- 'none':  `W_S` as it is (the pruned columns' contribution is simply gone);
- 'bias':  FLAP's compensation: the pruned columns' mean output `W_P mu_P` is folded into the
           bias, so each output keeps its mean;
- 'refit': least squares against the dense layer's output, with an intercept: the kept columns
           become `W C_{:,S} C_SS^-1` (ridge-damped like the unstructured refit) and the bias
           absorbs the change of the mean. This is the unstructured refit's OBS solution for a
           mask shared by every row, so one solve serves the whole layer (Channel Pruning,
           ThiNet, ZipLM). A refit that would not beat 'bias' on the calibration data is
           not used.

Errors are reported relative to the dense output's second moment `sum_i w_i^T (H/P) w_i`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..refit import damped, quadratic_error

COMPENSATIONS = ("refit", "bias", "none")


@dataclass(frozen=True)
class Compensation:
    """New canonical rows of a consumer (zero in the pruned columns) and its bias shift."""

    rows: np.ndarray
    bias_shift: np.ndarray | None
    """Added to each output (None: no change)."""
    error_none: float
    error_after: float
    """Relative output error on the calibration data: with the columns dropped, and after."""
    how: str


def compensate(
    w0: np.ndarray,
    keep_cols: np.ndarray,
    gram: np.ndarray,
    input_sum: np.ndarray,
    points: int,
    mode: str,
    has_bias: bool,
) -> Compensation:
    """Compensate one consumer (group count 1) for losing the columns where `keep_cols` is False."""
    w = w0.astype(np.float64)
    p = max(points, 1)
    mu = input_sum.astype(np.float64) / p
    second = gram.astype(np.float64) / p
    cov = second - np.outer(mu, mu)
    energy = float(quadratic_error(second, w).sum())

    def rel(value: float) -> float:
        return float(np.sqrt(max(value, 0.0) / energy)) if energy > 0 else 0.0

    pruned = ~keep_cols
    masked = np.where(keep_cols, w, 0.0)
    dropped = w - masked
    error_none = rel(float(quadratic_error(second, dropped).sum()))
    if mode == "none" or not pruned.any():
        return Compensation(masked, None, error_none, error_none, "none")
    shift_bias = dropped @ mu  # the pruned columns' mean contribution
    error_bias = float(quadratic_error(cov, dropped).sum())
    best = Compensation(masked, shift_bias, error_none, rel(error_bias), "bias")
    if not has_bias:
        return Compensation(masked, None, error_none, error_none, "none (no bias to fold into)")
    if mode == "bias" or not keep_cols.any():
        return best
    s = np.flatnonzero(keep_cols)
    c_ss = damped(cov[np.ix_(s, s)])
    rhs = w @ cov[:, s]  # [N, |S|]
    try:
        w_s = np.linalg.solve(c_ss, rhs.T).T
    except np.linalg.LinAlgError:
        return best
    refit = np.zeros_like(w)
    refit[:, s] = w_s
    delta = w - refit
    error_refit = float(quadratic_error(cov, delta).sum())
    if error_refit >= error_bias:
        return best
    return Compensation(refit, delta @ mu, error_none, rel(error_refit), "refit")
