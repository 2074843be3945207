"""Vectorized sensitivities (sipp_onnx.sensitivity) against the loop reference in naive.py."""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# tests/ has no __init__.py: pytest puts it on sys.path (rootdir "prepend" import mode)
from naive import (
    EPS,
    naive_abs_sensitivity,
    naive_conv_sensitivity,
    naive_conv_sqnorm,
    naive_dense_sensitivity,
    naive_dense_sqnorm,
    naive_g,
    naive_g_abs,
    naive_output_spatial,
    naive_patches,
    naive_z,
)

from sipp_onnx.layers import ConvGeometry
from sipp_onnx.sensitivity import EPS32, ConvAccumulator, DenseAccumulator

RTOL = 1e-4
ATOL = 1e-6


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ data helpers


def weights(shape, seed, zeros=0.0):
    """float32 weights with a fraction `zeros` of exact zeros."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    if zeros:
        w[rng.random(shape) < zeros] = 0.0
    return w


def activations(shape, seed, negative):
    """float32 inputs: ReLU-like (with exact zeros) when not `negative`, else signed."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    if not negative:
        a = np.maximum(a, 0.0) + np.float32(0.0)
    return a


def dense_lib(rows, batches, transpose_input=False):
    acc = DenseAccumulator(rows, transpose_input=transpose_input)
    for b in batches:
        acc.update(b)
    return acc.result()


def geometry(kernel, strides=None, dilations=None, pads=None, auto_pad="NOTSET", group=1):
    n = len(kernel)
    return ConvGeometry(
        kernel_shape=tuple(kernel),
        strides=tuple(strides) if strides is not None else (1,) * n,
        dilations=tuple(dilations) if dilations is not None else (1,) * n,
        pads=tuple(pads) if pads is not None else (0,) * (2 * n),
        auto_pad=auto_pad,
        group=group,
    )


def conv_args(geom: ConvGeometry) -> dict[str, Any]:
    """The geometry as keyword arguments of the naive.py conv functions."""
    return {
        "kernel_shape": geom.kernel_shape,
        "strides": geom.strides,
        "dilations": geom.dilations,
        "pads": geom.pads,
        "auto_pad": geom.auto_pad,
        "group": geom.group,
    }


def conv_lib(rows, geom, batches, reduction):
    acc = ConvAccumulator(rows, geom, reduction=reduction)
    for b in batches:
        acc.update(b)
    return acc.result()


# ------------------------------------------------------------------ the naive reference itself


def test_naive_g_by_hand():
    w = [2.0, 1.0, -1.0, -3.0, 0.0]
    a = [1.0, 2.0, 4.0, 0.0, 5.0]
    # z+ = 2 + 2 = 4 -> g = [0.5, 0.5]; z- = -4 + 0 = -4 -> g = [1, 0]; zero weight -> 0
    assert naive_g(w, a) == [0.5, 0.5, 1.0, 0.0, 0.0]
    assert naive_z(w, a) == (4.0, -4.0)
    # an empty sign part and z = 0 give 0, never NaN
    assert naive_g([1.0, 1.0], [0.0, 0.0]) == [0.0, 0.0]
    assert naive_g([-1.0, 0.0], [0.0, 3.0]) == [0.0, 0.0]


def test_naive_split_and_reductions_by_hand():
    # one Gemm sample with a negative entry: a+ = [1, 0], a- = [0, 2]
    rows = np.array([[1.0, 1.0]])
    s = naive_dense_sensitivity(rows, [np.array([1.0, -2.0])])
    np.testing.assert_array_equal(s, [[1.0, 1.0]])
    # |a| would give [1/3, 2/3]: the split must not mix the two parts
    s_abs = naive_dense_sensitivity(rows, [np.array([1.0, 2.0])])
    np.testing.assert_allclose(s_abs, [[1 / 3, 2 / 3]])
    # conv mean vs max: 1-D, k=2, one sample [1, 0, 0, 1] -> patches [1,0], [0,0], [0,1]
    x = np.array([[[1.0, 0.0, 0.0, 1.0]]])
    args = ((2,), (1,), (1,), (0, 0), "NOTSET", 1)
    w = np.array([[1.0, 1.0]])
    np.testing.assert_allclose(naive_conv_sensitivity(w, x, *args, "max"), [[1.0, 1.0]])
    np.testing.assert_allclose(naive_conv_sensitivity(w, x, *args, "mean"), [[1 / 3, 1 / 3]])


