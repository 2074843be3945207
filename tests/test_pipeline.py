"""End-to-end library behaviour of prune_model on tiny models built in code."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import convnet, finish, gaussian_calibration, mlp, single_gemm, tensor, tokens, value
from onnx import helper, numpy_helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.modelio import tensor_protos
from sipp_onnx.runtime import make_session
from sipp_onnx.select import budget

EPS32 = 1.1920929e-07


def naive_dense_sensitivity(rows, points):
    """Spec section 2 by loops: rows [N, K], points [n, K] (split by sign per point)."""
    n_out, k = rows.shape
    s = np.zeros((n_out, k))
    for x in points:
        for a in (np.maximum(x, 0), np.maximum(-x, 0)):
            for i in range(n_out):
                for sign in (1, -1):
                    z = sum(rows[i, j] * a[j] for j in range(k) if np.sign(rows[i, j]) == sign)
                    if abs(z) <= EPS32:
                        continue
                    for j in range(k):
                        if np.sign(rows[i, j]) == sign:
                            s[i, j] = max(s[i, j], rows[i, j] * a[j] / z)
    return s


def run(model_or_path, feed):
    source = (
        model_or_path.SerializeToString()
        if isinstance(model_or_path, onnx.ModelProto)
        else str(model_or_path)
    )
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def init_map(model):
    return {t.name: t for t in model.graph.initializer}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_single_gemm_det_keeps_exactly_the_top_sensitivities(tmp_path):
    model = single_gemm(n_in=10, n_out=6)
    # Non-negative, continuous inputs: no ties among the sensitivities, so "the top 40 %" is exact.
    x = gaussian_calibration((10,), n=12, nonneg=True)
    result = prune_model(
        model,
        {"x": x},
        PruneConfig(
            sparsity=0.6, method="sipp-det", reduction="max", terms="signed", refit="none", ranking="own"
        ),
    )
    w = numpy_helper.to_array(init_map(model)["W"])
    new = numpy_helper.to_array(init_map(result.model)["W"])
    s = naive_dense_sensitivity(w.astype(np.float64), x.astype(np.float64))
    keep = budget(w.size, 0.6)
    ranked = np.sort(s, axis=None)[::-1]
    assert ranked[keep - 1] - ranked[keep] > 1e-4  # the cut is not a near-tie
    assert np.count_nonzero(new) == keep == 24
    np.testing.assert_array_equal(new != 0, s >= ranked[keep - 1])
    np.testing.assert_array_equal(new[new != 0], w[new != 0])  # kept values unchanged


@pytest.mark.parametrize("builder,shape", [(mlp, (20,)), (convnet, (3, 8, 8)), (tokens, (5, 6))])
@pytest.mark.parametrize("method", ["sipp-det", "sipp-rand", "sipp-hybrid", "magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_every_method_reaches_the_sparsity_on_multi_layer_models(builder, shape, method, sparsity):
    model = builder()
    result = prune_model(
        model, {"x": gaussian_calibration(shape, n=24)}, PruneConfig(sparsity=sparsity, method=method, seed=1)
    )
    report = result.report
    assert abs(report.sparsity_achieved - sparsity) <= 0.005
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for name, t in _weights(result.model, report))
    assert zeros == report.params_total - report.params_kept
    assert report.verification and np.isfinite(report.verification[0].rel_l2_error)


def _weights(model, report):
    tensors = init_map(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = node.attribute[0].t
    return [(layer.weight, tensors[layer.weight]) for layer in report.layers]


def test_sparsity_zero_leaves_outputs_unchanged(tmp_path):
    model = convnet()
    x = gaussian_calibration((3, 8, 8), n=8)
    result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.0))
    assert [t.SerializeToString() for t in model.graph.initializer] == [
        t.SerializeToString() for t in result.model.graph.initializer
    ]
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(result.model, {"x": x})[0])


def test_everything_but_pruned_weights_is_preserved(tmp_path):
    model = mlp()
    model.doc_string = "my model"
    model.producer_name = "unit-test"
    helper.set_model_props(model, {"owner": "team", "version": "3"})
    model.graph.value_info.append(value("r1", ["batch", 32]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    src = tmp_path / "model.onnx"
    onnx.save_model(model, str(src))
    before = sha(src)
    out = tmp_path / "out.onnx"
    prune_model(src, {"x": gaussian_calibration((20,))}, PruneConfig(sparsity=0.5, refit="none"), output=out)
    assert sha(src) == before
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in pruned.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    assert pruned.doc_string == "my model" and pruned.producer_name == "unit-test"
    assert {p.key: p.value for p in pruned.metadata_props} == {"owner": "team", "version": "3"}
    assert [v.SerializeToString() for v in pruned.graph.value_info] == [
        v.SerializeToString() for v in model.graph.value_info
    ]
    assert [n.SerializeToString() for n in pruned.graph.node] == [
        n.SerializeToString() for n in model.graph.node
    ]
    assert pruned.graph.input == model.graph.input and pruned.graph.output == model.graph.output
    original, new = init_map(model), init_map(pruned)
    for name in ("b1", "b2", "b3"):
        assert new[name].SerializeToString() == original[name].SerializeToString()
    for name in ("W1", "W2", "W3"):
        assert new[name].dims == original[name].dims and new[name].data_type == original[name].data_type
    assert run(out, {"x": gaussian_calibration((20,), n=3)})[0].shape == (3, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]  # no temp files


def test_external_data_is_preserved(tmp_path):
    model = convnet()
    src = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "pruned.onnx"
    x = gaussian_calibration((3, 8, 8), n=10)
    result = prune_model(src, {"x": x}, PruneConfig(sparsity=0.5), output=out)
    assert {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    stored = onnx.load(str(out), load_external_data=False)
    assert any(onnx.external_data_helper.uses_external_data(t) for t in stored.graph.initializer)
    assert result.written == [out, out_dir / "pruned.onnx.data"]
    # In memory, external tensors stay external: after the write, the output's.
    assert result.base_dir == out_dir
    assert onnx.external_data_helper.uses_external_data(tensor_protos(result.model)["g_w"])
    session, _ = make_session(result.model, base_dir=result.base_dir)
    np.testing.assert_allclose(run(out, {"x": x})[0], session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_library_does_not_modify_the_given_model():
    model = mlp()
    snapshot = model.SerializeToString()
    prune_model(model, {"x": gaussian_calibration((20,))}, PruneConfig(sparsity=0.7, method="sipp-rand"))
    assert model.SerializeToString() == snapshot


def test_shared_weight_uses_the_max_sensitivity_over_its_uses():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 5)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="m1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="m2"),
    ]
    model = finish(nodes, [value("x", ["b", 5])], [value("y", ["b", 5])], [tensor("W", w)])
    x = gaussian_calibration((5,), n=6)
    result = prune_model(
        model,
        {"x": x},
        PruneConfig(
            sparsity=0.6, method="sipp-det", reduction="max", terms="signed", refit="none", ranking="own"
        ),
    )
    assert [layer.nodes for layer in result.report.layers] == [("m1", "m2")]
    h = np.maximum(x @ w, 0)
    s = np.maximum(
        naive_dense_sensitivity(w.T.astype(np.float64), x), naive_dense_sensitivity(w.T.astype(np.float64), h)
    )
    new = numpy_helper.to_array(init_map(result.model)["W"]).T
    threshold = np.sort(s, axis=None)[::-1][budget(w.size, 0.6) - 1]
    assert np.all(s[new != 0] >= threshold - 1e-5) and np.all(s[new == 0] <= threshold + 1e-5)


def test_float16_weights_keep_their_dtype(tmp_path):
    model = mlp()
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model.ir_version = 10
    x = gaussian_calibration((20,)).astype(np.float16)
    result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.5))
    assert {t.data_type for t in result.model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert abs(result.report.sparsity_achieved - 0.5) <= 0.005
    assert run(result.model, {"x": x[:2]})[0].dtype == np.float16


def test_report_contents(tmp_path):
    result = prune_model(
        convnet(),
        {"x": gaussian_calibration((3, 8, 8), n=20)},
        PruneConfig(sparsity=0.5, batch_size=8, method="sipp-hybrid", seed=4),
    )
    data = result.report.to_dict()
    json.dumps(data)
    assert (
        data["method"] == "sipp-hybrid"
        and data["seed"] == 4
        and data["reduction"] == "max"
        and data["terms"] == "absolute"
    )
    assert data["samples"] == 20 and data["batch_size"] == 8 and data["provider"] in ("cpu", "cuda")
    assert data["recommended_samples"] > 100
    assert any("recommends" in w for w in data["warnings"])
    assert set(data["timings"]) >= {"load", "capture", "sensitivity", "selection", "save", "total"}
    assert set(data["versions"]) == {"sipp-onnx", "onnx", "onnxruntime", "numpy"}
    layer = data["layers"][0]
    assert {
        "weight",
        "nodes",
        "op_type",
        "shape",
        "params",
        "kept",
        "sparsity",
        "sensitivity",
        "bound",
    } <= set(layer)
    assert sum(entry["kept"] for entry in data["layers"]) == data["params_kept"]


def test_recommended_samples_matches_spec_for_lenet300():
    """Spec section 3: 152 for LeNet-300-100 (784-300-100-10)."""
    from sipp_onnx.layers import Layer, WeightLayout
    from sipp_onnx.pipeline import recommended_samples

    layers = [
        Layer(f"fc{i}", "Gemm", f"W{i}", "x", (n, k), WeightLayout.ROWS)
        for i, (n, k) in enumerate([(300, 784), (100, 300), (10, 100)])
    ]
    assert recommended_samples(layers, {}) == 152


def test_magnitude_needs_no_capture():
    result = prune_model(
        mlp(),
        {"x": gaussian_calibration((20,), n=4)},
        PruneConfig(sparsity=0.5, method="magnitude", refit="none"),
    )
    assert "capture" not in result.report.timings
    assert result.report.layers[0].sensitivity is None


def test_gemm_trans_a_and_alpha_use_the_right_points():
    """Gemm(transA=1, transB=0, alpha=2) after a Transpose: the points are the columns of A."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(7, 4)).astype(np.float32)  # transB=0: [K, N]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[1, 0]),
        helper.make_node("Gemm", ["xt", "W"], ["y"], name="g", transA=1, alpha=2.0),
    ]
    model = finish(nodes, [value("x", ["b", 7])], [value("y", ["b", 4])], [tensor("W", w)])
    x = gaussian_calibration((7,), n=9, nonneg=True)
    result = prune_model(
        model,
        {"x": x},
        PruneConfig(sparsity=0.5, method="sipp-det", reduction="max", terms="signed", ranking="own"),
    )
    s = naive_dense_sensitivity(w.T.astype(np.float64), x.astype(np.float64))
    new = numpy_helper.to_array(init_map(result.model)["W"]).T
    ranked = np.sort(s, axis=None)[::-1]
    keep = budget(w.size, 0.5)
    assert ranked[keep - 1] - ranked[keep] > 1e-5
    np.testing.assert_array_equal(new != 0, s >= ranked[keep - 1])
