"""Layers inside If branches: planned from the calibration data, calibrated on an inlined copy,
pruned in place; the untaken branch left as it was."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import IR_VERSION, OPSET, tensor, value
from onnx import helper, numpy_helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.branches import calibration_model, inline_if, plan_branches
from sipp_onnx.config import Provider
from sipp_onnx.discover import discover
from sipp_onnx.errors import NoPrunableLayersError


def _branch(name: str, seed: int, hidden: int = 24, nested: bool = False, outer_weight: bool = False):
    """x [N, 16] -> Gemm(branch initializer) -> Relu -> MatMul(Constant node) + Add -> y [N, 4]."""
    rng = np.random.default_rng(seed)
    w1 = tensor(f"{name}_w1", rng.normal(size=(hidden, 16)) / 4)
    b1 = tensor(f"{name}_b1", rng.normal(size=hidden) * 0.1)
    w2 = rng.normal(size=(hidden, 4)).astype(np.float32) / 5
    nodes = [
        helper.make_node(
            "Gemm", ["x", f"{name}_w1", f"{name}_b1"], [f"{name}_h"], name=f"{name}_fc1", transB=1
        ),
        helper.make_node("Relu", [f"{name}_h"], [f"{name}_r"], name=f"{name}_relu"),
        helper.make_node(
            "Constant",
            [],
            [f"{name}_w2"],
            name=f"{name}_const",
            value=numpy_helper.from_array(w2, f"{name}_w2"),
        ),
        helper.make_node(
            "MatMul",
            [f"{name}_r", "shared_w" if outer_weight else f"{name}_w2"],
            [f"{name}_m"],
            name=f"{name}_fc2",
        ),
        helper.make_node("Add", [f"{name}_m", f"{name}_b2"], [f"{name}_y"], name=f"{name}_add"),
    ]
    inits = [w1, b1, tensor(f"{name}_b2", rng.normal(size=4) * 0.1)]
    if nested:  # an inner If on the sign of the input mean, both branches a Gemm
        inner_then = helper.make_graph(
            [
                helper.make_node(
                    "Gemm", [f"{name}_y", f"{name}_iw"], [f"{name}_it"], name=f"{name}_inner_fc", transB=1
                )
            ],
            f"{name}_inner_then",
            [],
            [value(f"{name}_it", ["N", 4])],
            [tensor(f"{name}_iw", rng.normal(size=(4, 4)))],
        )
        inner_else = helper.make_graph(
            [helper.make_node("Identity", [f"{name}_y"], [f"{name}_ie"], name=f"{name}_inner_id")],
            f"{name}_inner_else",
            [],
            [value(f"{name}_ie", ["N", 4])],
        )
        nodes += [
            helper.make_node("ReduceMean", ["x"], [f"{name}_mean"], keepdims=0, name=f"{name}_rm"),
            helper.make_node("Greater", [f"{name}_mean", f"{name}_zero"], [f"{name}_pos"], name=f"{name}_gt"),
            helper.make_node(
                "If",
                [f"{name}_pos"],
                [f"{name}_out"],
                name=f"{name}_inner",
                then_branch=inner_then,
                else_branch=inner_else,
            ),
        ]
        inits.append(tensor(f"{name}_zero", np.array(-1e9)))  # always true: the then branch
        out = f"{name}_out"
    else:
        out = f"{name}_y"
    return helper.make_graph(nodes, name, [], [value(out, ["N", 4])], inits)


def if_model(
    cond: str = "sr", nested: bool = False, shared: bool = False, head: bool = True
) -> onnx.ModelProto:
    """x [N, 16], sr (rank 0 int64): If(sr == 16000) -> then/else branch -> [Gemm head] -> out.

    `cond='sign'`: the branch follows the sign of the batch's input sum instead (data-dependent).
    `shared`: both branches' MatMul read one top-level initializer `shared_w`."""
    rng = np.random.default_rng(9)
    nodes, inits = [], [tensor("k16", np.array(16000), np.int64), tensor("zero", np.array(0.0))]
    inputs = [value("x", ["N", 16])]
    if cond == "sr":
        inputs.append(value("sr", [], onnx.TensorProto.INT64))
        nodes.append(helper.make_node("Equal", ["sr", "k16"], ["c"], name="is16k"))
    else:
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
            helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        ]
    if shared:
        inits.append(tensor("shared_w", rng.normal(size=(24, 4)) / 5))
    then_g = _branch("t", 1, nested=nested, outer_weight=shared)
    else_g = _branch("e", 2, hidden=24 if shared else 8, outer_weight=shared)
    nodes.append(helper.make_node("If", ["c"], ["y"], name="by_rate", then_branch=then_g, else_branch=else_g))
    if head:
        inits.append(tensor("head_w", rng.normal(size=(3, 4))))
        nodes.append(helper.make_node("Gemm", ["y", "head_w"], ["out"], name="head", transB=1))
        outputs = [value("out", ["N", 3])]
    else:
        outputs = [value("y", ["N", 4])]
    graph = helper.make_graph(nodes, "if_model", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _calib(n=64, sr=16000, seed=0):
    return {"x": np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32), "sr": np.array(sr)}


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _branch_tensors(model, branch):
    node = next(n for n in model.graph.node if n.op_type == "If")
    g = next(a.g for a in node.attribute if a.name == branch)
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


