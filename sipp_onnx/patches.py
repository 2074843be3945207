"""Conv input patches (im2col) for 1-D, 2-D and 3-D convolutions, in NumPy.

`conv_patches(x, geom)` turns a Conv input `[B, C, *spatial]` into the patch tensor
`[B, G, C/G * prod(kernel), L]` with `L = prod(output spatial)`: column l of group g holds the
input values that the weights of group g multiply to produce output position l. The row order
within a patch is (channel, k1, ..., kn), the same as `W[i].reshape(-1)`, so for every sample
`W_g_rows @ patches[b, g]` equals the Conv output (without bias). Zero padding contributes zeros.

`conv_transpose_patches` does the same for ConvTranspose, through the Conv it equals.
"""

from __future__ import annotations

from math import ceil, prod

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import ConvGeometry, ConvTransposeGeometry


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
    begin, end = resolve_pads(geom, tuple(x.shape[2:]))
    squares = np.einsum("b...,b...->...", x, x, dtype=np.float64)  # [C, *spatial]
    if any(begin + end):
        squares = np.pad(squares, [(0, 0), *zip(begin, end, strict=True)])
    return _window_sums(squares, geom)


def _window_sums(squares: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Per channel and kernel offset, the sum of the padded `squares [C, *spatial]` over the
    Conv's output positions, `[G, C/G * prod(kernel)]`; `geom`'s pads are already applied."""
    n = geom.spatial_rank
    channels = squares.shape[0]
    out = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, d, s in zip(
            squares.shape[1:], geom.kernel_shape, geom.dilations, geom.strides, strict=True
        )
    ]
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


# ConvTranspose ---------------------------------------------------------------------------------
#
# A ConvTranspose is a Conv: with the input's elements spread `stride` apart (stride - 1 zeros
# between them), padded by `d*(k-1) - pad_begin` at the start and `d*(k-1) - pad_end +
# output_padding` at the end (a negative pad crops), convolved at stride 1 and the same dilation
# with the kernel flipped along every spatial axis. Its patches are that Conv's patches with the
# kernel offsets of each row reversed, so the rows `[C_out, C_in/G * prod(k)]` of
# `layers.to_rows(..., CONV_TRANSPOSE)` multiply them in (c, k...) order like a Conv's rows.


def transpose_pads(
    geom: ConvTransposeGeometry, spatial: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Begin pads, end pads and output size per spatial axis of a ConvTranspose on an input of
    size `spatial`, by ONNX Runtime's rules (the runtime the pruned model is calibrated and
    checked with; those of 1.31 were read off its outputs by tests/test_convtranspose.py).

    The full output of an axis is `s*(in-1) + output_padding + d*(k-1) + 1`; the pads crop it.
    With `output_shape` the size is given and the pads are derived from the total
    `max(0, full - output_shape)` (an output_shape above `full`, by less than a stride, adds
    zeros at the end: a negative end pad). With SAME_UPPER/SAME_LOWER the total is
    `max(0, full - in * s)`. The total splits with the odd one at the end for SAME_UPPER and at
    the start otherwise (ONNX's rule). VALID crops nothing; NOTSET crops `pads`.
    """
    n = geom.spatial_rank
    adjust = geom.output_padding or (0,) * n
    full = [
        s * (size - 1) + a + d * (k - 1) + 1
        for size, s, a, d, k in zip(
            spatial, geom.strides, adjust, geom.dilations, geom.kernel_shape, strict=True
        )
    ]
    if geom.output_shape or geom.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if geom.output_shape:
            target = list(geom.output_shape[-n:])
        else:
            target = [size * s for size, s in zip(spatial, geom.strides, strict=True)]
        begin, out = [], []
        for f, t in zip(full, target, strict=True):
            total = max(0, f - t)
            begin.append(total // 2 if geom.auto_pad == "SAME_UPPER" else total - total // 2)
            out.append(t if geom.output_shape else f - total)
        end = [f - o - b for f, o, b in zip(full, out, begin, strict=True)]
        return tuple(begin), tuple(end), tuple(out)
    if geom.auto_pad == "VALID":
        return (0,) * n, (0,) * n, tuple(full)
    pads = geom.pads or (0,) * (2 * n)
    begin, end = list(pads[:n]), list(pads[n:])
    return tuple(begin), tuple(end), tuple(f - b - e for f, b, e in zip(full, begin, end, strict=True))


def transposed_output_spatial(geom: ConvTransposeGeometry, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Output spatial size of the ConvTranspose for an input of spatial size `spatial`."""
    return transpose_pads(geom, spatial)[2]


def _as_conv(geom: ConvTransposeGeometry) -> ConvGeometry:
    """The stride-1 Conv (same kernel, dilation and groups) that the spread input goes through."""
    n = geom.spatial_rank
    return ConvGeometry(geom.kernel_shape, (1,) * n, geom.dilations, (0,) * (2 * n), "NOTSET", geom.group)


def _spread(x: np.ndarray, geom: ConvTransposeGeometry) -> np.ndarray:
    """`x [..., C, *spatial]` with its elements `stride` apart and padded (or cropped) so that
    the stride-1 Conv `_as_conv(geom)` over it gives the ConvTranspose's output positions."""
    n = geom.spatial_rank
    spatial = tuple(x.shape[-n:])
    begin, end, out = transpose_pads(geom, spatial)
    if min(out) < 1:
        raise ValueError(f"conv-transpose input of spatial size {spatial} gives an empty output {out}")
    lead = x.shape[:-n]
    keep: tuple[slice, ...] = (slice(None),) * len(lead)
    spread_size = tuple((size - 1) * s + 1 for size, s in zip(spatial, geom.strides, strict=True))
    if all(s == 1 for s in geom.strides):
        spread = x
    else:
        spread = np.zeros((*lead, *spread_size), dtype=x.dtype)
        spread[keep + tuple(slice(None, None, s) for s in geom.strides)] = x
    pad_begin = [d * (k - 1) - b for d, k, b in zip(geom.dilations, geom.kernel_shape, begin, strict=True)]
    pad_end = [
        d * (k - 1) - e + a
        for d, k, e, a in zip(
            geom.dilations, geom.kernel_shape, end, geom.output_padding or (0,) * n, strict=True
        )
    ]
    # Crop first (negative pads), then pad with zeros (positive ones).
    crop = tuple(
        slice(max(0, -pb), size - max(0, -pe))
        for pb, pe, size in zip(pad_begin, pad_end, spread_size, strict=True)
    )
    spread = spread[keep + crop]
    widths = [(max(0, pb), max(0, pe)) for pb, pe in zip(pad_begin, pad_end, strict=True)]
    if any(w for pair in widths for w in pair):
        spread = np.pad(spread, [(0, 0)] * len(lead) + widths)
    return spread


def _flip_kernel_rows(values: np.ndarray, geom: ConvTransposeGeometry, axis: int) -> np.ndarray:
    """Reverse the kernel offsets of the (c, k...) axis `axis` of `values`."""
    shape = values.shape
    channels = shape[axis] // prod(geom.kernel_shape)
    split = values.reshape(*shape[:axis], channels, *geom.kernel_shape, *shape[axis + 1 :])
    flip = tuple(range(axis + 1, axis + 1 + geom.spatial_rank))
    return np.ascontiguousarray(np.flip(split, axis=flip)).reshape(shape)


def conv_transpose_patches(x: np.ndarray, geom: ConvTransposeGeometry) -> np.ndarray:
    """Patch tensor `[B, G, C_in/G * prod(kernel), L]` of the ConvTranspose input `x`
    `[B, C_in, *spatial]`, `L = prod(output spatial)`: for every sample the layer's rows
    (`to_rows(W, CONV_TRANSPOSE, G)`) of group g times `patches[b, g]` is its output (no bias)."""
    n = geom.spatial_rank
    if x.ndim != n + 2:
        raise ValueError(f"conv-transpose input of rank {x.ndim}, expected {n + 2}")
    patches = conv_patches(_spread(x, geom), _as_conv(geom))
    return _flip_kernel_rows(patches, geom, axis=2)


def conv_transpose_sqnorm(x: np.ndarray, geom: ConvTransposeGeometry) -> np.ndarray:
    """`patch_sqnorm` of a ConvTranspose, `[G, C_in/G * prod(kernel)]` float64, without building
    the patches: the batch-summed squares are spread like the input (spreading and squaring
    commute), and summed per kernel offset like a Conv's."""
    squares = np.einsum("b...,b...->...", x, x, dtype=np.float64)  # [C, *spatial]
    spread = _spread(squares, geom)
    sums = _window_sums(spread, _as_conv(geom))
    return _flip_kernel_rows(sums, geom, axis=1)
