"""The output-influence allocation (influence.py): the logits it reads, the probe's fed tensors
against models rewritten by hand, the gains' interpolation, and the split they make."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import finish, gaussian_calibration, mlp, save, tensor, value
from onnx import TensorProto, helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.budgets import ErrorCurve, kept_counts
from sipp_onnx.config import Allocation
from sipp_onnx.influence import (
    FLOOR,
    OutputProbe,
    Readout,
    fill_gains,
    interpolated_gain,
    logit_names,
    needs_measuring,
    output_divergence,
    readouts,
    scaled,
    weigh_curves,
)


def _squashed(kind: str) -> onnx.ModelProto:
    """x -> MatMul(W) -> [squash] -> y, with the squash written as `kind`."""
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.normal(size=(6, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"])]
    if kind == "softmax":
        nodes += [
            helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
            helper.make_node("Identity", ["p"], ["y"]),
        ]
    elif kind == "sigmoid":
        nodes += [helper.make_node("Sigmoid", ["logits"], ["y"])]
    elif kind == "exp-div":
        nodes += [
            helper.make_node("Exp", ["logits"], ["e"]),
            helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
            helper.make_node("Div", ["e", "s"], ["y"]),
        ]
        inits.append(tensor("axes", np.array([-1]), np.int64))
    elif kind == "argmax":
        nodes += [
            helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
            helper.make_node("ArgMax", ["p"], ["y"], axis=-1, keepdims=0),
        ]
        return finish(nodes, [value("x", ["b", 6])], [value("y", ["b"], TensorProto.INT64)], inits)
    else:
        nodes += [helper.make_node("Relu", ["logits"], ["y"])]
    return finish(nodes, [value("x", ["b", 6])], [value("y", ["b", 4])], inits)


@pytest.mark.parametrize(
    "kind, want",
    [
        ("softmax", "logits"),
        ("sigmoid", "logits"),
        ("exp-div", "logits"),
        ("argmax", "logits"),
        ("relu", "y"),
    ],
)
def test_logit_names_read_before_the_squash(kind, want):
    assert logit_names(_squashed(kind).graph) == [want]


def test_readouts_say_how_to_compare():
    assert readouts(_squashed("softmax").graph) == [Readout("logits", "softmax", -1)]
    assert readouts(_squashed("sigmoid").graph) == [Readout("logits", "sigmoid", -1)]
    assert readouts(_squashed("relu").graph) == [Readout("y")]


def test_plain_divergence_is_the_relative_squared_error():
    rng = np.random.default_rng(1)
    want = [[rng.normal(size=(3, 5)), rng.normal(size=4), np.arange(3)] for _ in range(2)]
    got = [[w[0] + 0.1 * rng.normal(size=(3, 5)), w[1] * 1.5, w[2] + 1] for w in want]
    per_tensor = []
    for t in range(2):  # the int tensor is skipped
        num = sum(((g[t] - w[t]) ** 2).sum() for g, w in zip(got, want, strict=True))
        den = sum((w[t] ** 2).sum() for w in want)
        per_tensor.append(num / den)
    plain = [Readout("a"), Readout("b"), Readout("c")]
    assert output_divergence(plain, got, want) == pytest.approx(np.mean(per_tensor))


def test_softmax_and_sigmoid_divergences_are_kl_loops():
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    kl = 0.0
    for i in range(4):
        a, b = np.exp(p[i]) / np.exp(p[i]).sum(), np.exp(q[i]) / np.exp(q[i]).sum()
        kl += sum(a[j] * np.log(a[j] / b[j]) for j in range(6))
    assert output_divergence([Readout("x", "softmax", -1)], [[q]], [[p]]) == pytest.approx(kl / 4)
    bkl = 0.0
    for x, y in zip(p.ravel(), q.ravel(), strict=True):
        a, b = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(-y))
        bkl += a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
    assert output_divergence([Readout("x", "sigmoid")], [[q]], [[p]]) == pytest.approx(bkl / p.size)
    assert output_divergence([Readout("x", "softmax", -1)], [[p]], [[p]]) == pytest.approx(0.0, abs=1e-12)


def _rewritten_error(model: onnx.ModelProto, tensors: dict[str, np.ndarray], feed, outputs) -> float:
    """The slow way: a copy of the model with the tensors written in, its own session."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name in tensors:
            init.CopyFrom(onnx.numpy_helper.from_array(tensors[init.name].astype(np.float32), init.name))
    for name in outputs:
        if name not in {o.name for o in copy.graph.output}:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    runs = []
    for m in (model, copy):
        mm = onnx.ModelProto()
        mm.CopyFrom(m)
        for name in outputs:
            if name not in {o.name for o in mm.graph.output}:
                mm.graph.output.append(helper.make_empty_tensor_value_info(name))
        session = ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"])
        runs.append(session.run(outputs, feed))
    return output_divergence([Readout(n) for n in outputs], [runs[1]], [runs[0]])


