"""Calibration inputs given one per sample, and calibration from Python feeds (issue 17 items 6, 7).

- An array whose rank is its input's rank + 1 holds one full input per sample on a new leading
  axis (silero-vad's `state` as `[N, 2, 1, 128]`, `sr` as `[N]`): fed one sample per run, the
  ordinary arrays as batch-1 slices along their batch axis, constants whole.
- `calibration` may be an iterable of feed dicts or an ONNX Runtime CalibrationDataReader, each
  feed one batch: copied to a temporary directory as read (the passes read it several times),
  with the same checks as files.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnxruntime.quantization import CalibrationDataReader

from sipp_onnx import CalibrationError, PruneConfig, StructuredConfig, prune_model, prune_structured
from sipp_onnx.calibration import open_calibration
from sipp_onnx.cli import main
from sipp_onnx.evaluate import evaluate
from sipp_onnx.modelio import InputSpec, model_inputs
from sipp_onnx.sweep import Variant, sweep

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
    from test_batch_axis import LAYERS, STATE, WIDTH, run, silero_data, silero_like
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]
    from tests.test_batch_axis import LAYERS, STATE, WIDTH, run, silero_data, silero_like  # type: ignore[no-redef]

SPECS = model_inputs(silero_like())


def per_sample_data(n: int = 12, seed: int = 1, sr: tuple[int, ...] = (16000,)) -> dict[str, np.ndarray]:
    """input [N, 16] as usual; state [N, 2, 1, 4] and sr [N]: one full input per sample."""
    data = silero_data(n, seed)
    return {
        "input": data["input"],
        "state": np.ascontiguousarray(data["state"].transpose(1, 0, 2)[:, :, None, :]),
        "sr": np.resize(np.array(sr, np.int64), n),
    }


def as_batched(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same samples as ordinary arrays (state [2, N, 4]; sr must be one value)."""
    assert len(set(data["sr"].tolist())) == 1
    return {
        "input": data["input"],
        "state": data["state"][:, :, 0, :].transpose(1, 0, 2),
        "sr": data["sr"][0, ...],
    }


def spy_feeds(monkeypatch) -> list[dict[str, np.ndarray]]:
    """Every feed the calibration pass gives ONNX Runtime (copied)."""
    import sipp_onnx.capture as capture_module

    seen: list[dict[str, np.ndarray]] = []
    real = capture_module._session

    def spy(*args, **kwargs):
        session, used = real(*args, **kwargs)

        class Spy:
            def run(self, names, feed):
                seen.append({k: np.array(v) for k, v in feed.items()})
                return session.run(names, feed)

        return Spy(), used

    monkeypatch.setattr(capture_module, "_session", spy)
    return seen


def masks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) == 0 for t in model.graph.initializer if t.name[0] == "W"}


# ----------------------------------------------------------------------------- one input per sample


def test_per_sample_arrays_are_read_one_sample_per_feed(caplog) -> None:
    data = per_sample_data(5, sr=(8000, 16000))
    with caplog.at_level(logging.INFO, logger="sipp_onnx"):
        calib = open_calibration(data, SPECS)
    assert calib.per_sample == {"state": (LAYERS, 1, STATE), "sr": ()}
    assert calib.axes == {"input": 0, "state": 1, "sr": None}
    assert calib.layout == {} and calib.fixed_batch == 1
    assert calib.samples == calib.available == 5 and calib.n_batches(4) == 5
    lines = [r.getMessage() for r in caplog.records]
    assert "calibration input 'state': one input per sample ([N, 2, 1, 4]), fed one sample per run" in lines
    assert "calibration input 'sr': one input per sample ([N]), fed one sample per run" in lines
    feeds = list(calib.batches(4))
    assert len(feeds) == 5 and all(calib.count(f) == 1 for f in feeds)
    for i, feed in enumerate(feeds):
        assert feed["input"].shape == (1, WIDTH) and feed["state"].shape == (LAYERS, 1, STATE)
        assert feed["sr"].shape == () and feed["sr"] == (8000, 16000)[i % 2]
        np.testing.assert_array_equal(feed["input"][0], data["input"][i])
        np.testing.assert_array_equal(feed["state"], data["state"][i])
        assert list(feed) == ["input", "state", "sr"]


