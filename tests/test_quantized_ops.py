"""Quantized layers (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul, QGemm): discovered,
calibrated on their dequantized inputs, pruned to their zero points, checked against ONNX
Runtime. The quantized models are made by onnxruntime.quantization from a float model built here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, tensor, value
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from sipp_onnx import prune_model
from sipp_onnx.calibration import open_calibration
from sipp_onnx.capture import capture, dequantized
from sipp_onnx.config import Provider, PruneConfig
from sipp_onnx.discover import discover
from sipp_onnx.inspection import inspect_model
from sipp_onnx.modelio import model_inputs, read_tensor, tensor_protos
from sipp_onnx.runtime import add_outputs
from sipp_onnx.weightchain import read_weight

logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer's advice on pre-processing


def float_model(head: str = "MatMul", seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Flatten -> MatMul(+Add) or Gemm, on [N, 2, 6, 6]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.4, (6, 2, 3, 3))
    w2 = rng.normal(0, 0.25, (8, 6, 3, 3))
    fc = rng.normal(0, 0.15, (8 * 4 * 4, 10))
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
    ]
    inits = [
        tensor("w1", w1),
        tensor("b1", rng.normal(0, 0.1, 6)),
        tensor("w2", w2),
        tensor("b2", rng.normal(0, 0.1, 8)),
        tensor("bf", rng.normal(0, 0.1, 10)),
    ]
    if head == "MatMul":
        nodes += [
            helper.make_node("MatMul", ["f", "wf"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "bf"], ["y"], name="fc_add"),
        ]
        inits.append(tensor("wf", fc))
    else:
        nodes.append(helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1))
        inits.append(tensor("wf", fc.T))
    return finish(nodes, [value("x", ["N", 2, 6, 6])], [value("y", ["N", 10])], inits)


def data(n: int = 48, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2, 6, 6)).astype(np.float32)


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self._batches = iter([{"x": x[i : i + 16]} for i in range(0, len(x), 16)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantized(tmp_path: Path, kind: str, head: str = "MatMul") -> Path:
    """The float model quantized: 'dynamic' (ConvInteger/MatMulInteger) or 'static' (QOperator:
    QLinearConv and QLinearMatMul, or com.microsoft QGemm for a Gemm head)."""
    src, out = tmp_path / f"float_{head}.onnx", tmp_path / f"{kind}_{head}.onnx"
    onnx.save(float_model(head), src)
    if kind == "dynamic":
        quantize_dynamic(src, out, weight_type=QuantType.QInt8)
    else:
        quantize_static(src, out, _Reader(data()), quant_format=QuantFormat.QOperator)
    return out


def run(model: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("kind", "head", "ops"),
    [
        ("dynamic", "MatMul", ["ConvInteger", "ConvInteger", "MatMulInteger"]),
        ("static", "MatMul", ["QLinearConv", "QLinearConv", "QLinearMatMul"]),
        ("static", "Gemm", ["QLinearConv", "QLinearConv", "QGemm"]),
    ],
)
def test_discovery_finds_quantized_layers(tmp_path: Path, kind: str, head: str, ops: list[str]) -> None:
    model = onnx.load(quantized(tmp_path, kind, head))
    found = discover(model)
    assert [layer.op_type for layer in found.layers] == ops
    assert found.skipped == ()
    protos = tensor_protos(model)
    for weight in found.weights:
        layer = weight.primary
        assert layer.input_quant is not None
        assert weight.stored_name == weight.name and weight.dtype == "float32"
        assert weight.via.startswith("(w - zero point) * scale")
        # The weight view is the float weight up to half a quantization step.
        (step,) = weight.chain
        scale = read_tensor(protos[step.scale]).max()
        original = {i.name: numpy_helper.to_array(i) for i in float_model(head).graph.initializer}
        name = weight.name.removesuffix("_quantized").split(".")[0].split("_")[0]
        if name in original:
            assert np.abs(read_weight(weight, protos) - original[name]).max() <= scale / 2 + 1e-6
    # Bias: the dynamic model's float Add after the output Mul, the static one's int32 bias.
    conv = found.layers[0]
    assert conv.bias is not None, conv.bias_problem
    if kind == "static":
        assert isinstance(conv.bias.scale, tuple) and len(conv.bias.scale) == 6
        assert (found.layers[2].bias is None) == (head == "MatMul")
    else:
        assert found.layers[2].bias is not None and found.layers[2].bias.tensor == "bf"


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None:
        self.seen.append(x.copy())


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_dequantized_inputs_match_the_float_model(tmp_path: Path, kind: str) -> None:
    """Oracle: what the accumulators see is the float model's layer input, up to quantization."""
    path = quantized(tmp_path, kind)
    model = onnx.load(path)
    found = discover(model)
    protos = tensor_protos(model)
    recorders = {layer.node: _Recorder() for layer in found.layers}
    accs = {
        layer.input: [dequantized(recorders[layer.node], layer.input_quant, protos)]
        for layer in found.layers
        if layer.input_quant is not None
    }
    x = data(40, seed=5)
    calib = open_calibration({"x": x}, model_inputs(model), None)
    capture(model, calib, accs, 16, Provider.CPU)

    reference = float_model()
    names = ["x", "r1", "f"]  # the float inputs of conv1, conv2, fc
    add_outputs(reference, names[1:])
    session = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip(names[1:], session.run(names[1:], {"x": x}), strict=True))
    expected["x"] = x
    for layer, name in zip(found.layers, names, strict=True):
        got = np.concatenate(recorders[layer.node].seen)
        want = expected[name].reshape(got.shape)
        assert got.dtype == np.float32
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 0.05, (layer.node, rel)
        if name == "x":  # the model's input: quantized once, so within half a step
            scale = max(float(np.abs(v).max()) for v in x) / 127  # loose: the step is at most this
            assert np.abs(got - want).max() <= scale
        # Static QOperator activations are quantized with calibrated constants, the dynamic
        # ones with each batch's own range: a batch's values take at most 256 levels.
        assert len(np.unique(recorders[layer.node].seen[0])) <= 256


