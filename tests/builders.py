"""Tiny ONNX models built in code for the tests (opset 17, ir_version 10, fixed seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10


def finish(nodes, inputs, outputs, initializers, name: str = "test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, array: np.ndarray, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def value(name: str, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def single_gemm(n_in: int = 16, n_out: int = 8, trans_b: int = 1, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    shape = (n_out, n_in) if trans_b else (n_in, n_out)
    w = rng.normal(size=shape).astype(np.float32)
    b = rng.normal(size=n_out).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=trans_b)
    return finish(
        [node],
        [value("x", ["batch", n_in])],
        [value("y", ["batch", n_out])],
        [tensor("W", w), tensor("b", b)],
    )


def mlp(sizes=(20, 32, 16, 5), seed: int = 0) -> onnx.ModelProto:
    """Gemm (transB=1) -> Relu -> Gemm (transB=0) -> Relu -> MatMul + Add."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    a, b, c, d = sizes
    inits += [
        tensor("W1", rng.normal(size=(b, a)).astype(np.float32) / np.sqrt(a)),
        tensor("b1", rng.normal(size=b).astype(np.float32) * 0.1),
        tensor("W2", rng.normal(size=(b, c)).astype(np.float32) / np.sqrt(b)),
        tensor("b2", rng.normal(size=c).astype(np.float32) * 0.1),
        tensor("W3", rng.normal(size=(c, d)).astype(np.float32) / np.sqrt(c)),
        tensor("b3", rng.normal(size=d).astype(np.float32) * 0.1),
    ]
    nodes += [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], name="fc2", transB=0),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "W3"], ["m3"], name="fc3"),
        helper.make_node("Add", ["m3", "b3"], ["y"], name="fc3_bias"),
    ]
    return finish(nodes, [value("x", ["batch", a])], [value("y", ["batch", d])], inits)


def convnet(seed: int = 0) -> onnx.ModelProto:
    """Conv (pad) -> Relu -> depthwise Conv (stride 2) -> Relu -> grouped Conv -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(size=shape).astype(np.float32) / np.sqrt(fan_in)

    inits = [
        tensor("c1_w", w(8, 3, 3, 3)),
        tensor("c1_b", np.zeros(8, np.float32)),
        tensor("dw_w", w(8, 1, 3, 3)),
        tensor("g_w", w(12, 4, 1, 1)),
        tensor("fc_w", w(4, 12)),
        tensor("fc_b", np.zeros(4, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "dw_w"], ["dw"], name="dwconv", group=8, strides=[2, 2], auto_pad="SAME_UPPER"
        ),
        helper.make_node("Relu", ["dw"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "g_w"], ["g"], name="gconv", group=2),
        helper.make_node("GlobalAveragePool", ["g"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return finish(nodes, [value("x", ["batch", 3, 8, 8])], [value("y", ["batch", 4])], inits)


def tokens(seed: int = 0) -> onnx.ModelProto:
    """MatMul on 3-D input, with a Constant-node weight and an attention-style MatMul."""
    rng = np.random.default_rng(seed)
    wq = rng.normal(size=(6, 6)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["Wc"],
            name="const_w",
            value=tensor("Wc_value", rng.normal(size=(6, 10)).astype(np.float32)),
        ),
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="proj_q"),
        helper.make_node("Transpose", ["x"], ["xt"], name="xt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["att"], name="attention"),
        helper.make_node("MatMul", ["att", "x"], ["mix"], name="mix"),
        helper.make_node("MatMul", ["mix", "Wc"], ["y"], name="proj_out"),
    ]
    return finish(nodes, [value("x", ["batch", 5, 6])], [value("y", ["batch", 5, 10])], [tensor("Wq", wq)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def save_external(model: onnx.ModelProto, path: Path, one_file: bool = True) -> Path:
    """Save with every tensor as external data beside `path` (`<name>.data`, or one file per
    tensor), from a copy: onnx.save_model converts the model it is given in place."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def gaussian_calibration(shape, n: int = 64, seed: int = 1, nonneg: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return np.abs(x) if nonneg else x
