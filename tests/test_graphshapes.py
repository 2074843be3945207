"""Graphs from the field: weights reached through Transpose/Cast/Reshape/DequantizeLinear, layers
in subgraphs, dynamic dimensions, outputs that are layer inputs, odd node names, custom ops.

Each followed chain is checked against the same model with the weight stored as the layer reads
it: the pruned weights must be the same, and the stored tensor keeps its dtype, shape and
quantization parameters.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import finish, gaussian_calibration, mlp, tensor, value
from onnx import TensorProto, helper, numpy_helper

from sipp_onnx import ModelError, PruneConfig, inspect_model, prune_model
from sipp_onnx.discover import discover
from sipp_onnx.modelio import tensor_protos
from sipp_onnx.runtime import make_session

RNG = np.random.default_rng(7)
W1 = (RNG.normal(size=(12, 16)) / 4).astype(np.float32)  # [K, N] as a MatMul reads it
W2 = (RNG.normal(size=(16, 6)) / 4).astype(np.float32)
X = gaussian_calibration((12,), n=24)
CONFIGS = {
    "sipp-det": PruneConfig(sparsity=0.5, refit="none"),
    "sipp-det-obs": PruneConfig(sparsity=0.5),
    "wanda": PruneConfig(sparsity=0.5, method="wanda", refit="none"),
}


def two_layer(
    first: list[onnx.NodeProto], inits: list[onnx.TensorProto], weight: str = "w1"
) -> onnx.ModelProto:
    """x -> MatMul(weight) -> Relu -> MatMul(W2) -> y, with `first` computing `weight`."""
    nodes = [
        *first,
        helper.make_node("MatMul", ["x", weight], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    return finish(nodes, [value("x", ["batch", 12])], [value("y", ["batch", 6])], [*inits, tensor("W2", W2)])


def plain() -> onnx.ModelProto:
    return two_layer([], [tensor("w1", W1)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session, _ = make_session(model)
    return session.run(None, {"x": x})[0]


def effective(model: onnx.ModelProto) -> np.ndarray:
    """The first layer's weight as the layer reads it (the chain evaluated by ONNX Runtime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name="w1"))
    session, _ = make_session(probe)
    return session.run(["w1"], {"x": X[:1]})[0]


def transposed() -> onnx.ModelProto:
    node = helper.make_node("Transpose", ["W1_t"], ["w1"], name="t", perm=[1, 0])
    return two_layer([node], [tensor("W1_t", W1.T.copy())])


def cast_from_half(dtype=np.float16, elem=TensorProto.FLOAT16) -> onnx.ModelProto:
    stored = numpy_helper.from_array(W1.astype(dtype), "W1_h")
    return two_layer([helper.make_node("Cast", ["W1_h"], ["w1"], name="c", to=TensorProto.FLOAT)], [stored])


def reshaped() -> onnx.ModelProto:
    nodes = [helper.make_node("Reshape", ["W1_flat", "shape"], ["w1"], name="r")]
    return two_layer(nodes, [tensor("W1_flat", W1.ravel()), tensor("shape", [12, -1], dtype=np.int64)])


def quantized(zero: bool = True, then_transpose: bool = False) -> onnx.ModelProto:
    """int8 weight, per-output-channel scale and zero point, optionally stored transposed."""
    scale = (np.abs(W1).max(axis=0) / 100).astype(np.float32)
    zp = np.arange(16, dtype=np.int8) - 8
    q = np.clip(np.rint(W1 / scale) + zp, -128, 127).astype(np.int8)
    inputs = ["Wq", "scale"] + (["zp"] if zero else [])
    inits = [numpy_helper.from_array(q.T.copy() if then_transpose else q, "Wq"), tensor("scale", scale)]
    if zero:
        inits.append(numpy_helper.from_array(zp, "zp"))
    if then_transpose:
        nodes = [
            helper.make_node("DequantizeLinear", inputs, ["deq"], name="dq", axis=0),
            helper.make_node("Transpose", ["deq"], ["w1"], name="t", perm=[1, 0]),
        ]
    else:
        nodes = [helper.make_node("DequantizeLinear", inputs, ["w1"], name="dq", axis=1)]
    return two_layer(nodes, inits)


def with_weight(model: onnx.ModelProto, values: np.ndarray) -> onnx.ModelProto:
    """`plain()`'s graph with the first weight set to `values` (the chain's evaluated weight)."""
    out = plain()
    tensor_protos(out)["w1"].CopyFrom(tensor("w1", values))
    return out


