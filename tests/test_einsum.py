"""Einsum nodes with a constant weight are dense layers: discovery of the equations, and the oracle
that an Einsum model is measured and pruned exactly as the same model written with MatMul."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, gaussian_calibration, save, tensor, value
from onnx import helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.discover import discover
from sipp_onnx.einsum import EinsumRejected, dense_einsum
from sipp_onnx.layers import WeightLayout
from sipp_onnx.pipeline import prepare
from sipp_onnx.sensitivity import DenseAccumulator


def _single(equation: str, x_shape, w_shape, weight_first: bool = False, bias=None) -> onnx.ModelProto:
    """One Einsum of input `x` and constant `W` (optionally followed by `Add(y, b)`)."""
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    operands = [w, x] if weight_first else [x, w]
    y_shape = list(np.einsum(equation.replace(" ", ""), *operands).shape)
    nodes = [
        helper.make_node("Einsum", ["W", "x"] if weight_first else ["x", "W"], ["y"], "e", equation=equation)
    ]
    inits = [tensor("W", w)]
    out = "y"
    if bias is not None:
        nodes.append(helper.make_node("Add", ["y", "b"], ["z"], "add"))
        inits.append(tensor("b", rng.normal(size=bias)))
        out = "z"
        y_shape = list(np.broadcast_shapes(tuple(y_shape), tuple(bias)))
    return finish(nodes, [value("x", list(x_shape))], [value(out, y_shape)], inits)


# (equation, x shape, W shape, weight first, layout, matrix shape, input_axes)
ACCEPTED = [
    ("bij,jk->bik", [2, 3, 4], [4, 5], False, WeightLayout.COLUMNS, (4, 5), ()),
    ("...j,jk->...k", [2, 3, 4], [4, 5], False, WeightLayout.COLUMNS, (4, 5), ()),
    ("ij,kj->ik", [2, 4], [5, 4], False, WeightLayout.ROWS, (5, 4), ()),
    ("jk,bij->bik", [2, 3, 4], [4, 5], True, WeightLayout.COLUMNS, (4, 5), ()),
    ("kj,btj->btk", [2, 3, 4], [5, 4], True, WeightLayout.ROWS, (5, 4), ()),
    ("bji,jk->bik", [2, 4, 3], [4, 5], False, WeightLayout.COLUMNS, (4, 5), (-2,)),
    ("bij,jk->bki", [2, 3, 4], [4, 5], False, WeightLayout.COLUMNS, (4, 5), ()),
    ("btd,dhk->bthk", [2, 3, 4], [4, 2, 3], False, WeightLayout.COLUMNS, (4, 6), ()),
    ("bd,hkd->bhk", [2, 4], [2, 3, 4], False, WeightLayout.ROWS, (6, 4), ()),
    ("abcd,cde->abe", [2, 3, 2, 4], [2, 4, 5], False, WeightLayout.COLUMNS, (8, 5), (-2, -1)),
    ("acbd,dce->abe", [2, 2, 3, 4], [4, 2, 5], False, WeightLayout.COLUMNS, (8, 5), (-1, -3)),
    (" b i j , j k -> b i k ", [2, 3, 4], [4, 5], False, WeightLayout.COLUMNS, (4, 5), ()),
    ("bij,jk", [2, 3, 4], [4, 5], False, WeightLayout.COLUMNS, (4, 5), ()),
]


@pytest.mark.parametrize(("equation", "xs", "ws", "first", "layout", "matrix", "axes"), ACCEPTED)
def test_accepted_equations(equation, xs, ws, first, layout, matrix, axes) -> None:
    found = discover(_single(equation, xs, ws, first))
    assert not found.skipped
    (layer,) = found.layers
    assert layer.op_type == "Einsum" and layer.weight == "W" and layer.input == "x"
    assert layer.layout is layout and layer.weight_shape == matrix and layer.input_axes == axes
    (weight,) = found.weights
    assert weight.shape == matrix and weight.stored_name == "W"
    assert weight.via == ("Reshape" if len(ws) > 2 else "")


# (equation, x shape, W shape, weight first, words of the reason)
REJECTED = [
    ("bij,bjk->bik", [2, 3, 4], [2, 4, 5], False, "index 'b' is in both operands and the output"),
    ("bij,jk->bk", [2, 3, 4], [4, 5], False, "activation is summed over index 'i'"),
    ("bij,jk->bi", [2, 3, 4], [4, 5], False, "weight is summed over index 'k'"),
    ("bij,jk->bij", [2, 3, 4], [4, 5], False, "index 'j' is in both operands and the output"),
    ("bii,ik->bik", [2, 4, 4], [4, 5], False, "index 'i' repeated in the activation"),
    ("bij,jj->bij", [2, 3, 4], [4, 4], False, "index 'j' repeated in the weight"),
    ("bij,j->bi", [2, 3, 4], [4], False, "no free index"),
    ("bi,jk->bijk", [2, 3], [4, 5], False, "outer product"),
    ("btd,hdk->bthk", [2, 3, 4], [2, 4, 3], False, "interleave contracted ('d') and free ('hk')"),
    ("j...,jk->...k", [4, 2, 3], [4, 5], False, "'...' not at the start"),
    ("bij,jk->bik", [2, 3, 4, 1], [4, 5], False, "do not match its rank 4"),
]


@pytest.mark.parametrize(("equation", "xs", "ws", "first", "reason"), REJECTED)
def test_rejected_equations(equation, xs, ws, first, reason) -> None:
    if equation == "bij,jk->bik":  # the activation's declared rank disagrees with the equation
        model = _single(equation, [2, 3, 4], ws)
        model.graph.input[0].CopyFrom(value("x", xs))
    else:
        model = _single(equation, xs, ws, first)
    found = discover(model)
    assert not found.weights
    (skip,) = found.skipped
    assert skip.op_type == "Einsum" and skip.weight == "W"
    assert reason in skip.reason and repr(equation) in skip.reason


def test_parser_rejections_without_a_model() -> None:
    """Equations ONNX Runtime would refuse to run never reach a model; the parser still says why."""
    for equation, reason in (
        ("ij,jk->i-k", "cannot parse"),
        ("...i...,ij->...j", "'...' twice"),
        ("ij,jk->ik->k", "cannot parse"),
        ("...j,jk->...kz", "output index 'z' is in no operand"),
        ("ij,...jk->ik", "weight's subscripts have '...'"),
        ("ij,jk->...ik", "'...' in the output but in no operand"),
        ("...j,jk->k", "a sum over its batch axes"),
        ("bij,jkl->bik", "do not match its rank 2"),
    ):
        with pytest.raises(EinsumRejected, match=reason):
            dense_einsum(equation, 1, (4, 5))


def test_other_einsums_are_reported() -> None:
    """Attention (two activations), three operands, a constant-only Einsum: skipped with why."""
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("Einsum", ["x", "x"], ["a"], "attention", equation="bij,bkj->bik"),
        helper.make_node("Einsum", ["x", "W", "V"], ["c"], "three", equation="bij,jk,kl->bil"),
        helper.make_node("Einsum", ["W", "V"], ["d"], "folded", equation="ij,jk->ik"),
    ]
    model = finish(
        nodes,
        [value("x", [2, 4, 4])],
        [value("a", [2, 4, 4]), value("c", [2, 4, 4]), value("d", [4, 4])],
        [tensor("W", w), tensor("V", w)],
    )
    reasons = {s.node: s.reason for s in discover(model).skipped}
    assert "both operands are activations" in reasons["attention"]
    assert "Einsum of 3 operands" in reasons["three"]
    assert "both operands are constant" in reasons["folded"]


@pytest.mark.parametrize(
    ("equation", "bias", "problem"),
    [
        ("bij,jk->bik", [5], ""),
        ("bij,jk->bik", [1, 1, 5], ""),
        ("bij,jk->bki", [5, 1], "does not end with the weight's free indices 'k'"),
        ("btd,dhk->bthk", [2, 3], ""),
        ("btd,dhk->bthk", [1, 3], "has shape [1, 3], not [2, 3]"),
        ("btd,dhk->bhtk", [2, 1, 3], "does not end with the weight's free indices 'hk'"),
        ("bIj,jK", [1], "mixed-case"),
    ],
)
def test_bias_slot(equation: str, bias: list[int], problem: str) -> None:
    ws = [4, 2, 3] if "dhk" in equation else [4, 5]
    (layer,) = discover(_single(equation, [2, 3, 4], ws, bias=bias)).layers
    if problem:
        assert layer.bias is None and problem in layer.bias_problem
    else:
        assert layer.bias is not None and layer.bias.tensor == "b" and not layer.bias_problem


def test_weight_shared_by_einsums() -> None:
    """One weight read by two Einsums (either operand order, the same matrix): one pruned
    weight with two uses; read as matrices of two shapes, it is skipped."""
    w = np.ones((4, 2, 3), np.float32)
    same = [
        helper.make_node("Einsum", ["x", "W"], ["a"], "e1", equation="btd,dhk->bthk"),
        helper.make_node("Einsum", ["W", "x"], ["b"], "e2", equation="dhk,btd->bthk"),
    ]
    outs = [value("a", [2, 3, 2, 3]), value("b", [2, 3, 2, 3])]
    found = discover(finish(same, [value("x", [2, 3, 4])], outs, [tensor("W", w)]))
    (weight,) = found.weights
    assert [layer.node for layer in weight.layers] == ["e1", "e2"] and weight.via == "Reshape"
    other = [same[0], helper.make_node("Einsum", ["y", "W"], ["b"], "e2", equation="bdh,dhk->bk")]
    model = finish(
        other, [value("x", [2, 3, 4]), value("y", [2, 4, 2])], [outs[0], value("b", [2, 3])], [tensor("W", w)]
    )
    found = discover(model)
    assert not found.weights
    assert all("matrices of different shapes" in s.reason for s in found.skipped)


def test_accumulator_input_axes_match_a_transposed_input() -> None:
    """Points along moved axes are the points of the input transposed by hand."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(5, 8)).astype(np.float32)
    x = rng.normal(size=(6, 2, 3, 4)).astype(np.float32)  # 'acbd': c (2) and d (4) contracted
    moved = DenseAccumulator(rows, gram=True, input_axes=(-3, -1))
    moved.update(x)
    plain = DenseAccumulator(rows, gram=True)
    plain.update(x.transpose(0, 2, 1, 3).reshape(6, 3, 8))
    a, b = moved.result(), plain.result()
    assert a.points == b.points == 18
    np.testing.assert_array_equal(a.sensitivity, b.sensitivity)
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-6)
    with pytest.raises(ValueError, match="do not hold the weight's 8 inputs"):
        moved.update(x[:, :, :, :2])