def test_mixed_with_ordinary_and_constant_inputs() -> None:
    """Only state one per sample: input gives batch-1 slices, the scalar sr stays a constant."""
    data = per_sample_data(4)
    data["sr"] = np.array(16000, np.int64)
    calib = open_calibration(data, SPECS)
    assert calib.per_sample == {"state": (LAYERS, 1, STATE)} and calib.layout == {"sr": None}
    feeds = list(calib.batches(3))
    assert [f["sr"] is data["sr"] for f in feeds] == [True] * 4
    # each run gives the sample's own outputs
    whole = run(silero_like(), as_batched(per_sample_data(4)))
    got = np.concatenate([run(silero_like(), f)["stateN"] for f in feeds], axis=1)
    np.testing.assert_allclose(got, whole["stateN"], atol=1e-6)


def test_files_streamed_directory_and_max_samples(tmp_path: Path) -> None:
    """A file whose arrays all count samples on their first axis (one per sample included) is
    streamed; a directory of such files and --max-samples count samples one per run."""
    a, b = per_sample_data(5, seed=1), per_sample_data(7, seed=2)
    np.savez(tmp_path / "1.npz", **a)
    np.savez(tmp_path / "2.npz", **b)
    one = open_calibration(tmp_path / "1.npz", SPECS)
    assert one.chunks[0].stream is not None and one.per_sample == {"state": (2, 1, 4), "sr": ()}
    calib = open_calibration(tmp_path, SPECS, max_samples=9)
    assert calib.samples == 9 and calib.available == 12
    states = np.stack([f["state"] for f in calib.batches(2)])
    np.testing.assert_array_equal(states, np.concatenate([a["state"], b["state"]])[:9])


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"state": np.zeros((3, 1, 2, 1, 4), np.float32)},
            r"^calibration data: input 'state' has shape \[3, 1, 2, 1, 4\] \(rank 5\); the model declares "
            r"\[2, batch, 4\]: give rank 3 \(samples along a batch axis\) or rank 4 \(one input per sample",
        ),
        (
            {"state": np.zeros((2, 4), np.float32)},
            r"input 'state' has shape \[2, 4\] \(rank 2\); .* or rank 4",
        ),
        (
            {"sr": np.zeros((3, 1), np.int64)},
            r"input 'sr' has shape \[3, 1\] .*give rank 0 \(a constant\) or rank 1",
        ),
        (
            {"state": np.zeros((4, 2, 1, 4), np.float32)},
            r"different sample counts .*'state \(one per sample\)': 4",
        ),
        (
            {"state": np.zeros((3, 2, 2, 4), np.float32)},
            r"rank 4: one input per sample .*each must be a batch of one",
        ),
        ({"state": np.zeros((3, 3, 1, 4), np.float32)}, r"each must be \[2, batch, 4\] \(axis 0 must be 2\)"),
        ({"sr": np.array([1.5, 2, 3])}, r"input 'sr' has dtype float64; the model expects int64"),
    ],
)
def test_per_sample_errors_are_one_line(change: dict, match: str) -> None:
    data = {**per_sample_data(3), **change}
    with pytest.raises(CalibrationError, match=match) as info:
        open_calibration(data, SPECS)
    assert "\n" not in str(info.value)


def test_nan_placed_in_its_sample_and_fixed_batch_model() -> None:
    data = per_sample_data(6)
    data["state"][4, 1, 0, 2] = np.inf
    with pytest.raises(CalibrationError, match=r"input 'state' has 1 NaN/inf values \(first in sample 4\)"):
        open_calibration(data, SPECS)
    fixed = model_inputs(silero_like(fixed=3))
    with pytest.raises(CalibrationError, match=r"fixes its batch size to 3, but calibration inputs \['sr'\]"):
        open_calibration(
            {**silero_data(3), "sr": np.full(3, 16000, np.int64)}, fixed, batch_axes={"state": 1}
        )


def test_batch_axis_override_names_the_axis_of_each_sample() -> None:
    """--batch-axis still names each sample's batch axis (the ranks decide the reading): `none`
    feeds each sample's state whole, so a state of batch 2 per sample is accepted."""
    data = per_sample_data(3)
    data["state"] = np.repeat(data["state"], 2, axis=2)  # [3, 2, 2, 4]
    calib = open_calibration(data, SPECS, batch_axes={"state": None})
    assert calib.axes["state"] is None and calib.per_sample["state"] == (2, 2, 4)
    assert [f["state"].shape for f in calib.batches(8)] == [(2, 2, 4)] * 3
    assert open_calibration(per_sample_data(3), SPECS, batch_axes={"state": -2}).axes["state"] == 1