@pytest.mark.parametrize("seed", range(5))
def test_naive_g_sums_to_one_per_sign_part(seed):
    rng = np.random.default_rng(seed)
    k = 7
    for _ in range(20):
        w = rng.standard_normal(k)
        w[rng.random(k) < 0.2] = 0.0
        a = np.maximum(rng.standard_normal(k), 0.0)
        g = naive_g(w, a)
        z_pos, z_neg = naive_z(w, a)
        assert all(0.0 <= v <= 1.0 + 1e-12 for v in g)
        for mask, z in ((w > 0, z_pos), (w < 0, z_neg)):
            total = sum(v for v, m in zip(g, mask, strict=True) if m)
            if abs(z) > EPS:
                assert total == pytest.approx(1.0, rel=1e-12)
            else:
                assert total == 0.0


# ------------------------------------------------------------------ dense: Gemm / MatMul


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("transpose_input", [False, True])
def test_gemm_rows_match_naive(negative, transpose_input):
    n, k, m = 5, 6, 9
    rows = weights((n, k), seed=1, zeros=0.2)
    x = activations((m, k), seed=2, negative=negative)
    feed = np.ascontiguousarray(x.T) if transpose_input else x
    st_ = dense_lib(rows, [feed], transpose_input)
    want = naive_dense_sensitivity(rows, list(x))  # every Gemm row is one sample / one point
    assert st_.sensitivity.shape == (n, k)
    assert st_.sensitivity.dtype == np.float32
    close(st_.sensitivity, want)
    close(st_.input_sqnorm, naive_dense_sqnorm(rows, list(x)))
    assert st_.points == m
    assert st_.patches_per_sample == 1


@pytest.mark.parametrize("negative", ["none", "all", "mixed"])
def test_matmul_3d_tokens_match_naive(negative):
    b, t, k, n = 3, 4, 5, 6
    rows = weights((n, k), seed=3, zeros=0.15)
    if negative == "mixed":  # some samples non-negative, some signed: the split is per sample
        x = np.concatenate(
            [activations((2, t, k), 4, negative=False), activations((1, t, k), 5, negative=True)]
        )
    else:
        x = activations((b, t, k), seed=6, negative=negative == "all")
    res = dense_lib(rows, [x])
    close(res.sensitivity, naive_dense_sensitivity(rows, list(x)))
    close(res.input_sqnorm, naive_dense_sqnorm(rows, list(x)))
    assert res.points == b * t


def test_zero_weights_have_zero_sensitivity():
    rows = weights((6, 8), seed=7, zeros=0.5)
    rows[2] = 0.0  # a row with no weights at all
    x = activations((10, 8), seed=8, negative=True)
    res = dense_lib(rows, [x])
    assert np.all(res.sensitivity[rows == 0] == 0)
    assert np.all(res.sensitivity[2] == 0)
    close(res.sensitivity, naive_dense_sensitivity(rows, list(x)))


def test_rows_with_an_empty_sign_part():
    rows = np.array(
        [
            [0.5, 1.0, 2.0, 0.0],  # only positive
            [-0.5, -1.0, 0.0, -3.0],  # only negative
            [0.0, 0.0, 0.0, 0.0],  # nothing
            [1.0, -1.0, 0.0, 0.0],  # one of each
        ],
        dtype=np.float32,
    )
    x = activations((7, 4), seed=9, negative=False)
    res = dense_lib(rows, [x])
    s = res.sensitivity
    assert np.all(np.isfinite(s))
    close(s, naive_dense_sensitivity(rows, list(x)))
    # a single weight alone in its sign part has g = 1 wherever its input is non-zero
    assert s[3, 0] == pytest.approx(1.0, rel=1e-6) and s[3, 1] == pytest.approx(1.0, rel=1e-6)


