"""Conv input patches (im2col) for 1-D, 2-D and 3-D convolutions, in NumPy.

`conv_patches(x, geom)` turns a Conv input `[B, C, *spatial]` into the patch tensor
`[B, G, C/G * prod(kernel), L]` with `L = prod(output spatial)`: column l of group g holds the
input values that the weights of group g multiply to produce output position l. The row order
within a patch is (channel, k1, ..., kn), the same as `W[i].reshape(-1)`, so for every sample
`W_g_rows @ patches[b, g]` equals the Conv output (without bias). Zero padding contributes zeros.
"""

from __future__ import annotations

from math import ceil, prod

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import ConvGeometry


def resolve_pads(geom: ConvGeometry, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Begin and end padding per spatial axis for an input of size `spatial` (ONNX auto_pad rules)."""
    n = geom.spatial_rank
    if geom.auto_pad in ("NOTSET", ""):
        pads = geom.pads or (0,) * (2 * n)
        return tuple(pads[:n]), tuple(pads[n:])
    if geom.auto_pad == "VALID":
        return (0,) * n, (0,) * n
    begin, end = [], []
    for size, k, s, d in zip(spatial, geom.kernel_shape, geom.strides, geom.dilations, strict=True):
        out = ceil(size / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        if geom.auto_pad == "SAME_UPPER":
            begin.append(small)
            end.append(big)
        else:  # SAME_LOWER
            begin.append(big)
            end.append(small)
    return tuple(begin), tuple(end)


def output_spatial(geom: ConvGeometry, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Output spatial size of the Conv for an input of spatial size `spatial`."""
    begin, end = resolve_pads(geom, spatial)
    out = []
    for size, k, s, d, pb, pe in zip(
        spatial, geom.kernel_shape, geom.strides, geom.dilations, begin, end, strict=True
    ):
        out.append((size + pb + pe - ((k - 1) * d + 1)) // s + 1)
    return tuple(out)


def patch_sqnorm(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """`sum over samples and positions of patch**2`, `[G, C/G * prod(kernel)]` float64, without
    building the patches.

    Only the sum over samples is needed, so the squares are summed over the batch first; each
    kernel offset then sums one strided window of that `[C, *spatial]` map. One pass over `x`
    instead of the patch tensor's `prod(kernel)` copies: Wanda's whole input statistic.
    """
    n = geom.spatial_rank
    channels = x.shape[1]
    spatial = tuple(x.shape[2:])
    begin, end = resolve_pads(geom, spatial)
    out = output_spatial(geom, spatial)
    squares = np.einsum("b...,b...->...", x, x, dtype=np.float64)  # [C, *spatial]
    if any(begin + end):
        squares = np.pad(squares, [(0, 0), *zip(begin, end, strict=True)])
    sums = np.empty((channels, prod(geom.kernel_shape)), dtype=np.float64)
    offsets = np.ndindex(*geom.kernel_shape)
    for index, offset in enumerate(offsets):
        window = tuple(
            slice(k * d, k * d + (o - 1) * s + 1, s)
            for k, d, o, s in zip(offset, geom.dilations, out, geom.strides, strict=True)
        )
        sums[:, index] = squares[(slice(None), *window)].sum(axis=tuple(range(1, n + 1)))
    return sums.reshape(geom.group, -1)


def conv_patches(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Patch tensor `[B, G, C/G * prod(kernel), L]` of the Conv input `x` `[B, C, *spatial]`."""
    n = geom.spatial_rank
    if x.ndim != n + 2:
        raise ValueError(f"conv input of rank {x.ndim}, expected {n + 2}")
    batch, channels = x.shape[:2]
    spatial = tuple(x.shape[2:])
    begin, end = resolve_pads(geom, spatial)
    out = output_spatial(geom, spatial)
    if min(out) < 1:
        raise ValueError(f"conv input of spatial size {spatial} gives an empty output {out}")
    groups = geom.group
    rows = channels // groups * prod(geom.kernel_shape)
    positions = tuple(slice(None, (o - 1) * s + 1, s) for o, s in zip(out, geom.strides, strict=True))
    if all(k == 1 for k in geom.kernel_shape) and not any(begin + end):
        # Pointwise conv: each position's patch is its channel vector, so no window copy (a view
        # for stride 1, the strided positions otherwise).
        picked = x[(slice(None), slice(None), *positions)]
        return np.ascontiguousarray(picked).reshape(batch, groups, rows, prod(out))
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)]) if any(begin + end) else x
    span = tuple((k - 1) * d + 1 for k, d in zip(geom.kernel_shape, geom.dilations, strict=True))
    axes = tuple(range(2, 2 + n))
    windows = sliding_window_view(padded, span, axis=axes)  # [B, C, o'..., span...]
    index = (slice(None), slice(None), *positions, *(slice(None, None, d) for d in geom.dilations))
    windows = windows[index]  # [B, C, o..., k...]
    windows = windows.reshape(batch, groups, channels // groups, *out, *geom.kernel_shape)
    # -> [B, G, C/G, k..., o...]: patch rows in (c, k...) order, positions last.
    order = (0, 1, 2, *range(3 + n, 3 + 2 * n), *range(3, 3 + n))
    patches = windows.transpose(order)
    return np.ascontiguousarray(patches).reshape(batch, groups, rows, prod(out))