def test_prune_feeds_onnx_runtime_batch_one(monkeypatch) -> None:
    """prune_model on state [N, 2, 1, 4], sr [N]: ONNX Runtime sees N batch-1 feeds with each
    sample's own sr; the masks equal those of the same samples given as ordinary arrays."""
    seen = spy_feeds(monkeypatch)
    data = per_sample_data(20, sr=(8000, 16000))
    config = PruneConfig(sparsity=0.3, method="sipp-det", batch_size=8)
    result = prune_model(silero_like(), data, config)
    report = result.report
    assert report.samples == 20 and report.batch_size == 1
    assert report.per_sample_inputs == {"state": [2, 1, 4], "sr": []} and report.batch_axes == {}
    assert [{k: v.shape for k, v in f.items()} for f in seen] == [
        {"input": (1, WIDTH), "state": (LAYERS, 1, STATE), "sr": ()}
    ] * 20
    assert [int(f["sr"]) for f in seen] == [8000, 16000] * 10
    # against the ordinary reading of the same samples (one sample rate for both)
    data = per_sample_data(20)
    one = prune_model(silero_like(), data, config)
    other = prune_model(silero_like(), as_batched(data), config)
    for name, mask in masks(one.model).items():
        np.testing.assert_array_equal(mask, masks(other.model)[name], err_msg=name)
    dense, pruned = run(silero_like(), as_batched(data)), run(one.model, as_batched(data))
    err = np.linalg.norm(pruned["output"] - dense["output"]) / np.linalg.norm(dense["output"])
    assert err < 0.2


def test_structured_eval_and_sweep_with_per_sample_data() -> None:
    model = silero_like()
    data = per_sample_data(16, sr=(8000, 16000))
    labels = np.array([np.argmax(run(model, f)["output"]) for f in open_calibration(data, SPECS).batches(1)])
    report = evaluate(model, {**data, "labels": labels}, compare=model, batch_size=4)
    assert report.model.samples == 16 and report.model.accuracy == 1.0
    assert report.compare is not None and report.compare.rel_l2_error == 0.0
    sweep_result = sweep(
        model,
        data,
        {**data, "labels": labels},
        [Variant.parse("sipp-det", "obs")],
        [0.3],
        PruneConfig(batch_size=8),
    )
    assert sweep_result.settings["samples"] == 16 and 0.5 < sweep_result.points[0].metric <= 1.0


def test_structured_with_per_sample_data(tmp_path: Path) -> None:
    path = builders.save(silero_like(), tmp_path / "m.onnx")
    config = StructuredConfig(sparsity=0.25, channel_multiple=4, batch_size=8, latency=True, latency_runs=2)
    result = prune_structured(path, per_sample_data(16), config)
    assert result.report.samples == 16 and result.report.macs_after < result.report.macs_before
    assert [lat.batch for lat in result.report.latency_after] == [1]


def test_cli_prune_says_so(tmp_path: Path) -> None:
    model = builders.save(silero_like(None), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **per_sample_data(10))
    res = CliRunner().invoke(
        main,
        ["prune", str(model), str(tmp_path / "c.npz"), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.3"],
    )
    assert res.exit_code == 0, res.output
    assert "10 calibration samples" in res.output
    assert (
        "calibration input 'state': one input per sample ([N, 2, 1, 4]), fed one sample per run" in res.output
    )
    np.savez(tmp_path / "bad.npz", **{**per_sample_data(3), "sr": np.zeros((3, 1, 1), np.int64)})
    res = CliRunner().invoke(
        main, ["prune", str(model), str(tmp_path / "bad.npz"), "-o", str(tmp_path / "q.onnx")]
    )
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "input 'sr' has shape [3, 1, 1]" in lines[0], res.output


# ----------------------------------------------------------------------------- feeds from Python


def mlp_feeds(sizes: list[int], seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(n, 20)).astype(np.float32)} for n in sizes]