def test_points_with_zero_denominator():
    rows = weights((4, 5), seed=10)
    x = activations((6, 5), seed=11, negative=False)
    x[[0, 3]] = 0.0  # all-zero points: z = 0 everywhere
    x[1] = 0.0
    x[1, 2] = 1.0  # one non-zero input: z of the other sign part may be 0
    res = dense_lib(rows, [x])
    assert np.all(np.isfinite(res.sensitivity))
    close(res.sensitivity, naive_dense_sensitivity(rows, list(x)))
    # only zero points: nothing is learned
    only_zero = dense_lib(rows, [np.zeros((3, 5), np.float32)])
    np.testing.assert_array_equal(only_zero.sensitivity, 0)
    np.testing.assert_array_equal(only_zero.input_sqnorm, 0)
    assert only_zero.points == 3


def test_eps_boundary_is_exclusive():
    # spec: g = 0 wherever |z| <= eps32; 2^-23 == eps32 exactly in float32
    assert np.float32(EPS) == EPS32
    rows = np.array([[1.0], [-1.0], [0.5]], dtype=np.float32)
    at_eps = dense_lib(rows, [np.array([[EPS32]], dtype=np.float32)]).sensitivity
    np.testing.assert_array_equal(at_eps, [[0.0], [0.0], [0.0]])
    above = dense_lib(rows, [np.array([[4 * EPS32]], dtype=np.float32)]).sensitivity
    np.testing.assert_allclose(above, [[1.0], [1.0], [1.0]], rtol=1e-6)
    # naive agrees
    np.testing.assert_array_equal(naive_dense_sensitivity(rows, [np.array([EPS32])]), 0.0)


def test_negative_input_is_split_not_absolute():
    rows = np.array([[1.0, 1.0]], dtype=np.float32)
    res = dense_lib(rows, [np.array([[1.0, -2.0]], dtype=np.float32)])
    # a+ = [1, 0] and a- = [0, 2] each give g = 1 for their entry; |a| would give [1/3, 2/3]
    close(res.sensitivity, [[1.0, 1.0]])
    close(res.input_sqnorm, [[1.0, 4.0]])


@pytest.mark.parametrize("negative", [False, True])
def test_dense_streaming_equals_one_batch(negative):
    rows = weights((5, 6), seed=12, zeros=0.2)
    x = activations((4, 3, 6), seed=13, negative=negative)
    if negative:
        x[1] = np.abs(x[1])  # one sample without negative entries among signed ones
    one = dense_lib(rows, [x])
    many = dense_lib(rows, [x[:1], x[1:3], x[3:]])
    close(many.sensitivity, one.sensitivity, rtol=1e-6, atol=1e-7)
    close(many.input_sqnorm, one.input_sqnorm, rtol=1e-6, atol=1e-7)
    assert many.points == one.points == 12
    close(many.sensitivity, naive_dense_sensitivity(rows, list(x)))
    # Gemm with transA, streamed column blocks
    flat = x.reshape(-1, 6)
    t_one = dense_lib(rows, [np.ascontiguousarray(flat.T)], transpose_input=True)
    t_many = dense_lib(rows, [np.ascontiguousarray(flat[:5].T), np.ascontiguousarray(flat[5:].T)], True)
    close(t_many.sensitivity, t_one.sensitivity, rtol=1e-6, atol=1e-7)
    close(t_many.sensitivity, naive_dense_sensitivity(rows, list(flat)))


def test_dense_single_point_sums_to_one():
    # with a single point, s equals g of that point: per sign part of a row it sums to 1 or 0
    rng = np.random.default_rng(14)
    for trial in range(10):
        rows = weights((4, 6), seed=100 + trial, zeros=0.2)
        a = np.maximum(rng.standard_normal(6), 0).astype(np.float32)
        s = dense_lib(rows, [a[None]]).sensitivity.astype(np.float64)
        for i in range(4):
            z_pos, z_neg = naive_z(rows[i], a)
            for mask, z in ((rows[i] > 0, z_pos), (rows[i] < 0, z_neg)):
                total = s[i, mask].sum()
                if abs(z) > EPS:
                    assert total == pytest.approx(1.0, rel=1e-5)
                else:
                    assert total == 0.0


@pytest.mark.parametrize("negative", [False, True])
def test_dense_range_and_row_scaling_invariance(negative):
    rows = weights((6, 7), seed=15, zeros=0.1)
    x = activations((3, 5, 7), seed=16, negative=negative)
    s = dense_lib(rows, [x]).sensitivity
    assert np.all(s >= 0) and np.all(s <= 1 + 1e-6)
    scale = np.random.default_rng(17).uniform(0.01, 100, size=(6, 1)).astype(np.float32)
    s_scaled = dense_lib(rows * scale, [x]).sensitivity
    close(s_scaled, s, rtol=1e-4, atol=1e-6)


