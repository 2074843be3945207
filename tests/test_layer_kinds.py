"""Issue 17's test requirements over every new layer kind, in one table (tests/kind_builders.py):
LSTM/GRU/RNN (with initial_h and sequence lengths), ConvTranspose in a UNet-style decoder (group
1 and grouped), Einsum dense layers, Convs inside If branches (either branch, nested), and the
quantized operators onnxruntime.quantization makes of the shipped models (ConvInteger,
MatMulInteger, QLinearConv, QGemm, QLinearMatMul, com.microsoft DynamicQuantizeLSTM).

For each kind: a prune at 0.5 reaches the target within 0.5 %, counted again from the written
file; sparsity 0 leaves every stored tensor and the outputs unchanged; the pruned model passes
onnx.checker and ONNX Runtime runs it. Then the sensitivities of the kinds whose own test files
do not check them against a slow loop are checked here, as measured by the whole calibration
pass (`prepare`): recurrent layers with sequence lengths (every op and direction), Einsum,
ConvTranspose in the decoder, Convs inside If branches, and the quantized operators on their
dequantized inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.pipeline import prepare

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import kind_builders as kb
    from naive import (
        naive_abs_sensitivity,
        naive_conv,
        naive_conv_sensitivity,
        naive_dense_sensitivity,
        naive_g_abs,
        naive_patches,
    )
    from test_convtranspose import naive_sensitivity as naive_conv_transpose_sensitivity
    from test_recurrent import _sigmoid
except ImportError:  # pragma: no cover
    from tests import kind_builders as kb  # type: ignore[no-redef]
    from tests.naive import (  # type: ignore[no-redef]
        naive_abs_sensitivity,
        naive_conv,
        naive_conv_sensitivity,
        naive_dense_sensitivity,
        naive_g_abs,
        naive_patches,
    )
    from tests.test_convtranspose import (  # type: ignore[no-redef]
        naive_sensitivity as naive_conv_transpose_sensitivity,
    )
    from tests.test_recurrent import _sigmoid  # type: ignore[no-redef]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KINDS = {kind.id: kind for kind in kb.KINDS}


@pytest.fixture(autouse=True)
def poison_uninitialized_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs with `np.empty` poisoned in the library (kind_builders.poison_empty):
    a missed entry fails every run instead of now and then."""
    kb.poison_empty(monkeypatch)


# ----------------------------------------------------------------------------- helpers


def run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], names: list[str] | None = None):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(names, feed)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return copy


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph in it, any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            for sub in attr.graphs:
                yield from graphs(sub)


def stored_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant node value of every graph, by name."""
    out = {}
    for graph in graphs(model.graph):
        out.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
        for node in graph.node:
            if node.op_type == "Constant":
                out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


# (op type, input index of the quantized weight) -> input index of its zero point
ZERO_POINT_INPUT = {
    ("ConvInteger", 1): 3,
    ("MatMulInteger", 1): 3,
    ("QLinearConv", 3): 5,
    ("QLinearMatMul", 3): 5,
    ("QGemm", 3): 5,
    ("DynamicQuantizeLSTM", 1): 9,
    ("DynamicQuantizeLSTM", 2): 11,
}


def zero_value(model: onnx.ModelProto, name: str, values: dict[str, np.ndarray]) -> np.ndarray:
    """What a pruned entry of stored tensor `name` holds: 0 for a float weight, the weight's zero
    point (broadcast as the op reads it) for a quantized operator's weight."""
    for graph in graphs(model.graph):
        for node in graph.node:
            for index, read in enumerate(node.input):
                slot = ZERO_POINT_INPUT.get((node.op_type, index))
                if read != name or slot is None:
                    continue
                if len(node.input) <= slot or not node.input[slot]:
                    return np.zeros((), values[name].dtype)
                zero = values[node.input[slot]]
                if zero.size == 1:
                    return zero.reshape(())
                shape = [1] * values[name].ndim
                shape[0] = zero.size  # per output channel (Conv) or per direction (LSTM)
                return zero.reshape(shape)
    return np.zeros((), values[name].dtype)


def zeros_in_file(model: onnx.ModelProto, report) -> tuple[int, int]:
    """(entries at their zero value, entries) over the report's pruned tensors, read from `model`."""
    values = stored_tensors(model)
    zeros = total = 0
    for layer in report.layers:
        name = layer.stored or layer.weight
        stored = values[name]
        zeros += int((stored == zero_value(model, name, values)).sum())
        total += stored.size
    return zeros, total


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("kind", list(KINDS))
def test_prune_at_half_reaches_the_target_and_runs(kind: str, tmp_path: Path) -> None:
    """(a) 0.5 within 0.5 %, counted again in the written file; (c) the file passes the checker,
    ONNX Runtime runs it on held-out data, and its outputs stay close to the dense model's."""
    spec = KINDS[kind]
    model, calib, held = spec.build()
    src, out = tmp_path / "model.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, src)
    report = prune_model(src, calib, PruneConfig(sparsity=0.5), output=out).report
    assert abs(report.sparsity_achieved - 0.5) <= 0.005, report.sparsity_achieved
    assert spec.ops <= {layer.op_type for layer in report.layers}, [layer.op_type for layer in report.layers]
    pruned = onnx.load(out)
    zeros, total = zeros_in_file(pruned, report)
    assert total == report.params_total
    assert zeros == report.params_total - report.params_kept
    assert abs(zeros / total - 0.5) <= 0.005

    onnx.checker.check_model(pruned, full_check=True)
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    dense, sparse = run(model, held), run(out, held)
    for a, b in zip(dense, sparse, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.isfinite(b).all()
    assert cosine(dense[0], sparse[0]) >= spec.min_cosine
    assert not np.array_equal(dense[0], sparse[0])  # it did prune something that matters


@pytest.mark.parametrize("kind", list(KINDS))
def test_sparsity_zero_changes_nothing(kind: str, tmp_path: Path) -> None:
    """(b) Every stored tensor (branch ones and Constant nodes included) is bit-identical, the
    graph is the same, and the outputs are those of the original model."""
    model, calib, held = KINDS[kind].build()
    src, out = tmp_path / "model.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, src)
    report = prune_model(src, calib, PruneConfig(sparsity=0.0), output=out).report
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    before, after = stored_tensors(model), stored_tensors(pruned)
    assert before.keys() == after.keys()
    for name, values in before.items():
        assert after[name].dtype == values.dtype, name
        np.testing.assert_array_equal(after[name], values, err_msg=name)
    for a, b in zip(model.graph.node, pruned.graph.node, strict=True):
        assert a.op_type == b.op_type and list(a.input) == list(b.input) and list(a.output) == list(b.output)
    for a, b in zip(run(model, held), run(out, held), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    # What is already at zero (a quantized weight rounded to its zero point) is all it reports.
    zeros, total = zeros_in_file(pruned, report)
    assert report.params_kept == total - zeros
    assert report.sparsity_achieved == pytest.approx(zeros / total, abs=1e-12)
    assert all(layer.kept == layer.nonzero_before for layer in report.layers)


# ----------------------------------------------------------------------------- recurrent layers


def _step(op, x, h, c, w, r, wb, rb, hidden):
    """One step of the ONNX equations (default activations; GRU with linear_before_reset=1)."""
    xw, hr = x @ w.T + wb, h @ r.T + rb
    if op == "RNN":
        return np.tanh(xw + hr), c
    if op == "LSTM":
        g = xw + hr
        i, o = _sigmoid(g[:hidden]), _sigmoid(g[hidden : 2 * hidden])
        f, cc = _sigmoid(g[2 * hidden : 3 * hidden]), np.tanh(g[3 * hidden :])
        c = f * c + i * cc
        return o * np.tanh(c), c
    z = _sigmoid(xw[:hidden] + hr[:hidden])
    reset = _sigmoid(xw[hidden : 2 * hidden] + hr[hidden : 2 * hidden])
    return (1 - z) * np.tanh(xw[2 * hidden :] + reset * hr[2 * hidden :]) + z * h, c


def naive_recurrence_with_lengths(op, x, lengths, w, r, b, h0, direction):
    """Sequence by sequence, step by step, as ONNX defines it with sequence_lens: sequence n
    computes steps 0..L_n-1 only, the reverse direction from step L_n-1 starting at initial_h;
    Y is 0 at the steps not computed. `x [B, T, I]`, `h0 [B, dirs, H]` (batch-first).

    Returns (Y `[T, dirs, B, H]`, states, inputs): states[d][n] are the `h_{t-1}` that R of
    direction d multiplies for sequence n, inputs[n] the `x_t` that W multiplies."""
    batch, steps, _ = x.shape
    dirs, hidden = w.shape[0], r.shape[2]
    y = np.zeros((steps, dirs, batch, hidden))
    states = [[[] for _ in range(batch)] for _ in range(dirs)]
    inputs = [[x[n, t].astype(np.float64) for t in range(lengths[n])] for n in range(batch)]
    for d in range(dirs):
        backwards = direction == "reverse" or d == 1
        wb, rb = b[d, : b.shape[1] // 2], b[d, b.shape[1] // 2 :]
        for n in range(batch):
            h, c = h0[n, d].astype(np.float64), np.zeros(hidden)
            order = range(lengths[n] - 1, -1, -1) if backwards else range(lengths[n])
            for t in order:
                states[d][n].append(h.copy())
                h, c = _step(op, x[n, t].astype(np.float64), h, c, w[d], r[d], wb, rb, hidden)
                y[t, d, n] = h
    return y, states, inputs


def _naive(rows, samples, reduction, terms):
    if terms == "signed":
        return naive_dense_sensitivity(rows, samples, reduction)
    return naive_abs_sensitivity(rows, [lambda i, s=s: s for s in samples], reduction)


def _cases():
    for op in ("LSTM", "GRU", "RNN"):
        for direction in ("forward", "reverse", "bidirectional"):
            for reduction in ("max", "mean"):
                yield pytest.param(op, direction, reduction, id=f"{op}-{direction}-{reduction}")


def test_reverse_points_of_short_sequences_are_defined() -> None:
    """The minimal case: one reverse-direction sequence of length 2 in a batch of 4 steps. Its
    points are initial_h (step 1) and Y[1] (step 0); steps 2 and 3 are not computed."""
    from sipp_onnx.layers import RecurrentGeometry

    geom = RecurrentGeometry("RNN", 1, True, 3, 1, 0, True, sequence_lens="lens")
    y = np.zeros((4, 1, 1, 3), np.float32)  # [T, dirs, B, H]
    y[:2, 0, 0] = [[1, 2, 3], [4, 5, 6]]
    h0 = np.array([[[7, 8, 9]]], np.float32)
    from sipp_onnx.recurrent import hidden_state_points

    points, mask = hidden_state_points(y, h0, geom, np.array([2], np.int32))
    np.testing.assert_array_equal(mask, [[True, True, False, False]])
    np.testing.assert_array_equal(points[0, 0].T, [[4, 5, 6], [7, 8, 9], [0, 0, 0], [0, 0, 0]])


def test_mean_reduction_averages_over_the_computed_steps() -> None:
    """W of a forward RNN, one sequence of length 1 in a batch of 2 steps and reduction 'mean':
    its one point is its mean."""
    from sipp_onnx.layers import RecurrentGeometry
    from sipp_onnx.recurrent import SequenceInputAccumulator

    geom = RecurrentGeometry("RNN", 1, False, 1, 1, 0, False, sequence_lens="lens")
    rows = np.array([[1.0, 1.0]], np.float32)
    acc = SequenceInputAccumulator(rows, geom, reduction="mean", terms="absolute")
    feeders = acc.feeders()
    feeders["sequence_lens"].update(np.array([1], np.int32))
    feeders["x"].update(np.array([[[1.0, 3.0]], [[5.0, 5.0]]], np.float32))  # [T, B, I]
    np.testing.assert_allclose(acc.result().sensitivity, [[0.25, 0.75]], rtol=1e-6)


@pytest.mark.parametrize(("op", "direction", "reduction"), list(_cases()))
def test_recurrent_statistics_with_sequence_lengths(op: str, direction: str, reduction: str) -> None:
    """The whole calibration pass (three batches, initial_h and sequence_lens graph inputs, steps
    beyond each length filled with large values) against a naive per-sequence recurrence: R's
    points are the states each step really read (the reverse direction's first one is
    initial_h, not Y's zero padding), W's the inputs of the computed steps; sensitivities,
    Gram matrices, input sums and point counts of both."""
    model, weights = kb.recurrent_model(op, direction, 0, hidden=6, inputs=5, initial_h="input")
    model = kb.with_lengths(model)
    dirs = weights["W"].shape[0]
    data = kb.recurrent_calibration(9, 7, 5, dirs, 6, lens=True, initial_h=True, seed=7)
    lengths = data["lens"]
    assert lengths.min() < 7 and lengths.max() == 7
    (y_ort,) = run(_named_y(model), data, ["Y"])
    y, states, inputs = naive_recurrence_with_lengths(
        op, data["X"], lengths, weights["W"], weights["R"], weights["B"], data["h0"], direction
    )
    np.testing.assert_allclose(y_ort, y, atol=2e-6)  # the naive recurrence is ONNX Runtime's

    for terms in ("absolute", "signed"):
        config = PruneConfig(sparsity=0.5, batch_size=3, reduction=reduction, terms=terms)
        stats = prepare(model, data, config, gram=True).stats
        w_stats, r_stats = stats["rnn/W"], stats["rnn/R"]
        assert w_stats.points == r_stats.points == int(lengths.sum())
        w_rows = weights["W"].reshape(-1, 5)
        np.testing.assert_allclose(
            w_stats.sensitivity, _naive(w_rows, inputs, reduction, terms), rtol=1e-4, atol=1e-6
        )
        every_x = np.concatenate(inputs)
        np.testing.assert_allclose(w_stats.gram[0], every_x.T @ every_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(w_stats.input_sum[0], every_x.sum(axis=0), rtol=1e-5, atol=1e-5)
        per = weights["R"].shape[1]
        for d in range(dirs):
            rows = weights["R"][d]
            samples = [np.array(states[d][n]) for n in range(len(lengths))]
            np.testing.assert_allclose(
                r_stats.sensitivity[d * per : (d + 1) * per],
                _naive(rows, samples, reduction, terms),
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"direction {d}",
            )
            every_h = np.concatenate(samples)
            np.testing.assert_allclose(r_stats.gram[d], every_h.T @ every_h, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(r_stats.input_sum[d], every_h.sum(axis=0), rtol=1e-5, atol=1e-5)


def _named_y(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose recurrent op names its Y output 'Y' and returns it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.name == "rnn")
    node.output[0] = "Y"
    copy.graph.output.append(onnx.ValueInfoProto(name="Y"))
    return copy


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_prune_with_sequence_lengths_and_initial_h(op: str, tmp_path: Path) -> None:
    """The issue's models: a bidirectional LSTM and a GRU with initial_h and sequence lengths
    prune; the pruned model's Y is still 0 beyond every length and its outputs stay close."""
    model, data = kb.recurrent_kind(op, "bidirectional", lens=True, initial_h=True)
    result = prune_model(model, data, PruneConfig(sparsity=0.5, batch_size=16))
    assert abs(result.report.sparsity_achieved - 0.5) <= 0.005
    onnx.checker.check_model(result.model, full_check=True)
    feed = {k: v[:16] for k, v in data.items()}
    (y,) = run(_named_y(result.model), feed, ["Y"])
    beyond = np.arange(y.shape[0])[:, None] >= feed["lens"][None, :]  # [T, B]
    assert not y.transpose(0, 2, 1, 3)[beyond].any()
    assert cosine(run(model, feed)[0], run(result.model, feed)[0]) > 0.9


# ----------------------------------------------------------------------------- Einsum


def test_einsum_sensitivities_against_a_loop_over_points() -> None:
    """Each Einsum's points written out by hand from its equation: `btj,jk`, `kj,btj` (weight
    first, rows), `btd,dhk` (3-D weight), `btHk,Hke` (two contracted axes), `...j,jk`, and
    `bjt,jk` (the contracted axis before the points)."""
    model = kb.einsum_model()
    x = kb.einsum_calibration()["x"][:6]
    names = ["h1", "h2", "h3"]
    h1, h2, h3 = run(with_outputs(model, names), {"x": x}, names)[-3:]
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    batch = range(x.shape[0])
    cases = {  # node -> (rows [N, K], per-sample points [T, K])
        "e1": (p["W1"].T, [x[b] for b in batch]),
        "e2": (p["W2"], [h1[b] for b in batch]),
        "e3": (p["W3"].reshape(20, 12).T, [h2[b] for b in batch]),
        "e6": (p["W6"].reshape(12, 4).T, [h3[b].reshape(3, 12) for b in batch]),
        "e4": (p["W4"].T, [h2[b] for b in batch]),
        "e5": (p["W5"].T, [x[b] for b in batch]),  # xt[b, :, t] is x[b, t]
    }
    for terms in ("absolute", "signed"):
        stats = prepare(model, {"x": x}, PruneConfig(sparsity=0.5, terms=terms), gram=True).stats
        for node, (rows, samples) in cases.items():
            np.testing.assert_allclose(
                stats[node].sensitivity,
                _naive(rows, samples, "max", terms),
                rtol=1e-4,
                atol=1e-6,
                err_msg=node,
            )
            every = np.concatenate(samples)
            np.testing.assert_allclose(
                stats[node].gram[0], every.T @ every, rtol=1e-4, atol=1e-4, err_msg=node
            )
            assert stats[node].points == every.shape[0]


# ----------------------------------------------------------------------------- ConvTranspose


@pytest.mark.parametrize("group", [1, 2])
def test_decoder_conv_transpose_sensitivities_against_a_loop(group: int) -> None:
    """The UNet decoder's ConvTranspose, measured in the whole pass, against the scatter
    definition's patches looped over (tests/test_convtranspose.py)."""
    from sipp_onnx.discover import discover
    from sipp_onnx.layers import WeightLayout, to_rows

    model = kb.unet_decoder(group, width=8)
    x = np.random.default_rng(2).normal(size=(3, 3, 8, 8)).astype(np.float32)
    (m,) = run(with_outputs(model, ["m"]), {"x": x}, ["m"])
    (layer,) = [layer for layer in discover(model).layers if layer.node == "up"]
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "up_w")
    rows = to_rows(w, WeightLayout.CONV_TRANSPOSE, groups=group)
    for terms in ("absolute", "signed"):
        stats = prepare(model, {"x": x}, PruneConfig(sparsity=0.5, terms=terms)).stats
        want = naive_conv_transpose_sensitivity(rows, m, layer.conv, "max", terms)
        np.testing.assert_allclose(stats["up"].sensitivity, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- Conv in If branches


def naive_conv_sens(rows, x, kernel, pads, group, terms):
    """Max over every patch (and sign part, with signed terms) of each row's shares."""
    if terms == "signed":
        return naive_conv_sensitivity(rows, x, kernel, [1, 1], [1, 1], pads, "NOTSET", group, "max")
    per_group = rows.shape[0] // group
    patches = naive_patches(x, kernel, [1, 1], [1, 1], pads, "NOTSET", group)  # [B, G, K, L]
    s = np.zeros(rows.shape)
    for b in range(patches.shape[0]):
        for i in range(rows.shape[0]):
            for col in range(patches.shape[3]):
                s[i] = np.maximum(s[i], naive_g_abs(rows[i], patches[b, i // per_group, :, col]))
    return s


@pytest.mark.parametrize(("sr", "prefix"), [(16000, "t"), (8000, "e")])
@pytest.mark.parametrize("terms", ["absolute", "signed"])
def test_branch_conv_sensitivities_against_a_loop(sr: int, prefix: str, terms: str) -> None:
    """The taken branch's two Convs (3x3 -> 3x3, or 5x5 -> grouped 1x1) against loops over their
    patches; the second conv's input computed by a direct loop Conv + bias + Relu."""
    model = kb.if_convs()
    data = kb.if_calibration(n=3, sr=sr, seed=4)
    x = data["x"]
    p = stored_tensors(model)
    w1, b1, w2 = p[f"{prefix}_w1"], p[f"{prefix}_b1"], p[f"{prefix}_w2"]
    k1, k2 = w1.shape[2], w2.shape[2]
    group2 = 16 // w2.shape[1]
    pads1, pads2 = [k1 // 2] * 4, [k2 // 2] * 4
    conv1 = naive_conv(x, w1, [k1, k1], [1, 1], [1, 1], pads1, "NOTSET", 1)
    r1 = np.maximum(conv1 + b1[None, :, None, None], 0)
    stats = prepare(model, data, PruneConfig(sparsity=0.5, terms=terms)).stats
    assert f"{prefix}_conv1" in stats and f"{'e' if prefix == 't' else 't'}_conv1" not in stats
    np.testing.assert_allclose(
        stats[f"{prefix}_conv1"].sensitivity,
        naive_conv_sens(w1.reshape(16, -1), x, [k1, k1], pads1, 1, terms),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        stats[f"{prefix}_conv2"].sensitivity,
        naive_conv_sens(w2.reshape(16, -1), r1, [k2, k2], pads2, group2, terms),
        rtol=1e-4,
        atol=1e-5,
    )


# ----------------------------------------------------------------------------- quantized operators


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if name in n.output)


def _dequantized_layer_inputs(model: onnx.ModelProto, x: np.ndarray, op: str):
    """(node, float weight rows [N, K], dequantized input) of every `op` node, read from the
    integer tensors ONNX Runtime computes and the stored integers, scales and zero points."""
    p = stored_tensors(model)
    nodes = [n for n in model.graph.node if n.op_type == op]
    if op in ("ConvInteger", "MatMulInteger"):
        # x_q, x_scale, x_zero_point: the outputs of the DynamicQuantizeLinear feeding the op
        names = [o for n in nodes for o in _producer(model, n.input[0]).output]
    else:
        names = [n.input[0] for n in nodes]
    got = dict(zip(names, run(with_outputs(model, names), {"input": x}, names)[-len(names) :], strict=True))
    out = []
    for node in nodes:
        if op in ("ConvInteger", "MatMulInteger"):
            xq_name, xs_name, xz_name = _producer(model, node.input[0]).output
            xq, xs, xz = got[xq_name], got[xs_name], got[xz_name]
            wq, wz = p[node.input[1]], p[node.input[3]]
            # the weight scale: the Mul of x_scale with an initializer, after the op
            mul = next(n for n in model.graph.node if n.op_type == "Mul" and xs_name in n.input)
            ws = p[next(i for i in mul.input if i != xs_name)]
        else:
            xq, xs, xz = got[node.input[0]], p[node.input[1]], p[node.input[2]]
            wq, ws, wz = p[node.input[3]], p[node.input[4]], p[node.input[5]]
        a = (xq.astype(np.float64) - xz.astype(np.float64)) * xs.astype(np.float64)
        w = (wq.astype(np.float64) - wz.astype(np.float64)) * ws.astype(np.float64)
        if op in ("MatMulInteger", "QLinearMatMul"):
            rows = w.T
        elif op == "QGemm":
            trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
            rows = w if trans_b else w.T
        else:
            rows = w.reshape(w.shape[0], -1)
        out.append((node, rows, a))
    return out


@pytest.mark.parametrize(
    ("kind", "conv_op", "dense_op"),
    [("dynamic", "ConvInteger", "MatMulInteger"), ("static", "QLinearConv", "QGemm")],
)
@pytest.mark.parametrize("terms", ["absolute", "signed"])
def test_quantized_sensitivities_against_a_loop(kind: str, conv_op: str, dense_op: str, terms: str) -> None:
    """The shipped CNN quantized: its first conv (1 -> 16, 3x3) and its two dense layers,
    against loops over the dequantized input ((q - zero point) * scale) and weight."""
    model = kb.quantized_shipped(kind)
    x = kb.cnn_data("calib")[:4]
    stats = prepare(model, {"input": x}, PruneConfig(sparsity=0.5, batch_size=4, terms=terms)).stats
    (node, rows, a), *_ = _dequantized_layer_inputs(model, x, conv_op)
    np.testing.assert_allclose(
        stats[node.name].sensitivity,
        naive_conv_sens(rows, a, [3, 3], [1, 1, 1, 1], 1, terms),
        rtol=1e-4,
        atol=1e-5,
    )
    dense = _dequantized_layer_inputs(model, x, dense_op)
    assert len(dense) == 2
    for node, rows, a in dense:
        want = _naive(rows, [a[b : b + 1] for b in range(len(a))], "max", terms)
        np.testing.assert_allclose(
            stats[node.name].sensitivity, want, rtol=1e-4, atol=1e-5, err_msg=node.name
        )


def test_dynamic_quantize_lstm_statistics_against_a_loop() -> None:
    """com.microsoft DynamicQuantizeLSTM with initial_h and sequence lengths: W's points are the
    computed steps of X, R's the states the int8 op itself produced (its Y, step by step per
    sequence, the reverse direction from its own last step starting at initial_h)."""
    model, data = kb.dynamic_lstm(lens=True, initial_h=True)
    data = {k: v[:6] for k, v in data.items()}
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    p = stored_tensors(model)
    dq = {}
    for name, scale, zero in (
        (node.input[1], node.input[8], node.input[9]),
        (node.input[2], node.input[10], node.input[11]),
    ):
        q = p[name].astype(np.float64)  # [dirs, K, 4H]
        dq[name] = ((q - p[zero][:, None, None]) * p[scale][:, None, None]).transpose(0, 2, 1)
    named = onnx.ModelProto()
    named.CopyFrom(model)
    op = next(n for n in named.graph.node if n.op_type == "DynamicQuantizeLSTM")
    op.output[0] = "Y"
    named.graph.output.append(onnx.ValueInfoProto(name="Y"))
    (y,) = run(named, data, ["Y"])  # [T, 2, B, H]
    lengths = data["lens"]
    states = [[], []]
    for d in range(2):
        for n, length in enumerate(lengths):
            seen, h = [], data["h0"][n, d].astype(np.float64)
            for t in range(length - 1, -1, -1) if d == 1 else range(length):
                seen.append(h)
                h = y[t, d, n].astype(np.float64)
            states[d].append(np.array(seen))
    inputs = [data["X"][n, :length].astype(np.float64) for n, length in enumerate(lengths)]
    # one batch: the op quantizes X and h with each batch's own range, so Y depends on the batch
    stats = prepare(model, data, PruneConfig(sparsity=0.5, batch_size=6), gram=True).stats
    w_node, r_node = f"{node.name}/W", f"{node.name}/R"
    np.testing.assert_allclose(
        stats[w_node].sensitivity,
        _naive(dq[node.input[1]].reshape(-1, 12), inputs, "max", "absolute"),
        rtol=1e-4,
        atol=1e-6,
    )
    rows_r = dq[node.input[2]]
    for d in range(2):
        np.testing.assert_allclose(
            stats[r_node].sensitivity[d * 64 : (d + 1) * 64],
            _naive(rows_r[d], states[d], "max", "absolute"),
            rtol=1e-4,
            atol=1e-6,
        )
        every_h = np.concatenate(states[d])
        np.testing.assert_allclose(stats[r_node].gram[d], every_h.T @ every_h, rtol=1e-5, atol=1e-5)
    assert stats[w_node].points == stats[r_node].points == int(lengths.sum())