def test_probe_feeds_equal_a_rewritten_model():
    model = mlp()
    x = gaussian_calibration((20,), n=16)
    probe = OutputProbe(model, {"W2", "b2", "W3"}, [{"x": x[:8]}, {"x": x[8:]}])
    assert probe.feedable == {"W2", "b2", "W3"}
    assert probe.error({}) == 0.0
    rng = np.random.default_rng(2)
    w2 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W2"))
    changed = {"W2": w2 * (rng.random(w2.shape) > 0.5), "b2": rng.normal(size=16)}
    want = _rewritten_error(model, changed, {"x": x}, probe.outputs)
    assert probe.error(changed) == pytest.approx(want, rel=1e-5)
    assert want > 0


def test_probe_reads_logits_and_exposes_constant_weights():
    model = _squashed("softmax")
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    del model.graph.initializer[:]
    model.graph.node.insert(
        0, helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w, "W"))
    )
    x = gaussian_calibration((6,), n=8)
    probe = OutputProbe(model, {"W"}, [{"x": x}])
    assert probe.outputs == ["logits"] and probe.feedable == {"W"}
    half = w * 0.5
    logits = x @ w
    want = output_divergence([Readout("logits", "softmax", -1)], [[logits * 0.5]], [[logits]])
    assert probe.error({"W": half}) == pytest.approx(want, rel=1e-5)
    assert want > 0


def test_interpolated_gain_is_log_linear_and_flat_outside():
    measured = {10: 1.0, 30: 100.0}
    got = interpolated_gain(measured, np.array([0, 10, 20, 30, 50]))
    assert got == pytest.approx([1.0, 1.0, 10.0, 100.0, 100.0])


def test_needs_measuring_and_fill_gains():
    assert not needs_measuring({}, 0, 100)
    assert needs_measuring({}, 5, 100)
    assert not needs_measuring({50: 1.0}, 55, 100) and needs_measuring({50: 1.0}, 65, 100)
    # 90 % sparsity: 604 -> 205 kept moves 5 % of the layer but cuts 3x deeper
    assert needs_measuring({7588: 1.0}, 7987, 8192)
    assert not needs_measuring({7588: 1.0}, 7600, 8192)
    filled = fill_gains([{10: 4.0}, {}, {5: 1.0, 9: 1e-9}])
    median = float(np.exp(np.median(np.log([4.0, 1.0, 1e-9]))))
    assert filled[1] == {0: pytest.approx(median)}
    assert filled[2][9] == pytest.approx(FLOOR * median)
    assert filled[0] == {10: 4.0}


def test_scaled_curve_passes_through_the_measurement():
    curve = ErrorCurve(np.array([0, 50, 100]), np.array([0.0, 0.1, 0.4]))
    alt = ErrorCurve(curve.pruned, np.array([0.0, 0.2, 0.3]))
    out = scaled(ErrorCurve(curve.pruned, curve.error, alt), {50: 3.0})
    assert out.error == pytest.approx([0.0, 0.3, 1.2])
    assert out.alternative is not None and out.alternative.error == pytest.approx([0.0, 0.6, 0.9])


class _FakeProbe:
    """Output error = gain * the layer's own error at the count fed (a linear model)."""

    def __init__(self, curves, gains):
        self.curves, self.gains, self.runs, self.calls = curves, gains, 0, []

    def error(self, fed):
        self.runs += 1
        total = 0.0
        for i, kept in fed.items():  # errors add: a fed tensor per weight
            self.calls.append(i)
            c = self.curves[i]
            total += self.gains[i] * float(np.interp(100 - kept, c.pruned, c.error))
        return total


def test_weigh_curves_spares_the_layer_the_output_feels():
    """Two layers with the same own error curve; the outputs feel the second 100x more. The
    plain split cuts both alike; the weighted split moves the cut to the first."""
    pruned = np.arange(0, 101, 10)
    curves = [ErrorCurve(pruned, (pruned / 100.0) ** 2) for _ in range(2)]
    plain = kept_counts(curves, [100, 100], 100)
    assert plain == [50, 50]
    probe = _FakeProbe(curves, [1.0, 100.0])
    found = weigh_curves(curves, [100, 100], 100, [True, True], lambda i, k: {i: k}, probe)
    weighted = kept_counts(found.curves, [100, 100], 100)
    assert weighted[0] < 20 and weighted[1] > 80
    assert sum(weighted) == 100
    assert found.gains[0] and found.gains[1]
    assert all(g == pytest.approx(1.0) for g in found.gains[0].values())
    assert all(g == pytest.approx(100.0) for g in found.gains[1].values())
    assert found.rounds >= 2 and found.runs == probe.runs
    # both splits measured whole; the weighted one has the lower output error and is kept
    assert found.chosen == "weighted" and found.joint["weighted"] < found.joint["plain"]


