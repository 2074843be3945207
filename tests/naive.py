"""Slow, obviously-correct reference implementations, written from docs/sipp.md sections 1-2.

Everything here is plain Python loops over float64 values (NumPy is only used as a container).
Nothing is imported from `sipp_onnx`: these functions are the oracle the library is tested against.

Conventions (spec section 1):
- a dense layer has canonical rows `W [N, K]`; row i holds the weights of output neuron i;
- a Conv layer has rows `W [C_out, C_in/G * prod(k)]`, row i = `W[i]` flattened in (c, k1..kn)
  order, and row i belongs to group `i // (C_out / G)`;
- a "sample" is one entry of the calibration batch (the leading axis of the layer input); the
  sign split of negative inputs is decided per sample over its whole input tensor.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

EPS = 1.1920929e-07


# --------------------------------------------------------------------------------------------
# Conv geometry (ONNX Conv semantics)
# --------------------------------------------------------------------------------------------


def naive_pads(kernel_shape, strides, dilations, pads, auto_pad, spatial):
    """(begin, end) padding per spatial axis, from the ONNX Conv operator definition."""
    n = len(kernel_shape)
    if auto_pad in ("NOTSET", ""):
        p = list(pads) if pads else [0] * (2 * n)
        return tuple(p[:n]), tuple(p[n:])
    if auto_pad == "VALID":
        return (0,) * n, (0,) * n
    begin, end = [], []
    for axis in range(n):
        size, k, s, d = spatial[axis], kernel_shape[axis], strides[axis], dilations[axis]
        out = -(-size // s)  # ceil(size / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        if auto_pad == "SAME_UPPER":  # the extra padding goes at the end
            b = total // 2
            e = total - b
        elif auto_pad == "SAME_LOWER":  # the extra padding goes at the beginning
            e = total // 2
            b = total - e
        else:
            raise ValueError(auto_pad)
        begin.append(b)
        end.append(e)
    return tuple(begin), tuple(end)


def naive_output_spatial(kernel_shape, strides, dilations, pads, auto_pad, spatial):
    """Output spatial size (ONNX Conv): ceil(in/stride) for SAME_*, else the floor formula."""
    n = len(kernel_shape)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(-(-spatial[a] // strides[a]) for a in range(n))
    begin, end = naive_pads(kernel_shape, strides, dilations, pads, auto_pad, spatial)
    out = []
    for a in range(n):
        span = (kernel_shape[a] - 1) * dilations[a] + 1
        out.append((spatial[a] + begin[a] + end[a] - span) // strides[a] + 1)
    return tuple(out)


def naive_patches(x, kernel_shape, strides, dilations, pads, auto_pad, group):
    """Patch tensor `[B, G, C/G*prod(k), L]` of `x [B, C, *spatial]` by explicit loops.

    Row r of a patch enumerates (c, k1, ..., kn) in C order; column l enumerates the output
    positions (o1, ..., on) in C order. An input coordinate outside the tensor (padding) is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    batch, channels = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    n = len(spatial)
    assert len(kernel_shape) == n
    begin, _ = naive_pads(kernel_shape, strides, dilations, pads, auto_pad, spatial)
    out = naive_output_spatial(kernel_shape, strides, dilations, pads, auto_pad, spatial)
    assert channels % group == 0
    cg = channels // group
    d = cg * math.prod(kernel_shape)
    n_pos = math.prod(out)
    result = np.zeros((batch, group, d, n_pos), dtype=np.float64)
    positions = list(itertools.product(*[range(o) for o in out]))
    offsets = list(itertools.product(*[range(k) for k in kernel_shape]))
    for b in range(batch):
        for g in range(group):
            for l_idx, pos in enumerate(positions):
                r = 0
                for c in range(cg):
                    for off in offsets:
                        coord = []
                        inside = True
                        for a in range(n):
                            i = pos[a] * strides[a] - begin[a] + off[a] * dilations[a]
                            if i < 0 or i >= spatial[a]:
                                inside = False
                            coord.append(i)
                        if inside:
                            result[b, g, r, l_idx] = x[(b, g * cg + c, *coord)]
                        r += 1
    return result