CHAINS = {
    "transpose": (transposed, "W1_t", "Transpose[1, 0]"),
    "cast-fp16": (cast_from_half, "W1_h", "Cast"),
    "reshape": (reshaped, "W1_flat", "Reshape"),
    "dequantize": (quantized, "Wq", "DequantizeLinear"),
    "dequantize-no-zero-point": (lambda: quantized(zero=False), "Wq", "DequantizeLinear"),
    "dequantize-transpose": (
        lambda: quantized(then_transpose=True),
        "Wq",
        "DequantizeLinear -> Transpose[1, 0]",
    ),
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain_is_followed_and_listed(chain):
    build, stored, via = CHAINS[chain]
    found = discover(build())
    weights = {w.primary.node: w for w in found.weights}
    assert set(weights) == {"mm1", "mm2"}
    assert weights["mm1"].stored_name == stored and weights["mm1"].via == via
    assert weights["mm1"].shape == (12, 16) and weights["mm1"].dtype == "float32"
    entry = next(e for e in inspect_model(build()).to_dict()["layers"] if e["node"] == "mm1")
    assert entry["stored"] == stored and entry["via"] == via
    assert f"{stored} via {via}" in inspect_model(build()).format_table()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("chain", list(CHAINS))
def test_chain_prunes_like_the_weight_stored_directly(chain, config):
    build, stored, _ = CHAINS[chain]
    model = build()
    original = tensor_protos(model)[stored]
    result = prune_model(model, {"x": X}, CONFIGS[config])
    reference = prune_model(with_weight(model, effective(model)), {"x": X}, CONFIGS[config])

    new = tensor_protos(result.model)[stored]
    assert (new.data_type, list(new.dims)) == (original.data_type, list(original.dims))
    got, want = effective(result.model), numpy_helper.to_array(tensor_protos(reference.model)["w1"])
    np.testing.assert_array_equal(got == 0, want == 0)
    if config == "sipp-det-obs" and "dequantize" in chain:
        # Refitted values are requantized to int8 with the same scale: within half a step of
        # the float refit, or at the end of the int8 range.
        protos = tensor_protos(model)
        scale = numpy_helper.to_array(protos["scale"])
        zero = numpy_helper.to_array(protos["zp"]).astype(np.float32) if "zp" in protos else 0.0
        representable = np.clip(want, (-128 - zero) * scale, (127 - zero) * scale)
        assert (np.abs(got - representable) <= 0.5 * scale + 1e-6).all()
    else:
        tolerance = 1e-3 if "fp16" in chain else 1e-6
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    layer = next(layer for layer in result.report.layers if layer.weight == "w1")
    assert layer.stored == stored and layer.via == CHAINS[chain][2]


def test_quantized_weight_keeps_its_integers_and_pruned_entries_become_the_zero_point():
    model = quantized()
    q = numpy_helper.to_array(tensor_protos(model)["Wq"])
    zp = numpy_helper.to_array(tensor_protos(model)["zp"])
    result = prune_model(model, {"x": X}, PruneConfig(sparsity=0.5, refit="none"))
    new = numpy_helper.to_array(tensor_protos(result.model)["Wq"])
    pruned = effective(result.model) == 0
    assert pruned.mean() > 0.3
    np.testing.assert_array_equal(new[~pruned], q[~pruned])
    np.testing.assert_array_equal(new[pruned], np.broadcast_to(zp, q.shape)[pruned])
    for name in ("scale", "zp"):
        assert tensor_protos(result.model)[name] == tensor_protos(model)[name]


def test_bfloat16_weight_behind_a_cast_keeps_its_dtype():
    model = cast_from_half(ml_dtypes.bfloat16, TensorProto.BFLOAT16)
    assert tensor_protos(model)["W1_h"].data_type == TensorProto.BFLOAT16
    result = prune_model(model, {"x": X}, PruneConfig(sparsity=0.5))
    stored = tensor_protos(result.model)["W1_h"]
    assert stored.data_type == TensorProto.BFLOAT16
    assert 0.4 < np.mean(numpy_helper.to_array(stored).astype(np.float32) == 0) < 0.6
    assert run(result.model, X[:3]).shape == (3, 6)


def test_bfloat16_model_that_the_cpu_provider_cannot_run_is_one_line_error(tmp_path):
    w = numpy_helper.from_array(W1.astype(ml_dtypes.bfloat16), "w1")
    node = helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm")
    model = finish(
        [node],
        [value("x", ["batch", 12], TensorProto.BFLOAT16)],
        [value("y", ["batch", 16], TensorProto.BFLOAT16)],
        [w],
    )
    assert [layer.node for layer in discover(model).layers] == ["mm"]
    with pytest.raises(ModelError) as info:
        prune_model(model, {"x": X.astype(ml_dtypes.bfloat16)}, PruneConfig(sparsity=0.5, provider="cpu"))
    message = str(info.value)
    assert "\n" not in message and "MatMul" in message and "bfloat16" in message


REJECTED = {
    "transpose-output-also-read": (
        [
            helper.make_node("Transpose", ["W1_t"], ["w1"], name="t", perm=[1, 0]),
            helper.make_node("ReduceSum", ["w1"], ["s"], name="side", keepdims=0),
        ],
        [tensor("W1_t", W1.T.copy())],
        "also read by ReduceSum node 'side'",
    ),
    "stored-also-read": (
        [
            helper.make_node("Transpose", ["W1_t"], ["w1"], name="t", perm=[1, 0]),
            helper.make_node("ReduceSum", ["W1_t"], ["s"], name="side", keepdims=0),
        ],
        [tensor("W1_t", W1.T.copy())],
        "something else also reads",
    ),
    # an int weight cast to float is followed (weight-only quantization, test_weight_only_int8);
    # a float weight rounded through an integer type is not: it would not keep its values
    "cast-through-int": (
        [
            helper.make_node("Cast", ["W1_f"], ["w1_i"], name="c1", to=TensorProto.INT32),
            helper.make_node("Cast", ["w1_i"], ["w1"], name="c2", to=TensorProto.FLOAT),
        ],
        [tensor("W1_f", W1 * 10)],
        "only casts to float keep zeros exactly",
    ),
    "blocked-quantization": (
        [helper.make_node("DequantizeLinear", ["Wq", "s2"], ["w1"], name="dq", axis=0, block_size=4)],
        [numpy_helper.from_array(np.ones((12, 16), np.int8), "Wq"), tensor("s2", np.ones((3, 16)))],
        "block_size",
    ),
    # (a Mul by a constant scale is followed: tests/test_weight_only_int8.py)
    "folded-constants": (
        [helper.make_node("Add", ["W1_a", "two"], ["w1"], name="m")],
        [tensor("W1_a", W1), tensor("two", np.float32(2))],
        "computed at run time by Add",
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_unsafe_chains_are_skipped_with_a_reason(case):
    nodes, inits, reason = REJECTED[case]
    opset = 21 if case == "blocked-quantization" else None
    model = two_layer(nodes, inits) if opset is None else _opset(two_layer_unchecked(nodes, inits), opset)
    found = discover(model)
    skipped = {s.node: s.reason for s in found.skipped}
    assert [layer.node for layer in found.layers] == ["mm2"]
    assert reason in skipped["mm1"]


def two_layer_unchecked(nodes, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
        ],
        "g",
        [value("x", ["batch", 12])],
        [value("y", ["batch", 6])],
        [*inits, tensor("W2", W2)],
    )
    return helper.make_model(graph)


def _opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = 10
    return model


def test_attention_through_transpose_is_still_two_activations():
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="proj"),
        helper.make_node("Transpose", ["x"], ["xt"], name="xt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["y"], name="attention"),
    ]
    model = finish(nodes, [value("x", ["b", 5, 6])], [value("y", ["b", 5, 5])], [tensor("Wq", np.eye(6))])
    skipped = {s.node: s.reason for s in discover(model).skipped}
    assert "both operands are activations" in skipped["attention"]


def subgraph_model() -> onnx.ModelProto:
    """A top-level layer, an If whose branches hold a MatMul each, and a Loop body with a Gemm."""
    rng = np.random.default_rng(3)
    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "Wt"], ["t"], name="then_mm")],
        "then",
        [],
        [value("t", ["batch", 6])],
        [tensor("Wt", rng.normal(size=(8, 6)))],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["h", "We"], ["e"], name="else_mm")],
        "else",
        [],
        [value("e", ["batch", 6])],
        [tensor("We", rng.normal(size=(8, 6)))],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
            helper.make_node("Gemm", ["acc_in", "Wl"], ["acc_out"], name="loop_gemm", transB=1),
        ],
        "body",
        [
            value("i", [], TensorProto.INT64),
            value("cond_in", [], TensorProto.BOOL),
            value("acc_in", ["batch", 6]),
        ],
        [value("cond_out", [], TensorProto.BOOL), value("acc_out", ["batch", 6])],
        [tensor("Wl", np.eye(6) * 0.5)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"], name="top"),
        helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["flag"], name="gt"),
        helper.make_node("If", ["flag"], ["branch"], name="choose", then_branch=then, else_branch=other),
        helper.make_node("Loop", ["trips", "", "branch"], ["y"], name="repeat", body=body),
    ]
    return finish(
        nodes,
        [value("x", ["batch", 12])],
        [value("y", ["batch", 6])],
        [
            tensor("W0", rng.normal(size=(12, 8))),
            tensor("zero", np.float32(0)),
            tensor("trips", np.int64(2), dtype=np.int64),
        ],
    )


