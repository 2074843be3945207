"""Conv patches (im2col) against a naive loop extractor and against ONNX Runtime's Conv."""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# tests/ has no __init__.py: pytest puts it on sys.path (rootdir "prepend" import mode)
from naive import naive_conv, naive_output_spatial, naive_pads, naive_patches

from sipp_onnx.layers import ConvGeometry
from sipp_onnx.patches import conv_patches, output_spatial, patch_sqnorm, resolve_pads


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


def naive_of(x, geom):
    return naive_patches(
        x, geom.kernel_shape, geom.strides, geom.dilations, geom.pads, geom.auto_pad, geom.group
    )


# (input shape [B, C, *spatial], geometry); ids name the interesting feature.
CASES = {
    # 1-D
    "1d_pads": ((2, 3, 7), geometry((3,), pads=(1, 2))),
    "1d_stride_dilation_groups": ((2, 4, 9), geometry((3,), (2,), (2,), group=2)),
    "1d_depthwise_same_upper_s3": ((1, 4, 8), geometry((2,), (3,), auto_pad="SAME_UPPER", group=4)),
    "1d_same_lower_s2_odd": ((1, 2, 7), geometry((4,), (2,), auto_pad="SAME_LOWER")),
    "1d_same_upper_s2_odd": ((1, 2, 7), geometry((4,), (2,), auto_pad="SAME_UPPER")),
    "1d_valid_s2": ((2, 2, 9), geometry((3,), (2,), (1,), auto_pad="VALID")),
    "1d_kernel1_same_s3": ((1, 1, 5), geometry((1,), (3,), auto_pad="SAME_UPPER")),
    # 2-D
    "2d_pads_1": ((2, 3, 6, 5), geometry((3, 3), pads=(1, 1, 1, 1))),
    "2d_asym_pads_stride_dil": ((2, 2, 7, 8), geometry((2, 3), (2, 1), (1, 2), (0, 1, 2, 0))),
    "2d_groups2": ((1, 4, 6, 7), geometry((3, 2), (2, 2), pads=(1, 0, 0, 1), group=2)),
    "2d_depthwise_same_upper": ((2, 3, 5, 6), geometry((3, 3), auto_pad="SAME_UPPER", group=3)),
    "2d_same_lower_s2_odd_dil": (
        (1, 2, 7, 5),
        geometry((3, 4), (2, 2), (1, 2), auto_pad="SAME_LOWER"),
    ),
    "2d_same_upper_s2_odd_dil": (
        (1, 2, 7, 5),
        geometry((3, 4), (2, 2), (1, 2), auto_pad="SAME_UPPER"),
    ),
    "2d_same_lower_s2_odd": ((2, 3, 7, 5), geometry((3, 4), (2, 2), auto_pad="SAME_LOWER")),
    "2d_same_upper_s2_odd": ((2, 3, 7, 5), geometry((3, 4), (2, 2), auto_pad="SAME_UPPER")),
    "2d_same_upper_s2_even_k": ((1, 2, 5, 9), geometry((2, 4), (2, 3), auto_pad="SAME_UPPER")),
    "2d_same_lower_s2_even_k": ((1, 2, 5, 9), geometry((2, 4), (2, 3), auto_pad="SAME_LOWER")),
    "2d_valid_s2_d2": ((1, 2, 9, 8), geometry((2, 2), (2, 2), (2, 2), auto_pad="VALID")),
    "2d_large_pads": ((1, 1, 3, 3), geometry((2, 2), (1, 1), pads=(2, 3, 3, 2))),
    "2d_pointwise": ((2, 3, 4, 3), geometry((1, 1))),
    "2d_pointwise_stride2_odd": ((2, 4, 7, 5), geometry((1, 1), (2, 2))),
    "2d_pointwise_stride_groups_dil": ((1, 6, 5, 6), geometry((1, 1), (3, 2), (2, 2), group=3)),
    "2d_pointwise_padded": ((1, 2, 3, 3), geometry((1, 1), pads=(1, 0, 0, 1))),
    "3d_pointwise_stride": ((1, 2, 3, 4, 5), geometry((1, 1, 1), (1, 2, 2))),
    "2d_empty_auto_pad_string": ((1, 2, 4, 4), geometry((3, 3), pads=(1, 1, 1, 1), auto_pad="")),
    # 3-D
    "3d_pads_stride_dil": (
        (1, 2, 4, 5, 3),
        geometry((2, 3, 2), (1, 2, 1), (1, 1, 2), (1, 0, 1, 0, 1, 1)),
    ),
    "3d_groups2_same_upper_s2": (
        (1, 4, 5, 3, 4),
        geometry((2, 2, 3), (2, 2, 2), auto_pad="SAME_UPPER", group=2),
    ),
    "3d_depthwise_same_lower": (
        (2, 2, 3, 5, 4),
        geometry((3, 2, 2), (1, 2, 2), auto_pad="SAME_LOWER", group=2),
    ),
    "3d_valid": ((1, 3, 4, 4, 4), geometry((2, 2, 2), (2, 1, 2), auto_pad="VALID")),
}

