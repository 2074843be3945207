"""Weight-only int8 exports: each weight an int8 initializer, `Cast` to float, times a constant
per-row or per-tensor scale (`Mul`), read by a MatMul. Discovery follows the Cast (a
DequantizeLinear with scale 1) and the Mul (a scale step), so the layer is pruned as it computes
and the int8 store is written back: pruned entries 0, kept ones their integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import finish, tensor, value
from onnx import helper, numpy_helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.discover import discover


def _model(scale_shape=(1, 24), int8: bool = True):
    """x [N, 16] -> MatMul(Cast(q1) * s1) -> Relu -> MatMul(W2 float) -> y."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(16, 24)).astype(np.int8)
    scale = (rng.uniform(0.5, 2.0, size=scale_shape) / 127).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["q1"], ["q1_f"], to=onnx.TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["q1_f", "s1"], ["w1"], name="scale"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    inits = [
        tensor("q1", q, np.int8 if int8 else np.int32),
        tensor("s1", scale),
        tensor("w2", rng.normal(size=(24, 4)) / 5),
    ]
    model = finish(nodes, [value("x", ["N", 16])], [value("y", ["N", 4])], inits)
    return model, q, scale


def _twin(q, scale):
    """The float model holding exactly the dequantized weight."""
    model, _, _ = _model()
    graph = model.graph
    keep = [n for n in graph.node if n.name not in ("cast", "scale")]
    del graph.node[:]
    graph.node.extend(keep)
    for i, t in enumerate(graph.initializer):
        if t.name == "q1":
            graph.initializer[i].CopyFrom(tensor("w1", q.astype(np.float64) * scale))
    return model


@pytest.mark.parametrize("scale_shape", [(1, 24), (1,), ()])
def test_cast_and_scale_are_followed_and_written_back(scale_shape):
    model, q, scale = _model(scale_shape)
    found = discover(model)
    (w,) = [w for w in found.weights if w.name == "w1"]
    assert w.stored_name == "q1" and w.via == "Cast -> Mul"
    calib = {"x": np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)}
    plain = prune_model(model, calib, PruneConfig(sparsity=0.5, refit="none"))
    twin = prune_model(_twin(q, scale), calib, PruneConfig(sparsity=0.5, refit="none"))
    stored = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    twin_w = {t.name: numpy_helper.to_array(t) for t in twin.model.graph.initializer}["w1"]
    assert stored["q1"].dtype == np.int8
    np.testing.assert_array_equal(stored["q1"] != 0, twin_w != 0)  # the same mask as the float twin
    np.testing.assert_array_equal(np.where(stored["q1"] != 0, q, 0), stored["q1"])  # kept integers kept
    np.testing.assert_array_equal(stored["s1"], scale)  # the scale is not touched
    refit = prune_model(model, calib, PruneConfig(sparsity=0.5))
    values = {t.name: numpy_helper.to_array(t) for t in refit.model.graph.initializer}["q1"]
    assert values.dtype == np.int8 and (values == 0).mean() >= 0.4
    assert all(check.cosine > 0.9 for check in refit.report.verification)


def test_an_elementwise_or_zero_scale_is_not_followed():
    model, _, _ = _model((16, 24))  # one scale per element: not a quantization scale
    reasons = {s.node: s.reason for s in discover(model).skipped}
    assert "per-tensor or per-axis" in reasons["fc1"]
    model, _, _ = _model((1, 24))
    s1 = next(t for t in model.graph.initializer if t.name == "s1")
    s1.CopyFrom(tensor("s1", np.zeros((1, 24))))
    reasons = {s.node: s.reason for s in discover(model).skipped}
    assert "non-zero" in reasons["fc1"]