def test_weigh_curves_keeps_the_plain_split_where_the_whole_says_so():
    """Gains measured alone say the second layer matters more; the whole model (errors that do
    not add: a deep cut of the first layer breaks it together with the second's) says the plain
    split is better: it is kept."""
    pruned = np.arange(0, 101, 10)
    curves = [ErrorCurve(pruned, (pruned / 100.0) ** 2) for _ in range(2)]

    class Interacting(_FakeProbe):
        def error(self, fed):
            if len(fed) == 1:
                return super().error(fed)
            self.runs += 1
            return 0.0 if fed[0] >= 40 else 1.0

    probe = Interacting(curves, [1.0, 100.0])
    found = weigh_curves(curves, [100, 100], 100, [True, True], lambda i, k: {i: k}, probe)
    assert found.chosen == "plain"
    assert kept_counts(found.curves, [100, 100], 100) == [50, 50]


def test_weigh_curves_gives_unmeasurable_weights_the_median():
    pruned = np.arange(0, 101, 10)
    curves = [ErrorCurve(pruned, (pruned / 100.0) ** 2) for _ in range(3)]
    probe = _FakeProbe(curves, [1.0, 9.0, 1.0])
    found = weigh_curves(
        curves, [100] * 3, 150, [True, True, False], lambda i, k: {i: k} if i < 2 else {}, probe
    )
    assert 2 not in probe.calls and not found.gains[2]
    # the third counts with the median gain (3): between the other two
    kept = kept_counts(found.curves, [100] * 3, 150)
    assert kept[0] < kept[2] < kept[1]


def test_prune_with_the_output_allocation(tmp_path: Path):
    model = save(mlp(), tmp_path / "m.onnx")
    x = gaussian_calibration((20,), n=64)
    stages = []
    result = prune_model(
        model,
        {"x": x},
        PruneConfig(sparsity=0.6, allocation=Allocation.OUTPUT),
        progress=lambda stage, done, total: stages.append((stage, done, total)),
    )
    report = result.report
    assert report.allocation == "output"
    assert ("influence round 1", 3, 3) in stages  # three weights measured, progress after each
    assert "influence" in report.timings
    kept = sum(layer.kept for layer in report.layers)
    total = sum(layer.params for layer in report.layers)
    assert kept == pytest.approx(0.4 * total, abs=2)
    onnx.checker.check_model(result.model, full_check=True)
    gains = [layer.influence for layer in report.layers]
    assert all(g is not None and g > 0 for g in gains)
    assert "influence" in report.format_table().splitlines()[0]


def test_measurements_shrink_to_the_time_budget(tmp_path: Path, monkeypatch, caplog):
    """A probe slower than its budget measures on fewer samples (at least one), and still prunes."""
    import logging

    from sipp_onnx import influence

    monkeypatch.setattr(influence, "BUDGET", 0.0)
    monkeypatch.setattr(influence, "BUDGET_FLOOR_S", 0.0)
    model = save(mlp(), tmp_path / "m.onnx")
    x = gaussian_calibration((20,), n=64)
    with caplog.at_level(logging.INFO, logger="sipp_onnx.pipeline"):
        result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.6, allocation=Allocation.OUTPUT))
    assert "1 samples per measurement, not 16" in caplog.text
    assert "model runs on 1 samples" in caplog.text
    assert result.report.allocation == "output"


def test_whole_model_checks_reuse_the_measured_prunes():
    """The plain split's counts are the first round's: with a cache, no weight is pruned twice
    at one count (each prune is a refit)."""
    pruned = np.arange(0, 101, 10)
    curves = [ErrorCurve(pruned, (pruned / 100.0) ** 2) for _ in range(2)]
    asked: list[tuple[int, int]] = []

    def prune_alone(i, k):
        asked.append((i, k))
        return {i: np.int64(k)}

    probe = _FakeProbe(curves, [1.0, 100.0])
    weigh_curves(curves, [100, 100], 100, [True, True], prune_alone, probe, cache_bytes=10**6)
    assert len(asked) == len(set(asked))
    uncached: list[tuple[int, int]] = []
    weigh_curves(
        curves,
        [100, 100],
        100,
        [True, True],
        lambda i, k: uncached.append((i, k)) or {i: k},
        _FakeProbe(curves, [1.0, 100.0]),
    )
    assert len(uncached) > len(asked)
