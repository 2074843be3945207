"""Empirical sensitivities (spec section 2), streamed batch by batch.

For a layer with canonical weight rows `W [N, K]` and non-negative input points `a`, each weight
`w_ij` of sign part `W+` (resp. `W-`) has the relative contribution

    g_ij(a) = w_ij * a_j / z_i(a),   z_i(a) = sum over the same sign part of w_ik * a_k

(0 where `|z| <= eps32`), and its sensitivity is `s_ij = max over points of g_ij`. A sample with
negative entries is split into `max(a, 0)` and `max(-a, 0)`. The 'absolute' terms variant uses
`g_ij = |w_ij a_j| / sum_k |w_ik a_k|` instead (see `_Accumulator`).

Vectorized form, with `R[p, i] = 1/|z_i(p)|` (0 where invalid) for one part:
- max over points:  `s_ij = |w_ij| * max_p R[p, i] * a[p, j]` (a max-times product, chunked);
- mean over the L points of a sample: `s_ij = |w_ij| * (R @ P^T)[i, j] / L`, then the max
  over samples; the expectation: the sum of `R @ P^T` over samples, divided by the points.

Accumulators keep only O(weights) state, so memory does not grow with the calibration set.
This module imports numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .layers import ConvGeometry, ConvTransposeGeometry
from .maxtimes import max_times_points
from .patches import (
    conv_patches,
    conv_transpose_patches,
    conv_transpose_sqnorm,
    output_spatial,
    patch_sqnorm,
    transposed_output_spatial,
)

EPS32 = np.float32(1.1920929e-07)
_CHUNK_ELEMENTS = 1 << 23  # ~32 MB of float32 temporaries in the per-sample mean reduction
SYRK_MIN_INPUTS = 32  # narrower groups' Gram matrices go in one batched product
GRAM_SAMPLE_POINTS = 512  # from this many positions per sample on, the Gram matrix goes per sample
STATS_SAMPLES = 16  # smaller captured batches are staged and measured together (see update)


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
    gram: np.ndarray | None = None
    """`[G, K, K]` float64 sum over points of `x x^T` per group (only when asked: the refit)."""
    input_sum: np.ndarray | None = None
    """`[G, K]` float64 sum over points of `x` per group (with `gram`)."""


def reciprocal(z: np.ndarray) -> np.ndarray:
    """`1/|z|` where `|z| > eps32`, else 0 (the spec's guard against empty sign parts).

    Overwrites and returns `z` (a temporary product of the caller's): no second array of the
    size of the layer's output.
    """
    mag = np.abs(z, out=z)
    valid = mag > EPS32
    np.divide(1.0, mag, out=mag, where=valid)
    mag[~valid] = 0
    return mag


REDUCTIONS = ("max", "mean", "expected")
TERMS = ("signed", "absolute")


class _Accumulator:
    """Running statistics of one layer over points grouped by sample.

    Every update is a tensor `[B, G, d, L]`: B samples, G groups, d entries per point, L points
    per sample (conv output positions, sequence tokens, or 1 for a plain Gemm row).

    What a weight's share of a point is (`terms`):

    - 'signed' (the spec): `w_ij a_j / z` within its sign part, with negative inputs split into
      `max(a, 0)` and `max(-a, 0)` per sample; four partial sums per row and point.
    - 'absolute': `|w_ij a_j| / sum_k |w_ik a_k|`, the weight's share of the row's absolute mass.
      Both give the same kind of guarantee, `|error of y_i| <= eps_i * sum_k |w_ik a_k|` with
      `eps_i` the summed shares of the pruned weights (the four signed partial sums add up to
      exactly that mass), but the absolute share measures it directly; the signed shares of a
      small partial sum are large even when it barely matters, which misranks weights fed by
      zero-mean inputs (LayerNorm outputs). docs/algorithm.md has the measurements.

    How the shares are reduced over the points (`reduction`):

    - 'max':      the max over every point of every sample (the paper's sensitivity);
    - 'mean':     the mean over the L points of each sample, then the max over samples
                  (the reference implementation's SiPP-Det choice for conv layers);
    - 'expected': the mean over every point of the point's total share (for 'signed', the sum
                  over its sign-split parts); no worst case, so the report's bounds are no
                  longer guarantees.
    """

    def __init__(
        self,
        rows: np.ndarray,
        groups: int,
        reduction: str,
        compute_sensitivity: bool,
        terms: str = "signed",
        gram: bool = False,
        max_points_per_sample: int | None = None,
        seed: int = 0,
    ) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        n_out, k = rows.shape
        if n_out % groups:
            raise ValueError(f"{n_out} rows do not split into {groups} groups")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if terms not in TERMS:
            raise ValueError(f"terms must be one of {TERMS}, got {terms!r}")
        self.rows = rows
        self.groups = groups
        self.reduction = reduction
        self.terms = terms
        self.compute_sensitivity = compute_sensitivity
        self._grouped = rows.reshape(groups, n_out // groups, k)
        dtype = np.float64 if reduction == "expected" else np.float32
        # The running statistic of each weight part (|w|, or the positive and negative parts);
        # the parts themselves are made per batch (`_weight_parts`): kept, they would be one
        # more copy of the model's weights for the whole pass.
        parts = 0 if not compute_sensitivity else 1 if terms == "absolute" else 2
        self._best = [np.zeros(self._grouped.shape, dtype=dtype) for _ in range(parts)]
        self._sqnorm = np.zeros((groups, k), dtype=np.float64)
        self._gram = np.zeros((groups, k, k), dtype=np.float64) if gram else None
        self._sum = np.zeros((groups, k), dtype=np.float64) if gram else None
        self.points = 0
        self.patches_per_sample = 1
        self.max_points_per_sample = max_points_per_sample
        self._rng = np.random.default_rng(seed)
        self._staged: list[tuple[np.ndarray, np.ndarray | None]] = []

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        """Add one captured batch of the layer's input (samples on axis 0).

        Batches smaller than `STATS_SAMPLES` (models that fix their batch to 1) are staged and
        measured together: the fixed costs of an update (the weight's sign parts, a K x K Gram
        sum, the small products) are paid once per `STATS_SAMPLES` samples instead of per
        sample. A max is the same either way; sums differ only in float rounding order."""
        x = np.asarray(x, dtype=np.float32)
        if not self._stageable(x, token_mask) or (not self._staged and x.shape[0] >= STATS_SAMPLES):
            # (a batch that cannot be staged is measured, and checked, at once)
            self._flush()
            self._update(x, token_mask)
            return
        if self._staged:
            first, first_mask = self._staged[0]
            same = first.shape[1:] == x.shape[1:] and (first_mask is None) == (token_mask is None)
            if not same or (
                token_mask is not None
                and first_mask is not None
                and first_mask.shape[1:] != token_mask.shape[1:]
            ):
                self._flush()
        self._staged.append((x, None if token_mask is None else np.asarray(token_mask)))
        if sum(staged.shape[0] for staged, _ in self._staged) >= STATS_SAMPLES:
            self._flush()

    def _stageable(self, x: np.ndarray, token_mask: np.ndarray | None) -> bool:
        """Whether batches of `x` join along axis 0 (and their masks with them), and `x` has the
        shape the layer expects (a wrong one is measured at once, so its error comes at once)."""
        return x.ndim >= 2 and (token_mask is None or np.ndim(token_mask) >= 1 and len(token_mask) == len(x))

    def _flush(self) -> None:
        if not self._staged:
            return
        staged, self._staged = self._staged, []
        x = staged[0][0] if len(staged) == 1 else np.concatenate([a for a, _ in staged])
        masks = [m for _, m in staged]
        mask = None if masks[0] is None else masks[0] if len(masks) == 1 else np.concatenate(masks)  # type: ignore[arg-type]
        self._update(x, mask)

    def _update(self, x: np.ndarray, token_mask: np.ndarray | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _accumulate(
        self,
        patches: np.ndarray,
        valid: np.ndarray | None = None,
        sqnorm: bool = True,
        nonnegative: bool = False,
    ) -> None:
        """`valid`: per sample, how many of its points are real (masked-out points are all zero
        and add nothing to a max, a sum or a Gram matrix; they must only not be counted, nor
        averaged over by the 'mean' reduction). `sqnorm=False`: the caller has added the batch's
        squared norms already. `nonnegative`: the caller knows that no entry is negative (checked
        on the conv input, a ninth of a 3x3 conv's patches)."""
        batch, groups, d, n_points = patches.shape
        if d != self.rows.shape[1]:
            raise ValueError(f"layer input points have {d} entries, the weight rows {self.rows.shape[1]}")
        self.points += batch * n_points if valid is None else int(valid.sum())
        self.patches_per_sample = n_points
        if sqnorm:
            self._sqnorm += np.einsum("bgdl,bgdl->gd", patches, patches, dtype=np.float64)
        if self._gram is not None and self._sum is not None:
            self._add_gram(patches)
        if not self.compute_sensitivity:
            return
        cap = self.max_points_per_sample
        if self.reduction == "max" and cap is not None and n_points > cap:
            # The max-times product costs points x N x K with no BLAS form; beyond `cap` points
            # per sample the max runs over a random subset of each batch's positions.
            chosen = np.sort(self._rng.choice(n_points, size=cap, replace=False))
            # np.take keeps [B, G, d, L] C-contiguous; `patches[..., chosen]` would come back
            # with the points axis outermost in memory, and every later product and copy of the
            # batch would run on that transposed layout (a third of PP-LCNet's statistics time).
            patches = np.take(patches, chosen, axis=-1)
            n_points = cap
        inputs: list[Part]
        if self.terms == "absolute":
            inputs = [(patches, None)] if nonnegative else _absolute_samples(patches)
        else:
            inputs = _sample_parts(patches)
        w_parts = self._weight_parts()
        for part, picked in inputs:
            per_sample = None if valid is None else valid if picked is None else valid[picked]
            for w_part, best in zip(w_parts, self._best, strict=True):
                recip = reciprocal(np.matmul(w_part[None], part))  # [B', G, Ng, L]
                if self.reduction == "max" or (self.reduction == "mean" and n_points == 1):
                    max_times_points(recip, part, best)
                elif self.reduction == "mean":
                    _max_of_sample_means(recip, part, best, per_sample)
                else:
                    best += np.matmul(recip, part.transpose(0, 1, 3, 2)).sum(axis=0, dtype=np.float64)

    def _weight_parts(self) -> list[np.ndarray]:
        if self.terms == "absolute":
            return [np.abs(self._grouped)]
        return [np.maximum(self._grouped, 0), np.minimum(self._grouped, 0)]

    def _add_gram(self, patches: np.ndarray) -> None:
        """Add `sum x x^T` and `sum x` of the points `[B, G, d, L]` to the running float64 sums.

        Each batch's product is float32 `X X^T` (2-D per group, so NumPy hands it to BLAS syrk:
        4x the float64 speed; narrow groups, depthwise convs, in one batched product); only the
        running sums are float64. Every point counts: estimating it from a subset of positions
        (256 per input and batch) saved nothing on PP-LCNet and moved textcls at 70 % by 3.5
        points, and a Gram matrix from the `--max-points` subsets cost magika 2.6 points at 90 %.
        """
        assert self._gram is not None and self._sum is not None
        batch, groups, d, n_points = patches.shape
        self._sum += patches.sum(axis=(0, 3), dtype=np.float64)
        if n_points >= GRAM_SAMPLE_POINTS and patches.flags.c_contiguous:
            # Many positions per sample: one product per sample on the patches as they lie,
            # instead of a transposed copy of the whole batch first.
            total = np.zeros(self._gram.shape, dtype=np.float32)
            for b in range(batch):
                if d < SYRK_MIN_INPUTS:
                    total += np.matmul(patches[b], patches[b].transpose(0, 2, 1))
                else:
                    for g in range(groups):
                        x = patches[b, g]
                        total[g] += x @ x.T
            self._gram += total
            return
        points = np.ascontiguousarray(patches.transpose(1, 2, 0, 3)).reshape(groups, d, -1)
        if d < SYRK_MIN_INPUTS:
            self._gram += np.matmul(points, points.transpose(0, 2, 1))
            return
        for g in range(groups):
            x = points[g]
            self._gram[g] += x @ x.T

    def result(self) -> LayerStatistics:
        self._flush()
        w = self.rows
        n_out, k = w.shape
        sens = None
        if self.compute_sensitivity:
            if self.terms == "absolute":
                share = self._best[0].reshape(n_out, k)
            else:
                pos, neg = (best.reshape(n_out, k) for best in self._best)
                share = np.where(w > 0, pos, np.where(w < 0, neg, 0))
            scale = 1.0 / max(self.points, 1) if self.reduction == "expected" else 1.0
            sens = np.minimum(np.abs(w) * share * scale, 1.0).astype(np.float32)  # float32 can pass 1
        if self.groups == 1:
            sqnorm = np.broadcast_to(self._sqnorm[0], (n_out, k))
        else:
            sqnorm = np.repeat(self._sqnorm, n_out // self.groups, axis=0)
        return LayerStatistics(sens, sqnorm, self.points, self.patches_per_sample, self._gram, self._sum)


Part = tuple[np.ndarray, np.ndarray | None]
"""Non-negative points of some samples, and which samples (None: all of them, in order)."""


def _absolute_samples(patches: np.ndarray) -> list[Part]:
    """`|a|` of the samples that have a non-zero entry (one part per sample).

    Inputs after a ReLU are already non-negative and usually every sample has content; then the
    patches are used as they are, without the two copies (selection, `abs`) of the general case.
    """
    content = patches.reshape(patches.shape[0], -1).any(axis=1)
    if not content.any():
        return []
    chosen: np.ndarray | None = None
    if not content.all():
        patches, chosen = patches[content], np.asarray(content)
    return [(patches if patches.min() >= 0 else np.abs(patches), chosen)]


def _sample_parts(patches: np.ndarray) -> list[Part]:
    """Non-negative parts of the samples that have content: `max(a, 0)` of the samples with a
    positive entry and `max(-a, 0)` of those with a negative entry (empty parts dropped)."""
    flat = patches.reshape(patches.shape[0], -1)
    parts: list[Part] = []
    has_pos: np.ndarray = np.asarray((flat > 0).any(axis=1))
    if has_pos.any():
        parts.append((np.maximum(patches[has_pos], 0) if (flat < 0).any() else patches[has_pos], has_pos))
    has_neg: np.ndarray = np.asarray((flat < 0).any(axis=1))
    if has_neg.any():
        parts.append((np.maximum(-patches[has_neg], 0), has_neg))
    return parts


def _max_of_sample_means(
    recip: np.ndarray, part: np.ndarray, out: np.ndarray, counts: np.ndarray | None = None
) -> None:
    """`out = max(out, max_b mean_l recip[b,g,i,l] * part[b,g,j,l])`, chunked over samples; the
    mean of sample b over its `counts[b]` real points (the padding points are zero)."""
    batch, groups, rows, n_points = recip.shape
    per_sample = groups * rows * part.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        sums = np.matmul(recip[start:stop], part[start:stop].transpose(0, 1, 3, 2))
        if counts is None:
            # max over samples before the division by L: one pass less over the [B, N, K] products
            np.maximum(out, sums.max(axis=0) / np.float32(n_points), out=out)
        else:
            scale = (1.0 / np.maximum(counts[start:stop], 1)).astype(np.float32)
            np.maximum(out, (sums * scale[:, None, None, None]).max(axis=0), out=out)


class DenseAccumulator(_Accumulator):
    """Gemm / MatMul / Einsum. The first axis of the input counts samples; each vector along the
    last axis is a point (the rows of a Gemm input, every token of a sequence). Gemm with transA
    takes an input `[K, M]` whose columns are the samples; an Einsum with `input_axes` has its
    points along those axes (moved last and flattened, the other axes keep their order)."""

    def __init__(
        self,
        rows: np.ndarray,
        transpose_input: bool = False,
        compute_sensitivity: bool = True,
        reduction: str = "max",
        terms: str = "signed",
        gram: bool = False,
        max_points_per_sample: int | None = None,
        seed: int = 0,
        input_axes: tuple[int, ...] = (),
    ) -> None:
        super().__init__(rows, 1, reduction, compute_sensitivity, terms, gram, max_points_per_sample, seed)
        self.transpose_input = transpose_input
        self.input_axes = tuple(input_axes)

    def _stageable(self, x: np.ndarray, token_mask: np.ndarray | None) -> bool:
        # transA has its samples on axis 1; Einsum inputs with moved axes are measured as they come
        plain = not self.transpose_input and not self.input_axes and x.shape[-1:] == (self.rows.shape[1],)
        return plain and super()._stageable(x, token_mask)

    def _update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        """`token_mask [B, T]` (non-zero = real token) drops padding tokens of a `[B, T, K]` input
        from the calibration points; it is ignored for inputs of any other shape."""
        x = np.asarray(x, dtype=np.float32)
        if self.transpose_input:
            x = x.T
        k = self.rows.shape[1]
        if self.input_axes:
            x = _points_last(x, self.input_axes, k)
        if x.shape[-1] != k:
            raise ValueError(f"layer input has {x.shape[-1]} features, the weight expects {k}")
        if x.ndim == 1:
            x = x[None]
        valid: np.ndarray | None = None
        if token_mask is not None and x.ndim == 3 and x.shape[:2] == token_mask.shape:
            keep = np.asarray(token_mask) != 0
            if self.reduction == "mean":  # per-sample means: keep the samples, zero the padding
                x = np.where(keep[:, :, None], x, np.float32(0))
                valid = keep.sum(axis=1)
            else:  # max / expected do not group points by sample: drop the padding outright
                x = x[keep][:, None, :]
        if x.size == 0:
            return
        samples = x.reshape(x.shape[0], -1, k)  # [B, T, K]
        self._accumulate(samples.transpose(0, 2, 1)[:, None], valid)  # [B, 1, K, T]


def _points_last(x: np.ndarray, axes: tuple[int, ...], k: int) -> np.ndarray:
    """`x` with `axes` moved last (in that order) and flattened into one axis of `k` entries."""
    if x.ndim < len(axes) or any(not -x.ndim <= a < x.ndim for a in axes):
        raise ValueError(f"layer input of shape {x.shape} has no axes {list(axes)}")
    x = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    lead = x.shape[: x.ndim - len(axes)]
    if prod(x.shape[x.ndim - len(axes) :]) != k:
        raise ValueError(f"layer input axes {list(axes)} of {x.shape} do not hold the weight's {k} inputs")
    return x.reshape(*lead, k)


class ConvAccumulator(_Accumulator):
    """Conv: the points are the (sample, output position) patches of each group.

    With a `ConvTransposeGeometry` the layer is a ConvTranspose: its points are the patches of
    the Conv it equals (`patches.conv_transpose_patches`), in the rows' (c, k...) order, so
    everything downstream (sensitivities, Gram matrices, Wanda, N:M) is the Conv path.
    """

    def __init__(
        self,
        rows: np.ndarray,
        geom: ConvGeometry,
        reduction: str = "mean",
        compute_sensitivity: bool = True,
        terms: str = "signed",
        gram: bool = False,
        max_points_per_sample: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            rows, geom.group, reduction, compute_sensitivity, terms, gram, max_points_per_sample, seed
        )
        self.geom = geom

    def _patches(self, x: np.ndarray) -> np.ndarray:
        if isinstance(self.geom, ConvTransposeGeometry):
            return conv_transpose_patches(x, self.geom)
        return conv_patches(x, self.geom)

    def _patch_sqnorm(self, x: np.ndarray) -> np.ndarray:
        if isinstance(self.geom, ConvTransposeGeometry):
            return conv_transpose_sqnorm(x, self.geom)
        return patch_sqnorm(x, self.geom)

    def _positions(self, spatial: tuple[int, ...]) -> int:
        if isinstance(self.geom, ConvTransposeGeometry):
            return prod(transposed_output_spatial(self.geom, spatial))
        return prod(output_spatial(self.geom, spatial))

    def _stageable(self, x: np.ndarray, token_mask: np.ndarray | None) -> bool:
        channels = self.geom.group * self.rows.shape[1] // prod(self.geom.kernel_shape)
        return x.ndim == self.geom.spatial_rank + 2 and x.shape[1] == channels and super()._stageable(x, None)

    def _update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        """`token_mask` is accepted for a uniform interface; conv inputs have no tokens.

        The squared norms come straight from `x`; the patches are only built when the
        sensitivities or the Gram matrix need them (not for Wanda).
        """
        x = np.asarray(x, dtype=np.float32)
        channels = self.geom.group * self.rows.shape[1] // prod(self.geom.kernel_shape)
        if x.ndim < 2 or x.shape[1] != channels:
            raise ValueError(f"conv input of shape {x.shape}, the weight expects {channels} channels")
        self._sqnorm += self._patch_sqnorm(x)
        if self.compute_sensitivity or self._gram is not None:
            # An all-zero sample adds 0 to every absolute-terms statistic, so with no negative
            # input the patches go in as they are: no content or sign scan over the patches.
            nonnegative = self.terms == "absolute" and x.size > 0 and float(x.min()) >= 0
            self._accumulate(self._patches(x), sqnorm=False, nonnegative=nonnegative)
            return
        positions = self._positions(tuple(x.shape[2:]))
        self.points += x.shape[0] * positions
        self.patches_per_sample = positions