def test_subgraph_layers_are_listed_and_the_rest_is_pruned(tmp_path):
    model = subgraph_model()
    report = inspect_model(model)
    skipped = {s["node"]: s["reason"] for s in report.to_dict()["skipped"]}
    assert set(skipped) == {"then_mm", "else_mm", "loop_gemm"}
    assert "inside a subgraph of If node 'choose'" in skipped["then_mm"]
    assert "inside a subgraph of Loop node 'repeat'" in skipped["loop_gemm"]
    assert all("calibration" in reason for reason in skipped.values())
    text = report.format_table()
    assert "then_mm" in text and "loop_gemm" in text and "top" in text
    out = tmp_path / "pruned.onnx"
    result = prune_model(model, {"x": X}, PruneConfig(sparsity=0.5), output=out)
    # The If's branch that every calibration batch takes is pruned in place (tests/test_branches.py);
    # the Loop body and the untaken branch are listed.
    assert sorted(layer.weight for layer in result.report.layers) == ["W0", "We"]
    reasons = {s.node: s.reason for s in result.report.skipped}
    assert set(reasons) == {"then_mm", "loop_gemm"}
    assert "which no calibration batch takes" in reasons["then_mm"]
    assert run(onnx.load(str(out)), X[:4]).shape == (4, 6)


