"""`sipp-onnx sweep` and the library's prepare/apply split, on tiny models built in code."""

import builtins
import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
from builders import gaussian_calibration, mlp, save

import sipp_onnx.pipeline as pipeline
from sipp_onnx import PruneConfig
from sipp_onnx.errors import ConfigError
from sipp_onnx.pipeline import apply, prepare, prune_model
from sipp_onnx.sweep import Variant, sweep

METHODS = "sipp-hybrid,sipp-det+none,magnitude+none,magnitude+obs,wanda"
SPARSITIES = [0.3, 0.6, 0.8]


@pytest.fixture
def files(tmp_path):
    model = mlp()
    path = save(model, tmp_path / "mlp.onnx")
    x_cal, x_eval = gaussian_calibration((20,), n=64, seed=1), gaussian_calibration((20,), n=96, seed=2)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x_eval})[0].argmax(axis=1)  # the dense model scores 100 %
    np.savez(tmp_path / "calib.npz", x=x_cal)
    np.savez(tmp_path / "eval.npz", x=x_eval, labels=labels)
    np.savez(tmp_path / "eval_nolabels.npz", x=x_eval)
    return path, tmp_path / "calib.npz", tmp_path / "eval.npz", tmp_path / "eval_nolabels.npz"


@pytest.fixture
def count_passes(monkeypatch):
    calls = []
    real = pipeline.capture

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "capture", counting)
    return calls


def test_cli_sweep_writes_every_point_once_calibrated(files, tmp_path, cli, count_passes):
    model, calib, evaluation, _ = files
    out = tmp_path / "sweep"
    result = cli(
        "sweep", model, calib, evaluation, "--methods", METHODS, "--sparsities", "0.3,0.6,0.8", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert len(count_passes) == 1  # sensitivities, norms and Gram matrices from one pass
    doc = json.loads((out / "sweep.json").read_text())
    labels = ["sipp-hybrid+obs", "sipp-det", "magnitude", "magnitude+obs", "wanda+obs"]
    assert doc["variants"] == labels and doc["metric"] == "accuracy" and doc["dense"] == 1.0
    assert doc["calibration_passes"] == 1
    assert sorted((p["variant"], p["sparsity"]) for p in doc["points"]) == sorted(
        (v, s) for v in labels for s in SPARSITIES
    )
    for p in doc["points"]:
        assert abs(p["achieved"] - p["sparsity"]) <= 0.01
        assert p["metric"] == p["comparison"]["accuracy"]
    assert set(doc["within_1pct"]) == set(labels)
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == len(labels) * len(SPARSITIES)
    assert {r["variant"] for r in rows} == set(labels)
    for label in labels:  # the printed table has one row per variant
        assert any(line.startswith(label + " ") for line in result.stdout.splitlines())
    again = cli("sweep", model, calib, evaluation, "--methods", "magnitude", "--out", out)
    assert again.exit_code == 1 and "already exists (use --overwrite" in again.stderr
    assert json.loads((out / "sweep.json").read_text())["variants"] == labels  # untouched
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'sipp-onnx[plot]'" in result.stdout
    else:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_points_equal_separate_prune_runs(files):
    """Sharing one calibration pass changes nothing: each point is what `prune` would give."""
    model, calib, evaluation, _ = files
    result = sweep(model, calib, evaluation, [Variant.parse("sipp-hybrid", "obs")], [0.6])
    alone = prune_model(model, calib, PruneConfig(sparsity=0.6, method="sipp-hybrid", refit="obs"))
    from sipp_onnx.evaluate import evaluate

    expected = evaluate(model, evaluation, compare=alone.model).compare
    assert result.points[0].comparison == expected
    assert result.points[0].achieved == alone.report.sparsity_achieved


def test_sweep_without_matplotlib_still_runs(files, tmp_path, cli, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    model, calib, evaluation, _ = files
    out = tmp_path / "s"
    result = cli(
        "sweep", model, calib, evaluation, "--methods", "magnitude", "--sparsities", "0.5", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert "pip install 'sipp-onnx[plot]'" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json"]


def test_sweep_without_labels_uses_top1_agreement(files):
    model, calib, _, no_labels = files
    result = sweep(model, calib, no_labels, [Variant.parse("magnitude", "none")], [0.0, 0.5])
    assert result.metric == "top1_agreement" and result.dense == 1.0
    assert result.value("magnitude", 0.0) == 1.0
    assert result.max_sparsity_within("magnitude") in (0.0, 0.5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "sipp-fancy"], "bad method 'sipp-fancy'"),
        (["--methods", "magnitude+ols"], "bad method 'magnitude+ols'"),
        (["--sparsities", "0.5,abc"], "--sparsities must be comma-separated numbers"),
        (["--sparsities", "0.5,1.2"], "sparsities must be in [0, 1)"),
    ],
)
def test_cli_sweep_bad_options(files, tmp_path, cli, args, message):
    model, calib, evaluation, _ = files
    result = cli("sweep", model, calib, evaluation, "--out", tmp_path / "o", *args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_apply_refuses_what_prepare_did_not_measure(files):
    model, calib, _, _ = files
    prepared = prepare(model, calib, PruneConfig(method="magnitude", refit="none"))
    assert not prepared.stats
    apply(prepared, PruneConfig(method="magnitude", refit="none", sparsity=0.7))  # fine
    for config, what in [
        (PruneConfig(method="sipp-det", refit="none"), "needs sensitivities"),
        (PruneConfig(method="magnitude", refit="obs"), "needs input statistics"),
        (PruneConfig(method="wanda", refit="none"), "wanda needs"),
    ]:
        with pytest.raises(ConfigError, match=what):
            apply(prepared, config)
    measured = prepare(model, calib, PruneConfig(method="sipp-det"))
    with pytest.raises(ConfigError, match="reduction and terms"):
        apply(measured, PruneConfig(method="sipp-det", reduction="mean"))


def test_sweep_json_round_trips(files, tmp_path):
    from sipp_onnx.sweep import SweepResult, write_sweep

    model, calib, evaluation, _ = files
    result = sweep(model, calib, evaluation, [Variant.parse("magnitude", "none")], [0.3, 0.6])
    write_sweep(result, tmp_path / "s", plot=False)
    back = SweepResult.from_dict(json.loads((tmp_path / "s" / "sweep.json").read_text()))
    assert back.points == result.points and back.variants == result.variants and back.dense == result.dense


def test_variant_with_an_allocation():
    from sipp_onnx.config import Allocation
    from sipp_onnx.errors import ConfigError
    from sipp_onnx.sweep import Variant

    v = Variant.parse("sipp-det+obs@error", "none")
    assert v.allocation is Allocation.ERROR and v.label == "sipp-det+obs@error"
    assert Variant.parse("wanda", "obs").label == "wanda+obs"
    with pytest.raises(ConfigError, match="ALLOCATION"):
        Variant.parse("sipp-det@nowhere", "obs")