def test_dense_depends_on_data_through_w_times_a_only():
    # scaling input feature j by c_j > 0 and weight column j by 1/c_j leaves s unchanged
    rows = weights((4, 5), seed=18)
    x = activations((8, 5), seed=19, negative=False)
    c = np.array([0.1, 1.0, 4.0, 0.5, 8.0], dtype=np.float32)
    s = dense_lib(rows, [x]).sensitivity
    s2 = dense_lib(rows / c, [x * c]).sensitivity
    close(s2, s, rtol=1e-4, atol=1e-6)


VALUES = [-2.0, -1.0, -0.5, 0.0, 0.0, 0.25, 1.0, 3.0]


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_dense_random_shapes_match_naive(data):
    n = data.draw(st.integers(1, 5), label="N")
    k = data.draw(st.integers(1, 6), label="K")
    lead = data.draw(st.sampled_from([(1,), (3,), (2, 3), (1, 4)]), label="leading dims")
    transpose = data.draw(st.booleans(), label="transpose_input") and len(lead) == 1
    rows = data.draw(hnp.arrays(np.float32, (n, k), elements=st.sampled_from(VALUES)), label="W")
    x = data.draw(
        hnp.arrays(np.float32, (*lead, k), elements=st.sampled_from(VALUES + [0.0, 2.0])),
        label="x",
    )
    res = dense_lib(rows, [np.ascontiguousarray(x.T) if transpose else x], transpose)
    samples = list(x)  # Gemm: a row; MatMul: [T, K]
    close(res.sensitivity, naive_dense_sensitivity(rows, samples))
    close(res.input_sqnorm, naive_dense_sqnorm(rows, samples))
    assert np.all(res.sensitivity >= 0) and np.all(res.sensitivity <= 1 + 1e-6)


# ------------------------------------------------------------------ conv

CONV_CASES = {
    "1d_pads": ((2, 3, 7), 4, geometry((3,), pads=(1, 2))),
    "1d_stride_dil_groups": ((2, 4, 9), 4, geometry((3,), (2,), (2,), (1, 0), group=2)),
    "1d_depthwise_same_lower": ((2, 3, 7), 3, geometry((4,), (2,), auto_pad="SAME_LOWER", group=3)),
    "2d_pads": ((2, 2, 5, 4), 3, geometry((3, 3), pads=(1, 1, 1, 1))),
    "2d_stride_dil_asym": ((2, 2, 7, 6), 4, geometry((2, 3), (2, 1), (1, 2), (0, 1, 2, 0))),
    "2d_groups_same_upper": (
        (2, 4, 5, 5),
        6,
        geometry((3, 2), (2, 2), auto_pad="SAME_UPPER", group=2),
    ),
    "2d_depthwise": ((2, 3, 5, 4), 3, geometry((3, 3), pads=(1, 1, 1, 1), group=3)),
    "2d_depthwise_multiplier": (
        (1, 2, 4, 4),
        4,
        geometry((2, 2), (1, 1), (1, 1), (0, 0, 1, 1), group=2),
    ),
    "2d_valid_pointwise": ((2, 3, 3, 4), 2, geometry((1, 1), auto_pad="VALID")),
    "3d_pads_stride_dil": (
        (2, 2, 4, 4, 3),
        3,
        geometry((2, 2, 2), (1, 2, 1), (2, 1, 1), (1, 0, 0, 0, 1, 1)),
    ),
    "3d_groups_same_lower": (
        (1, 4, 3, 4, 3),
        4,
        geometry((2, 3, 2), (2, 1, 2), auto_pad="SAME_LOWER", group=2),
    ),
    "3d_depthwise": ((2, 2, 3, 3, 3), 2, geometry((2, 2, 2), pads=(1, 1, 1, 0, 0, 0), group=2)),
}


