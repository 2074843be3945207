"""Shared fixtures of the CLI / calibration / bad-input tests (models come from builders.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sipp_onnx.cli import main

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]


@pytest.fixture
def cli():
    """Run `sipp-onnx ARGS...` in-process; returns click's Result (stdout/stderr kept apart).

    Exceptions other than SystemExit are re-raised, so a crash is a test error with its own
    traceback instead of a mysterious exit code.
    """
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture
def mlp_files(tmp_path: Path) -> tuple[Path, Path]:
    """builders.mlp() as tmp_path/mlp.onnx and 64 samples keyed 'x' as tmp_path/calib.npz."""
    model = builders.save(builders.mlp(), tmp_path / "mlp.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=builders.gaussian_calibration((20,), n=64))
    return model, calib


@pytest.fixture(scope="session")
def cuda_usable() -> bool:
    """True only when ONNX Runtime can really create a CUDA session on this machine."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            builders.single_gemm().SerializeToString(), providers=["CUDAExecutionProvider"]
        )
    except Exception:
        return False
    return session.get_providers()[0] == "CUDAExecutionProvider"