def naive_conv(x, weight, kernel_shape, strides, dilations, pads, auto_pad, group):
    """Direct Conv (no bias) by loops, `weight [C_out, C/G, *k]` -> `[B, C_out, *out]`."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    batch, channels = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    n = len(spatial)
    begin, _ = naive_pads(kernel_shape, strides, dilations, pads, auto_pad, spatial)
    out = naive_output_spatial(kernel_shape, strides, dilations, pads, auto_pad, spatial)
    c_out = weight.shape[0]
    cg = channels // group
    per_group = c_out // group
    y = np.zeros((batch, c_out, *out), dtype=np.float64)
    for b in range(batch):
        for co in range(c_out):
            g = co // per_group
            for pos in itertools.product(*[range(o) for o in out]):
                acc = 0.0
                for c in range(cg):
                    for off in itertools.product(*[range(k) for k in kernel_shape]):
                        coord = [pos[a] * strides[a] - begin[a] + off[a] * dilations[a] for a in range(n)]
                        if all(0 <= coord[a] < spatial[a] for a in range(n)):
                            acc += weight[(co, c, *off)] * x[(b, g * cg + c, *coord)]
                y[(b, co, *pos)] = acc
    return y


# --------------------------------------------------------------------------------------------
# Relative contributions and sensitivities (spec section 2)
# --------------------------------------------------------------------------------------------


def naive_g(w_row, a):
    """g_j for one row `w_row [K]` and one non-negative point `a [K]` (float64 list).

    For w_j > 0: w_j * a_j / z+ with z+ = sum_{k: w_k > 0} w_k a_k; for w_j < 0 the same with the
    negative part; 0 for w_j == 0 and wherever |z| <= EPS.
    """
    k = len(w_row)
    z_pos = 0.0
    z_neg = 0.0
    for j in range(k):
        w = float(w_row[j])
        if w > 0:
            z_pos += w * float(a[j])
        elif w < 0:
            z_neg += w * float(a[j])
    g = [0.0] * k
    for j in range(k):
        w = float(w_row[j])
        if w > 0 and abs(z_pos) > EPS:
            g[j] = w * float(a[j]) / z_pos
        elif w < 0 and abs(z_neg) > EPS:
            g[j] = w * float(a[j]) / z_neg
    return g


def naive_z(w_row, a):
    """(z+, z-) of one row at one point."""
    z_pos = sum(float(w) * float(v) for w, v in zip(w_row, a, strict=True) if w > 0)
    z_neg = sum(float(w) * float(v) for w, v in zip(w_row, a, strict=True) if w < 0)
    return z_pos, z_neg


def split_sample(sample):
    """The non-negative versions of one calibration sample (spec: decided per sample)."""
    sample = np.asarray(sample, dtype=np.float64)
    if (sample < 0).any():
        return [np.maximum(sample, 0.0), np.maximum(-sample, 0.0)]
    return [sample]


def content_parts(sample):
    """The parts of one sample that exist: max(a, 0) if it has a positive entry, max(-a, 0) if it
    has a negative entry (the points counted by the 'expected' reduction)."""
    sample = np.asarray(sample, dtype=np.float64)
    parts = []
    if (sample > 0).any():
        parts.append(np.maximum(sample, 0.0))
    if (sample < 0).any():
        parts.append(np.maximum(-sample, 0.0))
    return parts


def naive_dense_sensitivity(rows, samples, reduction="max"):
    """s `[N, K]` of a Gemm/MatMul layer.

    `samples` is an iterable of per-sample layer inputs, each `[..., K]` (one Gemm row `[K]`, or
    one MatMul sample `[T, K]`); every vector along the last axis is one point. 'max': max over
    all points; 'mean': mean over the points of each sample part, then max; 'expected': the sum of
    g over a point's sign parts, averaged over every point (sample position).
    """
    rows = np.asarray(rows, dtype=np.float64)
    n, k = rows.shape
    s = [[0.0] * k for _ in range(n)]
    total = [[0.0] * k for _ in range(n)]
    counted = 0
    for sample in samples:
        parts = split_sample(sample) if reduction != "expected" else content_parts(sample)
        counted += np.asarray(sample).reshape(-1, k).shape[0]
        for part in parts:
            points = part.reshape(-1, k)
            for i in range(n):
                acc = [0.0] * k
                for point in points:
                    g = naive_g(rows[i], point)
                    for j in range(k):
                        acc[j] += g[j]
                        if reduction == "max" and g[j] > s[i][j]:
                            s[i][j] = g[j]
                for j in range(k):
                    total[i][j] += acc[j]
                    if reduction == "mean" and acc[j] / len(points) > s[i][j]:
                        s[i][j] = acc[j] / len(points)
    if reduction == "expected":
        return np.array(total, dtype=np.float64) / max(counted, 1)
    return np.array(s, dtype=np.float64).reshape(n, k)


def naive_dense_sqnorm(rows, samples):
    """input_sqnorm `[N, K]`: sum over all points of a_j^2 of the raw (unsplit) input."""
    n, k = np.asarray(rows).shape
    acc = [0.0] * k
    for sample in samples:
        for point in np.asarray(sample, dtype=np.float64).reshape(-1, k):
            for j in range(k):
                acc[j] += float(point[j]) ** 2
    return np.array([acc] * n, dtype=np.float64)


def naive_conv_sensitivity(rows, x, kernel_shape, strides, dilations, pads, auto_pad, group, reduction):
    """s `[C_out, d]` of a Conv layer for the calibration input `x [B, C, *spatial]`.

    Every sample is split by sign if it has a negative entry; each resulting sample yields L
    patches. 'mean': mean of g over the L patches of that sample, then max over samples.
    'max': max over all patches of all samples. 'expected': the sum of g over a patch's sign parts
    (see content_parts), averaged over every patch of every sample.
    """
    rows = np.asarray(rows, dtype=np.float64)
    c_out, d = rows.shape
    per_group = c_out // group
    s = [[0.0] * d for _ in range(c_out)]
    if reduction == "expected":
        total = np.zeros((c_out, d))
        counted = 0
        for b in range(x.shape[0]):
            counted += naive_patches(
                x[b][None], kernel_shape, strides, dilations, pads, auto_pad, group
            ).shape[3]
            for part in content_parts(x[b]):
                p = naive_patches(part[None], kernel_shape, strides, dilations, pads, auto_pad, group)
                for i in range(c_out):
                    for l_idx in range(p.shape[3]):
                        total[i] += naive_g(rows[i], p[0, i // per_group, :, l_idx])
        return total / max(counted, 1)
    for b in range(x.shape[0]):
        for part in split_sample(x[b]):
            p = naive_patches(part[None], kernel_shape, strides, dilations, pads, auto_pad, group)
            n_pos = p.shape[3]
            for i in range(c_out):
                gi = i // per_group
                if reduction == "mean":
                    acc = [0.0] * d
                    for l_idx in range(n_pos):
                        g = naive_g(rows[i], p[0, gi, :, l_idx])
                        for j in range(d):
                            acc[j] += g[j]
                    for j in range(d):
                        v = acc[j] / n_pos
                        if v > s[i][j]:
                            s[i][j] = v
                elif reduction == "max":
                    for l_idx in range(n_pos):
                        g = naive_g(rows[i], p[0, gi, :, l_idx])
                        for j in range(d):
                            if g[j] > s[i][j]:
                                s[i][j] = g[j]
                else:
                    raise ValueError(reduction)
    return np.array(s, dtype=np.float64)


def naive_conv_sqnorm(rows, x, kernel_shape, strides, dilations, pads, auto_pad, group):
    """input_sqnorm `[C_out, d]`: sum over samples and patches of (patch entry j of row i's group)^2
    of the raw (unsplit) input."""
    c_out, d = np.asarray(rows).shape
    per_group = c_out // group
    p = naive_patches(x, kernel_shape, strides, dilations, pads, auto_pad, group)
    out = np.zeros((c_out, d), dtype=np.float64)
    for i in range(c_out):
        gi = i // per_group
        for b in range(p.shape[0]):
            for j in range(d):
                for l_idx in range(p.shape[3]):
                    out[i, j] += float(p[b, gi, j, l_idx]) ** 2
    return out


# --------------------------------------------------------------------------------------------
# 'absolute' terms: a weight's share of the row's absolute mass (no sign split)
# --------------------------------------------------------------------------------------------


def naive_g_abs(w_row, a):
    """g_j = |w_j a_j| / sum_k |w_k a_k| for one row and one (raw, signed) point; 0 if the mass
    is at most EPS."""
    terms = [abs(float(w) * float(v)) for w, v in zip(w_row, a, strict=True)]
    mass = sum(terms)
    return [t / mass if mass > EPS else 0.0 for t in terms]


def naive_abs_sensitivity(rows, sample_points, reduction="max"):
    """s `[N, K]` with absolute terms. `sample_points` is a list of per-sample point lists (each
    point a vector [K] of the raw input: a Gemm row, a token, or a conv patch of row i's group
    given by `sample_points[b][i]` when it is a dict keyed by row)."""
    rows = np.asarray(rows, dtype=np.float64)
    n, k = rows.shape
    s = np.zeros((n, k))
    total = np.zeros((n, k))
    counted = 0
    for points_of in sample_points:
        for i in range(n):
            pts = points_of(i)
            acc = np.zeros(k)
            for point in pts:
                g = np.array(naive_g_abs(rows[i], point))
                acc += g
                if reduction == "max":
                    s[i] = np.maximum(s[i], g)
            total[i] += acc
            if reduction == "mean":
                s[i] = np.maximum(s[i], acc / len(pts))
        counted += len(points_of(0))
    return total / max(counted, 1) if reduction == "expected" else s