def _zero_points(model: onnx.ModelProto, found_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    protos = tensor_protos(model)
    out = {}
    for w in discover(found_model).weights:
        (step,) = w.chain
        values = read_tensor(protos[w.stored_name])
        zero = read_tensor(protos[step.zero_point]) if step.zero_point else np.zeros(())
        shape = [1] * values.ndim
        if zero.size > 1:
            shape[step.axis] = zero.size
        out[w.stored_name] = values == zero.reshape(shape if zero.size > 1 else ())
    return out


@pytest.mark.parametrize(("kind", "head"), [("dynamic", "MatMul"), ("static", "MatMul"), ("static", "Gemm")])
@pytest.mark.parametrize("refit", ["none", "obs"])
def test_prune_quantized_end_to_end(tmp_path: Path, kind: str, head: str, refit: str) -> None:
    path = quantized(tmp_path, kind, head)
    original = onnx.load(path)
    out = tmp_path / "pruned.onnx"
    result = prune_model(path, {"x": data(256)}, PruneConfig(sparsity=0.5, refit=refit), output=out)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    report = result.report
    assert report.sparsity_achieved == pytest.approx(0.5, abs=0.01)
    # Every pruned entry is the weight's zero point, and the kept ones are not.
    at_zero = _zero_points(pruned, original)
    assert sum(int((~z).sum()) for z in at_zero.values()) == report.params_kept
    before = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    for name, zero in at_zero.items():
        assert after[name].dtype == before[name].dtype
        if refit == "none":  # kept entries keep their integers
            np.testing.assert_array_equal(after[name][~zero], before[name][~zero])
    # Scales and zero points are untouched; the biases change only with a refit, in their dtype.
    biases = {layer.bias.tensor for layer in discover(original).layers if layer.bias is not None}
    assert len(biases) == (2 if head == "MatMul" and kind == "static" else 3)
    for name, values in before.items():
        assert after[name].dtype == values.dtype
        if name not in at_zero and (name not in biases or refit == "none"):
            np.testing.assert_array_equal(after[name], values, err_msg=name)
    if refit == "obs":
        shifted = {layer.refit.bias for layer in report.layers if layer.refit and layer.refit.bias}
        assert shifted and shifted <= biases
        assert all(not np.array_equal(after[n], before[n]) for n in shifted)
    x = data(64, seed=9)
    dense, sparse = run(path, x), run(out, x)
    cos = (dense * sparse).sum() / (np.linalg.norm(dense) * np.linalg.norm(sparse))
    assert cos > 0.9  # a random model at 50 %: the float model loses as much (see below)


@pytest.mark.parametrize(("kind", "head"), [("dynamic", "MatMul"), ("static", "Gemm")])
def test_quantized_pruning_tracks_the_float_model(tmp_path: Path, kind: str, head: str) -> None:
    """Pruned through the dequantized view, the quantized model loses what the float model
    pruned the same way loses (same selection maths, same refit units), and the refit helps."""
    path = quantized(tmp_path, kind, head)
    calibration, x = {"x": data(256, seed=3)}, data(64, seed=9)
    errors: dict[str, dict[str, float]] = {"float": {}, "quantized": {}}
    for name, model in (("float", float_model(head)), ("quantized", onnx.load(path))):
        dense = run(model, x)
        for refit in ("none", "bias", "obs"):
            result = prune_model(model, calibration, PruneConfig(sparsity=0.6, refit=refit))
            errors[name][refit] = float(np.linalg.norm(run(result.model, x) - dense) / np.linalg.norm(dense))
    for refit, error in errors["quantized"].items():
        assert error == pytest.approx(errors["float"][refit], abs=0.05), (refit, errors)
    assert errors["quantized"]["obs"] < errors["quantized"]["bias"] < errors["quantized"]["none"]


def test_sequential_refit_runs_on_a_quantized_model(tmp_path: Path) -> None:
    path = quantized(tmp_path, "dynamic")
    result = prune_model(path, {"x": data()}, PruneConfig(sparsity=0.5, refit="obs", sequential=True))
    onnx.checker.check_model(result.model)
    assert result.report.sparsity_achieved == pytest.approx(0.5, abs=0.01)


def test_structured_path_stops_with_a_reason(tmp_path: Path) -> None:
    from sipp_onnx.errors import SippError
    from sipp_onnx.structured.pipeline import StructuredConfig, prune_structured

    path = quantized(tmp_path, "dynamic")
    with pytest.raises(SippError, match="no structured pruning possible"):
        prune_structured(path, {"x": data()}, StructuredConfig(sparsity=0.3))


def _int8(name: str, array: np.ndarray, dtype=np.int8) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def unsupported_model() -> onnx.ModelProto:
    """Quantized ops that discovery must report, not prune (only discovered, never run)."""
    ms = "com.microsoft"
    w = np.ones((4, 4))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
        # per-row activation zero points
        helper.make_node("MatMulInteger", ["xq", "w_a", "rowzp"], ["a"], name="per_row_zp"),
        # uint8 weight whose zero point is computed at run time
        helper.make_node("Identity", ["wz_in"], ["wz"], name="wz_id"),
        helper.make_node("MatMulInteger", ["xq", "w_b", "xz", "wz"], ["b"], name="runtime_wzp"),
        # input not produced by a (Dynamic)QuantizeLinear: no scale
        helper.make_node("MatMulInteger", ["xq_in", "w_c"], ["c"], name="no_scale"),
        # blocked (neither per-tensor nor per-output) weight scale
        helper.make_node(
            "QLinearMatMul", ["xq_in", "s", "z", "w_d", "blocked", "wzd", "s", "z"], ["d"], name="blocked"
        ),
        helper.make_node("DynamicQuantizeLSTM", ["x"], ["lstm"], name="lstm", domain=ms),
        helper.make_node("QAttention", ["x"], ["att"], name="attention", domain=ms),
        helper.make_node("DynamicQuantizeMatMul", ["x", "w_e"], ["e"], name="dqmm", domain=ms),
        helper.make_node("MatMulIntegerToFloat", ["xq", "w_f", "xs", "s"], ["f"], name="mmitf", domain=ms),
    ]
    inits = [
        _int8("w_a", w),
        numpy_helper.from_array(np.zeros(2, np.uint8), "rowzp"),
        _int8("w_b", w, np.uint8),
        _int8("w_c", w, np.uint8),
        _int8("w_d", w),
        tensor("blocked", np.ones(2)),
        _int8("wzd", np.zeros(())),
        tensor("s", np.ones(())),
        _int8("z", np.zeros(()), np.uint8),
        tensor("w_e", w),
        _int8("w_f", w),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [
            value("x", [2, 4]),
            value("xq_in", [2, 4], TensorProto.UINT8),
            value("wz_in", [], TensorProto.UINT8),
        ],
        [value(n, None) for n in ("a", "b", "c", "d", "lstm", "att", "e", "f")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)])
    model.ir_version = 10
    return model