# ----------------------------------------------------------------------- the MatMul oracle

RNG_SEED = 7


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)

    def w(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)

    return {
        "W1": w(16, 24),
        "b1": w(24) * 0.1,
        "W2": w(20, 24),  # rows: the Einsum reads it as 'kj'
        "W3": w(20, 2, 6),
        "b3": w(2, 6) * 0.1,
        "W4": w(20, 5),
        "b4": w(5) * 0.1,
        "W5": w(16, 7),
        "W6": w(2, 6, 4),
    }


def _einsum_model() -> onnx.ModelProto:
    """x -> e1 (+b1, Relu) -> e2 (weight first, Relu) -> e3 (3-D weight, +b3) -> e6 (two
    contracted axes) = y2; e2 -> e4 ('...', +b4) = y; x transposed -> e5 (points on axis 1) = y3."""
    p = _weights()
    e = helper.make_node
    nodes = [
        e("Einsum", ["x", "W1"], ["m1"], "e1", equation="btj,jk->btk"),
        e("Add", ["m1", "b1"], ["a1"], "e1_add"),
        e("Relu", ["a1"], ["h1"], "relu1"),
        e("Einsum", ["W2", "h1"], ["m2"], "e2", equation="kj,btj->btk"),
        e("Relu", ["m2"], ["h2"], "relu2"),
        e("Einsum", ["h2", "W3"], ["m3"], "e3", equation="btd,dhk->bthk"),
        e("Add", ["m3", "b3"], ["h3"], "e3_add"),
        e("Einsum", ["h3", "W6"], ["y2"], "e6", equation="btHk,Hke->bte"),
        e("Einsum", ["h2", "W4"], ["m4"], "e4", equation="...j,jk->...k"),
        e("Add", ["m4", "b4"], ["y"], "e4_add"),
        e("Transpose", ["x"], ["xt"], "xt", perm=[0, 2, 1]),
        e("Einsum", ["xt", "W5"], ["y3"], "e5", equation="bjt,jk->btk"),
    ]
    inits = [tensor(name, p[name]) for name in ("W1", "b1", "W2", "W3", "b3", "W4", "b4", "W5", "W6")]
    return finish(nodes, [value("x", ["B", 3, 16])], _outputs(), inits)


def _matmul_model() -> onnx.ModelProto:
    """The same network with MatMul: transposed and reshaped weights, Reshape nodes."""
    p = _weights()
    e = helper.make_node
    nodes = [
        e("MatMul", ["x", "W1"], ["m1"], "e1"),
        e("Add", ["m1", "b1"], ["a1"], "e1_add"),
        e("Relu", ["a1"], ["h1"], "relu1"),
        e("MatMul", ["h1", "W2t"], ["m2"], "e2"),
        e("Relu", ["m2"], ["h2"], "relu2"),
        e("MatMul", ["h2", "W3r"], ["m3"], "e3"),
        e("Add", ["m3", "b3r"], ["a3"], "e3_add"),
        e("Reshape", ["a3", "heads"], ["h3"], "split"),
        e("Reshape", ["h3", "merged"], ["h3m"], "merge"),
        e("MatMul", ["h3m", "W6r"], ["y2"], "e6"),
        e("MatMul", ["h2", "W4"], ["m4"], "e4"),
        e("Add", ["m4", "b4"], ["y"], "e4_add"),
        e("MatMul", ["x", "W5"], ["y3"], "e5"),
    ]
    inits = [
        tensor("W1", p["W1"]),
        tensor("b1", p["b1"]),
        tensor("W2t", p["W2"].T),
        tensor("W3r", p["W3"].reshape(20, 12)),
        tensor("b3r", p["b3"].reshape(12)),
        tensor("heads", np.array([0, 0, 2, 6]), np.int64),
        tensor("merged", np.array([0, 0, 12]), np.int64),
        tensor("W6r", p["W6"].reshape(12, 4)),
        tensor("W4", p["W4"]),
        tensor("b4", p["b4"]),
        tensor("W5", p["W5"]),
    ]
    return finish(nodes, [value("x", ["B", 3, 16])], _outputs(), inits)


