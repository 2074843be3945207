"""Graph walker: which nodes are layers, their layouts, and the reasons for skipping the rest."""

import numpy as np
import onnx
from builders import convnet, finish, mlp, tensor, tokens, value
from onnx import helper

from sipp_onnx import inspect_model
from sipp_onnx.discover import discover
from sipp_onnx.layers import WeightLayout


def reasons(found):
    return {s.node: s.reason for s in found.skipped}


def test_mlp_layers_and_layouts():
    found = discover(mlp())
    layers = {layer.node: layer for layer in found.layers}
    assert set(layers) == {"fc1", "fc2", "fc3"}
    assert layers["fc1"].layout is WeightLayout.ROWS and layers["fc1"].n_out == 32
    assert layers["fc2"].layout is WeightLayout.COLUMNS and layers["fc2"].n_out == 16
    assert layers["fc3"].op_type == "MatMul" and layers["fc3"].fan_in == 16
    assert layers["fc1"].input == "x" and layers["fc2"].input == "r1"
    assert not found.skipped


def test_conv_geometry():
    layers = {layer.node: layer for layer in discover(convnet()).layers}
    dw = layers["dwconv"].conv
    assert dw.group == 8 and dw.strides == (2, 2) and dw.auto_pad == "SAME_UPPER"
    assert layers["conv1"].conv.pads == (1, 1, 1, 1)
    assert layers["gconv"].conv.group == 2 and layers["gconv"].fan_in == 4
    assert layers["conv1"].kernel_size == 9


def test_tokens_constant_node_weight_and_attention_skipped():
    found = discover(tokens())
    weights = {w.name: w for w in found.weights}
    assert weights["Wc"].source == "constant" and weights["Wq"].source == "initializer"
    why = reasons(found)
    assert "both operands are activations" in why["attention"]
    assert "both operands are activations" in why["mix"]


def _two_gemm_model(shared_extra_consumer=None, weight_is_input=False, left_constant=False):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="g1", transB=1),
        helper.make_node("Gemm", ["h", "W"], ["y"], name="g2", transB=1),
    ]
    inputs = [value("x", ["batch", 4])]
    outputs = [value("y", ["batch", 4])]
    if shared_extra_consumer:
        nodes.append(helper.make_node(shared_extra_consumer, ["W"], ["w_out"], name="reader"))
        outputs.append(value("w_out", None))
    if left_constant:
        nodes.append(helper.make_node("MatMul", ["W", "x_t"], ["z"], name="left"))
        inputs.append(value("x_t", [4, "n"]))
        outputs.append(value("z", None))
    if weight_is_input:
        inputs.append(value("W", [4, 4]))
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, [tensor("W", rng.normal(size=(4, 4)))]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 10
    return model


def test_shared_weight_is_one_prunable_weight_with_two_uses():
    found = discover(_two_gemm_model())
    assert len(found.weights) == 1
    assert [layer.node for layer in found.weights[0].layers] == ["g1", "g2"]


def test_weight_read_by_another_op_is_skipped():
    found = discover(_two_gemm_model(shared_extra_consumer="Identity"))
    assert not found.weights
    assert "also read by Identity node 'reader'" in reasons(found)["g1"]


def test_initializer_that_is_a_graph_input_is_skipped():
    found = discover(_two_gemm_model(weight_is_input=True))
    assert not found.weights
    assert "also a graph input" in reasons(found)["g1"]


def test_constant_left_operand_is_not_a_layer():
    found = discover(_two_gemm_model(left_constant=True))
    assert "left operand is constant" in reasons(found)["left"]
    # ...and it also blocks pruning the shared weight it reads.
    assert "also read by MatMul node 'left'" in reasons(found)["g1"]


def test_exclude_and_op_types():
    found = discover(mlp(), exclude=["fc[12]$"])
    assert [layer.node for layer in found.layers] == ["fc3"]
    assert "excluded by --exclude" in reasons(found)["fc1"]
    found = discover(convnet(), op_types=["Conv"])
    assert {layer.op_type for layer in found.layers} == {"Conv"}
    assert "not selected" in reasons(found)["fc"]


def test_empty_and_duplicate_node_names_get_unique_ids():
    model = mlp()
    model.graph.node[0].name = ""
    model.graph.node[2].name = "dup"
    model.graph.node[4].name = "dup"
    nodes = [layer.node for layer in discover(model).layers]
    assert len(set(nodes)) == 3
    assert nodes[0] == "Gemm#0" and nodes[1] == "dup#2" and nodes[2] == "dup#4"


def test_subgraph_layers_are_reported_not_pruned():
    rng = np.random.default_rng(0)
    body_w = tensor("Wb", rng.normal(size=(4, 4)))
    then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wb"], ["t"], name="inner_mm")],
        "then",
        [],
        [value("t", ["b", 4])],
        [body_w],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [], [value("e", ["b", 4])]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["y", "W"], ["z"], name="outer"),
    ]
    model = finish(
        nodes,
        [value("x", ["b", 4]), value("cond", [], onnx.TensorProto.BOOL)],
        [value("z", ["b", 3])],
        [tensor("W", rng.normal(size=(4, 3)))],
    )
    found = discover(model)
    assert [layer.node for layer in found.layers] == ["outer"]
    assert "inside a subgraph of If node 'branch'" in reasons(found)["inner_mm"]


def test_unsupported_weight_dtype_is_skipped():
    model = _two_gemm_model()
    init = model.graph.initializer[0]
    init.CopyFrom(tensor("W", np.ones((4, 4)), dtype=np.int32))
    found = discover(model)
    assert not found.weights and "dtype int32" in reasons(found)["g1"]


def test_inspect_report_json_lists_layers_and_skips():
    report = inspect_model(tokens()).to_dict()
    assert {entry["node"] for entry in report["layers"]} == {"proj_q", "proj_out"}
    assert {s["node"] for s in report["skipped"]} == {"attention", "mix"}
    assert report["prunable_params"] == 36 + 60
