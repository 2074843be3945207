"""Checks on the reference models shipped in ``models/``.

The pruning quality sweep trusts these files to be valid opset-17 / IR-10
graphs with the documented interface and a known dense accuracy; these tests
catch a broken regeneration (see ``tools/train_reference_models.py``) or an
accidental edit.  They need only onnx, onnxruntime and numpy, and run on CPU in
well under a second per model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
N_CALIB = 200
N_TEST = 400
MAX_DIR_BYTES = 5 * 1024 * 1024

# name -> (per-sample input shape, minimum dense test accuracy)
REFERENCE_MODELS: dict[str, tuple[tuple[int, ...], float]] = {
    "lenet300": ((64,), 0.97),
    "cnn": ((1, 8, 8), 0.97),
    "tokens": ((8, 8), 0.95),
}
NAMES = sorted(REFERENCE_MODELS)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array eagerly so the file handle is closed at once."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module", params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(name: str) -> onnx.ModelProto:
    return onnx.load(MODELS_DIR / f"{name}.onnx")


def test_model_is_valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def test_model_versions(model: onnx.ModelProto) -> None:
    assert model.ir_version == 10
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    assert opsets == {"ai.onnx": 17}


def test_model_interface(name: str, model: onnx.ModelProto) -> None:
    graph = model.graph
    (inp,) = graph.input
    (out,) = graph.output
    sample_shape, _ = REFERENCE_MODELS[name]

    def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
        shape = value_info.type.tensor_type.shape
        return [d.dim_param or d.dim_value for d in shape.dim]

    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp) == ["batch", *sample_shape]
    assert out.name == "logits"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(out) == ["batch", 10]


def test_nodes_named_uniquely(model: onnx.ModelProto) -> None:
    names = [node.name for node in model.graph.node]
    assert all(names)
    assert len(set(names)) == len(names)


def test_weights_are_float32(model: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        assert init.data_type == onnx.TensorProto.FLOAT, init.name


def test_no_batchnorm_left(model: onnx.ModelProto) -> None:
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}


def test_calib_file(name: str) -> None:
    calib = load_npz(MODELS_DIR / f"{name}_calib.npz")
    sample_shape, _ = REFERENCE_MODELS[name]
    assert set(calib) == {"input"}
    assert calib["input"].dtype == np.float32
    assert calib["input"].shape == (N_CALIB, *sample_shape)
    assert np.isfinite(calib["input"]).all()
    assert (calib["input"] < 0).any(), "inputs are standardised, so blank pixels are negative"


def test_test_file(name: str) -> None:
    test = load_npz(MODELS_DIR / f"{name}_test.npz")
    sample_shape, _ = REFERENCE_MODELS[name]
    assert set(test) == {"input", "labels"}
    assert test["input"].dtype == np.float32
    assert test["input"].shape == (N_TEST, *sample_shape)
    assert test["labels"].dtype == np.int64
    assert test["labels"].shape == (N_TEST,)
    assert set(np.unique(test["labels"]).tolist()) == set(range(10))


def test_dense_accuracy(name: str) -> None:
    test = load_npz(MODELS_DIR / f"{name}_test.npz")
    _, min_accuracy = REFERENCE_MODELS[name]
    sess = ort.InferenceSession(str(MODELS_DIR / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": test["input"]})
    assert logits.shape == (N_TEST, 10)
    accuracy = float((logits.argmax(axis=1) == test["labels"]).mean())
    assert accuracy >= min_accuracy, f"{name}: {accuracy:.4f} < {min_accuracy}"


def test_models_dir_is_small() -> None:
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert total < MAX_DIR_BYTES


def test_readme_documents_every_model() -> None:
    readme = (MODELS_DIR / "README.md").read_text()
    assert "## Pruning results" in readme
    for model_name in NAMES:
        assert f"`{model_name}`" in readme
