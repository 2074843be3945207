"""Models of the layer kinds of issue 17 (LSTM/GRU/RNN, ConvTranspose, Einsum, layers inside If
branches, quantized operators), shared by tests/test_layer_kinds.py, test_hostile.py and
test_fuzz.py. Each builder returns a valid model (onnx.checker passes) built in code with fixed
seeds; the quantized ones are made by onnxruntime.quantization from a shipped float model.
"""

from __future__ import annotations

import functools
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    from builders import IR_VERSION, OPSET, finish, tensor, value
    from test_convtranspose import decoder
    from test_einsum import _calibration as einsum_calibration
    from test_einsum import _einsum_model as einsum_model
    from test_recurrent import recurrent_model
except ImportError:  # pragma: no cover
    from tests.builders import IR_VERSION, OPSET, finish, tensor, value  # type: ignore[no-redef]
    from tests.test_convtranspose import decoder  # type: ignore[no-redef]
    from tests.test_einsum import _calibration as einsum_calibration  # type: ignore[no-redef]
    from tests.test_einsum import _einsum_model as einsum_model  # type: ignore[no-redef]
    from tests.test_recurrent import recurrent_model  # type: ignore[no-redef]

MODELS = Path(__file__).resolve().parents[1] / "models"

__all__ = ["decoder", "einsum_calibration", "einsum_model", "recurrent_model"]


# ----------------------------------------------------------------------------- uninitialized memory


def _poisoned_empty(shape, dtype=float, order="C", **kwargs):
    """`np.empty` whose memory holds NaN (floats) or the largest value (integers), not whatever
    the allocator left there: a read of an entry never written shows, every run."""
    out = np.empty(shape, dtype, order, **kwargs)
    if out.dtype.kind in "fc":
        out.fill(np.nan)
    elif out.dtype.kind in "iu":
        out.fill(np.iinfo(out.dtype).max)
    return out


class _NumpyWithPoisonedEmpty:
    """numpy as the library modules see it, with `empty` poisoned."""

    empty = staticmethod(_poisoned_empty)

    def __getattr__(self, name: str):
        return getattr(np, name)


def poison_empty(monkeypatch) -> None:
    """Give every loaded `sipp_onnx` module a numpy whose `empty` is poisoned (the library's few
    uses must write every entry they read): without it, a missed entry is garbage that is
    sometimes harmless and sometimes NaN, i.e. a flaky test instead of a failing one."""
    proxy = _NumpyWithPoisonedEmpty()
    for name, module in list(sys.modules.items()):
        if name.startswith("sipp_onnx") and getattr(module, "np", None) is np:
            monkeypatch.setattr(module, "np", proxy)


# ----------------------------------------------------------------------------- recurrent


def with_lengths(model: onnx.ModelProto, name: str = "lens") -> onnx.ModelProto:
    """`model` (a `recurrent_model`) with an int32 `[batch]` graph input wired to the op's
    sequence_lens input."""
    node = next(n for n in model.graph.node if n.name == "rnn")
    while len(node.input) < 5:
        node.input.append("")
    node.input[4] = name
    model.graph.input.append(value(name, ["batch"], TensorProto.INT32))
    onnx.checker.check_model(model, full_check=True)
    return model


