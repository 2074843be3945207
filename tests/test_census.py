"""The census of a model's parameters: every stored constant counted once, by kind, the
prunable share taken from discovery (inspect, the prune report and the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from builders import IR_VERSION, OPSET, finish, save, tensor, value
from onnx import TensorProto, helper

from sipp_onnx import PruneConfig, inspect_model, prune_model
from sipp_onnx.census import Census, census, count
from sipp_onnx.discover import discover
from sipp_onnx.modelio import tensor_protos

RNG = np.random.default_rng(0)


def _normal(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def embedding_model() -> onnx.ModelProto:
    """ids -> Gather(table) -> LayerNormalization -> MatMul + Add -> Relu -> MatMul -> Reshape."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("LayerNormalization", ["emb", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "W1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Reshape", ["m2", "shape"], ["y"], name="flat"),
    ]
    inits = [
        tensor("table", _normal(50, 8)),
        tensor("gamma", np.ones(8)),
        tensor("beta", np.zeros(8)),
        tensor("W1", _normal(8, 16)),
        tensor("b1", _normal(16)),
        tensor("W2", _normal(16, 4)),
        tensor("shape", np.array([-1, 4]), np.int64),
    ]
    ids = value("ids", ["N", 3], TensorProto.INT64)
    return finish(nodes, [ids], [value("y", ["M", 4])], inits)


def lstm_model() -> onnx.ModelProto:
    """X [seq, N, 5] -> LSTM(W, R, B; hidden 6) -> Y_h."""
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["", "Y_h"], name="rnn", hidden_size=6)
    inits = [tensor("W", _normal(1, 24, 5)), tensor("R", _normal(1, 24, 6)), tensor("B", _normal(1, 48))]
    return finish([node], [value("X", ["T", "N", 5])], [value("Y_h", [1, "N", 6])], inits)


def conv_transpose_model() -> onnx.ModelProto:
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up", strides=[2, 2])
    inits = [tensor("w", _normal(3, 4, 3, 3)), tensor("b", _normal(4))]
    return finish([node], [value("x", ["N", 3, 5, 5])], [value("y", ["N", 4, 11, 11])], inits)


def qlinear_conv_model() -> onnx.ModelProto:
    """x -> QuantizeLinear -> QLinearConv (per-channel int8 weight, int32 bias) -> DequantizeLinear."""
    weight = RNG.integers(-100, 100, size=(4, 2, 3, 3)).astype(np.int8)
    inits = [
        tensor("xs", np.array(0.05)),
        tensor("xz", np.array(128), np.uint8),
        tensor("qw", weight, np.int8),
        tensor("ws", np.full(4, 0.01)),
        tensor("wz", np.zeros(4), np.int8),
        tensor("ys", np.array(0.1)),
        tensor("yz", np.array(128), np.uint8),
        tensor("qb", np.array([10, -5, 0, 3]), np.int32),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quant"),
        helper.make_node(
            "QLinearConv", ["xq", "xs", "xz", "qw", "ws", "wz", "ys", "yz", "qb"], ["yq"], name="qconv"
        ),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dequant"),
    ]
    return finish(nodes, [value("x", ["N", 2, 6, 6])], [value("y", ["N", 4, 4, 4])], inits)


