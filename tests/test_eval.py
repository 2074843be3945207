"""`sipp-onnx eval` and `evaluate`: accuracy, fidelity, --max-drop, bad input."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from builders import mlp, save
from click.testing import CliRunner

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.cli import main
from sipp_onnx.errors import CalibrationError, ModelError
from sipp_onnx.evaluate import evaluate


@pytest.fixture
def files(tmp_path):
    model = save(mlp(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 20)).astype(np.float32)
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    labels = logits.argmax(axis=1)
    labels[:10] = (labels[:10] + 1) % 5  # 80 % accuracy by construction
    data = tmp_path / "test.npz"
    np.savez(data, x=x, labels=labels.astype(np.int64))
    pruned = tmp_path / "p.onnx"
    prune_model(model, {"x": x}, PruneConfig(sparsity=0.8, method="magnitude"), output=pruned)
    return tmp_path, model, data, pruned, x, labels


def test_accuracy_and_identity_fidelity(files):
    _, model, data, _, _, _ = files
    report = evaluate(model, data, compare=model, batch_size=7)
    assert report.model.accuracy == pytest.approx(0.8) and report.model.samples == 50
    c = report.compare
    assert c.accuracy == pytest.approx(0.8) and c.accuracy_drop == pytest.approx(0.0)
    assert c.top1_agreement == 1.0 and c.rel_l2_error == 0.0 and c.cosine == pytest.approx(1.0)


def test_fidelity_matches_direct_computation(files):
    _, model, data, pruned, x, labels = files
    report = evaluate(model, data, compare=pruned, batch_size=16)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    a, b = run(model).astype(np.float64), run(pruned).astype(np.float64)
    c = report.compare
    assert c.rel_l2_error == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-6)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert c.cosine == pytest.approx(cos.mean(), rel=1e-6)
    assert c.top1_agreement == pytest.approx((a.argmax(1) == b.argmax(1)).mean())
    assert c.accuracy == pytest.approx((b.argmax(1) == labels).mean())
    assert c.accuracy_drop == pytest.approx((0.8 - c.accuracy) * 100)


def test_cli_json_and_max_drop(files):
    _, model, data, pruned, _, _ = files
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(model), str(data), "--compare", str(pruned), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["model"]) >= {"accuracy"}
    assert set(doc["compare"]) >= {"accuracy", "accuracy_drop", "top1_agreement", "rel_l2_error", "cosine"}
    drop = doc["compare"]["accuracy_drop"]
    ok = runner.invoke(
        main, ["eval", str(model), str(data), "--compare", str(pruned), "--max-drop", str(drop + 1)]
    )
    assert ok.exit_code == 0
    if drop > 0:
        bad = runner.invoke(
            main, ["eval", str(model), str(data), "--compare", str(pruned), "--max-drop", str(drop - 0.5)]
        )
        assert bad.exit_code == 3 and "exceeds --max-drop" in bad.stderr


def test_max_drop_on_a_heavily_pruned_model_fails(files):
    tmp, model, data, _, x, _ = files
    wrecked = tmp / "wrecked.onnx"
    prune_model(model, {"x": x}, PruneConfig(sparsity=0.99, method="magnitude"), output=wrecked)
    result = CliRunner().invoke(
        main, ["eval", str(model), str(data), "--compare", str(wrecked), "--max-drop", "0"]
    )
    report = evaluate(model, data, compare=wrecked)
    assert report.compare.accuracy_drop > 0
    assert result.exit_code == 3


def test_bad_eval_input(files):
    tmp, model, data, pruned, x, labels = files
    runner = CliRunner()
    unlabelled = tmp / "unlabelled.npz"
    np.savez(unlabelled, x=x)
    result = runner.invoke(
        main, ["eval", str(model), str(unlabelled), "--compare", str(pruned), "--max-drop", "1"]
    )
    assert result.exit_code == 1 and "needs labels" in result.stderr
    result = runner.invoke(main, ["eval", str(model), str(data), "--max-drop", "1"])
    assert result.exit_code == 1 and "--compare" in result.stderr
    wrong = tmp / "wrong.npz"
    np.savez(wrong, y=x, z=x, labels=labels)
    with pytest.raises(CalibrationError, match="missing"):
        evaluate(model, wrong)
    short = tmp / "short.npz"
    np.savez(short, x=x, labels=labels[:10])
    with pytest.raises(CalibrationError, match="labels"):
        evaluate(model, short)
    shape = tmp / "shape.npz"
    np.savez(shape, x=x[:, :5], labels=labels)
    result = runner.invoke(main, ["eval", str(model), str(shape)])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "Traceback" not in result.output
    with pytest.raises(ModelError, match="no output"):
        evaluate(model, data, output="nope")
    result = runner.invoke(main, ["eval", str(tmp / "missing.onnx"), str(data)])
    assert result.exit_code == 1 and "does not exist" in result.stderr


@pytest.mark.parametrize("name", ["lenet300", "cnn", "tokens"])
def test_prune_then_eval_on_shipped_models(tmp_path, name):
    out = tmp_path / f"{name}.pruned.onnx"
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "prune",
            f"models/{name}.onnx",
            f"models/{name}_calib.npz",
            "-o",
            str(out),
            "--sparsity",
            "0.3",
            "--method",
            "magnitude",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, ["eval", f"models/{name}.onnx", f"models/{name}_test.npz", "--compare", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["samples"] == 400 and doc["model"]["accuracy"] >= 0.95
    assert 0 < doc["compare"]["top1_agreement"] <= 1 and doc["compare"]["rel_l2_error"] > 0


@pytest.mark.parametrize("name", ["lenet300", "cnn", "tokens"])
def test_default_prune_at_half_sparsity_loses_at_most_one_point(tmp_path, name):
    """Issue 3's bar, end to end through the CLI: the default method at --sparsity 0.5."""
    out = tmp_path / f"{name}.pruned.onnx"
    runner = CliRunner()
    args = ["prune", f"models/{name}.onnx", f"models/{name}_calib.npz", "-o", str(out), "-q"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["eval", f"models/{name}.onnx", f"models/{name}_test.npz", "--compare", str(out), "--max-drop", "1"],
    )
    assert result.exit_code == 0, result.output