def test_dynamic_batch_and_sequence_dimensions():
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["h"], name="a"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "Wb"], ["y"], name="b"),
    ]
    model = finish(
        nodes,
        [value("x", ["batch", "sequence", 12])],
        [value("y", ["batch", "sequence", 4])],
        [tensor("Wa", rng.normal(size=(12, 16))), tensor("Wb", rng.normal(size=(16, 4)))],
    )
    x = gaussian_calibration((7, 12), n=10)
    result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.5, batch_size=4))
    assert result.report.sparsity_achieved == pytest.approx(0.5, abs=0.02)
    assert run(result.model, gaussian_calibration((3, 12), n=2)).shape == (2, 3, 4)


def test_layer_input_that_is_already_a_graph_output():
    model = mlp()
    model.graph.output.append(value("r1", ["batch", 32]))  # the input of fc2
    result = prune_model(model, {"x": gaussian_calibration((20,), n=16)}, PruneConfig(sparsity=0.5))
    assert [o.name for o in result.model.graph.output] == ["y", "r1"]
    assert len(result.report.layers) == 3
    assert len(result.report.verification) == 2


def test_empty_and_duplicate_node_names_prune_end_to_end(tmp_path):
    model = mlp()
    model.graph.node[0].name = ""
    model.graph.node[2].name = "dup"
    model.graph.node[4].name = "dup"
    result = prune_model(model, {"x": gaussian_calibration((20,), n=16)}, PruneConfig(sparsity=0.5))
    assert [layer.nodes for layer in result.report.layers] == [("Gemm#0",), ("dup#2",), ("dup#4",)]
    assert [n.name for n in result.model.graph.node] == [n.name for n in model.graph.node]


def test_custom_domain_op_is_one_line_error_naming_it():
    model = mlp()
    model.graph.node.insert(
        1, helper.make_node("FancyRelu", ["h1"], ["f1"], name="fancy", domain="com.example")
    )
    model.graph.node[2].input[0] = "f1"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError) as info:
        prune_model(model, {"x": gaussian_calibration((20,), n=8)}, PruneConfig(sparsity=0.5))
    message = str(info.value)
    assert "\n" not in message and "FancyRelu" in message and "com.example" in message
