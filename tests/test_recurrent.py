"""LSTM / GRU / RNN layers: the points each weight reads, against a naive recurrence in NumPy,
and the whole prune on small recurrent models built in code."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, tensor, value
from naive import naive_abs_sensitivity, naive_dense_sensitivity
from onnx import helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.discover import discover
from sipp_onnx.layers import WeightLayout, from_rows, to_rows
from sipp_onnx.recurrent import HiddenStateAccumulator, SequenceInputAccumulator, hidden_state_points

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def recurrent_model(
    op: str = "LSTM",
    direction: str = "bidirectional",
    layout: int = 0,
    hidden: int = 6,
    inputs: int = 5,
    with_bias: bool = True,
    initial_h: str = "input",
    keep_y: bool = False,
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """X -> op -> (Y_h, flattened) -> Gemm -> out. `initial_h`: 'input' (a graph input),
    'constant' (an initializer) or 'none'. Returns the model and its weights."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    w = rng.normal(size=(dirs, g * hidden, inputs)).astype(np.float32) / np.sqrt(inputs)
    r = rng.normal(size=(dirs, g * hidden, hidden)).astype(np.float32) / np.sqrt(hidden)
    b = rng.normal(size=(dirs, 2 * g * hidden)).astype(np.float32) * 0.1
    fc = rng.normal(size=(3, dirs * hidden)).astype(np.float32)
    inits = [tensor("W", w), tensor("R", r), tensor("fc", fc)]
    # Graph inputs are batch-first; a layout-0 op gets them through Transposes, as exporters do.
    node_inputs = ["X" if layout else "X_t", "W", "R", "B" if with_bias else "", "", ""]
    graph_inputs = [value("X", ["batch", "seq", inputs])]
    pre = [] if layout else [helper.make_node("Transpose", ["X"], ["X_t"], perm=[1, 0, 2])]
    if with_bias:
        inits.append(tensor("B", b))
    if initial_h == "input":
        node_inputs[5] = "h0" if layout else "h0_t"
        graph_inputs.append(value("h0", ["batch", dirs, hidden]))
        if not layout:
            pre.append(helper.make_node("Transpose", ["h0"], ["h0_t"], perm=[1, 0, 2]))
    elif initial_h == "constant":
        node_inputs[5] = "h0c"
        # ONNX Runtime does not broadcast initial_h: a constant one fixes the batch size (8).
        h0c = rng.normal(size=(dirs, 8, hidden) if layout == 0 else (8, dirs, hidden)).astype(np.float32)
        inits.append(tensor("h0c", h0c))
    while node_inputs and not node_inputs[-1]:
        node_inputs.pop()
    attrs = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    outputs = ["Y" if keep_y else "", "Y_h"]
    nodes = [*pre, helper.make_node(op, node_inputs, outputs, name="rnn", **attrs)]
    if layout == 0:
        nodes.append(helper.make_node("Transpose", ["Y_h"], ["Y_t"], perm=[1, 0, 2]))
        flat_in = "Y_t"
    else:
        flat_in = "Y_h"
    nodes += [
        helper.make_node("Flatten", [flat_in], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc"], ["out"], name="head", transB=1),
    ]
    outs = [value("out", ["batch", 3])]
    if keep_y:
        outs.append(value("Y", None))
    model = finish(nodes, graph_inputs, outs, inits)
    return model, {"W": w, "R": r, "B": b}


def naive_recurrence(op, x, w, r, b, h0, direction, linear_before_reset=1):
    """h_{t-1} and x_t of every step the op takes, per direction, by the ONNX equations
    (default activations). x `[T, B, I]`, h0 `[dirs, B, H]`. Returns (states, inputs):
    states[d] is a list of `[B, H]` arrays, one per step, in processing order."""
    dirs = w.shape[0]
    steps = x.shape[0]
    hidden = r.shape[2]
    states: list[list[np.ndarray]] = []
    for d in range(dirs):
        backwards = direction == "reverse" or d == 1
        order = range(steps - 1, -1, -1) if backwards else range(steps)
        h = h0[d].astype(np.float64)
        c = np.zeros_like(h)
        wb, rb = b[d, : b.shape[1] // 2], b[d, b.shape[1] // 2 :]
        seen = []
        for t in order:
            seen.append(h.copy())
            xw = x[t] @ w[d].T + wb
            hr = h @ r[d].T + rb
            if op == "RNN":
                h = np.tanh(xw + hr)
            elif op == "LSTM":
                i_, o_, f_, c_ = (xw + hr)[:, :hidden], None, None, None
                gates = xw + hr
                i_ = _sigmoid(gates[:, :hidden])
                o_ = _sigmoid(gates[:, hidden : 2 * hidden])
                f_ = _sigmoid(gates[:, 2 * hidden : 3 * hidden])
                c_ = np.tanh(gates[:, 3 * hidden :])
                c = f_ * c + i_ * c_
                h = o_ * np.tanh(c)
            else:  # GRU, linear_before_reset=1
                z = _sigmoid(xw[:, :hidden] + hr[:, :hidden])
                rr = _sigmoid(xw[:, hidden : 2 * hidden] + hr[:, hidden : 2 * hidden])
                hh = np.tanh(xw[:, 2 * hidden :] + rr * hr[:, 2 * hidden :])
                h = (1 - z) * hh + z * h
        states.append(seen)
    return states


def _run(model, feed, names):
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    node = next(n for n in extra.graph.node if n.name == "rnn")
    if not node.output[0]:
        node.output[0] = "Y"
    extra.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(extra.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feed), strict=True))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
