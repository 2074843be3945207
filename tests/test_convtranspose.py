"""ConvTranspose layers: patches, row layout, sensitivities, discovery and pruning end to end.

The patches are checked against loops that implement the ConvTranspose definition directly
(each input element scatters `x * W` to the output positions `i*s + k*d - pad_begin`) and against
ONNX Runtime's own ConvTranspose output, whose output-size rules (output_shape, auto_pad, odd
paddings) they follow.
"""

from __future__ import annotations

import itertools
from math import prod

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, gaussian_calibration, save, tensor, value
from naive import naive_g, naive_g_abs, split_sample
from onnx import helper, numpy_helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.checking import CheckStatus, check_pattern
from sipp_onnx.config import PRUNABLE_OP_TYPES
from sipp_onnx.discover import discover
from sipp_onnx.errors import NoPrunableLayersError
from sipp_onnx.layers import ConvTransposeGeometry, Layer, WeightLayout, from_rows, to_rows
from sipp_onnx.patches import conv_transpose_patches, conv_transpose_sqnorm, transpose_pads
from sipp_onnx.pattern import parse_pattern
from sipp_onnx.sensitivity import ConvAccumulator

# --------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------


def naive_axis(size, k, s, d, pads, auto_pad, adjust, out_shape):
    """(pad_begin, output size) of one axis, ONNX Runtime's rules written out per case."""
    full = s * (size - 1) + adjust + d * (k - 1) + 1
    if out_shape is not None:
        total = max(0, full - out_shape)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        return begin, out_shape
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = max(0, full - size * s)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        return begin, full - total
    if auto_pad == "VALID":
        return 0, full
    return pads[0], full - pads[0] - pads[1]


def naive_geometry(spatial, geom):
    """Per-axis pad_begin and output size by `naive_axis`."""
    n = geom.spatial_rank
    begins, outs = [], []
    for a in range(n):
        pads = (geom.pads[a], geom.pads[n + a]) if geom.pads else (0, 0)
        adjust = geom.output_padding[a] if geom.output_padding else 0
        out_shape = geom.output_shape[-n:][a] if geom.output_shape else None
        b, o = naive_axis(
            spatial[a],
            geom.kernel_shape[a],
            geom.strides[a],
            geom.dilations[a],
            pads,
            geom.auto_pad,
            adjust,
            out_shape,
        )
        begins.append(b)
        outs.append(o)
    return begins, outs


def naive_conv_transpose(x, w, geom):
    """The ConvTranspose output (no bias) by the scatter definition:
    `y[b, g*Cog + j, i*s + k*d - pad_begin] += x[b, c, i] * W[c, j, k]` for c in group g."""
    batch, c_in = x.shape[:2]
    spatial = x.shape[2:]
    begins, outs = naive_geometry(spatial, geom)
    per_group_out = w.shape[1]
    per_group_in = c_in // geom.group
    y = np.zeros((batch, per_group_out * geom.group, *outs))
    for b, c in itertools.product(range(batch), range(c_in)):
        g = c // per_group_in
        for i in np.ndindex(*spatial):
            for j in range(per_group_out):
                for k in np.ndindex(*geom.kernel_shape):
                    o = tuple(
                        ii * s + kk * d - pb
                        for ii, kk, s, d, pb in zip(i, k, geom.strides, geom.dilations, begins, strict=True)
                    )
                    if all(0 <= oo < out for oo, out in zip(o, outs, strict=True)):
                        y[(b, g * per_group_out + j, *o)] += float(x[(b, c, *i)]) * float(w[(c, j, *k)])
    return y