def conv_rows(x_shape, c_out, geom, seed, zeros=0.15):
    d = x_shape[1] // geom.group * prod(geom.kernel_shape)
    return weights((c_out, d), seed, zeros)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_matches_naive(name, reduction, negative):
    shape, c_out, geom = CONV_CASES[name]
    rows = conv_rows(shape, c_out, geom, seed=20)
    x = activations(shape, seed=21, negative=negative)
    res = conv_lib(rows, geom, [x], reduction)
    want = naive_conv_sensitivity(rows, x, **conv_args(geom), reduction=reduction)
    assert res.sensitivity.shape == rows.shape
    close(res.sensitivity, want)
    assert np.all(res.sensitivity[rows == 0] == 0)
    n_pos = prod(
        naive_output_spatial(
            geom.kernel_shape, geom.strides, geom.dilations, geom.pads, geom.auto_pad, shape[2:]
        )
    )
    assert res.patches_per_sample == n_pos
    assert res.points == shape[0] * n_pos


@pytest.mark.parametrize("name", ["1d_stride_dil_groups", "2d_groups_same_upper", "3d_pads_stride_dil"])
def test_conv_input_sqnorm_matches_naive(name):
    shape, c_out, geom = CONV_CASES[name]
    rows = conv_rows(shape, c_out, geom, seed=22)
    x = activations(shape, seed=23, negative=True)
    for reduction in ("mean", "max"):
        res = conv_lib(rows, geom, [x], reduction)
        assert res.input_sqnorm.shape == rows.shape
        close(res.input_sqnorm, naive_conv_sqnorm(rows, x, **conv_args(geom)), rtol=1e-5)
    # Wanda alone: no patches are built, the norms and the point count are the same
    acc = ConvAccumulator(rows, geom, compute_sensitivity=False)
    acc.update(x)
    acc.update(x[:1])
    only = acc.result()
    assert only.sensitivity is None
    both = np.concatenate([x, x[:1]])
    close(only.input_sqnorm, naive_conv_sqnorm(rows, both, **conv_args(geom)), rtol=1e-5)
    assert only.points == res.points // shape[0] * both.shape[0]
    assert only.patches_per_sample == res.patches_per_sample
    with pytest.raises(ValueError, match="channels"):
        acc.update(x[:, :1])


def test_conv_per_sample_split_with_mean():
    # one sample signed, one non-negative, in the same batch: the mean is per (split) sample
    shape, c_out, geom = CONV_CASES["2d_pads"]
    rows = conv_rows(shape, c_out, geom, seed=24)
    x = activations(shape, seed=25, negative=True)
    x[0] = np.abs(x[0])
    res = conv_lib(rows, geom, [x], "mean")
    close(res.sensitivity, naive_conv_sensitivity(rows, x, **conv_args(geom), reduction="mean"))


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_conv_streaming_equals_one_batch(reduction, negative):
    shape, c_out, geom = (4, 4, 5, 4), 4, geometry((3, 2), (2, 1), (1, 1), (1, 0, 1, 1), group=2)
    rows = conv_rows(shape, c_out, geom, seed=26)
    x = activations(shape, seed=27, negative=negative)
    if negative:
        x[2] = np.abs(x[2])
    one = conv_lib(rows, geom, [x], reduction)
    many = conv_lib(rows, geom, [x[:1], x[1:3], x[3:]], reduction)
    close(many.sensitivity, one.sensitivity, rtol=1e-6, atol=1e-7)
    close(many.input_sqnorm, one.input_sqnorm, rtol=1e-6, atol=1e-7)
    assert many.points == one.points
    assert many.patches_per_sample == one.patches_per_sample
    close(many.sensitivity, naive_conv_sensitivity(rows, x, **conv_args(geom), reduction=reduction))


def test_conv_zero_input_and_zero_patches():
    # all-zero samples, and a geometry where padding-only patches exist (z = 0 for them)
    geom = geometry((2, 2), pads=(2, 2, 2, 2))
    shape = (3, 2, 3, 3)
    rows = conv_rows(shape, 3, geom, seed=28)
    x = activations(shape, seed=29, negative=True)
    x[1] = 0.0
    for reduction in ("mean", "max"):
        res = conv_lib(rows, geom, [x], reduction)
        assert np.all(np.isfinite(res.sensitivity))
        close(res.sensitivity, naive_conv_sensitivity(rows, x, **conv_args(geom), reduction=reduction))
        zero = conv_lib(rows, geom, [np.zeros(shape, np.float32)], reduction)
        np.testing.assert_array_equal(zero.sensitivity, 0)