def if_model() -> onnx.ModelProto:
    """x -> MatMul(W_top) -> If(sr == 16000): MatMul(W_then) / MatMul(W_else) -> y."""

    def branch(name: str, n_in: int) -> onnx.GraphProto:
        node = helper.make_node("MatMul", ["h", f"W_{name}"], [f"y_{name}"], name=f"fc_{name}")
        return helper.make_graph(
            [node], name, [], [value(f"y_{name}", ["N", 3])], [tensor(f"W_{name}", _normal(n_in, 3))]
        )

    nodes = [
        helper.make_node("MatMul", ["x", "W_top"], ["h"], name="fc_top"),
        helper.make_node("Equal", ["sr", "k16"], ["c"], name="is16k"),
        helper.make_node(
            "If", ["c"], ["y"], name="by_rate", then_branch=branch("then", 4), else_branch=branch("else", 4)
        ),
    ]
    inits = [tensor("W_top", _normal(4, 4)), tensor("k16", np.array(16000), np.int64)]
    inputs = [value("x", ["N", 4]), value("sr", [], TensorProto.INT64)]
    graph = helper.make_graph(nodes, "if_model", inputs, [value("y", ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def weight_only_int8_model() -> onnx.ModelProto:
    """MatMul whose weight is computed from constants at run time: Cast(int8) * scale."""
    nodes = [
        helper.make_node("Cast", ["wq"], ["wf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wf", "scale"], ["w"], name="dequant_mul"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    inits = [tensor("wq", RNG.integers(-9, 9, size=(6, 5)), np.int8), tensor("scale", np.array(0.1))]
    return finish(nodes, [value("x", ["N", 6])], [value("y", ["N", 5])], inits)


def _census(model: onnx.ModelProto) -> Census:
    return census(model, discover(model))


def _groups(result: Census) -> dict[str, int]:
    return {g.kind: g.params for g in result.groups}


def _check_totals(model: onnx.ModelProto, result: Census) -> None:
    """Every stored constant is counted once, and the kinds add up to the total."""
    stored = tensor_protos(model)
    assert {t.name for t in result.tensors} == set(stored)
    assert sum(t.params for t in result.tensors) == sum(int(np.prod(p.dims)) for p in stored.values())
    assert sum(g.params for g in result.groups) == result.params_total
    assert result.params_total + result.not_parameters == sum(t.params for t in result.tensors)
    assert result.prunable_share == result.params_prunable / result.params_total


def test_embedding_norm_and_dense_layers() -> None:
    model = embedding_model()
    result = _census(model)
    _check_totals(model, result)
    assert result.params_total == 400 + 16 + 128 + 16 + 64
    assert result.params_prunable == 128 + 64
    assert result.not_parameters == 2  # the Reshape's shape
    assert _groups(result) == {"prunable": 192, "embedding": 400, "norm": 16, "bias": 16}
    kinds = {t.name: t for t in result.tensors}
    assert "looked up" in kinds["table"].reason and kinds["table"].nodes == ("embed",)
    assert kinds["b1"].reason == "bias of a pruned layer: refitted, not pruned"
    assert kinds["shape"].kind == "not_parameter"
    assert result.share_line() == "prunable: 192 of 624 parameters (30.8 %)"


def test_lstm_conv_transpose_and_qlinear_conv() -> None:
    lstm = lstm_model()
    result = _census(lstm)
    _check_totals(lstm, result)
    assert _groups(result) == {"prunable": 120 + 144, "bias": 48}
    assert {t.name: t.nodes for t in result.tensors}["W"] == ("rnn/W",)

    up = conv_transpose_model()
    result = _census(up)
    _check_totals(up, result)
    assert _groups(result) == {"prunable": 108, "bias": 4}

    qconv = qlinear_conv_model()
    result = _census(qconv)
    _check_totals(qconv, result)
    # scales and zero points: xs, xz, ys, yz (1 each), ws and wz (4 each); qb is the int32 bias
    assert _groups(result) == {"prunable": 72, "quantization": 12, "bias": 4}
    assert result.params_prunable == 72 and result.params_total == 88


def test_op_types_before_issue_17_leave_lstm_and_conv_transpose_skipped() -> None:
    """What `--op-types Gemm,MatMul,Conv` leaves: the recurrent weights are skipped candidates."""
    lstm = lstm_model()
    result = census(lstm, discover(lstm, ("Gemm", "MatMul", "Conv")))
    assert result.params_prunable == 0
    assert _groups(result) == {"skipped": 264, "bias": 48}
    reasons = {t.name: t.reason for t in result.tensors}
    assert "not selected" in reasons["W"] and "not selected" in reasons["R"]


def test_weight_computed_from_constants_counts_as_its_layer() -> None:
    """Cast(int8) * scale is followed (tests/test_weight_only_int8.py): the int8 values are
    prunable, their scale a kept quantization parameter; with the Mul not followed (a float
    weight times a run-time value), the constant counts with its skipped layer."""
    model = weight_only_int8_model()
    result = _census(model)
    _check_totals(model, result)
    assert _groups(result) == {"prunable": 30, "quantization": 1}
    model.graph.input.append(value("scale", []))  # now the caller may override the scale
    del model.graph.initializer[1]
    result = _census(model)
    skipped = discover(model).skipped
    assert _groups(result) == {"skipped": 30}
    assert {t.reason for t in result.tensors} == {skipped[0].reason}


def test_if_branches_are_counted_apart_by_inspect_and_as_prunable_by_prune() -> None:
    model = if_model()
    result = _census(model)
    _check_totals(model, result)
    assert _groups(result) == {"prunable": 16, "if_branch": 24}
    assert result.if_branch_params == 24
    assert any(
        "inside If branches" in line and "calibration data takes one branch" in line
        for line in result.lines()
    )

    calib = {"x": RNG.normal(size=(32, 4)).astype(np.float32), "sr": np.array(16000)}
    report = prune_model(model, calib, PruneConfig(sparsity=0.5)).report
    assert report.census is not None and report.census.tensors == ()
    assert report.census.params_prunable == report.params_total == 16 + 12  # W_top and W_then
    assert _groups(report.census) == {"prunable": 28, "skipped": 12}  # W_else: untaken branch


def test_count_format() -> None:
    assert [count(n) for n in (0, 9_999, 12_345, 13_500_000, 2_100_000_000)] == [
        "0",
        "9,999",
        "12.3 k",
        "13.5 M",
        "2.1 G",
    ]


def test_inspect_report_and_cli(tmp_path: Path, cli) -> None:
    path = save(embedding_model(), tmp_path / "emb.onnx")
    report = inspect_model(path)
    data = report.to_dict()
    assert data["params_total"] == 624 and data["prunable_params"] == 192
    assert abs(data["prunable_share"] - 192 / 624) < 1e-12
    assert {g["kind"] for g in data["census"]["groups"]} == {"prunable", "embedding", "norm", "bias"}
    assert len(data["census"]["tensors"]) == 7

    text = cli("inspect", path)
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith("2 prunable layer(s), 192 prunable parameters\n")
    assert "prunable: 192 of 624 parameters (30.8 %)" in text.stdout
    assert "Gather (embedding tables)" in text.stdout and "rows are looked up" in text.stdout
    as_json = json.loads(cli("inspect", path, "--json").stdout)
    assert as_json["census"]["params_total"] == 624


def test_prune_report_and_cli_give_the_share(tmp_path: Path, cli) -> None:
    path = save(embedding_model(), tmp_path / "emb.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=RNG.integers(0, 50, size=(16, 3)))
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    result = cli("prune", path, calib, "-o", out, "--sparsity", "0.5", "--report", report_path)
    assert result.exit_code == 0, result.output
    assert "prunable: 192 of 624 parameters (30.8 %)" in result.stdout
    saved = json.loads(report_path.read_text())
    assert saved["census"]["params_prunable"] == saved["params_total"] == 192
    assert saved["census"]["params_total"] == 624 and saved["census"]["tensors"] == []
