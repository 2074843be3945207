"""Reproducibility (issue 7, item 4): the same model, calibration data, options and seed give a
byte-identical pruned file, in one process and across processes (hash randomization included);
another seed gives another sipp-rand result; the JSON report records the versions that made it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import sipp_onnx
from sipp_onnx import PruneConfig, prune_model

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
METHODS = ["sipp-det", "sipp-rand", "sipp-hybrid", "wanda", "magnitude"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two built models (Gemm/MatMul and Conv) and the smallest shipped model, with calibration."""
    folder = tmp_path_factory.mktemp("repro")
    files = {}
    for name, model, shape in (("mlp", builders.mlp(), (20,)), ("conv", builders.convnet(), (3, 8, 8))):
        calib = folder / f"{name}.npz"
        np.savez(calib, x=builders.gaussian_calibration(shape, n=48))
        files[name] = (builders.save(model, folder / f"{name}.onnx"), calib)
    shipped = REPO / "models"
    files["tokens"] = (shipped / "tokens.onnx", shipped / "tokens_calib.npz")  # the smallest: 40 KB
    return files


def prune_twice(model: Path, calib: Path, config: PruneConfig, folder: Path) -> tuple[str, str]:
    digests = []
    for name in ("first.onnx", "second.onnx"):
        prune_model(model, calib, config, output=folder / name)
        digests.append(sha256(folder / name))
    return digests[0], digests[1]


@pytest.mark.parametrize("model", ["mlp", "conv", "tokens"])
@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_give_the_same_bytes(model: str, method: str, inputs, tmp_path: Path) -> None:
    """Default options (refit obs) for every method; sipp-rand/hybrid with a non-default seed."""
    model_path, calib = inputs[model]
    digest = sha256(model_path)
    first, second = prune_twice(model_path, calib, PruneConfig(method=method, seed=7), tmp_path)
    assert first == second, f"{method} on {model}: two runs wrote different files"
    assert sha256(model_path) == digest


def test_sipp_det_sequential_and_signed_terms_are_reproducible(inputs, tmp_path: Path) -> None:
    """The options with more moving parts: a pass per layer depth, the spec's signed terms."""
    model, calib = inputs["conv"]
    config = PruneConfig(sequential=True, terms="signed", reduction="mean", sparsity=0.7)
    first, second = prune_twice(model, calib, config, tmp_path)
    assert first == second


def test_another_seed_gives_another_sipp_rand_result(inputs, tmp_path: Path) -> None:
    model, calib = inputs["tokens"]
    digests = set()
    for seed in (0, 0, 1):
        out = tmp_path / f"seed{seed}.onnx"
        prune_model(model, calib, PruneConfig(method="sipp-rand", seed=seed), output=out, overwrite=True)
        digests.add(sha256(out))
    assert len(digests) == 2, "seed 1 should differ from seed 0, and seed 0 twice should not"


def test_same_bytes_across_processes(inputs, tmp_path: Path) -> None:
    """Two `sipp-onnx prune` processes with different hash seeds (set and dict orders) agree."""
    model, calib = inputs["conv"]
    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash{hash_seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        args = ["prune", model, calib, "-o", out, "-q", "--method", "sipp-hybrid"]
        proc = subprocess.run(
            [sys.executable, "-m", "sipp_onnx.cli", *map(str, args)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        digests.append(sha256(out))
    assert digests[0] == digests[1]


def test_report_records_the_versions(inputs, tmp_path: Path, cli) -> None:
    model, calib = inputs["mlp"]
    expected = {
        "sipp-onnx": sipp_onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    report = tmp_path / "report.json"
    result = cli("prune", model, calib, "-o", tmp_path / "out.onnx", "-q", "--report", report)
    assert result.exit_code == 0, result.stderr
    assert json.loads(report.read_text())["versions"] == expected
    assert prune_model(model, calib, PruneConfig(method="magnitude")).report.versions == expected
    try:
        installed = importlib.metadata.version("sipp-onnx")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return
    assert installed == sipp_onnx.__version__, "pyproject.toml and sipp_onnx.__version__ disagree"