def test_hidden_state_points_match_the_recurrence(op, direction, layout):
    """ONNX Runtime runs layout 0 only: Y of the layout-1 op is the layout-0 Y, transposed."""
    model, weights = recurrent_model(op, direction, 0)
    (r_layer,) = [
        layer for layer in discover(recurrent_model(op, direction, layout)[0]).layers if layer.weight == "R"
    ]
    rng = np.random.default_rng(1)
    dirs = weights["W"].shape[0]
    x = rng.normal(size=(7, 3, 5)).astype(np.float32)  # [T, B, I]
    h0 = rng.normal(size=(dirs, 3, 6)).astype(np.float32)
    feed = {"X": x.swapaxes(0, 1).copy(), "h0": h0.swapaxes(0, 1).copy()}
    y = _run(model, feed, ["Y"])["Y"]  # [T, dirs, B, H]
    if layout == 1:
        y, h0_op = y.transpose(2, 0, 1, 3), feed["h0"]
    else:
        h0_op = h0
    points, _ = hidden_state_points(y, h0_op, r_layer.recurrent)  # [B, dirs, H, T]
    expected = naive_recurrence(op, x, weights["W"], weights["R"], weights["B"], h0, direction)
    for d in range(dirs):
        got = sorted(map(tuple, np.round(points[:, d].transpose(0, 2, 1).reshape(-1, 6), 4)))
        want = sorted(map(tuple, np.round(np.concatenate(expected[d]), 4)))
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-4)


@pytest.mark.parametrize("terms", ["signed", "absolute"])
@pytest.mark.parametrize("reduction", ["max", "mean"])
def test_recurrent_sensitivities_against_the_definition(terms, reduction):
    model, weights = recurrent_model("LSTM", "bidirectional", 0, initial_h="input")
    found = discover(model)
    by_weight = {layer.weight: layer for layer in found.layers}
    w_layer, r_layer = by_weight["W"], by_weight["R"]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    h0 = rng.normal(size=(2, 3, 6)).astype(np.float32)
    y = _run(model, {"X": x.swapaxes(0, 1).copy(), "h0": h0.swapaxes(0, 1).copy()}, ["Y"])["Y"]

    def naive(rows, samples, reduction):
        if terms == "signed":
            return naive_dense_sensitivity(rows, samples, reduction)
        return naive_abs_sensitivity(rows, [lambda i, s=s: s for s in samples], reduction)

    acc_w = SequenceInputAccumulator(
        to_rows(weights["W"], w_layer.layout), w_layer.recurrent, reduction=reduction, terms=terms
    )
    acc_w.update(x)
    samples = [x[:, b] for b in range(3)]  # one sample per sequence, its steps the points
    np.testing.assert_allclose(
        acc_w.result().sensitivity,
        naive(to_rows(weights["W"], WeightLayout.STACKED), samples, reduction),
        rtol=1e-4,
        atol=1e-6,
    )

    rows = to_rows(weights["R"], r_layer.layout)
    acc_r = HiddenStateAccumulator(rows, r_layer.recurrent, reduction=reduction, terms=terms)
    for kind, tensor_value in (("initial_h", h0), ("Y", y)):  # either order
        acc_r.feeders()[kind].update(tensor_value)
    sens = acc_r.result().sensitivity
    expected = naive_recurrence("LSTM", x, weights["W"], weights["R"], weights["B"], h0, "bidirectional")
    per = rows.shape[0] // 2
    for d in range(2):
        states = np.stack(expected[d], axis=1)  # [B, T, H]
        want = naive(rows[d * per : (d + 1) * per], [states[b] for b in range(3)], reduction)
        np.testing.assert_allclose(sens[d * per : (d + 1) * per], want, rtol=1e-4, atol=1e-6)


def test_discovery_of_recurrent_layers():
    model, _ = recurrent_model("GRU", "bidirectional", 1, with_bias=False, initial_h="constant")
    found = discover(model)
    by_weight = {layer.weight: layer for layer in found.layers}
    assert set(by_weight) == {"W", "R", "fc"}
    w, r = by_weight["W"], by_weight["R"]
    assert (w.node, r.node) == ("rnn/W", "rnn/R")
    assert w.layout is WeightLayout.STACKED and (w.n_out, w.fan_in) == (36, 5) and w.groups == 1
    assert (r.n_out, r.fan_in, r.groups) == (36, 6, 2) and r.weight_input == 2
    assert r.recurrent.name_output and r.recurrent.initial_h_constant
    assert r.bias is not None and r.bias.tensor is None and r.bias.part == (18, 36)
    assert w.bias is not None and w.bias.part == (0, 18)
    values = np.arange(2 * 18 * 6, dtype=np.float32).reshape(2, 18, 6)
    np.testing.assert_array_equal(from_rows(to_rows(values, r.layout), r.layout, values.shape), values)


def test_gru_without_linear_before_reset_prunes_w_only():
    model, _ = recurrent_model("GRU", "forward")
    for attr in next(n for n in model.graph.node if n.name == "rnn").attribute:
        if attr.name == "linear_before_reset":
            attr.i = 0
    found = discover(model)
    assert {layer.weight for layer in found.layers} == {"W", "fc"}
    (skip,) = [s for s in found.skipped if s.weight == "R"]
    assert skip.node == "rnn/R" and "linear_before_reset=0" in skip.reason


def test_shared_recurrent_weight_read_elsewhere_is_skipped():
    model, _ = recurrent_model("RNN", "forward")
    model.graph.node.append(helper.make_node("Identity", ["R"], ["R_copy"], name="peek"))
    model.graph.output.append(value("R_copy", None))
    found = discover(model)
    assert "R" not in {layer.weight for layer in found.layers}
    assert any(s.weight == "R" and "peek" in s.reason for s in found.skipped)


@pytest.mark.parametrize(
    ("op", "direction", "layout", "initial_h", "with_bias"),
    [
        ("LSTM", "bidirectional", 0, "input", True),
        ("GRU", "forward", 0, "constant", False),
        ("RNN", "reverse", 0, "none", True),
    ],
)
def test_prune_recurrent_model_end_to_end(tmp_path, op, direction, layout, initial_h, with_bias):
    model, weights = recurrent_model(
        op, direction, layout, hidden=16, inputs=12, initial_h=initial_h, with_bias=with_bias
    )
    rng = np.random.default_rng(3)
    dirs = weights["W"].shape[0]
    n, steps = 24, 9
    calib = {"X": rng.normal(size=(n, steps, 12)).astype(np.float32)}
    if initial_h == "input":
        calib["h0"] = rng.normal(size=(n, dirs, 16)).astype(np.float32) * 0.1
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out = tmp_path / "p.onnx"
    result = prune_model(src, calib, PruneConfig(sparsity=0.5, batch_size=8), output=out)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for name in ("W", "R"):
        assert 0.05 < float(np.mean(values[name] == 0)) < 0.9, name  # pruned, not emptied
    # The node's interface is as it was: Y stays unnamed, B added only where the refit put one.
    node = next(n for n in pruned.graph.node if n.name == "rnn")
    assert node.output[0] == "" and node.output[1] == "Y_h"
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    reported = {layer.weight: layer for layer in result.report.layers}
    assert reported["R"].nodes == ("rnn/R",) and reported["R"].op_type == op
    for name in ("W", "R"):
        refit = reported[name].refit
        assert refit is not None and refit.error_after is not None and refit.error_before is not None
        assert refit.error_after <= refit.error_before + 1e-6
    # R's inputs are its own outputs fed back: mask and bias refit only, and the report says why.
    assert reported["R"].refit.how == "bias" and "recurrent" in reported["R"].refit.note
    assert reported["W"].refit.how != "bias"
    sess_a = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_b = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    feed = {k: v[:8] for k, v in calib.items()}
    a, b = sess_a.run(None, feed)[0], sess_b.run(None, feed)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.6


def test_weights_reached_through_unsqueeze_and_squeeze(tmp_path):
    """Exporters store a one-direction LSTM's weights 2-D and Unsqueeze them (silero-vad): the
    weight is pruned as the op reads it and written back into the 2-D initializer."""
    model, weights = recurrent_model("LSTM", "forward", hidden=8, inputs=6, initial_h="none")
    graph = model.graph
    for name in ("W", "R"):
        index = next(i for i, t in enumerate(graph.initializer) if t.name == name)
        graph.initializer.pop(index)
        graph.initializer.append(tensor(f"{name}2d", weights[name][0]))
        graph.initializer.append(tensor(f"{name}_axes", np.array([0]), np.int64))
        graph.node.insert(
            0, helper.make_node("Unsqueeze", [f"{name}2d", f"{name}_axes"], [name], name=f"unsq_{name}")
        )
    # and a Squeeze -> Unsqueeze round trip on the head's weight
    head = next(t for t in graph.initializer if t.name == "fc")
    head_values = onnx.numpy_helper.to_array(head)
    graph.initializer.remove(head)
    graph.initializer.append(tensor("fc3d", head_values[None]))
    graph.initializer.append(tensor("sq_axes", np.array([0]), np.int64))
    graph.node.insert(0, helper.make_node("Squeeze", ["fc3d", "sq_axes"], ["fc"], name="sq_fc"))
    onnx.checker.check_model(model, full_check=True)
    found = discover(model)
    by_weight = {w.name: w for w in found.weights}
    assert by_weight["W"].stored_name == "W2d" and by_weight["W"].via == "Unsqueeze"
    assert by_weight["fc"].stored_name == "fc3d" and by_weight["fc"].via == "Squeeze"
    calib = {"X": np.random.default_rng(0).normal(size=(32, 7, 6)).astype(np.float32)}
    result = prune_model(model, calib, PruneConfig(sparsity=0.5, batch_size=8))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert stored["W2d"].shape == (32, 6) and stored["fc3d"].shape == (1, 3, 8)
    assert 0.05 < float(np.mean(stored["W2d"] == 0)) < 0.9 and float(np.mean(stored["R2d"] == 0)) > 0.05