def test_conv_single_patch_sums_to_one():
    # a 1x1 output with 'max' (or 'mean': L = 1) gives s = g of the only patch of one sample
    geom = geometry((3, 3), group=2)
    shape = (1, 4, 3, 3)
    rows = conv_rows(shape, 4, geom, seed=30, zeros=0.2)
    x = activations(shape, seed=31, negative=False)
    for reduction in ("mean", "max"):
        s = conv_lib(rows, geom, [x], reduction).sensitivity.astype(np.float64)
        for i in range(4):
            g = i // 2
            a = x[0, 2 * g : 2 * g + 2].reshape(-1)
            z_pos, z_neg = naive_z(rows[i], a)
            for mask, z in ((rows[i] > 0, z_pos), (rows[i] < 0, z_neg)):
                if abs(z) > EPS:
                    assert s[i, mask].sum() == pytest.approx(1.0, rel=1e-5)
                else:
                    assert s[i, mask].sum() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("negative", [False, True])
def test_conv_range_and_row_scaling_invariance(reduction, negative):
    shape, c_out, geom = CONV_CASES["2d_groups_same_upper"]
    rows = conv_rows(shape, c_out, geom, seed=32)
    x = activations(shape, seed=33, negative=negative)
    s = conv_lib(rows, geom, [x], reduction).sensitivity
    assert np.all(s >= 0) and np.all(s <= 1 + 1e-6)
    scale = np.random.default_rng(34).uniform(0.01, 100, size=(c_out, 1)).astype(np.float32)
    close(conv_lib(rows * scale, geom, [x], reduction).sensitivity, s)


def test_conv_mean_not_above_max():
    shape, c_out, geom = CONV_CASES["2d_stride_dil_asym"]
    rows = conv_rows(shape, c_out, geom, seed=35)
    x = activations(shape, seed=36, negative=True)
    s_mean = conv_lib(rows, geom, [x], "mean").sensitivity
    s_max = conv_lib(rows, geom, [x], "max").sensitivity
    assert np.all(s_mean <= s_max + 1e-6)