@pytest.mark.parametrize(
    ("sr", "taken", "other"), [(16000, "then_branch", "else_branch"), (8000, "else_branch", "then_branch")]
)
def test_prunes_the_taken_branch_in_place(tmp_path, sr, taken, other):
    model = if_model()
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    result = prune_model(src, _calib(sr=sr), PruneConfig(sparsity=0.4, batch_size=16), output=out)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]  # the If stays
    before, after = _branch_tensors(model, taken), _branch_tensors(pruned, taken)
    prefix = taken[0]
    for name in (f"{prefix}_w1", f"{prefix}_w2"):  # an initializer and a Constant node, pruned in place
        assert np.mean(after[name] == 0) > 0.2 and not np.array_equal(after[name], before[name])
    assert not np.array_equal(after[f"{prefix}_b1"], before[f"{prefix}_b1"])  # the bias refit reached it
    for name, values in _branch_tensors(model, other).items():  # the other branch is untouched
        np.testing.assert_array_equal(_branch_tensors(pruned, other)[name], values)
    report = result.report
    assert {layer.weight for layer in report.layers} == {f"{prefix}_w1", f"{prefix}_w2", "head_w"}
    assert len(report.branches) == 1 and taken in report.branches[0] and "by_rate" in report.branches[0]
    untaken = [s for s in report.skipped if "no calibration batch takes" in s.reason]
    assert {s.node for s in untaken} == {f"{other[0]}_fc1", f"{other[0]}_fc2"}
    feed = _calib(n=8, sr=sr, seed=5)
    a, b = _run(model, feed), _run(pruned, feed)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.5


def test_branch_statistics_equal_those_of_the_inlined_model(tmp_path):
    """The oracle: pruning the If model prunes the branch exactly as pruning the same model with
    that branch inlined by hand (same masks, same refitted values)."""
    model = if_model()
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    inline_if(flat, next(i for i, n in enumerate(flat.graph.node) if n.op_type == "If"), "then_branch")
    config = PruneConfig(sparsity=0.6, batch_size=16)
    a = prune_model(model, _calib(), config)
    b = prune_model(flat, _calib(), config)
    values_b = {t.name: numpy_helper.to_array(t) for t in b.model.graph.initializer}
    for n in b.model.graph.node:
        if n.op_type == "Constant":
            values_b[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for name, values in _branch_tensors(a.model, "then_branch").items():
        np.testing.assert_array_equal(values, values_b[name], err_msg=name)
    assert [layer.kept for layer in a.report.layers] == [layer.kept for layer in b.report.layers]


def test_nested_if_is_resolved_level_by_level():
    model = if_model(nested=True)
    plan = plan_branches(model, lambda: iter([_calib(n=16)]), Provider.CPU)
    assert [(s.node, s.branch) for s in plan.steps] == [
        ("by_rate", "then_branch"),
        ("t_inner", "then_branch"),
    ]
    copy = calibration_model(model, plan)
    assert not any(n.op_type == "If" for n in copy.graph.node)
    feed = _calib(n=8)
    np.testing.assert_allclose(_run(copy, feed), _run(model, feed), rtol=1e-6)
    result = prune_model(model, _calib(), PruneConfig(sparsity=0.5, batch_size=16))
    assert "t_iw" in {layer.weight for layer in result.report.layers}


def test_batches_taking_both_branches_skip_the_if(tmp_path):
    model = if_model(cond="sign")
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    x[:16] = np.abs(x[:16])  # batch 0: positive sum, batch 1: negative
    x[16:] = -np.abs(x[16:])
    result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.5, batch_size=16))
    assert {layer.weight for layer in result.report.layers} == {"head_w"}
    reasons = [s.reason for s in result.report.skipped if s.node in ("t_fc1", "e_fc2")]
    assert len(reasons) == 2 and all(
        "does not agree" in r and "1 batch(es) the then_branch" in r for r in reasons
    )
    assert result.report.branches == []
    no_head = if_model(cond="sign", head=False)
    with pytest.raises(NoPrunableLayersError, match="does not agree"):
        prune_model(no_head, {"x": x}, PruneConfig(sparsity=0.5, batch_size=16))


def test_weight_read_by_the_untaken_branch_is_left_alone():
    model = if_model(shared=True)
    result = prune_model(model, _calib(), PruneConfig(sparsity=0.5, batch_size=16))
    assert "shared_w" not in {layer.weight for layer in result.report.layers}
    assert any(s.weight == "shared_w" and "does not take" in s.reason for s in result.report.skipped), (
        result.report.skipped
    )


def test_inspect_names_if_branch_layers_with_what_prune_does():
    found = discover(if_model())
    assert {layer.weight for layer in found.layers} == {"head_w"}
    reasons = {s.node: s.reason for s in found.skipped}
    assert "calibrates it on a copy with the branch inlined" in reasons["t_fc1"]