def recurrent_calibration(
    n: int, steps: int, inputs: int, dirs: int, hidden: int, lens: bool, initial_h: bool, seed: int = 3
) -> dict[str, np.ndarray]:
    """X `[n, steps, inputs]`; with `lens` lengths 1..steps (the first sequence full, at least
    one short); with `initial_h` a small random h0 `[n, dirs, hidden]`. Steps beyond a
    sequence's length hold large values: the op never reads them, so neither may calibration."""
    rng = np.random.default_rng(seed)
    data = {"X": rng.normal(size=(n, steps, inputs)).astype(np.float32)}
    if initial_h:
        data["h0"] = (rng.normal(size=(n, dirs, hidden)) * 0.3).astype(np.float32)
    if lens:
        lengths = rng.integers(1, steps + 1, size=n).astype(np.int32)
        lengths[0], lengths[1] = steps, max(1, steps // 3)
        data["lens"] = lengths
        padding = np.arange(steps)[None, :] >= lengths[:, None]
        data["X"][padding] = 50.0
    return data


def recurrent_kind(
    op: str, direction: str, lens: bool, initial_h: bool, hidden: int = 16, inputs: int = 12, seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model, _ = recurrent_model(
        op, direction, 0, hidden=hidden, inputs=inputs, initial_h="input" if initial_h else "none", seed=seed
    )
    if lens:
        model = with_lengths(model)
    dirs = 2 if direction == "bidirectional" else 1
    return model, recurrent_calibration(64, 9, inputs, dirs, hidden, lens, initial_h)


# ----------------------------------------------------------------------------- ConvTranspose


def unet_decoder(group: int = 1, seed: int = 0, width: int = 16) -> onnx.ModelProto:
    """A UNet-style block: enc Conv -> down Conv (stride 2) -> mid Conv -> ConvTranspose (stride 2,
    bias, `group`) -> Concat with the encoder's skip -> dec Conv -> 1x1 Conv -> y [b, 2, w, w]."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))

    inits = [
        tensor("enc_w", w(8, 3, 3, 3)),
        tensor("enc_b", rng.normal(size=8) * 0.1),
        tensor("down_w", w(16, 8, 3, 3)),
        tensor("mid_w", w(16, 16, 3, 3)),
        tensor("mid_b", rng.normal(size=16) * 0.1),
        tensor("up_w", w(16, 8 // group, 2, 2)),
        tensor("up_b", rng.normal(size=8) * 0.1),
        tensor("dec_w", w(8, 16, 3, 3)),
        tensor("out_w", w(2, 8, 1, 1)),
    ]
    e = helper.make_node
    nodes = [
        e("Conv", ["x", "enc_w", "enc_b"], ["enc"], name="enc", pads=[1, 1, 1, 1]),
        e("Relu", ["enc"], ["skip"], name="enc_relu"),
        e("Conv", ["skip", "down_w"], ["down"], name="down", pads=[1, 1, 1, 1], strides=[2, 2]),
        e("Relu", ["down"], ["d"], name="down_relu"),
        e("Conv", ["d", "mid_w", "mid_b"], ["mid"], name="mid", pads=[1, 1, 1, 1]),
        e("Relu", ["mid"], ["m"], name="mid_relu"),
        e("ConvTranspose", ["m", "up_w", "up_b"], ["up"], name="up", strides=[2, 2], group=group),
        e("Relu", ["up"], ["u"], name="up_relu"),
        e("Concat", ["u", "skip"], ["cat"], name="cat", axis=1),
        e("Conv", ["cat", "dec_w"], ["dec"], name="dec", pads=[1, 1, 1, 1]),
        e("Relu", ["dec"], ["r"], name="dec_relu"),
        e("Conv", ["r", "out_w"], ["y"], name="out"),
    ]
    return finish(nodes, [value("x", ["b", 3, width, width])], [value("y", ["b", 2, width, width])], inits)


# ----------------------------------------------------------------------------- If branches


def _conv_branch(prefix: str, kernel: int, group2: int, seed: int, channels: int = 16) -> onnx.GraphProto:
    """x [N, 3, 8, 8] -> Conv k x k (bias) -> Relu -> Conv 3x3 or 1x1 (group `group2`) -> [N, C, 8, 8]."""
    rng = np.random.default_rng(seed)
    c = channels
    pad = kernel // 2
    second = 3 if group2 == 1 else 1
    inits = [
        tensor(f"{prefix}_w1", rng.normal(size=(c, 3, kernel, kernel)) / np.sqrt(3 * kernel * kernel)),
        tensor(f"{prefix}_b1", rng.normal(size=c) * 0.1),
        tensor(f"{prefix}_w2", rng.normal(size=(c, c // group2, second, second)) / np.sqrt(c * second)),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["x", f"{prefix}_w1", f"{prefix}_b1"],
            [f"{prefix}_c1"],
            name=f"{prefix}_conv1",
            pads=[pad] * 4,
        ),
        helper.make_node("Relu", [f"{prefix}_c1"], [f"{prefix}_r1"], name=f"{prefix}_relu"),
        helper.make_node(
            "Conv",
            [f"{prefix}_r1", f"{prefix}_w2"],
            [f"{prefix}_out"],
            name=f"{prefix}_conv2",
            pads=[second // 2] * 4,
            group=group2,
        ),
    ]
    return helper.make_graph(nodes, prefix, [], [value(f"{prefix}_out", ["N", c, 8, 8])], inits)


def if_convs(cond: str = "sr", nested: bool = False) -> onnx.ModelProto:
    """x [N, 3, 8, 8] (+ sr, a rank-0 int64): If(sr == 16000) with different convs per branch
    (then: 3x3 -> 3x3; else: 5x5 -> grouped 1x1) -> GlobalAveragePool -> Gemm -> out [N, 4].

    `cond='sign'`: the branch follows the sign of the batch's input sum (data-dependent).
    `nested`: the then branch ends in another If (on the sign of its output's mean) whose
    branches hold a 1x1 Conv and an Identity."""
    rng = np.random.default_rng(11)
    inputs = [value("x", ["N", 3, 8, 8])]
    inits = [tensor("k16", np.array(16000), np.int64), tensor("zero", np.array(0.0))]
    if cond == "sr":
        inputs.append(value("sr", [], TensorProto.INT64))
        nodes = [helper.make_node("Equal", ["sr", "k16"], ["c"], name="is16k")]
    else:
        nodes = [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
            helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
        ]
    then_g = _conv_branch("t", 3, 1, 1)
    if nested:
        inner_then = helper.make_graph(
            [helper.make_node("Conv", ["t_out", "t_iw"], ["t_it"], name="t_inner_conv")],
            "t_inner_then",
            [],
            [value("t_it", ["N", 16, 8, 8])],
            [tensor("t_iw", rng.normal(size=(16, 16, 1, 1)) / 4)],
        )
        inner_else = helper.make_graph(
            [helper.make_node("Identity", ["t_out"], ["t_ie"], name="t_inner_id")],
            "t_inner_else",
            [],
            [value("t_ie", ["N", 16, 8, 8])],
        )
        then_g.node.extend(
            [
                helper.make_node("ReduceMean", ["t_out"], ["t_mean"], keepdims=0, name="t_rm"),
                helper.make_node("Greater", ["t_mean", "t_floor"], ["t_pos"], name="t_gt"),
                helper.make_node(
                    "If",
                    ["t_pos"],
                    ["t_final"],
                    name="t_inner",
                    then_branch=inner_then,
                    else_branch=inner_else,
                ),
            ]
        )
        then_g.initializer.append(tensor("t_floor", np.array(-1e9)))  # always true: the then branch
        del then_g.output[:]
        then_g.output.append(value("t_final", ["N", 16, 8, 8]))
    else_g = _conv_branch("e", 5, 2, 2)
    nodes += [
        helper.make_node("If", ["c"], ["feat"], name="by_rate", then_branch=then_g, else_branch=else_g),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head_w"], ["out"], name="head", transB=1),
    ]
    inits.append(tensor("head_w", rng.normal(size=(4, 16)) / 4))
    graph = helper.make_graph(nodes, "if_convs", inputs, [value("out", ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def if_calibration(n: int = 48, sr: int = 16000, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)
    return {"x": x, "sr": np.array(sr, dtype=np.int64)}


# ----------------------------------------------------------------------------- quantized


def _quiet_quantizer() -> None:
    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer's advice on pre-processing


def cnn_data(split: str = "calib") -> np.ndarray:
    """The shipped digits CNN's calibration (200) or test (400) images."""
    return np.load(MODELS / f"cnn_{split}.npz")["input"]


@functools.cache
def _quantized_bytes(kind: str, source: str, per_channel: bool) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    _quiet_quantizer()
    src = MODELS / f"{source}.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        if kind == "dynamic":
            quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=per_channel)
        else:
            x = np.load(MODELS / f"{source}_calib.npz")["input"]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._batches = iter([{"input": x[i : i + 50]} for i in range(0, len(x), 50)])

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._batches, None)

            quantize_static(src, out, Reader(), quant_format=QuantFormat.QOperator, per_channel=per_channel)
        return out.read_bytes()


def quantized_shipped(kind: str, source: str = "cnn", per_channel: bool = False) -> onnx.ModelProto:
    """models/<source>.onnx quantized by onnxruntime: 'dynamic' (ConvInteger, MatMulInteger) or
    'static' in QOperator format (QLinearConv, QGemm for Gemm, QLinearMatMul for MatMul)."""
    return onnx.load_from_string(_quantized_bytes(kind, source, per_channel))


@functools.cache
def _dynamic_lstm_bytes(lens: bool, initial_h: bool) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_quantizer()
    model, _ = recurrent_kind("LSTM", "bidirectional", lens, initial_h)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "f.onnx")
        quantize_dynamic(
            Path(tmp) / "f.onnx",
            Path(tmp) / "q.onnx",
            op_types_to_quantize=["LSTM"],
            weight_type=QuantType.QInt8,
        )
        return (Path(tmp) / "q.onnx").read_bytes()