def _outputs() -> list[onnx.ValueInfoProto]:
    return [value("y", ["B", 3, 5]), value("y2", ["B", 3, 4]), value("y3", ["B", 3, 7])]


# Einsum weight -> (MatMul twin's weight, the twin's values as the Einsum's matrix)
TWINS = {
    "W1": ("W1", lambda v: v),
    "W2": ("W2t", lambda v: v.T),
    "W3": ("W3r", lambda v: v),
    "W4": ("W4", lambda v: v),
    "W5": ("W5", lambda v: v),
    "W6": ("W6r", lambda v: v),
}


def _calibration() -> dict[str, np.ndarray]:
    return {"x": gaussian_calibration((3, 16), n=48, seed=2)}


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y", "y2", "y3"], {"x": x})


def test_einsum_model_is_found_as_the_matmul_model() -> None:
    einsum, matmul = discover(_einsum_model()), discover(_matmul_model())
    assert not einsum.skipped
    layers = {layer.node: layer for layer in einsum.layers}
    twins = {layer.node: layer for layer in matmul.layers}
    assert set(layers) == set(twins) == {"e1", "e2", "e3", "e4", "e5", "e6"}
    for node, layer in layers.items():
        assert layer.op_type == "Einsum"
        assert layer.n_out == twins[node].n_out and layer.fan_in == twins[node].fan_in
        assert (layer.bias is None) == (twins[node].bias is None), node
    assert layers["e5"].input_axes == (-2,) and layers["e6"].input_axes == (-2, -1)