def _reordered(model, name, values, order_blocks):
    """Store `name` as the rows of `values` in another block order and rebuild it with a Concat
    of Slices (as PyTorch's LSTM export reorders its gates), then Unsqueeze. The op reads block k
    as stored block `order_blocks[k]`."""
    graph = model.graph
    index = next(i for i, t in enumerate(graph.initializer) if t.name == name)
    graph.initializer.pop(index)
    rows = values[0]
    h = rows.shape[0] // len(order_blocks)
    inverse = np.argsort(order_blocks)
    graph.initializer.append(
        tensor(f"{name}_torch", np.concatenate([rows[b * h : (b + 1) * h] for b in inverse]))
    )
    pieces, nodes = [], []
    for k, block in enumerate(order_blocks):
        graph.initializer.extend(
            [
                tensor(f"{name}_s{k}", np.array([block * h]), np.int64),
                tensor(f"{name}_e{k}", np.array([(block + 1) * h]), np.int64),
            ]
        )
        nodes.append(
            helper.make_node("Slice", [f"{name}_torch", f"{name}_s{k}", f"{name}_e{k}"], [f"{name}_p{k}"])
        )
        pieces.append(f"{name}_p{k}")
    graph.initializer.append(tensor(f"{name}_axes", np.array([0]), np.int64))
    nodes.append(helper.make_node("Concat", pieces, [f"{name}_cat"], axis=0))
    nodes.append(helper.make_node("Unsqueeze", [f"{name}_cat", f"{name}_axes"], [name]))
    for node in reversed(nodes):
        graph.node.insert(0, node)


def test_weights_reordered_by_a_concat_of_slices():
    """The oracle: the model whose W is rebuilt from reordered rows prunes exactly like the model
    that stores W as the LSTM reads it."""
    plain, weights = recurrent_model("LSTM", "forward", hidden=8, inputs=6, initial_h="none")
    model, _ = recurrent_model("LSTM", "forward", hidden=8, inputs=6, initial_h="none")
    _reordered(model, "W", weights["W"], [0, 3, 1, 2])
    onnx.checker.check_model(model, full_check=True)
    feed = {"X": np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)}
    np.testing.assert_allclose(
        _run(model, feed, ["Y_h"])["Y_h"], _run(plain, feed, ["Y_h"])["Y_h"], rtol=1e-6
    )
    found = discover(model)
    (w,) = [w for w in found.weights if w.name == "W"]
    assert w.stored_name == "W_torch" and w.via == "Concat -> Unsqueeze"
    calib = {"X": np.random.default_rng(0).normal(size=(32, 7, 6)).astype(np.float32)}
    config = PruneConfig(sparsity=0.5, batch_size=8)
    a, b = prune_model(model, calib, config), prune_model(plain, calib, config)
    np.testing.assert_allclose(
        _run(a.model, feed, ["Y_h"])["Y_h"], _run(b.model, feed, ["Y_h"])["Y_h"], rtol=1e-5, atol=1e-6
    )
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in a.model.graph.initializer}
    assert float(np.mean(stored["W_torch"] == 0)) > 0.05


def test_concat_of_slices_that_do_not_cover_the_tensor_is_not_followed():
    model, weights = recurrent_model("LSTM", "forward", hidden=8, inputs=6, initial_h="none")
    _reordered(model, "W", weights["W"], [0, 3, 1, 2])
    end = next(t for t in model.graph.initializer if t.name == "W_e0")
    end.CopyFrom(tensor("W_e0", np.array([4]), np.int64))  # a hole in the first block
    found = discover(model)
    (skip,) = [s for s in found.skipped if s.node == "rnn/W"]
    assert "exactly once" in skip.reason