class Reader(CalibrationDataReader):
    """A static-quantization reader as ONNX Runtime's examples write them."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)
        self.calls = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.calls += 1
        return next(self.feeds, None)


def test_list_generator_and_reader_give_the_mapping_result(monkeypatch) -> None:
    """Each feed is split into runs of at most batch_size (never joined with the next); the
    result equals that of the same samples as one mapping cut at the same places."""
    feeds = mlp_feeds([7, 5, 9])
    seen = spy_feeds(monkeypatch)
    config = PruneConfig(sparsity=0.5, batch_size=6, method="sipp-det")
    from_list = prune_model(builders.mlp(), feeds, config)
    assert [f["x"].shape[0] for f in seen] == [6, 1, 5, 6, 3]
    assert from_list.report.samples == 21
    reader = Reader(feeds)
    from_reader = prune_model(builders.mlp(), reader, config)
    assert reader.calls == 4  # read once, though the pass and the verification read the data again
    from_generator = prune_model(builders.mlp(), (f for f in feeds), config)
    seen.clear()
    whole = {"x": np.concatenate([f["x"] for f in feeds])}
    one_pass = prune_model(builders.mlp(), whole, PruneConfig(sparsity=0.5, batch_size=21, method="sipp-det"))
    want = masks(one_pass.model)
    for result in (from_list, from_reader, from_generator):
        for name, mask in masks(result.model).items():
            np.testing.assert_array_equal(mask, want[name], err_msg=name)


def test_reader_with_sequential_refit_reads_the_copy_again(monkeypatch) -> None:
    """--sequential re-runs the calibration data once per layer depth: the copy serves them."""
    seen = spy_feeds(monkeypatch)
    result = prune_model(
        builders.mlp(), Reader(mlp_feeds([8, 8])), PruneConfig(sparsity=0.5, sequential=True)
    )
    assert result.report.samples == 16 and len(seen) > 2


def test_temporary_copy_is_removed(monkeypatch) -> None:
    import sipp_onnx.calibration as calibration

    made: list[Path] = []
    real = calibration.tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        spill = real(*args, **kwargs)
        made.append(Path(spill.name))
        return spill

    monkeypatch.setattr(calibration.tempfile, "TemporaryDirectory", recording)
    prune_model(builders.mlp(), mlp_feeds([4, 4]), PruneConfig(sparsity=0.5))
    assert len(made) == 1 and not made[0].exists()
    data = open_calibration(iter(mlp_feeds([3, 2])), model_inputs(builders.mlp()))
    assert sorted(p.name for p in made[1].iterdir()) == ["000000-0.npy", "000001-0.npy"]
    data.close()
    assert not made[1].exists()
    with pytest.raises(CalibrationError, match="batch 1 lacks input"):
        open_calibration([{"x": np.ones((2, 20))}, {"y": np.ones((2, 20))}], model_inputs(builders.mlp()))
    assert not made[2].exists()
    with pytest.raises(CalibrationError, match="only 2 calibration sample"):
        open_calibration(mlp_feeds([1, 1]), _fixed_batch_specs(4))
    assert not made[3].exists()


def _fixed_batch_specs(batch: int) -> list[InputSpec]:
    return [InputSpec("x", np.dtype(np.float32), (batch, 20))]


def test_fixed_batch_model_joins_feeds() -> None:
    calib = open_calibration(mlp_feeds([3, 2, 4]), _fixed_batch_specs(4))
    assert [f["x"].shape for f in calib.batches(32)] == [(4, 20), (4, 20)]
    assert any("last 1 sample" in w for w in calib.warnings)


def test_max_samples_stops_an_endless_generator() -> None:
    pulled = 0

    def endless() -> Iterator[dict[str, np.ndarray]]:
        nonlocal pulled
        while True:
            pulled += 1
            yield {"x": np.ones((4, 20), np.float32)}

    calib = open_calibration(endless(), model_inputs(builders.mlp()), max_samples=10)
    assert pulled == 3 and calib.samples == 10 and calib.available == 12
    assert [f["x"].shape[0] for f in calib.batches(8)] == [4, 4, 2]


def good(n: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.ones((n, 20), np.float32)}


@pytest.mark.parametrize(
    "feeds, match",
    [
        ([good(), good(), good(), [1, 2]], r"^calibration reader: batch 3 is not a dict \(got list\)$"),
        (
            [good(), good(), {"z": np.ones((2, 20))}],
            r"^calibration reader: batch 2 lacks input 'x' \(batch 0 gave it\)$",
        ),
        ([], r"^calibration reader: gave no batches$"),
        (
            [{"a": np.ones((2, 20)), "b": np.ones(2)}],
            r"^calibration reader: batch 0: has arrays \['a', 'b'\].*missing \['x'\]$",
        ),
        (
            [good(), {"x": np.ones((2, 20), np.complex64)}],
            r"^calibration reader: batch 1: input 'x' has dtype complex64",
        ),
        (
            [good(), good(), {"x": np.full((2, 20), np.nan)}],
            r"batch 2: input 'x' has 40 NaN/inf values \(first in sample 0\)",
        ),
        ([good(), {"x": np.ones((2, 19))}], r"batch 1: input 'x' has shape \[2, 19\]; .*axis 1 must be 20"),
        ([good(), {"x": np.ones((2, 2, 2, 20))}], r"batch 1: input 'x' has shape \[2, 2, 2, 20\] \(rank 4\)"),
        (np.ones((2, 20)), r"^calibration data is a bare NumPy array"),
        (42, r"^calibration data must be a path, a mapping of arrays, an iterable of feed dicts or a reader"),
    ],
)
def test_feed_errors_are_one_line(feeds, match: str) -> None:
    with pytest.raises(CalibrationError, match=match) as info:
        open_calibration(feeds, model_inputs(builders.mlp()))
    assert "\n" not in str(info.value)


def test_single_input_under_another_key_unused_keys_and_casts() -> None:
    specs = model_inputs(builders.mlp())
    assert open_calibration([{"data": np.ones((2, 20))}] * 3, specs).samples == 6
    calib = open_calibration([{"x": np.ones((2, 20)), "labels": np.zeros(2)}] * 3, specs)
    assert calib.samples == 6 and calib.unused_arrays == ("labels",)
    # one cast warning, not one per feed
    assert [w for w in calib.warnings if "cast" in w] == [
        "calibration reader: input 'x' cast from float64 to float32"
    ]


def test_silero_like_reader_of_batch_one_feeds(monkeypatch) -> None:
    """A reader for static quantization of silero gives state [2, 1, 128] and a scalar sr per
    feed: ordinary batch-1 feeds, each sr its own."""
    seen = spy_feeds(monkeypatch)
    data = per_sample_data(6, sr=(8000, 16000))
    feeds = [
        {"input": data["input"][i : i + 1], "state": data["state"][i], "sr": data["sr"][i]} for i in range(6)
    ]
    result = prune_model(silero_like(), Reader(feeds), PruneConfig(sparsity=0.3))
    assert result.report.samples == 6 and result.report.batch_axes == {"state": 1, "sr": None}
    assert [int(f["sr"]) for f in seen] == [8000, 16000] * 3


def test_evaluate_takes_labels_from_each_feed() -> None:
    model = builders.mlp()
    feeds = mlp_feeds([5, 7])
    ref = [run(model, f)["y"] for f in feeds]
    labelled = [{**f, "labels": np.argmax(r, axis=1)} for f, r in zip(feeds, ref, strict=True)]
    report = evaluate(model, Reader(labelled), compare=model, batch_size=4)
    assert report.model.samples == 12 and report.model.accuracy == 1.0
    assert report.compare is not None and report.compare.rel_l2_error == 0.0
    with pytest.raises(CalibrationError, match="in some evaluation batches only"):
        evaluate(model, [labelled[0], feeds[1]])


def test_narrow_float_inputs_survive_the_copy() -> None:
    spec = InputSpec("x", np.dtype(ml_dtypes.bfloat16), ("batch", 4))
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    calib = open_calibration([{"x": values.astype(ml_dtypes.bfloat16)}], [spec])
    (feed,) = calib.batches(8)
    assert feed["x"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(feed["x"], values.astype(ml_dtypes.bfloat16))


def test_memory_holds_about_one_feed() -> None:
    """40 feeds of 1 MB: reading them in and batching them all back peaks near one feed."""

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(0)
        for _ in range(40):
            yield {"x": rng.normal(size=(13107, 20)).astype(np.float32)}  # 1 MB

    tracemalloc.start()
    try:
        calib = open_calibration(feeds(), model_inputs(builders.mlp()))
        total = sum(float(f["x"].sum()) for f in calib.batches(4096))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calib.samples == 40 * 13107 and np.isfinite(total)
    assert peak < 8e6, peak  # the data is 42 MB
