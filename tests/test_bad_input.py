"""Bad input, through the CLI (one row each) and through the library (the right SippError).

Every CLI row must: exit non-zero, print exactly one stderr line starting with "error:" that
names the problem, print no traceback, create no output file, leave the input model
byte-identical and leave no stray (temporary) files in the output directory.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sipp_onnx import (
    CalibrationError,
    ConfigError,
    ModelError,
    NoPrunableLayersError,
    OutputError,
    ProviderError,
    PruneConfig,
    SippError,
    inspect_model,
    prune_model,
)

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]

N_SAMPLES = 16


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every entry under `folder` (hidden temporary directories included)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# ----------------------------------------------------------------------------- models


def relu_only() -> onnx.ModelProto:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    return builders.finish(
        [node], [builders.value("x", ["batch", 20])], [builders.value("y", ["batch", 20])], []
    )


def matmul_of_inputs() -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")
    return builders.finish(
        [node],
        [builders.value("x", ["batch", 4, 5]), builders.value("z", ["batch", 5, 3])],
        [builders.value("y", ["batch", 4, 3])],
        [],
    )


def object_array() -> np.ndarray:
    arr = np.empty((N_SAMPLES,), dtype=object)
    for i in range(N_SAMPLES):
        arr[i] = np.zeros(20, np.float32)
    return arr


# ----------------------------------------------------------------------------- CLI rows


@dataclass
class Env:
    """The files of one row: a good mlp model, good calibration data, the output path."""

    dir: Path
    model: Path
    calib: Path
    out: Path

    def npz(self, name: str = "bad.npz", **arrays) -> Path:
        path = self.dir / name
        np.savez(path, **arrays)
        return path

    def good(self) -> np.ndarray:
        return builders.gaussian_calibration((20,), n=N_SAMPLES)


@dataclass
class Row:
    id: str
    args: Callable[[Env], list]
    expect: str
    """Substring (case-insensitive) the one error line must contain."""
    bug: str = ""
    """Set when the row fails because of a library bug (the reason of its strict xfail)."""


def _model(env: Env, model: onnx.ModelProto, name: str) -> Path:
    path = builders.save(model, env.dir / name)
    env.model = path  # the file whose bytes must not change
    return path


def _bytes(env: Env, name: str, data: bytes) -> Path:
    path = env.dir / name
    path.write_bytes(data)
    env.model = path
    return path


def _with_bad_value(env: Env, value: float) -> list:
    x = env.good()
    x[3, 7] = value
    return ["prune", env.model, env.npz(x=x), "-o", env.out]


ROWS = [
    Row("missing-model", lambda e: ["prune", e.dir / "nope.onnx", e.calib, "-o", e.out], "does not exist"),
    Row(
        "corrupt-random-bytes",
        lambda e: [
            "prune",
            _bytes(e, "random.onnx", np.random.default_rng(0).bytes(4096)),
            e.calib,
            "-o",
            e.out,
        ],
        "cannot read",
    ),
    Row(
        "corrupt-truncated",
        lambda e: ["prune", _bytes(e, "cut.onnx", _half(e.model)), e.calib, "-o", e.out],
        "cannot read",
    ),
    Row("model-is-directory", lambda e: ["prune", e.dir, e.calib, "-o", e.out], "not a file"),
    Row(
        "calibration-missing", lambda e: ["prune", e.model, e.dir / "nope.npz", "-o", e.out], "does not exist"
    ),
    Row("calibration-not-npz", lambda e: ["prune", e.model, _text(e.dir / "calib.txt"), "-o", e.out], ".npz"),
    Row(
        "calibration-truncated-npz",
        lambda e: ["prune", e.model, _raw(e.dir / "cut.npz", _half(e.calib)), "-o", e.out],
        "cannot read",
    ),
    Row(
        "calibration-garbage-npz",
        lambda e: ["prune", e.model, _raw(e.dir / "junk.npz", b"not a zip file"), "-o", e.out],
        "cannot read",
    ),
    Row(
        "calibration-keys-mismatch",
        lambda e: ["prune", e.model, e.npz(a=e.good(), b=e.good()), "-o", e.out],
        "missing ['x']",
    ),
    Row(
        "wrong-rank",
        lambda e: ["prune", e.model, e.npz(x=e.good().reshape(N_SAMPLES, 4, 5)), "-o", e.out],
        "rank",
    ),
    Row(
        "wrong-fixed-dim",
        lambda e: ["prune", e.model, e.npz(x=np.zeros((N_SAMPLES, 21), np.float32)), "-o", e.out],
        "axis 1 must be 20",
    ),
    Row(
        "int-dtype-for-float",
        lambda e: ["prune", e.model, e.npz(x=np.ones((N_SAMPLES, 20), np.int32)), "-o", e.out],
        "int32",
    ),
    Row("nan", lambda e: _with_bad_value(e, np.nan), "nan"),
    Row("inf", lambda e: _with_bad_value(e, np.inf), "inf"),
    Row("negative-inf", lambda e: _with_bad_value(e, -np.inf), "inf"),
    Row(
        "empty-array",
        lambda e: ["prune", e.model, e.npz(x=np.zeros((0, 20), np.float32)), "-o", e.out],
        "no samples",
    ),
    Row(
        "object-array-npy",
        lambda e: ["prune", e.model, _pickled_npy(e.dir / "obj.npy"), "-o", e.out],
        "object",
    ),
    Row(
        "object-array-npz",
        lambda e: ["prune", e.model, e.npz("obj.npz", x=object_array()), "-o", e.out],
        "object",
    ),
    Row("sparsity-1.0", lambda e: ["prune", e.model, e.calib, "-o", e.out, "--sparsity", "1.0"], "sparsity"),
    Row(
        "sparsity-negative",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--sparsity", "-0.1"],
        "sparsity",
    ),
    Row("sparsity-1.5", lambda e: ["prune", e.model, e.calib, "-o", e.out, "--sparsity", "1.5"], "sparsity"),
    Row("sparsity-nan", lambda e: ["prune", e.model, e.calib, "-o", e.out, "--sparsity", "nan"], "sparsity"),
    Row(
        "batch-size-0", lambda e: ["prune", e.model, e.calib, "-o", e.out, "--batch-size", "0"], "batch_size"
    ),
    Row(
        "max-samples-0",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--max-samples", "0"],
        "max_samples",
    ),
    Row(
        "bad-exclude-regex", lambda e: ["prune", e.model, e.calib, "-o", e.out, "--exclude", "fc(1"], "regex"
    ),
    Row("output-is-input", lambda e: ["prune", e.model, e.calib, "-o", e.model], "input model"),
    Row(
        "output-is-input-other-spelling",
        lambda e: ["prune", e.model, e.calib, "-o", e.dir / "." / "sub" / ".." / e.model.name],
        "input model",
    ),
    Row(
        "output-dir-missing",
        lambda e: ["prune", e.model, e.calib, "-o", e.dir / "nope" / "out.onnx"],
        "does not exist",
    ),
    Row(
        "output-is-directory",
        lambda e: ["prune", e.model, e.calib, "-o", _mkdir(e.dir / "outdir")],
        "directory",
    ),
    Row(
        "report-exists",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--report", _raw(e.dir / "r.json", b"{}")],
        "--overwrite",
    ),
    Row(
        "report-dir-missing",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--report", e.dir / "nope" / "r.json"],
        "does not exist",
    ),
    Row(
        "report-is-input-model",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--report", e.model, "--overwrite"],
        "input model",
    ),
    Row(
        "report-is-output",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--report", e.out, "--overwrite"],
        "report",
    ),
    Row(
        "no-prunable-relu-only",
        lambda e: ["prune", _model(e, relu_only(), "relu.onnx"), e.calib, "-o", e.out],
        "prun",
    ),
    Row(
        "no-prunable-matmul-of-inputs",
        lambda e: ["prune", _model(e, matmul_of_inputs(), "mm.onnx"), e.calib, "-o", e.out],
        "no prunable layer",
    ),
    Row(
        "everything-excluded",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--exclude", "fc"],
        "no prunable layer",
    ),
    Row(
        "provider-cuda-without-gpu",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--provider", "cuda"],
        "cuda",
    ),
    Row(
        "provider-cuda-magnitude",
        lambda e: ["prune", e.model, e.calib, "-o", e.out, "--provider", "cuda", "--method", "magnitude"],
        "cuda",
    ),
    Row("inspect-missing-model", lambda e: ["inspect", e.dir / "nope.onnx"], "does not exist"),
    Row(
        "inspect-corrupt-model",
        lambda e: ["inspect", _bytes(e, "random.onnx", np.random.default_rng(1).bytes(4096))],
        "cannot read",
    ),
    Row("inspect-bad-exclude-regex", lambda e: ["inspect", e.model, "--exclude", "("], "regex"),
]


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _text(path: Path) -> Path:
    path.write_text("1 2 3\n")
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _pickled_npy(path: Path) -> Path:
    np.save(path, object_array(), allow_pickle=True)
    return path


def _env(tmp_path: Path) -> Env:
    model = builders.save(builders.mlp(), tmp_path / "mlp.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=builders.gaussian_calibration((20,), n=N_SAMPLES))
    return Env(tmp_path, model, calib, tmp_path / "out.onnx")


def _params():
    for row in ROWS:
        marks = [pytest.mark.xfail(strict=True, reason=row.bug)] if row.bug else []
        yield pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", list(_params()))
def test_cli_bad_input(row: Row, tmp_path: Path, cli, cuda_usable: bool) -> None:
    if row.id.startswith("provider-cuda") and cuda_usable:
        pytest.skip("a CUDA session works on this machine")
    env = _env(tmp_path)
    args = row.args(env)
    model_digest = sha256(env.model) if env.model.is_file() else None
    before = listing(tmp_path)

    result = cli(*args)

    assert result.exit_code not in (0, None), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    assert lines[0].startswith("error: "), lines
    assert row.expect.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not env.out.exists()
    assert listing(tmp_path) == before, "files were created or removed"
    if model_digest is not None:
        assert sha256(env.model) == model_digest


def test_cli_existing_output_refused(tmp_path: Path, cli) -> None:
    env = _env(tmp_path)
    env.out.write_bytes(b"precious")
    before = listing(tmp_path)
    result = cli("prune", env.model, env.calib, "-o", env.out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0], lines
    assert env.out.read_bytes() == b"precious"
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "args, option",
    [
        (["--sparsity", "half"], "--sparsity"),
        (["--method", "random"], "--method"),
        (["--op-types", "Relu"], "--op-types"),
        (["--provider", "tpu"], "--provider"),
        (["--batch-size", "1.5"], "--batch-size"),
    ],
    ids=[
        "sparsity-not-a-number",
        "unknown-method",
        "unknown-op-type",
        "unknown-provider",
        "batch-size-not-int",
    ],
)
def test_cli_usage_errors(args: list[str], option: str, tmp_path: Path, cli) -> None:
    """Values click itself rejects: usage error (exit 2) naming the option, nothing written."""
    env = _env(tmp_path)
    digest = sha256(env.model)
    before = listing(tmp_path)
    result = cli("prune", env.model, env.calib, "-o", env.out, *args)
    assert result.exit_code == 2
    assert option in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert listing(tmp_path) == before and sha256(env.model) == digest


# ----------------------------------------------------------------------------- real processes


def _subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sipp_onnx.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_subprocess_bad_input_rows(tmp_path: Path, cuda_usable: bool) -> None:
    """Real processes: exit status 1, one "error:" line on the real stderr (where ONNX Runtime's
    own C++ logging would land too), no traceback, nothing written, the model unchanged."""
    env = _env(tmp_path)
    x = env.good()
    x[0, 0] = np.nan
    bad = env.npz(x=x)
    digest = sha256(env.model)
    before = listing(tmp_path)
    rows: list[tuple[list[object], str]] = [([bad], "NaN"), ([env.calib, "--sparsity", "1.0"], "sparsity")]
    if not cuda_usable:
        rows.append(([env.calib, "--provider", "cuda"], "cuda"))
    for args, expect in rows:
        proc = _subprocess("prune", env.model, *args, "-o", env.out)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
        assert proc.stdout == ""
    assert sha256(env.model) == digest
    assert listing(tmp_path) == before


def test_subprocess_inspect_missing_and_corrupt_model(tmp_path: Path) -> None:
    corrupt = tmp_path / "cut.onnx"
    good = builders.mlp().SerializeToString()
    corrupt.write_bytes(good[: len(good) // 2])
    for path in (tmp_path / "nope.onnx", corrupt):
        proc = _subprocess("inspect", path)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr + proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert proc.stdout == ""


# ----------------------------------------------------------------------------- library level


def _lib_case(name: str, tmp_path: Path):
    """(model, calibration, config kwargs, output, expected error) for one library case."""
    env = _env(tmp_path)
    good = env.good()
    x = good.copy()
    calib_error = CalibrationError
    cases = {
        "missing-model": lambda: (tmp_path / "nope.onnx", env.calib, {}, env.out, ModelError),
        "random-bytes": lambda: (
            _bytes(env, "r.onnx", np.random.default_rng(0).bytes(4096)),
            env.calib,
            {},
            env.out,
            ModelError,
        ),
        "truncated": lambda: (
            _bytes(env, "t.onnx", env.model.read_bytes()[:-40]),
            env.calib,
            {},
            env.out,
            ModelError,
        ),
        "keys": lambda: (env.model, env.npz(a=good, b=good), {}, env.out, calib_error),
        "rank": lambda: (env.model, {"x": good[:, :, None]}, {}, env.out, calib_error),
        "fixed-dim": lambda: (env.model, {"x": good[:, :19]}, {}, env.out, calib_error),
        "int": lambda: (env.model, {"x": good.astype(np.int64)}, {}, env.out, calib_error),
        "nan": lambda: (env.model, {"x": np.where(x > 1, np.nan, x)}, {}, env.out, calib_error),
        "inf": lambda: (env.model, {"x": np.where(x > 1, np.inf, x)}, {}, env.out, calib_error),
        "empty": lambda: (env.model, {"x": good[:0]}, {}, env.out, calib_error),
        "object": lambda: (env.model, _pickled_npy(tmp_path / "o.npy"), {}, env.out, calib_error),
        "output-is-input": lambda: (env.model, env.calib, {}, env.model, OutputError),
        "output-dir-missing": lambda: (env.model, env.calib, {}, tmp_path / "a" / "b.onnx", OutputError),
        "no-prunable": lambda: (
            _model(env, relu_only(), "relu.onnx"),
            env.calib,
            {},
            env.out,
            NoPrunableLayersError,
        ),
        "attention-only": lambda: (matmul_of_inputs(), env.calib, {}, None, NoPrunableLayersError),
        "cuda": lambda: (env.model, env.calib, {"provider": "cuda"}, env.out, ProviderError),
    }
    return env, cases[name]()


LIB_CASES = [
    "missing-model",
    "random-bytes",
    "truncated",
    "keys",
    "rank",
    "fixed-dim",
    "int",
    "nan",
    "inf",
    "empty",
    "object",
    "output-is-input",
    "output-dir-missing",
    "no-prunable",
    "attention-only",
    "cuda",
]


@pytest.mark.parametrize("name", LIB_CASES)
def test_library_raises_the_right_error(name: str, tmp_path: Path, cuda_usable: bool) -> None:
    if name == "cuda" and cuda_usable:
        pytest.skip("a CUDA session works on this machine")
    env, (model, calib, kwargs, out, error) = _lib_case(name, tmp_path)
    before = listing(tmp_path)
    digest = sha256(model) if isinstance(model, Path) and model.is_file() else None
    with pytest.raises(error) as info:
        prune_model(model, calib, PruneConfig(**kwargs), output=out)
    assert isinstance(info.value, SippError)
    message = str(info.value)
    assert message and "\n" not in message
    assert listing(tmp_path) == before
    if digest is not None:
        assert sha256(model) == digest


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_library_sparsity_out_of_range(sparsity) -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        PruneConfig(sparsity=sparsity)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "sipp"},
        {"provider": "gpu"},
        {"batch_size": 0},
        {"max_samples": 0},
        {"exclude": ("[",)},
        {"op_types": ("Relu",)},
        {"op_types": ()},
        {"seed": -1},
        {"reduction": "min"},
    ],
)
def test_library_config_errors(kwargs) -> None:
    with pytest.raises(ConfigError):
        PruneConfig(**kwargs)


def test_library_existing_output_needs_overwrite(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="overwrite"):
        prune_model(env.model, env.calib, output=env.out)
    assert env.out.read_bytes() == b"keep"
    prune_model(env.model, env.calib, output=env.out, overwrite=True)
    onnx.checker.check_model(str(env.out))


def test_library_inspect_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model(tmp_path / "nope.onnx")
    bad = _raw(tmp_path / "bad.onnx", b"\x00\xff" * 100)
    with pytest.raises(ModelError):
        inspect_model(bad)


def test_library_multi_input_model_rejects_npy(tmp_path: Path) -> None:
    """A .npy cannot feed a model with two inputs; the error names both inputs."""
    x, z = builders.value("x", ["batch", 4]), builders.value("z", ["batch", 4])
    w = builders.tensor("W", np.ones((3, 4)))
    nodes = [
        helper.make_node("Add", ["x", "z"], ["s"], name="add"),
        helper.make_node("Gemm", ["s", "W"], ["y"], name="fc", transB=1),
    ]
    y = builders.value("y", ["batch", 3], TensorProto.FLOAT)
    model = builders.finish(nodes, [x, z], [y], [w])
    path = tmp_path / "calib.npy"
    np.save(path, np.zeros((4, 4), np.float32))
    with pytest.raises(CalibrationError, match="'x'.*'z'"):
        prune_model(model, path)
