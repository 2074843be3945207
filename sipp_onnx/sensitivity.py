"""Empirical sensitivities (spec section 2), streamed batch by batch.

For a layer with canonical weight rows `W [N, K]` and non-negative input points `a`, each weight
`w_ij` of sign part `W+` (resp. `W-`) has the relative contribution

    g_ij(a) = w_ij * a_j / z_i(a),   z_i(a) = sum over the same sign part of w_ik * a_k

(0 where `|z| <= eps32`), and its sensitivity is `s_ij = max over points of g_ij`. Inputs with
negative entries are split into `max(a, 0)` and `max(-a, 0)`; splitting every batch gives the same
maxima as deciding per sample, because the negative part of a sample with no negative entry is
all zero and contributes nothing.

Vectorized form, with `R[p, i] = 1/z_i(p)` (0 where invalid) for one sign part:
- max over points:  `s_ij = |w_ij| * max_p R[p, i] * a[p, j]` (a max-times product, chunked);
- mean over the L patches of a conv sample: `s_ij = |w_ij| * (R @ P^T)[i, j] / L`, then the max
  over samples.

Accumulators keep only O(weights) state, so memory does not grow with the calibration set.
This module imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import ConvGeometry
from .patches import conv_patches

EPS32 = np.float32(1.1920929e-07)
_CHUNK_ELEMENTS = 1 << 23  # ~32 MB of float32 temporaries in the max-times product


@dataclass(frozen=True)
class LayerStatistics:
    """What the calibration pass learned about one layer, in canonical rows `[N, K]`."""

    sensitivity: np.ndarray | None
    """`s_ij`, float32 `[N, K]`; 0 for zero weights. None when not computed (Wanda)."""
    input_sqnorm: np.ndarray
    """Sum over all points of the squared input feature each weight multiplies, `[N, K]`
    (a broadcast view for Gemm/MatMul); Wanda's `||X_j||^2`."""
    points: int
    """Calibration points seen (rows/tokens, or sample-patches for Conv)."""
    patches_per_sample: int
    """L: output positions per sample for Conv, 1 for Gemm/MatMul."""


def reciprocal(z: np.ndarray) -> np.ndarray:
    """`1/|z|` where `|z| > eps32`, else 0 (the spec's guard against empty sign parts)."""
    mag = np.abs(z)
    out = np.zeros_like(mag)
    np.divide(1.0, mag, out=out, where=mag > EPS32)
    return out


def max_times(r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """`out[g] = max(out[g], max_p r[g, p, :, None] * a[g, p, None, :])` in bounded memory.

    r: `[G, n, Ng]`, a: `[G, n, K]`, out: `[G, Ng, K]`. The product has as many operations as the
    layer itself but no BLAS form; chunks over points keep temporaries near `_CHUNK_ELEMENTS`.
    """
    groups, n, rows = r.shape
    cols = a.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, groups * rows * cols))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        prod = r[:, start:stop, :, None] * a[:, start:stop, None, :]
        np.maximum(out, prod.max(axis=1), out=out)


def _sign_parts(points: np.ndarray) -> list[np.ndarray]:
    """The non-negative parts of the input: `[a]` if `a >= 0`, else `[max(a,0), max(-a,0)]`."""
    if not (points < 0).any():
        return [points]
    return [np.maximum(points, 0), np.maximum(-points, 0)]