ORT_CASES = [
    "1d_pads",
    "1d_depthwise_same_upper_s3",
    "1d_same_lower_s2_odd",
    "1d_same_upper_s2_odd",
    "2d_asym_pads_stride_dil",
    "2d_groups2",
    "2d_depthwise_same_upper",
    # ORT rejects dilations with SAME_* auto_pad; those cases are checked against naive only.
    "2d_same_lower_s2_odd",
    "2d_same_upper_s2_odd",
    "2d_same_upper_s2_even_k",
    "2d_same_lower_s2_even_k",
    "2d_valid_s2_d2",
    "3d_pads_stride_dil",
    "3d_groups2_same_upper_s2",
    "3d_depthwise_same_lower",
]


def _input(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------ naive oracle self-checks


def test_naive_pads_same_rules_by_hand():
    # in=7, k=4, s=2: out=4, total = 3*2 + 4 - 7 = 3 -> UPPER (1, 2), LOWER (2, 1)
    assert naive_pads((4,), (2,), (1,), (), "SAME_UPPER", (7,)) == ((1,), (2,))
    assert naive_pads((4,), (2,), (1,), (), "SAME_LOWER", (7,)) == ((2,), (1,))
    assert naive_output_spatial((4,), (2,), (1,), (), "SAME_UPPER", (7,)) == (4,)
    # total < 0 clamps to 0
    assert naive_pads((1,), (3,), (1,), (), "SAME_UPPER", (5,)) == ((0,), (0,))
    assert naive_output_spatial((3,), (2,), (1,), (0, 0), "VALID", (9,)) == (4,)


def test_naive_patches_by_hand():
    x = np.arange(5, dtype=np.float64).reshape(1, 1, 5)  # [0 1 2 3 4]
    p = naive_patches(x, (2,), (2,), (1,), (1, 0), "NOTSET", 1)
    # padded: [0(pad) 0 1 2 3 4], windows at 0, 2, 4 of length 2 -> [pad,0], [1,2], [3,4]
    np.testing.assert_array_equal(p[0, 0], [[0, 1, 3], [0, 2, 4]])


# ------------------------------------------------------------------ library vs naive


@pytest.mark.parametrize("name", list(CASES))
def test_resolve_pads_and_output_spatial(name):
    shape, geom = CASES[name]
    spatial = shape[2:]
    args = (geom.kernel_shape, geom.strides, geom.dilations, geom.pads, geom.auto_pad, spatial)
    begin, end = resolve_pads(geom, spatial)
    assert (tuple(begin), tuple(end)) == naive_pads(*args)
    assert tuple(output_spatial(geom, spatial)) == naive_output_spatial(*args)


@pytest.mark.parametrize("name", list(CASES))
def test_conv_patches_match_naive(name):
    shape, geom = CASES[name]
    x = _input(shape)
    got = conv_patches(x, geom)
    want = naive_of(x, geom)
    out = naive_output_spatial(
        geom.kernel_shape, geom.strides, geom.dilations, geom.pads, geom.auto_pad, shape[2:]
    )
    assert got.shape == (
        shape[0],
        geom.group,
        shape[1] // geom.group * prod(geom.kernel_shape),
        prod(out),
    )
    np.testing.assert_array_equal(got, want)
    squares = np.einsum("bgdl,bgdl->gd", want.astype(np.float64), want.astype(np.float64))
    np.testing.assert_allclose(patch_sqnorm(x, geom), squares, rtol=1e-6)


def test_conv_patches_float64_input_is_exact():
    shape, geom = CASES["2d_asym_pads_stride_dil"]
    x = np.random.default_rng(3).standard_normal(shape)
    np.testing.assert_allclose(conv_patches(x, geom), naive_of(x, geom), rtol=1e-7, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 3),
    data=st.data(),
)
def test_conv_patches_random_geometry(rank, data):
    group = data.draw(st.sampled_from([1, 2, 3]))
    cg = data.draw(st.integers(1, 2))
    batch = data.draw(st.integers(1, 2))
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
    dilations = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
    auto_pad = data.draw(st.sampled_from(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = (
        tuple(data.draw(st.integers(0, 2)) for _ in range(2 * rank))
        if auto_pad == "NOTSET"
        else (0,) * (2 * rank)
    )
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    # spatial large enough that every geometry has a non-empty output
    extra = 4 if rank < 3 else 2
    spatial = tuple(data.draw(st.integers(s, s + extra)) for s in spans)
    geom = geometry(kernel, strides, dilations, pads, auto_pad, group)
    x = _input((batch, group * cg, *spatial), seed=rank)
    want = naive_of(x, geom)
    np.testing.assert_array_equal(conv_patches(x, geom), want)
    squares = np.einsum("bgdl,bgdl->gd", want.astype(np.float64), want.astype(np.float64))
    np.testing.assert_allclose(patch_sqnorm(x, geom), squares, rtol=1e-6)


# ------------------------------------------------------------------ ONNX Runtime oracle


def _ort_conv(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    attrs: dict[str, Any] = {
        "kernel_shape": list(geom.kernel_shape),
        "strides": list(geom.strides),
        "dilations": list(geom.dilations),
        "group": geom.group,
    }
    if geom.auto_pad in ("NOTSET", ""):
        attrs["pads"] = list(geom.pads)
    else:
        attrs["auto_pad"] = geom.auto_pad
    node = helper.make_node("Conv", ["X", "W"], ["Y"], **attrs)
    graph = helper.make_graph(
        [node],
        "one_conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * x.ndim)],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(["Y"], {"X": x})[0]


@pytest.mark.parametrize("name", ORT_CASES)
def test_patches_reproduce_onnxruntime_conv(name):
    shape, geom = CASES[name]
    x = _input(shape, seed=1)
    c_in = shape[1]
    c_out = 2 * geom.group
    rng = np.random.default_rng(2)
    w = rng.standard_normal((c_out, c_in // geom.group, *geom.kernel_shape)).astype(np.float32)
    y = _ort_conv(x, w, geom)

    out = output_spatial(geom, shape[2:])
    assert tuple(y.shape[2:]) == tuple(out)

    rows = w.reshape(c_out, -1).astype(np.float64)
    per_group = c_out // geom.group
    for patches in (conv_patches(x, geom), naive_of(x, geom)):
        got = np.zeros(y.shape, dtype=np.float64)
        for b in range(shape[0]):
            for g in range(geom.group):
                block = rows[g * per_group : (g + 1) * per_group] @ patches[b, g].astype(np.float64)
                got[b, g * per_group : (g + 1) * per_group] = block.reshape(per_group, *out)
        np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["2d_asym_pads_stride_dil", "1d_same_lower_s2_odd", "3d_groups2_same_upper_s2"]
)
def test_naive_conv_matches_onnxruntime(name):
    # the loop Conv in naive.py is itself consistent with ORT (validates the oracle's geometry)
    shape, geom = CASES[name]
    x = _input(shape, seed=4)
    c_out = 3 * geom.group
    w = (
        np.random.default_rng(5)
        .standard_normal((c_out, shape[1] // geom.group, *geom.kernel_shape))
        .astype(np.float32)
    )
    want = _ort_conv(x, w, geom)
    got = naive_conv(
        x,
        w,
        geom.kernel_shape,
        geom.strides,
        geom.dilations,
        geom.pads,
        geom.auto_pad,
        geom.group,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