def test_conv_rejects_unknown_reduction():
    shape, c_out, geom = CONV_CASES["1d_pads"]
    with pytest.raises(ValueError):
        ConvAccumulator(conv_rows(shape, c_out, geom, seed=37), geom, reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_conv_batches_of_different_spatial_size(reduction):
    # a dynamic-size input: each sample is reduced over its own L patches, then max over samples
    geom = geometry((3, 3), (2, 2), pads=(1, 1, 1, 1))
    rows = conv_rows((1, 2, 5, 5), 3, geom, seed=38)
    x1 = activations((2, 2, 5, 5), seed=39, negative=True)
    x2 = activations((1, 2, 4, 7), seed=40, negative=False)
    res = conv_lib(rows, geom, [x1, x2], reduction)
    want = np.maximum(
        naive_conv_sensitivity(rows, x1, **conv_args(geom), reduction=reduction),
        naive_conv_sensitivity(rows, x2, **conv_args(geom), reduction=reduction),
    )
    close(res.sensitivity, want)
    assert res.points == 2 * 9 + 1 * 8


def test_dense_rejects_wrong_feature_count():
    acc = DenseAccumulator(weights((3, 4), seed=41))
    with pytest.raises(ValueError):
        acc.update(np.ones((2, 5), np.float32))


# --- reductions beyond the spec's max: per-sample mean of tokens, and the expectation ---------


@pytest.mark.parametrize("reduction", ["mean", "expected", "max"])
@pytest.mark.parametrize("signed", [False, True])
def test_dense_sequence_reductions_match_naive(reduction, signed):
    rng = np.random.default_rng(11)
    rows = rng.normal(size=(5, 6)).astype(np.float32)
    x = rng.normal(size=(4, 3, 6)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    x[1, 0] = 0.0  # a zero token inside a sample
    acc = DenseAccumulator(rows, reduction=reduction)
    acc.update(x[:2])
    acc.update(x[2:])
    expected = naive_dense_sensitivity(rows, list(x), reduction=reduction)
    np.testing.assert_allclose(acc.result().sensitivity, expected, rtol=1e-4, atol=1e-6)


def test_expected_reduction_rows_sum_to_the_valid_fraction():
    """sum_j E[g_ij] over a sign part is the fraction of points where that part's z is valid
    (non-negative inputs: one part per point)."""
    rng = np.random.default_rng(2)
    rows = np.abs(rng.normal(size=(3, 5))).astype(np.float32)  # one sign part per row
    x = np.abs(rng.normal(size=(20, 5))).astype(np.float32)
    x[:5] = 0.0  # five empty samples: points where no z is valid
    acc = DenseAccumulator(rows, reduction="expected")
    acc.update(x)
    np.testing.assert_allclose(acc.result().sensitivity.sum(axis=1), 15 / 20, rtol=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_conv_expected_reduction_matches_naive(signed):
    rng = np.random.default_rng(4)
    geom = ConvGeometry((3, 3), (2, 1), (1, 1), (1, 0, 0, 1), "NOTSET", 2)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    x = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    acc = ConvAccumulator(w.reshape(4, -1), geom, reduction="expected")
    acc.update(x[:1])
    acc.update(x[1:])
    expected = naive_conv_sensitivity(
        w.reshape(4, -1), x, (3, 3), (2, 1), (1, 1), (1, 0, 0, 1), "NOTSET", 2, "expected"
    )
    np.testing.assert_allclose(acc.result().sensitivity, expected, rtol=1e-4, atol=1e-6)


# --- 'absolute' terms --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["max", "mean", "expected"])
def test_dense_absolute_terms_match_naive(reduction):
    rng = np.random.default_rng(21)
    rows = rng.normal(size=(4, 6)).astype(np.float32)
    rows[0, 1] = 0.0
    x = rng.normal(size=(5, 3, 6)).astype(np.float32)
    x[2] = 0.0  # an empty sample
    acc = DenseAccumulator(rows, reduction=reduction, terms="absolute")
    acc.update(x[:3])
    acc.update(x[3:])
    samples = [lambda i, b=b: list(x[b].astype(np.float64)) for b in range(len(x))]
    expected = naive_abs_sensitivity(rows, samples, reduction)
    np.testing.assert_allclose(acc.result().sensitivity, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["max", "mean", "expected"])
@pytest.mark.parametrize("inputs", ["signed", "relu_with_an_empty_sample"])
def test_conv_absolute_terms_match_naive(reduction, inputs):
    """Signed inputs go through the content and sign scans; non-negative ones skip them (an
    all-zero sample must still count as points and add nothing)."""
    rng = np.random.default_rng(22)
    geom = ConvGeometry((3,), (2,), (1,), (1, 1), "NOTSET", 2)
    w = rng.normal(size=(4, 3, 3)).astype(np.float32)
    x = rng.normal(size=(3, 6, 7)).astype(np.float32)
    if inputs != "signed":
        x = np.maximum(x, 0)
        x[1] = 0
    rows = w.reshape(4, -1)
    acc = ConvAccumulator(rows, geom, reduction=reduction, terms="absolute")
    acc.update(x)
    patches = naive_patches(x, (3,), (2,), (1,), (1, 1), "NOTSET", 2)  # [B, G, d, L]

    def points_of(b):
        return lambda i: [patches[b, i // 2, :, l_idx] for l_idx in range(patches.shape[3])]

    expected = naive_abs_sensitivity(rows, [points_of(b) for b in range(len(x))], reduction)
    np.testing.assert_allclose(acc.result().sensitivity, expected, rtol=1e-4, atol=1e-6)


def test_absolute_shares_sum_to_one_and_bound_the_pruned_error():
    """Per point the absolute shares of a row sum to 1, and the error of pruning a set of weights
    is at most (their summed sensitivity) x (the row's absolute mass) at every point."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(3, 8)).astype(np.float32)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    acc = DenseAccumulator(rows, terms="absolute")
    acc.update(x)
    s = acc.result().sensitivity.astype(np.float64)
    pruned = rng.random(rows.shape) < 0.5
    eps = np.where(pruned, s, 0).sum(axis=1)
    for point in x.astype(np.float64):
        g = np.array([naive_g_abs(rows[i], point) for i in range(3)])
        np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-9)
        error = np.abs((np.where(pruned, rows, 0) * point).sum(axis=1))
        mass = (np.abs(rows) * np.abs(point)).sum(axis=1)
        assert np.all(error <= eps * mass * (1 + 1e-5) + 1e-9)