def dynamic_lstm(lens: bool = True, initial_h: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The bidirectional LSTM kind, int8 by quantize_dynamic: com.microsoft DynamicQuantizeLSTM."""
    model = onnx.load_from_string(_dynamic_lstm_bytes(lens, initial_h))
    return model, recurrent_calibration(64, 9, 12, 2, 16, lens, initial_h)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Kind:
    """One layer kind of issue 17: a model, its calibration data and held-out data."""

    id: str
    build: Callable[[], tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]]
    """() -> (model, calibration arrays, held-out feed)."""
    ops: frozenset[str]
    """The op types the report must list among its pruned layers."""
    min_cosine: float = 0.9
    """Cosine of the pruned model's outputs to the dense ones on held-out data, at 0.5 (measured
    with some margin; the RNN of 496 weights loses most)."""


def _split(data: dict[str, np.ndarray], held: int = 8) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Calibration and a held-out feed from one data set (constants such as `sr` go to both)."""
    calib = {k: (v[:-held] if v.ndim else v) for k, v in data.items()}
    test = {k: (v[-held:] if v.ndim else v) for k, v in data.items()}
    return calib, test


def _recurrent(op: str, direction: str, lens: bool, initial_h: bool):
    def build():
        model, data = recurrent_kind(op, direction, lens, initial_h)
        return (model, *_split(data))

    return build