def _dynamic_lstm(tmp_path):
    """The bidirectional LSTM model, int8 dynamically quantized by onnxruntime (com.microsoft
    DynamicQuantizeLSTM, weights `[dirs, K, 4H]` with per-direction scales)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, _ = recurrent_model("LSTM", "bidirectional", 0, hidden=16, inputs=12, initial_h="none")
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(
        tmp_path / "f.onnx", tmp_path / "q.onnx", op_types_to_quantize=["LSTM"], weight_type=QuantType.QInt8
    )
    return onnx.load(tmp_path / "q.onnx")


def test_dynamic_quantize_lstm_prunes_like_its_dequantized_twin(tmp_path):
    quantized = _dynamic_lstm(tmp_path)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    found = discover(quantized)
    by_weight = {layer.weight: layer for layer in found.layers}
    assert by_weight["W_quantized"].node.endswith("/W") and by_weight["R_quantized"].weight_input == 2
    assert by_weight["W_quantized"].weight_shape == (2, 64, 12)
    # The float twin holds exactly the dequantized weights, in the LSTM's layout.
    dequant = {
        name: (
            (values[f"{name}_quantized"].astype(np.float64) - values[f"{name}_zero_point"][:, None, None])
            * values[f"{name}_scale"][:, None, None]
        ).transpose(0, 2, 1)
        for name in ("W", "R")
    }
    twin, _ = recurrent_model("LSTM", "bidirectional", 0, hidden=16, inputs=12, initial_h="none")
    for t in twin.graph.initializer:
        if t.name in dequant:
            t.CopyFrom(tensor(t.name, dequant[t.name]))
        if t.name == "B":
            t.CopyFrom(tensor("B", values["B"]))
    calib = {"X": np.random.default_rng(0).normal(size=(32, 7, 12)).astype(np.float32)}
    config = PruneConfig(sparsity=0.5, batch_size=8, refit="none")
    q = prune_model(quantized, calib, config)
    f = prune_model(twin, calib, config)
    pruned_q = {t.name: onnx.numpy_helper.to_array(t) for t in q.model.graph.initializer}
    pruned_f = {t.name: onnx.numpy_helper.to_array(t) for t in f.model.graph.initializer}
    for name in ("W", "R"):
        kept_q = pruned_q[f"{name}_quantized"] != values[f"{name}_zero_point"][:, None, None]
        differ = np.mean(kept_q.transpose(0, 2, 1) != (pruned_f[name] != 0))
        # W reads the same float X in both; R reads states the int8 op computed (it quantizes x
        # and h on the fly), a hair away from the float twin's: a few near-ties may flip.
        assert differ == 0 if name == "W" else differ < 0.01, (name, differ)
        unchanged = np.where(kept_q, pruned_q[f"{name}_quantized"], values[f"{name}_quantized"])
        np.testing.assert_array_equal(unchanged, values[f"{name}_quantized"])  # kept integers kept
    # with the default refit the model still runs and stays close
    result = prune_model(quantized, calib, PruneConfig(sparsity=0.5, batch_size=8))
    onnx.checker.check_model(result.model)
    assert all(check.cosine > 0.9 for check in result.report.verification)


def test_two_of_four_along_the_input_axis_of_w_and_r():
    """N:M groups of a recurrent weight run along its input axis (the rows' K); the checker,
    which reads the weights back from the file as the op does, confirms every group."""
    from sipp_onnx.checking import check_pattern
    from sipp_onnx.pattern import parse_pattern

    model, _ = recurrent_model("LSTM", "bidirectional", 0, hidden=16, inputs=12, initial_h="none")
    calib = {"X": np.random.default_rng(0).normal(size=(32, 7, 12)).astype(np.float32)}
    result = prune_model(model, calib, PruneConfig(pattern="2:4", batch_size=8))
    assert {layer.weight: layer.pattern for layer in result.report.layers} == {
        "W": "2:4",
        "R": "2:4",
        "fc": "2:4",
    }
    report = check_pattern(result.model, parse_pattern("2:4"))
    assert {c.weight for c in report.complying} == {"W", "R", "fc"} and not report.violating
    w = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "W"))
    assert (np.count_nonzero(w.reshape(2, 64, 3, 4), axis=-1) <= 2).all()  # along the 12 inputs


def _with_lengths(model):
    """The model with a `lens` int32 graph input wired to the op's sequence_lens."""
    node = next(n for n in model.graph.node if n.name == "rnn")
    while len(node.input) < 5:
        node.input.append("")
    node.input[4] = "lens"
    model.graph.input.append(value("lens", ["batch"], onnx.TensorProto.INT32))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_sequence_lengths_points_are_the_steps_each_sequence_computes(op):
    """ONNX: a sequence of length L computes steps 0..L-1 (the reverse direction from L-1,
    starting at initial_h); Y is 0 beyond. The points are exactly those of a naive recurrence run
    on each sequence alone, and the steps beyond L are no points at all."""
    model, weights = recurrent_model(op, "bidirectional", 0, hidden=6, inputs=5)
    model = _with_lengths(model)
    (r_layer,) = [layer for layer in discover(model).layers if layer.weight == "R"]
    assert r_layer.recurrent.sequence_lens == "lens"
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 3, 5)).astype(np.float32)  # [T, B, I]
    h0 = rng.normal(size=(2, 3, 6)).astype(np.float32)
    lens = np.array([7, 4, 1], dtype=np.int32)
    feed = {"X": x.swapaxes(0, 1).copy(), "h0": h0.swapaxes(0, 1).copy(), "lens": lens}
    y = _run(model, feed, ["Y"])["Y"]
    points, mask = hidden_state_points(y, h0, r_layer.recurrent, lens)
    np.testing.assert_array_equal(mask, np.arange(7)[None] < lens[:, None])
    for b, length in enumerate(lens):
        expected = naive_recurrence(
            op,
            x[:length, b : b + 1],
            weights["W"],
            weights["R"],
            weights["B"],
            h0[:, b : b + 1],
            "bidirectional",
        )
        for d in range(2):
            seen = np.concatenate(expected[d])  # in processing order
            at_step = seen if d == 0 else seen[::-1]  # the point of step t
            np.testing.assert_allclose(points[b, d, :, :length].T, at_step, atol=2e-5)
            assert not points[b, d, :, length:].any()
    # W's points are the computed steps only; the sensitivities match the definition on them
    (w_layer,) = [layer for layer in discover(model).layers if layer.weight == "W"]
    acc = SequenceInputAccumulator(to_rows(weights["W"], w_layer.layout), w_layer.recurrent, terms="signed")
    feeders = acc.feeders()
    assert set(feeders) == {"x", "sequence_lens"}
    feeders["sequence_lens"].update(lens)
    feeders["x"].update(x)
    got = acc.result()
    samples = [x[:length, b] for b, length in enumerate(lens)]
    np.testing.assert_allclose(
        got.sensitivity,
        naive_dense_sensitivity(to_rows(weights["W"], WeightLayout.STACKED), samples),
        rtol=1e-4,
        atol=1e-6,
    )
    assert got.points == int(lens.sum())


def test_prune_with_sequence_lengths_end_to_end():
    model, _ = recurrent_model("GRU", "bidirectional", 0, hidden=16, inputs=12)
    model = _with_lengths(model)
    rng = np.random.default_rng(2)
    calib = {
        "X": rng.normal(size=(32, 9, 12)).astype(np.float32),
        "h0": rng.normal(size=(32, 2, 16)).astype(np.float32) * 0.1,
        "lens": rng.integers(1, 10, size=32).astype(np.int32),
    }
    result = prune_model(model, calib, PruneConfig(sparsity=0.5, batch_size=8))
    assert result.report.sparsity_achieved == pytest.approx(0.5, abs=0.005)
    assert all(check.cosine > 0.9 for check in result.report.verification)