def test_unsupported_quantized_ops_are_reported_with_reasons() -> None:
    report = inspect_model(unsupported_model())
    reasons = {s.node: s.reason for s in report.discovery.skipped}
    assert report.discovery.weights == ()
    assert "per-row or per-channel activation quantization" in reasons["per_row_zp"]
    assert "weight zero point 'wz' is not a constant" in reasons["runtime_wzp"]
    assert "scale is unknown" in reasons["no_scale"]
    assert "blocked or per-input quantization" in reasons["blocked"]
    for node in ("attention", "dqmm", "mmitf"):
        assert reasons[node].startswith("com.microsoft "), node
    # DynamicQuantizeLSTM is pruned as an LSTM (tests/test_recurrent.py); this one lacks W and R.
    assert reasons["lstm/W"] == reasons["lstm/R"] == "missing an operand"
    table = report.format_table()
    assert "9 skipped candidate(s)" in table
    assert "attention (QAttention): com.microsoft QAttention" in table


def test_integer_op_without_its_scale_mul_is_pruned_in_integer_units() -> None:
    """No Cast -> Mul after a MatMulInteger: the weight view is (w - zero point) and the bias
    refit is refused with the reason."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (8, 5))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
        helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["y"], name="mmi"),
    ]
    model = finish(
        nodes,
        [value("x", ["N", 8])],
        [value("y", ["N", 5], TensorProto.INT32)],
        [_int8("w", w), _int8("wz", 3)],
    )
    (weight,) = discover(model).weights
    assert weight.via == "(w - zero point), scale unknown"
    assert weight.primary.bias is None and "weight scale is unknown" in weight.primary.bias_problem
    np.testing.assert_array_equal(read_weight(weight, tensor_protos(model)), w - 3)
    result = prune_model(model, {"x": rng.normal(size=(32, 8)).astype(np.float32)}, PruneConfig(sparsity=0.5))
    stored = numpy_helper.to_array(next(i for i in result.model.graph.initializer if i.name == "w"))
    assert int((stored == 3).sum()) == 20