def _plain(model_fn: Callable[[], onnx.ModelProto], data_fn: Callable[[], dict[str, np.ndarray]]):
    def build():
        return (model_fn(), *_split(data_fn()))

    return build


def _conv_data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(5).normal(size=(40, 3, 16, 16)).astype(np.float32)}


def _einsum_data() -> dict[str, np.ndarray]:
    held = np.random.default_rng(8).normal(size=(8, 3, 16)).astype(np.float32)
    return {"x": np.concatenate([einsum_calibration()["x"], held])}


def _shipped(kind: str, source: str = "cnn"):
    def build():
        x = np.load(MODELS / f"{source}_calib.npz")["input"]
        test = np.load(MODELS / f"{source}_test.npz")["input"][:16]
        return quantized_shipped(kind, source), {"input": x}, {"input": test}

    return build


def _dynamic_lstm():
    model, data = dynamic_lstm()
    return (model, *_split(data))


KINDS = [
    Kind(
        "lstm-bidirectional-initial_h-lens",
        _recurrent("LSTM", "bidirectional", True, True),
        frozenset({"LSTM"}),
    ),
    Kind("gru-initial_h-lens", _recurrent("GRU", "forward", True, True), frozenset({"GRU"})),
    Kind("gru-bidirectional-initial_h", _recurrent("GRU", "bidirectional", False, True), frozenset({"GRU"})),
    Kind("rnn-reverse", _recurrent("RNN", "reverse", False, False), frozenset({"RNN"}), 0.5),
    Kind(
        "convtranspose-unet-group1", _plain(lambda: unet_decoder(1), _conv_data), frozenset({"ConvTranspose"})
    ),
    Kind(
        "convtranspose-unet-grouped",
        _plain(lambda: unet_decoder(2), _conv_data),
        frozenset({"ConvTranspose"}),
    ),
    Kind("einsum-dense", _plain(einsum_model, _einsum_data), frozenset({"Einsum"})),
    Kind("if-convs-then", _plain(if_convs, lambda: if_calibration(56, 16000)), frozenset({"Conv", "Gemm"})),
    Kind("if-convs-else", _plain(if_convs, lambda: if_calibration(56, 8000)), frozenset({"Conv", "Gemm"})),
    Kind("if-nested", _plain(lambda: if_convs(nested=True), if_calibration), frozenset({"Conv", "Gemm"})),
    Kind("quantize-dynamic-cnn", _shipped("dynamic"), frozenset({"ConvInteger", "MatMulInteger"})),
    Kind("quantize-static-qoperator-cnn", _shipped("static"), frozenset({"QLinearConv", "QGemm"})),
    Kind("quantize-static-qoperator-tokens", _shipped("static", "tokens"), frozenset({"QLinearMatMul"})),
    Kind("dynamic-quantize-lstm", _dynamic_lstm, frozenset({"DynamicQuantizeLSTM"})),
]