class _Accumulator:
    """Shared state: the weight split by sign and the running maxima per sign part."""

    def __init__(self, rows: np.ndarray, groups: int, compute_sensitivity: bool = True) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        self.compute_sensitivity = compute_sensitivity
        n_out, k = rows.shape
        if n_out % groups:
            raise ValueError(f"{n_out} rows do not split into {groups} groups")
        self.rows = rows
        self.groups = groups
        grouped = rows.reshape(groups, n_out // groups, k)
        self._pos = np.maximum(grouped, 0)
        self._neg = np.minimum(grouped, 0)
        self._best_pos = np.zeros_like(grouped)
        self._best_neg = np.zeros_like(grouped)
        self._sqnorm = np.zeros((groups, k), dtype=np.float64)
        self.points = 0
        self.patches_per_sample = 1

    def result(self) -> LayerStatistics:
        w = self.rows
        n_out, k = w.shape
        best_pos = self._best_pos.reshape(n_out, k)
        best_neg = self._best_neg.reshape(n_out, k)
        sens = None
        if self.compute_sensitivity:
            sens = np.where(w > 0, w * best_pos, np.where(w < 0, -w * best_neg, 0)).astype(np.float32)
            np.minimum(sens, 1.0, out=sens)  # g <= 1 exactly; float32 rounding can exceed it by an ulp
        if self.groups == 1:
            sqnorm = np.broadcast_to(self._sqnorm[0], (n_out, k))
        else:
            sqnorm = np.repeat(self._sqnorm, n_out // self.groups, axis=0)
        return LayerStatistics(sens, sqnorm, self.points, self.patches_per_sample)


class DenseAccumulator(_Accumulator):
    """Gemm / MatMul: every row (every token of a 3-D input) is one point; always the max."""

    def __init__(
        self, rows: np.ndarray, transpose_input: bool = False, compute_sensitivity: bool = True
    ) -> None:
        super().__init__(rows, groups=1, compute_sensitivity=compute_sensitivity)
        self.transpose_input = transpose_input

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if self.transpose_input:
            x = x.T
        k = self.rows.shape[1]
        if x.shape[-1] != k:
            raise ValueError(f"layer input has {x.shape[-1]} features, the weight expects {k}")
        points = x.reshape(-1, k)
        self.points += points.shape[0]
        self._sqnorm[0] += np.einsum("pk,pk->k", points, points, dtype=np.float64)
        if not self.compute_sensitivity:
            return
        for part in _sign_parts(points):
            part = part[part.any(axis=1)]  # all-zero points contribute nothing
            if part.shape[0] == 0:
                continue
            for w_sign, best in ((self._pos, self._best_pos), (self._neg, self._best_neg)):
                recip = reciprocal(part @ w_sign[0].T)  # [n, N]
                max_times(recip[None], part[None], best)


class ConvAccumulator(_Accumulator):
    """Conv: the points are the (sample, output position) patches of each group.

    `reduction='mean'` averages g over the L patches of a sample before the max over samples;
    `reduction='max'` takes the max over all patches of all samples.
    """

    def __init__(
        self, rows: np.ndarray, geom: ConvGeometry, reduction: str = "mean", compute_sensitivity: bool = True
    ) -> None:
        super().__init__(rows, groups=geom.group, compute_sensitivity=compute_sensitivity)
        if reduction not in ("mean", "max"):
            raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")
        self.geom = geom
        self.reduction = reduction

    def update(self, x: np.ndarray) -> None:
        patches = conv_patches(np.asarray(x, dtype=np.float32), self.geom)  # [B, G, d, L]
        batch, groups, d, n_patch = patches.shape
        if d != self.rows.shape[1]:
            raise ValueError(f"conv patches have {d} entries, the weight rows {self.rows.shape[1]}")
        self.points += batch * n_patch
        self.patches_per_sample = n_patch
        self._sqnorm += np.einsum("bgdl,bgdl->gd", patches, patches, dtype=np.float64)
        if not self.compute_sensitivity:
            return
        for part in _sign_parts(patches):
            for w_sign, best in ((self._pos, self._best_pos), (self._neg, self._best_neg)):
                recip = reciprocal(np.matmul(w_sign[None], part))  # [B, G, Ng, L]
                if self.reduction == "mean":
                    mean = np.matmul(recip, part.transpose(0, 1, 3, 2)) / n_patch  # [B, G, Ng, d]
                    np.maximum(best, mean.max(axis=0), out=best)
                else:
                    r = recip.transpose(1, 0, 3, 2).reshape(groups, batch * n_patch, -1)
                    a = part.transpose(1, 0, 3, 2).reshape(groups, batch * n_patch, d)
                    max_times(r, a, best)