def naive_patches(x, geom):
    """`[B, G, C_in/G * prod(k), L]` by gathering: entry (c, k) of output position o is
    `x[c, i]` with `i*s + k*d - pad_begin == o`, 0 when no such input position exists."""
    batch, c_in = x.shape[:2]
    spatial = x.shape[2:]
    begins, outs = naive_geometry(spatial, geom)
    groups = geom.group
    per_group = c_in // groups
    kernel = geom.kernel_shape
    p = np.zeros((batch, groups, per_group * prod(kernel), prod(outs)))
    for b, g, c in itertools.product(range(batch), range(groups), range(per_group)):
        for ki, k in enumerate(np.ndindex(*kernel)):
            for li, o in enumerate(np.ndindex(*outs)):
                i = []
                for oo, kk, s, d, pb, size in zip(
                    o, k, geom.strides, geom.dilations, begins, spatial, strict=True
                ):
                    num = oo + pb - kk * d
                    i.append(num // s if num % s == 0 and 0 <= num // s < size else None)
                if None not in i:
                    p[b, g, c * prod(kernel) + ki, li] = x[(b, g * per_group + c, *i)]
    return p


def naive_rows(w, groups):
    """Row of output channel `g*Cog + j`: `W[c, j]` over the input channels c of group g."""
    c_in, per_group_out = w.shape[:2]
    per_group_in = c_in // groups
    rows = []
    for g in range(groups):
        for j in range(per_group_out):
            rows.append(np.concatenate([w[g * per_group_in + c, j].ravel() for c in range(per_group_in)]))
    return np.array(rows)


def geometry(kernel, strides=None, dilations=None, pads=None, auto_pad="NOTSET", group=1, adjust=(), out=()):
    n = len(kernel)
    return ConvTransposeGeometry(
        tuple(kernel),
        tuple(strides or (1,) * n),
        tuple(dilations or (1,) * n),
        tuple(pads or (0,) * (2 * n)),
        auto_pad,
        group,
        tuple(adjust),
        tuple(out),
    )


# (input shape [B, C_in, *spatial], C_out / group, geometry)
CASES = {
    "1d_plain": ((2, 3, 5), 2, geometry((3,))),
    "1d_stride2_pads": ((2, 2, 4), 3, geometry((3,), (2,), pads=(1, 2))),
    "1d_stride3_dil2_adjust": ((1, 2, 4), 2, geometry((2,), (3,), (2,), pads=(0, 1), adjust=(2,))),
    "1d_big_pads_crop": ((2, 2, 5), 2, geometry((2,), (1,), pads=(3, 2))),
    "1d_groups_same_upper": ((2, 4, 5), 2, geometry((3,), (2,), auto_pad="SAME_UPPER", group=2)),
    "1d_same_lower_odd": ((1, 2, 4), 2, geometry((4,), (3,), (2,), auto_pad="SAME_LOWER")),
    "1d_valid": ((1, 2, 4), 1, geometry((3,), (2,), auto_pad="VALID")),
    "1d_output_shape_crop": ((2, 2, 4), 2, geometry((3,), (2,), out=(6,))),
    "1d_output_shape_longer": ((1, 2, 4), 2, geometry((1,), (3,), out=(12,))),
    "1d_output_shape_same_upper": ((1, 2, 5), 2, geometry((4,), (2,), auto_pad="SAME_UPPER", out=(9,))),
    "2d_stride2_k2": ((2, 3, 3, 4), 2, geometry((2, 2), (2, 2))),
    "2d_mixed": ((1, 4, 3, 4), 3, geometry((3, 2), (2, 3), (1, 2), (1, 0, 0, 2), group=2, adjust=(1, 1))),
    "2d_depthwise_same_lower": ((2, 3, 3, 3), 1, geometry((3, 3), (2, 2), auto_pad="SAME_LOWER", group=3)),
    "2d_output_shape_full_rank": ((1, 2, 3, 4), 2, geometry((3, 3), (2, 2), out=(1, 4, 6, 8))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_patches_match_the_definition(name):
    shape, per_group_out, geom = CASES[name]
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(shape[1], per_group_out, *geom.kernel_shape)).astype(np.float32)
    patches = conv_transpose_patches(x, geom)
    np.testing.assert_allclose(patches, naive_patches(x, geom), atol=0)
    rows = to_rows(w, WeightLayout.CONV_TRANSPOSE, groups=geom.group)
    np.testing.assert_array_equal(rows, naive_rows(w, geom.group))
    grouped = rows.reshape(geom.group, -1, rows.shape[1]).astype(np.float64)
    out = np.einsum("gnk,bgkl->bgnl", grouped, patches).reshape(shape[0], rows.shape[0], -1)
    want = naive_conv_transpose(x, w, geom)
    assert tuple(transpose_pads(geom, shape[2:])[2]) == want.shape[2:]
    np.testing.assert_allclose(out, want.reshape(shape[0], rows.shape[0], -1), rtol=1e-5, atol=1e-5)
    sqnorm = conv_transpose_sqnorm(x, geom)
    np.testing.assert_allclose(sqnorm, (patches.astype(np.float64) ** 2).sum(axis=(0, 3)), rtol=1e-6)


def ort_conv_transpose(x, w, attrs, opset=17):
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "ct", [value("x", list(x.shape))], [value("y", None)], [tensor("w", w)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def ort_cases():
    """A spread of 1-D to 3-D geometries: every auto_pad, strides 1-3, dilations, explicit and
    cropping pads, output_padding, output_shape below and just above the full size, groups."""
    rng = np.random.default_rng(5)
    cases = []
    for s, d, k, auto_pad, group in itertools.product(
        (1, 2, 3), (1, 2), (1, 2, 3), ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"), (1, 2)
    ):
        n = 1 if (s + d + k) % 2 else 2
        spatial = (5,) if n == 1 else (4, 3)
        attrs = {"strides": [s] * n, "dilations": [d] * n, "group": group, "auto_pad": auto_pad}
        extra = rng.integers(4)
        if extra == 1 and auto_pad == "NOTSET":
            attrs["pads"] = [int(p) for p in rng.integers(0, 4, 2 * n)]
        elif extra == 2 and s > 1:
            attrs["output_padding"] = [int(a) for a in rng.integers(0, s, n)]
        elif extra == 3:
            full = [s * (size - 1) + d * (k - 1) + 1 for size in spatial]
            attrs["output_shape"] = [f + int(rng.integers(-2, s)) for f in full]
        cases.append((spatial, k, attrs))
    cases.append(((3, 2, 3), 2, {"strides": [2, 1, 2], "pads": [0, 1, 1, 1, 0, 0], "group": 2}))
    cases.append(
        ((2, 3, 2), 3, {"strides": [1, 2, 2], "auto_pad": "SAME_UPPER", "output_padding": [0, 1, 0]})
    )
    return cases


def test_patches_match_onnx_runtime():
    rng = np.random.default_rng(6)
    for spatial, k, attrs in ort_cases():
        n = len(spatial)
        group = attrs.get("group", 1)
        x = rng.normal(size=(2, 4, *spatial)).astype(np.float32)
        w = rng.normal(size=(4, 3, *(k,) * n)).astype(np.float32)
        want = ort_conv_transpose(x, w, attrs)
        geom = ConvTransposeGeometry(
            (k,) * n,
            tuple(attrs["strides"]),
            tuple(attrs.get("dilations", (1,) * n)),
            tuple(attrs.get("pads", (0,) * (2 * n))),
            attrs.get("auto_pad", "NOTSET"),
            group,
            tuple(attrs.get("output_padding", ())),
            tuple(attrs.get("output_shape", ())),
        )
        rows = to_rows(w, WeightLayout.CONV_TRANSPOSE, groups=group)
        rows = rows.reshape(group, -1, rows.shape[1])
        out = np.einsum("gnk,bgkl->bgnl", rows, conv_transpose_patches(x, geom))
        assert out.shape[2] * group == want.shape[1], attrs
        np.testing.assert_allclose(out.reshape(want.shape), want, rtol=1e-4, atol=1e-4, err_msg=str(attrs))


def test_empty_output_is_an_error():
    geom = geometry((2,), pads=(3, 3))
    with pytest.raises(ValueError, match="empty output"):
        conv_transpose_patches(np.ones((1, 1, 2), np.float32), geom)


# --------------------------------------------------------------------------------------------
# Row layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "groups"), [((6, 4, 3), 1), ((6, 2, 3, 2), 3), ((4, 1, 2, 2, 2), 4)])
def test_rows_round_trip(shape, groups):
    w = np.arange(prod(shape), dtype=np.float32).reshape(shape)
    rows = to_rows(w, WeightLayout.CONV_TRANSPOSE, groups=groups)
    assert rows.shape == (shape[1] * groups, shape[0] // groups * prod(shape[2:]))
    np.testing.assert_array_equal(rows, naive_rows(w, groups))
    np.testing.assert_array_equal(from_rows(rows, WeightLayout.CONV_TRANSPOSE, shape, groups=groups), w)
    layer = Layer(
        "ct",
        "ConvTranspose",
        "w",
        "x",
        shape,
        WeightLayout.CONV_TRANSPOSE,
        conv=geometry(shape[2:], group=groups),
    )
    assert (layer.n_out, layer.fan_in) == rows.shape
    assert layer.kernel_size == prod(shape[2:])
    # a zero-strided stand-in keeps its shape without a copy of the weight
    stand_in = to_rows(np.broadcast_to(np.float32(0), shape), WeightLayout.CONV_TRANSPOSE, groups=groups)
    assert stand_in.shape == rows.shape


# --------------------------------------------------------------------------------------------
# Sensitivities
# --------------------------------------------------------------------------------------------


def naive_sensitivity(rows, x, geom, reduction, terms):
    """s `[C_out, K]` by loops over samples, sign parts, rows and points (spec section 2)."""
    rows = np.asarray(rows, dtype=np.float64)
    n_out, k = rows.shape
    per_group = n_out // geom.group
    s = np.zeros((n_out, k))
    for b in range(x.shape[0]):
        parts = split_sample(x[b]) if terms == "signed" else [np.asarray(x[b], dtype=np.float64)]
        for part in parts:
            p = naive_patches(part[None], geom)[0]
            for i in range(n_out):
                points = [p[i // per_group, :, l_idx] for l_idx in range(p.shape[2])]
                gs = [naive_g(rows[i], a) if terms == "signed" else naive_g_abs(rows[i], a) for a in points]
                g = np.array(gs)
                s[i] = np.maximum(s[i], g.max(axis=0) if reduction == "max" else g.mean(axis=0))
    return s


@pytest.mark.parametrize("terms", ["signed", "absolute"])
@pytest.mark.parametrize("reduction", ["max", "mean"])
@pytest.mark.parametrize(
    "name", ["1d_stride2_pads", "1d_groups_same_upper", "2d_mixed", "1d_output_shape_longer"]
)
def test_sensitivities_match_a_loop_over_points(name, reduction, terms):
    shape, per_group_out, geom = CASES[name]
    rng = np.random.default_rng(7)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(shape[1], per_group_out, *geom.kernel_shape)).astype(np.float32)
    w[rng.random(w.shape) < 0.15] = 0
    rows = to_rows(w, WeightLayout.CONV_TRANSPOSE, groups=geom.group)
    acc = ConvAccumulator(rows, geom, reduction=reduction, terms=terms, gram=True)
    for batch in (x[:1], x[1:]):  # streamed in two batches where there are two samples
        if len(batch):
            acc.update(batch)
    res = acc.result()
    want = naive_sensitivity(rows, x, geom, reduction, terms)
    np.testing.assert_allclose(res.sensitivity, want, rtol=1e-4, atol=1e-6)
    assert np.all(res.sensitivity[rows == 0] == 0)
    patches = naive_patches(x, geom)  # [B, G, K, L]
    assert res.points == shape[0] * patches.shape[3]
    assert res.patches_per_sample == patches.shape[3]
    per_row = np.repeat((patches**2).sum(axis=(0, 3)), rows.shape[0] // geom.group, axis=0)
    np.testing.assert_allclose(res.input_sqnorm, per_row, rtol=1e-5)
    gram = np.einsum("bgkl,bgjl->gkj", patches, patches)
    np.testing.assert_allclose(res.gram, gram, rtol=1e-4, atol=1e-4)
    # Wanda alone: norms and point count without the patches
    only = ConvAccumulator(rows, geom, compute_sensitivity=False)
    only.update(x)
    np.testing.assert_allclose(only.result().input_sqnorm, per_row, rtol=1e-5)
    assert only.result().points == res.points


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def decoder(seed=0, channels=8, group=1, width=16):
    """Conv (stride 2) -> Relu -> ConvTranspose (stride 2, bias) -> Relu -> Conv: a DB-head-like
    upsampler between two convs."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        tensor("W1", rng.normal(size=(c, 3, 3, 3)) / np.sqrt(27)),
        tensor("b1", rng.normal(size=c) * 0.1),
        tensor("WT", rng.normal(size=(c, c // group, 2, 2)) / np.sqrt(4 * c / group)),
        tensor("bT", rng.normal(size=c) * 0.1),
        tensor("W2", rng.normal(size=(4, c, 3, 3)) / np.sqrt(9 * c)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("ConvTranspose", ["r1", "WT", "bT"], ["h2"], name="up", strides=[2, 2], group=group),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return finish(nodes, [value("x", ["b", 3, width, width])], [value("y", ["b", 4, width, width])], inits)


def test_discovery_finds_the_conv_transpose_with_its_bias():
    found = discover(decoder(group=2))
    layer = next(layer for layer in found.layers if layer.node == "up")
    assert layer.op_type == "ConvTranspose" and layer.layout is WeightLayout.CONV_TRANSPOSE
    assert isinstance(layer.conv, ConvTransposeGeometry) and layer.conv.group == 2
    assert layer.conv.strides == (2, 2) and layer.conv.output_padding == (0, 0)
    assert (layer.n_out, layer.fan_in, layer.kernel_size) == (8, 16, 4)
    assert layer.bias is not None and layer.bias.tensor == "bT" and layer.bias.input_index == 2
    assert "ConvTranspose" in PRUNABLE_OP_TYPES
    only_conv = discover(decoder(), op_types=("Conv",))
    assert "up" not in {layer.node for layer in only_conv.layers}
    assert any(s.node == "up" and "not selected" in s.reason for s in only_conv.skipped)


def single_conv_transpose(w_shape, x_shape, **attrs):
    w = np.ones(w_shape, np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="ct", **attrs)
    return helper.make_model(
        helper.make_graph([node], "g", [value("x", list(x_shape))], [value("y", None)], [tensor("W", w)]),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=10,
    )


@pytest.mark.parametrize(
    ("w_shape", "x_shape", "attrs", "reason"),
    [
        ((4, 2, 2, 2, 2, 2), (1, 4, 2, 2, 2, 2), {}, "rank 6"),
        ((3, 2, 2), (1, 3, 4), {"group": 2}, "group=2 does not divide the 3 input channels"),
        ((2, 2, 2), (1, 2, 4), {"output_padding": [1, 1]}, "output_padding"),
        ((2, 2, 2), (1, 2, 4), {"output_shape": [3, 3, 3, 3]}, "output_shape"),
        ((2, 2, 3), (1, 2, 4), {"kernel_shape": [2]}, "kernel_shape"),
        ((2, 2, 3), (1, 2, 4), {"strides": [0]}, "below 1"),
    ],
)
def test_unsupported_conv_transposes_are_skipped_with_a_reason(w_shape, x_shape, attrs, reason):
    found = discover(single_conv_transpose(w_shape, x_shape, **attrs))
    assert not found.weights
    (skipped,) = found.skipped
    assert skipped.op_type == "ConvTranspose" and reason in skipped.reason


def test_conv_transpose_inside_a_subgraph_is_reported():
    inner = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "W"], ["z"], name="inner_ct")],
        "body",
        [],
        [value("z", None)],
    )
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=inner, else_branch=inner)]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [value("x", [1, 2, 4]), value("c", [], onnx.TensorProto.BOOL)],
            [value("y", None)],
            [tensor("W", np.ones((2, 2, 2)))],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=10,
    )
    skipped = discover(model).skipped
    assert len(skipped) == 2  # the then and the else branch
    assert all(s.op_type == "ConvTranspose" and "inside a subgraph" in s.reason for s in skipped)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def outputs(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def stored(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("group", [1, 2])
def test_prune_model_prunes_the_conv_transpose(group):
    model = decoder(group=group)
    x = gaussian_calibration((3, 16, 16), n=16)
    dense = outputs(model, x)
    errors = {}
    for refit in ("none", "obs"):
        result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.5, refit=refit))
        onnx.checker.check_model(result.model, full_check=True)
        report = {layer.nodes[0]: layer for layer in result.report.layers}
        assert report["up"].op_type == "ConvTranspose"
        assert abs(result.report.sparsity_achieved - 0.5) < 0.01
        wt = stored(result.model, "WT")
        assert wt.shape == (8, 8 // group, 2, 2)
        assert 0.15 < np.mean(wt == 0) == pytest.approx(report["up"].sparsity)
        y = outputs(result.model, x)
        assert np.isfinite(y).all()
        errors[refit] = float(np.linalg.norm(y - dense) / np.linalg.norm(dense))
        assert errors[refit] < 0.8
        if refit == "obs":
            assert report["up"].refit is not None
            bias = stored(result.model, "bT")
            assert not np.array_equal(bias, stored(model, "bT"))  # the bias shift reached it
    assert errors["obs"] < errors["none"]


def test_refit_fits_a_single_conv_transpose_layer():
    """One wide ConvTranspose: the OBS refit must lower its own output error."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 6, 3, 3)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="ct", strides=[2, 2], pads=[1, 1, 1, 1])
    model = finish([node], [value("x", ["b", 16, 5, 5])], [value("y", ["b", 6, 9, 9])], [tensor("W", w)])
    x = gaussian_calibration((16, 5, 5), n=32, nonneg=True)
    dense = outputs(model, x)
    err = {}
    for refit in ("none", "obs"):
        result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.6, refit=refit))
        err[refit] = float(np.linalg.norm(outputs(result.model, x) - dense) / np.linalg.norm(dense))
    assert err["obs"] < 0.8 * err["none"]


def test_pattern_and_sequential_runs():
    model = decoder(group=2)
    x = gaussian_calibration((3, 16, 16), n=8)
    result = prune_model(model, {"x": x}, PruneConfig(pattern="2:4"))
    checks = {c.nodes[0]: c for c in check_pattern(result.model, parse_pattern("2:4")).layers}
    assert checks["up"].status is CheckStatus.COMPLIES and checks["up"].groups == 8 * 4
    seq = prune_model(model, {"x": x}, PruneConfig(sparsity=0.5, sequential=True))
    assert np.isfinite(outputs(seq.model, x)).all()
    assert 0 < np.mean(stored(seq.model, "WT") == 0) < 1


def test_inspect_lists_the_conv_transpose(tmp_path, cli):
    path = save(decoder(), tmp_path / "decoder.onnx")
    result = cli("inspect", path)
    assert result.exit_code == 0
    assert any(
        "up" in line and "ConvTranspose" in line and "8x8x2x2" in line for line in result.stdout.splitlines()
    )
    assert cli("inspect", path, "--op-types", "ConvTranspose").exit_code == 0


def test_structured_pruning_stops_at_the_conv_transpose(tmp_path):
    from sipp_onnx.structured.pipeline import StructuredConfig, prune_structured

    path = save(decoder(), tmp_path / "decoder.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=gaussian_calibration((3, 16, 16), n=4))
    with pytest.raises(NoPrunableLayersError, match="ConvTranspose is not mapped"):
        prune_structured(path, calib, StructuredConfig(sparsity=0.3, channel_multiple=1))
