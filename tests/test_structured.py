"""Structured pruning: the sliced model must equal the masked one (the oracle), keep the interface,
pass the checker, and refuse what it cannot map, with the reason."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import structured_builders as sb
from onnx import shape_inference

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.errors import NoPrunableLayersError
from sipp_onnx.structured.pipeline import (
    StructuredConfig,
    apply_structured,
    prepare_structured,
    prune_structured,
)
from sipp_onnx.structured.surgery import apply_surgery

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

IMAGE_MODELS = [
    "resnet_block",
    "resnet_block_folded",
    "mobilenet_block",
    "concat_net",
    "split_net",
    "reshape_gemm_net",
    "flatten_matmul_net",
    "grouped_conv_net",
]


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])


def _setup(name: str, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    if name.startswith("bert"):
        mode = name.split(":")[1] if ":" in name else "constant"
        model = sb.bert_layer(shape_mode=mode)
        calib = {"x": sb.sequence_calibration(n=24)}
    else:
        model = getattr(sb, name)()
        calib = {model.graph.input[0].name: sb.image_calibration(_input_shape(model), n=48)}
    path = tmp_path / f"{name.replace(':', '_')}.onnx"
    onnx.save(model, path)
    return path, calib


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _masked_and_sliced(
    path: Path, calib: dict[str, np.ndarray], compensation: str, sparsity: float = 0.4
) -> tuple[onnx.ModelProto, onnx.ModelProto, float]:
    """The masked model (compensation written, nothing removed) and the sliced one."""
    config = StructuredConfig(
        sparsity=sparsity, compensation=compensation, channel_multiple=1, verify=False, probe=False
    )
    prepared = prepare_structured(path, calib, config)
    result = apply_structured(prepared, config)
    from sipp_onnx.structured.allocate import allocate
    from sipp_onnx.structured.pipeline import _compensate
    from sipp_onnx.structured.scores import component_scores, scored_groups

    plan = prepared.plan
    scores = component_scores(plan, "pfp", prepared.weights, prepared.stats)
    allowed = {g.index for g in plan.groups if g.prunable} & scored_groups(plan, prepared.stats)
    keep = allocate(plan, scores, sparsity, "macs", 1, allowed).keep
    comps = _compensate(plan, keep, prepared.weights, prepared.stats, compensation)
    masked = onnx.ModelProto()
    masked.CopyFrom(prepared.proto)
    apply_surgery(masked, plan, keep, comps, slice_channels=False, base_dir=path.parent)
    return masked, result.model, result.report.macs_removed


@pytest.mark.parametrize("compensation", ["refit", "bias", "none"])
@pytest.mark.parametrize("name", IMAGE_MODELS + ["bert:constant", "bert:minus_one", "bert:dynamic"])
def test_sliced_equals_masked(name: str, compensation: str, tmp_path: Path) -> None:
    path, calib = _setup(name, tmp_path)
    masked, sliced, removed = _masked_and_sliced(path, calib, compensation)
    assert removed > 0.1, f"{name}: only {removed:.1%} of the MACs removed"
    onnx.checker.check_model(sliced, full_check=True)
    shape_inference.infer_shapes(sliced, strict_mode=True)
    feed = {k: v[:7] for k, v in calib.items()}
    for a, b in zip(_run(masked, feed), _run(sliced, feed), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bert_sequence_length_stays_dynamic(tmp_path: Path) -> None:
    path, calib = _setup("bert:dynamic", tmp_path)
    result = prune_structured(path, calib, StructuredConfig(sparsity=0.3, channel_multiple=1))
    assert any(g.kind == "heads" and g.units_after < g.units_before for g in result.report.groups)
    original = onnx.load(path)
    assert result.model.graph.input[0] == original.graph.input[0]
    assert result.model.graph.output[0] == original.graph.output[0]
    for seq in (1, 9):
        x = np.random.default_rng(seq).normal(size=(3, seq, 16)).astype(np.float32)
        (y,) = _run(result.model, {"x": x})
        assert y.shape == (3, seq, 16)


@pytest.mark.parametrize("batch", [1, 32])
def test_shipped_cnn_keeps_interface(batch: int, tmp_path: Path) -> None:
    out = tmp_path / "cnn.s.onnx"
    result = prune_structured(
        MODELS / "cnn.onnx", MODELS / "cnn_calib.npz", StructuredConfig(sparsity=0.3), output=out
    )
    assert result.report.macs_removed >= 0.3
    original = onnx.load(MODELS / "cnn.onnx")
    written = onnx.load(out)
    assert list(written.graph.input) == list(original.graph.input)
    assert list(written.graph.output) == list(original.graph.output)
    x = np.load(MODELS / "cnn_test.npz")["input"][:batch]
    (y,) = _run(out, {"input": x})
    assert y.shape == (batch, 10)
    assert out.stat().st_size < (MODELS / "cnn.onnx").stat().st_size


@pytest.mark.parametrize("model", ["cnn", "lenet300", "tokens"])
def test_shipped_models_sliced_equals_masked(model: str) -> None:
    calib = dict(np.load(MODELS / f"{model}_calib.npz"))
    masked, sliced, removed = _masked_and_sliced(MODELS / f"{model}.onnx", calib, "refit", 0.3)
    assert removed > 0.1
    feed = {k: v[:16] for k, v in calib.items()}
    for a, b in zip(_run(masked, feed), _run(sliced, feed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_shipped_cnn_accuracy_close_to_dense(tmp_path: Path) -> None:
    out = tmp_path / "cnn.s.onnx"
    prune_structured(
        MODELS / "cnn.onnx", MODELS / "cnn_calib.npz", StructuredConfig(sparsity=0.2), output=out
    )
    test = np.load(MODELS / "cnn_test.npz")
    dense = _run(MODELS / "cnn.onnx", {"input": test["input"]})[0].argmax(1)
    pruned = _run(out, {"input": test["input"]})[0].argmax(1)
    assert (pruned == test["labels"]).mean() >= (dense == test["labels"]).mean() - 0.02


def test_compensation_beats_none_on_the_consumers(tmp_path: Path) -> None:
    path, calib = _setup("resnet_block", tmp_path)
    prepared = prepare_structured(path, calib, StructuredConfig(), everything=True)
    errors = {}
    for comp in ("none", "bias", "refit"):
        report = apply_structured(
            prepared, StructuredConfig(sparsity=0.3, compensation=comp, verify=True)
        ).report
        errors[comp] = report.verification[0].rel_l2_error
    assert errors["refit"] <= errors["bias"] <= errors["none"]


def test_probe_measures_every_group_and_reaches_the_target(tmp_path: Path) -> None:
    path, calib = _setup("mobilenet_block", tmp_path)
    prepared = prepare_structured(path, calib, StructuredConfig())
    result = apply_structured(prepared, StructuredConfig(sparsity=0.3, channel_multiple=2))
    prunable = sum(1 for g in prepared.plan.groups if g.prunable)
    assert result.report.timings["probe_runs"] >= prunable  # at least one cut measured per group
    assert result.report.macs_removed >= 0.3
    assert result.report.verification[0].cosine > 0.5


@pytest.mark.parametrize(
    "name, reason",
    [
        ("custom_op_net", "custom op com.example::FancyRelu"),
        ("gather_channel_net", "Gather on the channel axis"),
    ],
)
def test_unmappable_groups_are_frozen_with_a_reason(name: str, reason: str) -> None:
    from sipp_onnx.structured.pipeline import structured_plan

    plan = structured_plan(getattr(sb, name)())
    first = plan.groups[0]
    assert first.frozen == first.size
    assert any(reason in r for r in first.reasons)


def test_layernorm_and_graph_outputs_are_stops() -> None:
    from sipp_onnx.structured.pipeline import structured_plan

    plan = structured_plan(sb.bert_layer())
    kinds = {g.name: g for g in plan.groups}
    assert kinds["query_matmul"].kind == "heads" and kinds["query_matmul"].frozen == 0
    assert kinds["ffn_in_matmul"].frozen == 0
    assert kinds["attn_out_matmul"].frozen == kinds["attn_out_matmul"].size  # the residual width


def test_no_prunable_group_is_an_error(tmp_path: Path) -> None:
    model = sb.custom_op_net()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    # the only Conv after the custom op feeds the classifier: freeze it too with --exclude
    with pytest.raises(NoPrunableLayersError, match="no prunable channel group"):
        prune_structured(
            path, {"x": sb.image_calibration((3, 6, 6))}, StructuredConfig(exclude=("conv_out",))
        )


def test_structured_then_unstructured(tmp_path: Path) -> None:
    out = tmp_path / "s.onnx"
    prune_structured(
        MODELS / "cnn.onnx", MODELS / "cnn_calib.npz", StructuredConfig(sparsity=0.3), output=out
    )
    result = prune_model(out, MODELS / "cnn_calib.npz", PruneConfig(sparsity=0.5), output=tmp_path / "u.onnx")
    assert result.report.sparsity_achieved == pytest.approx(0.5, abs=0.01)
    assert result.report.verification[0].cosine > 0.9


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipp_onnx.cli", *args], capture_output=True, text=True)


def test_cli_structured_prune_and_inspect(tmp_path: Path) -> None:
    digest = hashlib.sha256((MODELS / "cnn.onnx").read_bytes()).hexdigest()
    out = tmp_path / "cnn.s.onnx"
    done = _cli(
        "prune",
        str(MODELS / "cnn.onnx"),
        str(MODELS / "cnn_calib.npz"),
        "--structured",
        "--sparsity",
        "0.3",
        "-o",
        str(out),
        "--report",
        str(tmp_path / "r.json"),
        "-q",
    )
    assert done.returncode == 0, done.stderr
    assert out.exists() and (tmp_path / "r.json").exists()
    assert hashlib.sha256((MODELS / "cnn.onnx").read_bytes()).hexdigest() == digest
    inspect = _cli("inspect", "--structured", str(MODELS / "cnn.onnx"))
    assert inspect.returncode == 0 and "pwconv2" in inspect.stdout and "graph output" in inspect.stdout


def test_cli_structured_with_pattern_is_an_error(tmp_path: Path) -> None:
    done = _cli(
        "prune",
        str(MODELS / "cnn.onnx"),
        str(MODELS / "cnn_calib.npz"),
        "--structured",
        "--pattern",
        "2:4",
        "-o",
        str(tmp_path / "x.onnx"),
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: --structured")
    assert not (tmp_path / "x.onnx").exists()


def test_interrupted_surgery_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sipp_onnx.structured.pipeline as pipeline

    def boom(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "apply_surgery", boom)
    with pytest.raises(KeyboardInterrupt):
        prune_structured(MODELS / "cnn.onnx", MODELS / "cnn_calib.npz", output=tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []
