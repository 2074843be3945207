"""Calibration inputs without a leading batch axis (issue 17): a recurrent state `[2, N, 4]` whose
samples are on axis 1 and a rank-0 sample rate fed whole with every batch, as silero-vad's
`input [N, 512]`, `state [2, N, 128]`, `sr []`.

The batch axes are inferred from the declared input shapes or given (`batch_axes`,
`--batch-axis NAME=AXIS|none`); batches, sample counts, the streamed and joined files, the
prune / structured / eval / sweep paths and the latency and probe feeds all follow them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from sipp_onnx import (
    CalibrationError,
    ConfigError,
    PruneConfig,
    StructuredConfig,
    prune_model,
    prune_structured,
)
from sipp_onnx.calibration import count_samples, open_calibration, repeat_samples, take_samples
from sipp_onnx.cli import main
from sipp_onnx.evaluate import evaluate
from sipp_onnx.modelio import model_inputs
from sipp_onnx.sweep import Variant, sweep

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]

WIDTH, HIDDEN, LAYERS, STATE = 16, 32, 2, 4


def silero_like(batch: str | None = "batch", fixed: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """input [N, 16], state [2, N, 4], sr int64 [] -> output [N, 4], stateN [2, N, 4].

    The state is brought to [N, 8] by Transpose + Reshape, the input scaled by sr / 16000
    (Cast + Mul), both concatenated into a Gemm -> Relu -> two MatMuls (the output and the new
    state, which goes back to [2, N, 4]). `batch`: the batch dim's name (None: unknown, as the
    real silero_vad.onnx declares it); `fixed`: a fixed batch size instead.
    """
    rng = np.random.default_rng(seed)
    n = fixed if fixed is not None else batch
    k = WIDTH + LAYERS * STATE
    inits = [
        builders.tensor("W1", rng.normal(size=(HIDDEN, k)).astype(np.float32) / np.sqrt(k)),
        builders.tensor("b1", rng.normal(size=HIDDEN).astype(np.float32) * 0.1),
        builders.tensor("W2", rng.normal(size=(HIDDEN, 4)).astype(np.float32) / np.sqrt(HIDDEN)),
        builders.tensor("W3", rng.normal(size=(HIDDEN, LAYERS * STATE)).astype(np.float32) / np.sqrt(HIDDEN)),
        builders.tensor("flat", np.array([-1, LAYERS * STATE]), np.int64),
        builders.tensor("split", np.array([-1, LAYERS, STATE]), np.int64),
        builders.tensor("per_hz", np.array(1 / 16000, np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["state"], ["state_t"], name="state_t", perm=[1, 0, 2]),
        helper.make_node("Reshape", ["state_t", "flat"], ["state_flat"], name="state_flat"),
        helper.make_node("Cast", ["sr"], ["sr_f"], name="sr_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sr_f", "per_hz"], ["scale"], name="sr_scale"),
        helper.make_node("Mul", ["input", "scale"], ["scaled"], name="scaled"),
        helper.make_node("Concat", ["scaled", "state_flat"], ["joined"], name="join", axis=1),
        helper.make_node("Gemm", ["joined", "W1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["output"], name="head"),
        helper.make_node("MatMul", ["r", "W3"], ["new_flat"], name="state_head"),
        helper.make_node("Reshape", ["new_flat", "split"], ["new_t"], name="state_split"),
        helper.make_node("Transpose", ["new_t"], ["stateN"], name="state_back", perm=[1, 0, 2]),
    ]
    inputs = [
        builders.value("input", [n, WIDTH]),
        builders.value("state", [LAYERS, n, STATE]),
        builders.value("sr", [], TensorProto.INT64),
    ]
    outputs = [builders.value("output", [n, 4]), builders.value("stateN", [LAYERS, n, STATE])]
    return builders.finish(nodes, inputs, outputs, inits)


def silero_data(n: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input": rng.normal(size=(n, WIDTH)).astype(np.float32),
        "state": rng.normal(size=(LAYERS, n, STATE)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


SPECS = model_inputs(silero_like())


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("batch", ["batch", None], ids=["named", "unknown"])
def test_axes_inferred_from_the_declared_shapes(batch: str | None, caplog) -> None:
    """state [2, batch, 4] -> axis 1 (named like input's axis 0, or its only open axis); the
    rank-0 sr given as a scalar -> a constant; the log says so, one line each."""
    with caplog.at_level(logging.INFO, logger="sipp_onnx"):
        calib = open_calibration(silero_data(12), model_inputs(silero_like(batch)))
    assert calib.axes == {"input": 0, "state": 1, "sr": None}
    assert calib.layout == {"state": 1, "sr": None}
    assert calib.samples == calib.available == 12 and calib.fixed_batch is None
    lines = [r.getMessage() for r in caplog.records]
    assert "calibration input 'state': samples on axis 1" in lines
    assert "calibration input 'sr': constant, fed whole with every batch" in lines


def test_batches_slice_each_input_along_its_axis() -> None:
    data = silero_data(12)
    calib = open_calibration(data, SPECS)
    batches = list(calib.batches(5))
    assert [b["input"].shape for b in batches] == [(5, WIDTH), (5, WIDTH), (2, WIDTH)]
    assert [b["state"].shape for b in batches] == [(2, 5, STATE), (2, 5, STATE), (2, 2, STATE)]
    assert all(b["sr"].shape == () and b["sr"] == 16000 for b in batches)
    assert [calib.count(b) for b in batches] == [5, 5, 2] and calib.n_batches(5) == 3
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1), data["state"])
    # every batch runs, and gives the samples' own outputs
    whole = run(silero_like(), data)
    got = [run(silero_like(), b) for b in batches]
    np.testing.assert_allclose(np.concatenate([g["stateN"] for g in got], axis=1), whole["stateN"], atol=1e-6)


def test_files_directory_and_max_samples(tmp_path: Path) -> None:
    """A file with a constant or an axis-1 input is loaded whole (not streamed); a directory of
    such files is joined along the batch axes; --max-samples counts on them."""
    a, b = silero_data(5, seed=1), silero_data(7, seed=2)
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "1.npz", **a)
    np.savez(folder / "2.npz", **b)
    calib = open_calibration(folder, SPECS, max_samples=9)
    assert calib.samples == 9 and calib.available == 12
    assert all(chunk.stream is None for chunk in calib.chunks)
    batches = list(calib.batches(4))
    assert [calib.count(x) for x in batches] == [4, 1, 4]  # per file, the last file capped
    state = np.concatenate([x["state"] for x in batches], axis=1)
    np.testing.assert_array_equal(state, np.concatenate([a["state"], b["state"]], axis=1)[:, :9])


def test_fixed_batch_joins_files_along_axis_1(tmp_path: Path) -> None:
    """A model that fixes its batch to 3 (input [3, 16], state [2, 3, 4]): nothing in the
    declared shapes says which axis of state is the batch, so it is given; 7 + 4 samples give
    three batches of 3 joined across the files along each input's own axis."""
    specs = model_inputs(silero_like(fixed=3))
    a, b = silero_data(7, seed=1), silero_data(4, seed=2)
    np.savez(tmp_path / "a.npz", **a)
    np.savez(tmp_path / "b.npz", **b)
    with pytest.raises(CalibrationError, match=r"input 'state'.*axis 1 must be 3"):
        open_calibration(tmp_path, specs)
    calib = open_calibration(tmp_path, specs, batch_axes={"state": 1})
    assert calib.fixed_batch == 3 and calib.axes == {"input": 0, "state": 1, "sr": None}
    batches = list(calib.batches(32))
    assert [x["state"].shape for x in batches] == [(2, 3, STATE)] * 3
    assert [x["input"].shape for x in batches] == [(3, WIDTH)] * 3
    state = np.concatenate([a["state"], b["state"]], axis=1)[:, :9]
    np.testing.assert_array_equal(np.concatenate([x["state"] for x in batches], axis=1), state)
    assert any("last 2 sample" in w for w in calib.warnings)


def test_a_fully_fixed_model_keeps_its_inputs_batched() -> None:
    """Fully fixed shapes given exactly once are one batch, not constants, when no other input
    would carry the samples (a fixed-batch image model [1, 3, 4, 4] with one image)."""
    proto = builders.single_gemm()
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    calib = open_calibration({"x": np.ones((1, 16), np.float32)}, model_inputs(proto))
    assert calib.axes == {"x": 0} and calib.samples == 1 and calib.fixed_batch == 1


def test_only_open_axis_needs_a_dynamic_batch_elsewhere() -> None:
    """A single input [1, 3, W] (fixed batch 1, dynamic width) stays batched on axis 0: the only
    open axis is taken for the batch only when another input has a dynamic batch."""
    node = helper.make_node("ReduceSum", ["x"], ["y"], name="sum", keepdims=0)
    proto = builders.finish([node], [builders.value("x", [1, 3, "width"])], [builders.value("y", [])], [])
    calib = open_calibration({"x": np.ones((4, 3, 9), np.float32)}, model_inputs(proto))
    assert calib.axes == {"x": 0} and calib.samples == 4


# ----------------------------------------------------------------------------- overrides, errors


def test_override_and_its_errors() -> None:
    data = silero_data(6)
    data["state"] = np.ascontiguousarray(data["state"].transpose(1, 0, 2))  # [N, 2, 4]: wrong layout
    with pytest.raises(CalibrationError, match=r"input 'state'.*axis 0 must be 2"):
        open_calibration(data, SPECS)
    good = silero_data(6)
    assert open_calibration(good, SPECS, batch_axes={"state": -2}).axes["state"] == 1
    with pytest.raises(ConfigError, match=r"'nope': not a model input \(inputs: input, state, sr\)"):
        open_calibration(good, SPECS, batch_axes={"nope": 0})
    with pytest.raises(ConfigError, match=r"batch axis 3 for 'state' is out of range.*rank 3"):
        open_calibration(good, SPECS, batch_axes={"state": 3})
    with pytest.raises(CalibrationError, match=r"different sample counts \{'input': 6, 'state': 2\}"):
        open_calibration(good, SPECS, batch_axes={"state": 0})
    with pytest.raises(CalibrationError, match="no calibration input carries samples"):
        open_calibration(good, SPECS, batch_axes={"input": None, "state": None})
    const = open_calibration(
        {"input": good["input"], "state": good["state"][:, :1], "sr": good["sr"]},
        SPECS,
        batch_axes={"state": None},
    )
    assert const.layout == {"state": None, "sr": None}
    assert all(b["state"].shape == (2, 1, STATE) for b in const.batches(4))


def test_nan_is_placed_in_its_sample_on_the_batch_axis() -> None:
    data = silero_data(6)
    data["state"][1, 4, 2] = np.nan
    with pytest.raises(CalibrationError, match=r"input 'state' has 1 NaN/inf values \(first in sample 4\)"):
        open_calibration(data, SPECS)


@pytest.mark.parametrize(
    "value, match",
    [
        (["state"], "must be NAME=AXIS or NAME=none"),
        (["state=x"], "must be NAME=AXIS"),
        (["state=1", "state=0"], "given twice"),
        ({"state": 1.5}, "must be an integer or None"),
    ],
)
def test_config_parses_and_checks_overrides(value, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PruneConfig(batch_axes=value)


def test_config_forms() -> None:
    want = (("state", 1), ("sr", None))
    assert PruneConfig(batch_axes=["state=1", "sr=none"]).batch_axes == want
    assert PruneConfig(batch_axes={"state": 1, "sr": None}).batch_axes == want
    assert StructuredConfig(batch_axes=[("state", 1), ("sr", None)]).batch_axes == want


# ----------------------------------------------------------------------------- feed helpers


def test_take_count_repeat() -> None:
    axes = {"input": 0, "state": 1, "sr": None}
    feed = silero_data(3)
    part = take_samples(feed, axes, 1, 3)
    assert part["state"].shape == (2, 2, STATE) and part["state"].flags.c_contiguous
    assert part["sr"] is feed["sr"] and count_samples(part, axes) == 2
    more = repeat_samples(feed, axes, 7)
    assert more["input"].shape == (7, WIDTH) and more["state"].shape == (2, 7, STATE)
    np.testing.assert_array_equal(more["state"][:, 3:6], feed["state"])
    assert more["sr"].shape == ()


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("batch", ["batch", None], ids=["named", "unknown"])
def test_prune_model_end_to_end(batch: str | None, tmp_path: Path) -> None:
    """prune_model on the silero-like model: every sample counted once, the layout reported,
    and the pruned model's outputs close to the dense model's on the calibration data."""
    model = silero_like(batch)
    data = silero_data(48)
    np.savez(tmp_path / "c.npz", **data)
    result = prune_model(model, tmp_path / "c.npz", PruneConfig(sparsity=0.3, batch_size=10))
    report = result.report
    assert report.samples == 48 and report.samples_available == 48
    assert report.batch_axes == {"state": 1, "sr": None}
    assert report.to_dict()["batch_axes"] == {"state": 1, "sr": None}
    assert 0.25 < report.sparsity_achieved < 0.35
    dense, pruned = run(model, data), run(result.model, data)
    for name in ("output", "stateN"):
        err = np.linalg.norm(pruned[name] - dense[name]) / np.linalg.norm(dense[name])
        assert err < 0.2, (name, err)
    assert {c.output for c in report.verification} == {"output", "stateN"}


def test_capture_counts_samples_on_the_batch_axis(monkeypatch) -> None:
    """Every batch ONNX Runtime receives has the batch's samples on each input's own axis."""
    import sipp_onnx.capture as capture_module

    seen: list[dict[str, tuple[int, ...]]] = []
    real = capture_module._session

    def spy(*args, **kwargs):
        session, used = real(*args, **kwargs)

        class Spy:
            def run(self, names, feed):
                seen.append({k: v.shape for k, v in feed.items()})
                return session.run(names, feed)

        return Spy(), used

    monkeypatch.setattr(capture_module, "_session", spy)
    result = prune_model(silero_like(), silero_data(23), PruneConfig(sparsity=0.3, batch_size=10))
    assert result.report.samples == 23
    assert seen == [{"input": (n, WIDTH), "state": (2, n, STATE), "sr": ()} for n in (10, 10, 3)]


def test_structured_prune_with_probe_and_latency(tmp_path: Path) -> None:
    """The structured path: the probe slices the first batch along the batch axes (and runs the
    dense model for its reference), the latency feeds repeat samples along them."""
    path = builders.save(silero_like(), tmp_path / "m.onnx")
    data = silero_data(32)
    config = StructuredConfig(sparsity=0.25, channel_multiple=4, batch_size=8, latency=True, latency_runs=2)
    result = prune_structured(path, data, config)
    report = result.report
    assert report.samples == 32 and report.batch_axes == {"state": 1, "sr": None}
    assert report.macs_after < report.macs_before
    assert [lat.batch for lat in report.latency_after] == [1, 8]
    dense, pruned = run(silero_like(), data), run(result.model, data)
    err = np.linalg.norm(pruned["output"] - dense["output"]) / np.linalg.norm(dense["output"])
    assert err < 0.5


def test_evaluate_counts_samples_on_the_inputs_axes() -> None:
    """eval: samples counted on the inputs' batch axes; an output with its samples on axis 1
    (stateN) is scored per sample along that axis; labels per sample."""
    model = silero_like()
    data = silero_data(20)
    labels = np.argmax(run(model, data)["output"], axis=1)
    report = evaluate(model, {**data, "labels": labels}, compare=model, batch_size=6)
    assert report.model.samples == 20 and report.model.accuracy == 1.0
    assert report.compare is not None and report.compare.rel_l2_error == 0.0
    state = evaluate(model, data, compare=model, output="stateN", batch_size=6)
    assert state.model.samples == 20 and state.compare is not None
    assert state.compare.cosine == pytest.approx(1.0) and state.compare.top1_agreement is None


def test_sweep_runs_on_the_silero_like_model() -> None:
    model = silero_like()
    result = sweep(
        model,
        silero_data(40, seed=1),
        silero_data(16, seed=2),
        [Variant.parse("sipp-det", "obs"), Variant.parse("magnitude", "none")],
        [0.3],
        PruneConfig(batch_size=8),
    )
    assert result.settings["samples"] == 40 and result.settings["evaluation_samples"] == 16
    assert all(0.5 < p.metric <= 1.0 for p in result.points)


# ----------------------------------------------------------------------------- CLI


def test_cli_prune_and_eval(tmp_path: Path) -> None:
    model = builders.save(silero_like(None), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **silero_data(24))
    out = tmp_path / "p.onnx"
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["prune", str(model), str(tmp_path / "c.npz"), "-o", str(out), "--sparsity", "0.3",
         "--batch-size", "10", "--batch-axis", "state=1", "--batch-axis", "sr=none"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "24 calibration samples" in res.output
    assert "calibration input 'state': samples on axis 1" in res.output
    assert "calibration input 'sr': constant, fed whole with every batch" in res.output
    res = runner.invoke(main, ["eval", str(model), str(tmp_path / "c.npz"), "--compare", str(out)])
    assert res.exit_code == 0, res.output
    assert "samples: 24" in res.output


@pytest.mark.parametrize(
    "option, match",
    [
        ("nope=1", "'nope': not a model input"),
        ("state=5", "batch axis 5 for 'state' is out of range"),
        ("state", "must be NAME=AXIS or NAME=none"),
        ("state=one", "must be NAME=AXIS"),
        ("state=0", "different sample counts"),
    ],
)
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_cli_bad_override_is_one_line(command: str, option: str, match: str, tmp_path: Path) -> None:
    model = builders.save(silero_like(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **silero_data(8))
    args = [command, str(model), str(tmp_path / "c.npz"), "--batch-axis", option]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output


def test_output_sample_axis_is_kept_across_an_ambiguous_batch() -> None:
    """stateN [2, n, 4] with a last batch of n = 2 has two axes of size 2: the axis the first
    batch showed (1) is kept, so each sample's cosine is taken over its own values."""
    from sipp_onnx.evaluate import _Sums

    rng = np.random.default_rng(0)
    first = rng.normal(size=(2, 3, STATE))
    ref = rng.normal(size=(2, 2, STATE))
    new = ref + rng.normal(size=ref.shape)

    def cosines(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return float((np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).sum())

    sums = _Sums("stateN")
    sums.add(first, first, None, 3)
    sums.add(ref, new, None, 2)
    want = (3 + cosines(ref.transpose(1, 0, 2), new.transpose(1, 0, 2))) / 5
    assert sums.seen == 5 and sums.axis == 1
    assert sums.comparison(False).cosine == pytest.approx(want)
    assert cosines(ref, new) != pytest.approx(cosines(ref.transpose(1, 0, 2), new.transpose(1, 0, 2)))