def test_statistics_equal_the_matmul_model() -> None:
    """The oracle: every statistic of every layer, in canonical rows, as measured on the MatMul
    twin (the Einsum's moved and flattened points are the twin's points)."""
    config = PruneConfig(sparsity=0.5)
    ours = prepare(_einsum_model(), _calibration(), config, gram=True).stats
    theirs = prepare(_matmul_model(), _calibration(), config, gram=True).stats
    assert set(ours) == set(theirs)
    for node, a in ours.items():
        b = theirs[node]
        assert a.points == b.points and a.patches_per_sample == b.patches_per_sample, node
        np.testing.assert_allclose(a.sensitivity, b.sensitivity, rtol=1e-5, atol=1e-7, err_msg=node)
        np.testing.assert_allclose(a.input_sqnorm, b.input_sqnorm, rtol=1e-6, err_msg=node)
        np.testing.assert_allclose(a.gram, b.gram, rtol=1e-5, atol=1e-6, err_msg=node)
        np.testing.assert_allclose(a.input_sum, b.input_sum, rtol=1e-5, atol=1e-6, err_msg=node)


@pytest.mark.parametrize("refit", ["obs", "bias"])
def test_pruned_like_the_matmul_model(refit: str) -> None:
    """prune_model at 0.5: the Einsum model's weights get the MatMul twin's masks and refitted
    values (biases too), the result passes the checker and computes the twin's outputs."""
    config = PruneConfig(sparsity=0.5, refit=refit)
    ours = prune_model(_einsum_model(), _calibration(), config)
    theirs = prune_model(_matmul_model(), _calibration(), config)
    onnx.checker.check_model(ours.model, full_check=True)
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in ours.model.graph.initializer}
    twin = {t.name: onnx.numpy_helper.to_array(t) for t in theirs.model.graph.initializer}
    zeros = sum(int((pruned[name] == 0).sum()) for name in TWINS)
    total = sum(pruned[name].size for name in TWINS)
    assert 0.45 <= zeros / total <= 0.55
    for name, (other, as_ours) in TWINS.items():
        matrix = as_ours(twin[other]).reshape(pruned[name].shape)
        np.testing.assert_array_equal(pruned[name] == 0, matrix == 0, err_msg=name)
        np.testing.assert_allclose(pruned[name], matrix, rtol=1e-4, atol=1e-5, err_msg=name)
    for bias, other in (("b1", "b1"), ("b3", "b3r"), ("b4", "b4")):
        np.testing.assert_allclose(pruned[bias].ravel(), twin[other], rtol=1e-4, atol=1e-5)
    assert not np.array_equal(pruned["b4"], _weights()["b4"])  # the bias refit did shift it
    x = gaussian_calibration((3, 16), n=5, seed=9)
    for a, b in zip(_run(ours.model, x), _run(theirs.model, x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    dense = _run(_einsum_model(), x)
    assert not np.allclose(dense[0], _run(ours.model, x)[0])


def test_two_four_pattern_on_einsum_layers() -> None:
    """N:M runs along each Einsum's contracted axis (K) like along a MatMul's."""
    config = PruneConfig(pattern="2:4", refit="none")
    result = prune_model(_einsum_model(), _calibration(), config)
    pruned = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name, rows in (("W1", pruned["W1"].T), ("W2", pruned["W2"]), ("W6", pruned["W6"].reshape(12, 4).T)):
        groups = (rows.reshape(rows.shape[0], -1, 4) != 0).sum(axis=2)
        assert (groups <= 2).all(), name


def test_inspect_lists_einsum_layers(tmp_path: Path, cli) -> None:
    model = save(_einsum_model(), tmp_path / "einsum.onnx")
    result = cli("inspect", model, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    layers = {entry["node"]: entry for entry in data["layers"]}
    assert set(layers) == {"e1", "e2", "e3", "e4", "e5", "e6"}
    assert {entry["op_type"] for entry in layers.values()} == {"Einsum"}
    assert layers["e3"]["shape"] == [20, 12]
    skipped = _single("bij,bjk->bik", [2, 3, 4], [2, 4, 5])
    text = cli("inspect", save(skipped, tmp_path / "s.onnx"))
    assert text.exit_code == 0 and "'bij,bjk->bik'" in text.stdout and "one product per 'b'" in text.stdout
    only = cli("inspect", model, "--json", "--op-types", "MatMul")
    assert only.exit_code == 0
    assert all("not selected" in s["reason"] for s in json.loads(only.stdout)["skipped"])


def test_structured_pruning_stops_at_einsum(tmp_path: Path) -> None:
    """Structured pruning does not map Einsum: a MatMul feeding one keeps its neurons, with the
    reason; another MatMul branch is still pruned; an Einsum-only model is a clear error."""
    from sipp_onnx.errors import NoPrunableLayersError
    from sipp_onnx.structured.pipeline import StructuredConfig, prune_structured

    rng = np.random.default_rng(0)
    e = helper.make_node
    nodes = [
        e("MatMul", ["x", "W0"], ["m0"], "fc0"),
        e("Relu", ["m0"], ["h0"], "relu0"),
        e("Einsum", ["h0", "W1"], ["y"], "e1", equation="btj,jk->btk"),
        e("MatMul", ["x", "W2"], ["m2"], "fc2"),
        e("Relu", ["m2"], ["h2"], "relu2"),
        e("MatMul", ["h2", "W3"], ["y2"], "fc3"),
    ]
    shapes = {"W0": (16, 24), "W1": (24, 8), "W2": (16, 24), "W3": (24, 8)}
    inits = [tensor(name, rng.normal(size=shape)) for name, shape in shapes.items()]
    outputs = [value("y", ["B", 3, 8]), value("y2", ["B", 3, 8])]
    mixed = save(finish(nodes, [value("x", ["B", 3, 16])], outputs, inits), tmp_path / "mixed.onnx")
    result = prune_structured(mixed, _calibration(), StructuredConfig(sparsity=0.2, channel_multiple=1))
    groups = {g.name: g for g in result.report.groups}
    assert any("Einsum is not mapped" in r for r in groups["fc0"].reasons) and groups["fc0"].units_after == 24
    assert groups["fc2"].units_after < 24
    onnx.checker.check_model(result.model, full_check=True)
    with pytest.raises(NoPrunableLayersError, match="no structured pruning possible"):
        prune_structured(save(_einsum_model(), tmp_path / "e.onnx"), _calibration(), StructuredConfig())


def test_weight_through_a_chain() -> None:
    """A quantized 3-D weight (DequantizeLinear, per-channel on its last axis) and a transposed
    2-D one: followed as for MatMul, the 3-D one read as its matrix by one more Reshape step;
    pruning writes zero points into the stored integers."""
    rng = np.random.default_rng(4)
    q = rng.integers(-100, 100, size=(8, 2, 3)).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, size=3).astype(np.float32)
    zero = np.full(3, 2, np.int8)
    wt = rng.normal(size=(5, 6)).astype(np.float32)  # stored [k, j]
    e = helper.make_node
    nodes = [
        e("DequantizeLinear", ["Wq", "s", "z"], ["W"], "dq", axis=2),
        e("Einsum", ["x", "W"], ["h"], "heads", equation="btd,dhk->bthk"),
        e("Reshape", ["h", "flat"], ["hf"], "flat"),
        e("Transpose", ["Wt"], ["V"], "tr", perm=[1, 0]),
        e("Einsum", ["V", "hf"], ["y"], "out", equation="jk,btj->btk"),
    ]
    inits = [
        tensor("Wq", q, np.int8),
        tensor("s", scale),
        tensor("z", zero, np.int8),
        tensor("Wt", wt),
        tensor("flat", np.array([0, 0, 6]), np.int64),
    ]
    model = finish(nodes, [value("x", ["B", 4, 8])], [value("y", ["B", 4, 5])], inits)
    found = discover(model)
    weights = {w.name: w for w in found.weights}
    assert weights["W"].via == "DequantizeLinear -> Reshape" and weights["W"].shape == (8, 6)
    assert weights["V"].via == "Transpose[1, 0]" and weights["V"].primary.layout is WeightLayout.COLUMNS
    calib = {"x": gaussian_calibration((4, 8), n=32, seed=5)}
    result = prune_model(model, calib, PruneConfig(sparsity=0.5, refit="none"))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert stored["Wq"].dtype == np.int8 and stored["Wq"].shape == (8, 2, 3)
    kept = stored["Wq"] != zero
    assert 0.2 < 1 - kept.mean() < 0.8
    assert np.array_equal(stored["Wq"][kept], q[kept])  # kept integers untouched
    assert 0.2 < (stored["Wt"] == 0).mean() < 0.8
