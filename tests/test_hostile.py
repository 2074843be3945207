"""Hostile input and hostile conditions (issue 7, item 3), beyond tests/test_bad_input.py.

Every refused case must: exit non-zero with exactly one stderr line that starts with "error:"
(or "interrupted:" after a signal) and names the problem, print no traceback, leave the input
model byte-identical, and leave neither an output nor a temporary file in the output directory.
The same cases go through the library, which must raise the right `SippError` subclass.

A real read-only or full file system is a small tmpfs, mounted where the tests run as root and
may mount (skipped elsewhere); a full disk is also simulated everywhere by making the writes
under the output directory fail with ENOSPC. Signals are sent to real `sipp-onnx` processes.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sipp_onnx import (
    CalibrationError,
    ModelError,
    NoPrunableLayersError,
    OutputError,
    PruneConfig,
    PruneReport,
    SippError,
    prune_model,
)

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
    import kind_builders
except ImportError:  # pragma: no cover
    from tests import (
        builders,  # type: ignore[no-redef]
        kind_builders,  # type: ignore[no-redef]
    )

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 16
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and permissions")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every entry under `folder`, hidden temporary files and directories included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@dataclass
class Env:
    """A good mlp model and calibration data in `dir`; the output goes to the separate `outdir`."""

    dir: Path
    outdir: Path
    model: Path
    calib: Path

    @property
    def out(self) -> Path:
        return self.outdir / "pruned.onnx"

    def good(self, shape=(20,)) -> np.ndarray:
        return builders.gaussian_calibration(shape, n=N_SAMPLES)

    def npz(self, name: str = "bad.npz", **arrays) -> Path:
        path = self.dir / name
        np.savez(path, **arrays)
        return path

    def raw(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def use_model(self, model: onnx.ModelProto, name: str = "bad.onnx") -> Path:
        """Write `model` unchecked (it may be invalid) and make it the file that must not change."""
        self.model = self.raw(name, model.SerializeToString())
        return self.model


def make_env(tmp_path: Path, model: onnx.ModelProto | None = None, shape=(20,)) -> Env:
    folder, outdir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    outdir.mkdir()
    path = builders.save(model if model is not None else builders.mlp(), folder / "mlp.onnx")
    calib = folder / "calib.npz"
    np.savez(calib, x=builders.gaussian_calibration(shape, n=N_SAMPLES))
    return Env(folder, outdir, path, calib)


def assert_clean_failure(
    code: int | None,
    stderr: str,
    expect: str,
    env: Env,
    before: set[str],
    digest: str,
    prefix: str = "error: ",
) -> None:
    """The contract of a refused or interrupted run (see the module docstring)."""
    assert code not in (0, None), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    assert lines[0].startswith(prefix), lines
    assert expect.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in stderr
    assert listing(env.outdir) == set(), "output or temporary files left in the output directory"
    assert listing(env.dir) == before, "files were created or removed beside the inputs"
    assert sha256(env.model) == digest, "the input model changed"


# ----------------------------------------------------------------------------- models


def two_inputs() -> onnx.ModelProto:
    """x + z -> Gemm: a model whose calibration needs two arrays."""
    nodes = [
        helper.make_node("Add", ["x", "z"], ["s"], name="add"),
        helper.make_node("Gemm", ["s", "W"], ["y"], name="fc", transB=1),
    ]
    return builders.finish(
        nodes,
        [builders.value("x", ["batch", 4]), builders.value("z", ["batch", 4])],
        [builders.value("y", ["batch", 3])],
        [builders.tensor("W", np.ones((3, 4)))],
    )


def mlp_with(change: Callable[[onnx.ModelProto], None]) -> onnx.ModelProto:
    model = builders.mlp()
    change(model)
    return model


def _dangling_input(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "ghost"  # relu1 reads a tensor that nothing produces


def _unknown_attribute(m: onnx.ModelProto) -> None:
    m.graph.node[0].attribute.append(helper.make_attribute("bogus", 3))


def _output_written_twice(m: onnx.ModelProto) -> None:
    m.graph.node[3].output[0] = "h1"  # relu2 overwrites fc1's output: not SSA


def _ir_version_99(m: onnx.ModelProto) -> None:
    m.ir_version = 99


def _opset_99(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = 99  # onnx.checker lets it pass; ONNX Runtime refuses it


def _fixed_batch_32(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32


def _npz_with_member(env: Env, name: str, member: str, data: bytes) -> Path:
    path = env.dir / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def _truncated_member(env: Env) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, env.good())
    return _npz_with_member(env, "short.npz", "x.npy", buffer.getvalue()[:-100])


def _calibration_dir(env: Env, **files: np.ndarray) -> Path:
    folder = env.dir / "calib_dir"
    folder.mkdir()
    for name, array in files.items():
        np.savez(folder / f"{name}.npz", x=array)
    return folder


# ----------------------------------------------------------------------------- new layer kinds


def _lstm_lens_beyond_steps(env: Env) -> tuple[Path, Path]:
    """A bidirectional LSTM with sequence_lens longer than the sequences: ONNX Runtime refuses
    the first calibration batch."""
    model, data = kind_builders.recurrent_kind("LSTM", "bidirectional", lens=True, initial_h=True)
    data = {k: v[:N_SAMPLES] for k, v in data.items()}
    data["lens"] = data["lens"] + 5
    return env.use_model(model), env.npz(**data)


def _if_only_layers_disagree(env: Env) -> tuple[Path, Path]:
    """Every layer inside an If whose data-dependent condition differs between the batches."""
    model = kind_builders.if_convs(cond="sign")
    graph = model.graph
    head = next(n for n in graph.node if n.name == "head")
    graph.node.remove(head)
    flatten = next(n for n in graph.node if n.name == "flatten")
    flatten.output[0] = "out"
    del graph.output[:]
    graph.output.append(builders.value("out", ["N", 16]))
    x = builders.gaussian_calibration((3, 8, 8), n=N_SAMPLES)
    folder = env.dir / "calib_dir"  # one file per sign: batches do not span files
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.abs(x))
    np.savez(folder / "b.npz", x=-np.abs(x))
    return env.use_model(model), folder


# ----------------------------------------------------------------------------- refused cases


@dataclass
class Case:
    id: str
    build: Callable[[Env], tuple[Path, Path]]
    """(model, calibration) paths; a model built here is registered with `env.use_model`."""
    error: type[SippError]
    expect: str
    """Substring (case-insensitive) that the one error line and the exception must contain."""


CASES = [
    # models that parse but are not valid (onnx.checker, or ONNX Runtime after it)
    Case(
        "model-input-never-produced",
        lambda e: (e.use_model(mlp_with(_dangling_input)), e.calib),
        ModelError,
        "ghost",
    ),
    Case(
        "model-unknown-attribute",
        lambda e: (e.use_model(mlp_with(_unknown_attribute)), e.calib),
        ModelError,
        "bogus",
    ),
    Case(
        "model-not-ssa", lambda e: (e.use_model(mlp_with(_output_written_twice)), e.calib), ModelError, "'h1'"
    ),
    Case(
        "model-ir-version-99",
        lambda e: (e.use_model(mlp_with(_ir_version_99)), e.calib),
        ModelError,
        "ir_version 99",
    ),
    Case("model-opset-99", lambda e: (e.use_model(mlp_with(_opset_99)), e.calib), ModelError, "opset 99"),
    Case(
        "model-zero-bytes", lambda e: (e.use_model(onnx.ModelProto()), e.calib), ModelError, "no onnx graph"
    ),
    # calibration data that does not fit
    Case(
        "calibration-wrong-second-name",
        lambda e: (e.use_model(two_inputs()), e.npz(x=e.good((4,)), zz=e.good((4,)))),
        CalibrationError,
        "missing ['z']",
    ),
    Case(
        "calibration-sample-counts-differ",
        lambda e: (e.use_model(two_inputs()), e.npz(x=e.good((4,)), z=e.good((4,))[:15])),
        CalibrationError,
        "different sample counts",
    ),
    Case("calibration-npz-without-arrays", lambda e: (e.model, e.npz()), CalibrationError, "holds no arrays"),
    Case(
        "calibration-zero-byte-npz",
        lambda e: (e.model, e.raw("zero.npz", b"")),
        CalibrationError,
        "cannot read",
    ),
    Case(
        "calibration-zero-byte-npy",
        lambda e: (e.model, e.raw("zero.npy", b"")),
        CalibrationError,
        "cannot read",
    ),
    Case(
        # NumPy takes such a file for a pickle; the message must not suggest allow_pickle
        "calibration-onnx-file-named-npz",
        lambda e: (e.model, e.raw("model.npz", e.model.read_bytes())),
        CalibrationError,
        "not a numpy file",
    ),
    Case(
        "calibration-npz-member-not-npy",
        lambda e: (e.model, _npz_with_member(e, "readme.npz", "readme.txt", b"hello")),
        CalibrationError,
        "not a numpy array",
    ),
    Case(
        "calibration-npz-member-empty",
        lambda e: (e.model, _npz_with_member(e, "empty_member.npz", "x.npy", b"")),
        CalibrationError,
        "not a numpy array",
    ),
    Case(
        "calibration-npz-member-truncated",
        lambda e: (e.model, _truncated_member(e)),
        CalibrationError,
        "cannot read",
    ),
    Case(
        "calibration-float64-beyond-float32",
        lambda e: (e.model, e.npz(x=e.good().astype(np.float64) * 1e300)),
        CalibrationError,
        "too large for float32",
    ),
    Case(
        "calibration-complex",
        lambda e: (e.model, e.npz(x=e.good().astype(np.complex64))),
        CalibrationError,
        "complex64",
    ),
    Case(
        "calibration-strings",
        lambda e: (e.model, e.npz(x=np.full((N_SAMPLES, 20), "a"))),
        CalibrationError,
        "<U1",
    ),
    Case("calibration-scalar", lambda e: (e.model, e.npz(x=np.float32(1.0))), CalibrationError, "rank 0"),
    Case(
        "calibration-zero-width",
        lambda e: (e.model, e.npz(x=np.zeros((N_SAMPLES, 0), np.float32))),
        CalibrationError,
        "axis 1 must be 20",
    ),
    Case(
        "calibration-empty-directory",
        lambda e: (e.model, _calibration_dir(e)),
        CalibrationError,
        "holds no .npz or .npy",
    ),
    Case(
        "calibration-directory-one-bad-file",
        lambda e: (e.model, _calibration_dir(e, a=e.good(), b=e.good().astype(np.int64))),
        CalibrationError,
        "b.npz",
    ),
    # the layer kinds of issue 17
    Case(
        "recurrent-sequence-lens-beyond-steps",
        _lstm_lens_beyond_steps,
        CalibrationError,
        "sequence_le",
    ),
    Case(
        "if-branch-layers-only-and-batches-disagree",
        _if_only_layers_disagree,
        NoPrunableLayersError,
        "does not agree",
    ),
    Case(
        # the error line only: the "last N samples are not used" warning used to come first
        "calibration-fewer-samples-than-fixed-batch",
        lambda e: (e.use_model(mlp_with(_fixed_batch_32)), e.calib),
        CalibrationError,
        "fixes its batch size to 32",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_refuses(case: Case, tmp_path: Path, cli) -> None:
    env = make_env(tmp_path)
    model, calib = case.build(env)
    before, digest = listing(env.dir), sha256(env.model)
    result = cli("prune", model, calib, "-o", env.out)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert_clean_failure(result.exit_code, result.stderr, case.expect, env, before, digest)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_library_refuses(case: Case, tmp_path: Path) -> None:
    env = make_env(tmp_path)
    model, calib = case.build(env)
    before, digest = listing(env.dir), sha256(env.model)
    with pytest.raises(case.error) as info:
        prune_model(model, calib, PruneConfig(), output=env.out)
    message = str(info.value)
    assert case.expect.lower() in message.lower() and "\n" not in message, message
    assert listing(env.outdir) == set() and listing(env.dir) == before
    assert sha256(env.model) == digest


# ----------------------------------------------------------------------------- accepted oddities


def warnings_and_errors(stderr: str) -> list[str]:
    """The stderr lines that are not progress ('stage: done/total')."""
    return [line for line in stderr.splitlines() if line.startswith(("warning:", "error:", "info:"))]


def test_unused_extra_array_is_a_warning(tmp_path: Path, cli) -> None:
    """The right input plus an array no input uses: a warning line, not an error."""
    env = make_env(tmp_path)
    calib = env.npz("extra.npz", x=env.good(), extra=env.good())
    result = cli("prune", env.model, calib, "-o", env.out, "--method", "magnitude")
    assert result.exit_code == 0, result.stderr
    assert warnings_and_errors(result.stderr) == [
        "warning: calibration arrays not used by any model input: ['extra']"
    ]
    onnx.checker.check_model(str(env.out))
    library = prune_model(env.model, calib, PruneConfig())
    assert library.report.unused_calibration_arrays == ("extra",)
    assert "calibration arrays not used by any model input: ['extra']" in library.report.warnings


def test_single_array_under_any_name_feeds_a_single_input(tmp_path: Path) -> None:
    """Documented in calibration.py: a single-input model takes the one array whatever its key."""
    env = make_env(tmp_path)
    reference = prune_model(env.model, env.calib, PruneConfig(), output=env.outdir / "a.onnx")
    renamed = prune_model(env.model, env.npz(images=env.good()), PruneConfig(), output=env.outdir / "b.onnx")
    assert renamed.report.unused_calibration_arrays == ()
    assert reference.report.samples == renamed.report.samples == N_SAMPLES
    assert sha256(env.outdir / "a.onnx") == sha256(env.outdir / "b.onnx")


def test_float64_calibration_is_cast_to_float32(tmp_path: Path, cli) -> None:
    """Documented in calibration.py: a float of another width is cast, with a warning; values
    float32 holds exactly give the very file the float32 data gives."""
    env = make_env(tmp_path)
    calib = env.npz("f64.npz", x=env.good().astype(np.float64))
    result = cli("prune", env.model, calib, "-o", env.outdir / "f64.onnx", "--method", "magnitude")
    assert result.exit_code == 0, result.stderr
    assert warnings_and_errors(result.stderr) == [f"warning: {calib}: input 'x' cast from float64 to float32"]
    cli("prune", env.model, env.calib, "-o", env.outdir / "f32.onnx", "-q", "--method", "magnitude")
    assert sha256(env.outdir / "f64.onnx") == sha256(env.outdir / "f32.onnx")
    library = prune_model(env.model, calib, PruneConfig(refit="none"))
    assert any("cast from float64 to float32" in w for w in library.report.warnings)


# ----------------------------------------------------------------------------- the output directory


@POSIX
def test_unwritable_output_directory(tmp_path: Path, cli) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions (test_read_only_file_system covers root)")
    env = make_env(tmp_path)
    before, digest = listing(env.dir), sha256(env.model)
    env.outdir.chmod(0o555)
    try:
        result = cli("prune", env.model, env.calib, "-o", env.out)
        assert_clean_failure(result.exit_code, result.stderr, "not writable", env, before, digest)
        with pytest.raises(OutputError, match="not writable"):
            prune_model(env.model, env.calib, output=env.out)
        assert listing(env.outdir) == set()
    finally:
        env.outdir.chmod(0o755)


@pytest.fixture
def tmpfs(tmp_path: Path):
    """mount(options) -> a fresh tmpfs; needs root and permission to mount, skips otherwise."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs Linux, root and mount(8)")
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_file_system(tmp_path: Path, tmpfs, cli) -> None:
    """Really unwritable, even for root: the refusal comes before any work."""
    env = make_env(tmp_path)
    env.outdir = tmpfs("ro,size=64k")
    before, digest = listing(env.dir), sha256(env.model)
    result = cli("prune", env.model, env.calib, "-o", env.out)
    assert_clean_failure(result.exit_code, result.stderr, "not writable", env, before, digest)
    result = cli("prune", env.model, env.calib, "-o", tmp_path / "o.onnx", "--report", env.outdir / "r.json")
    assert_clean_failure(result.exit_code, result.stderr, "not writable", env, before, digest)
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(OutputError, match="not writable"):
        prune_model(env.model, env.calib, output=env.out)


def _wide_mlp() -> onnx.ModelProto:
    return builders.mlp(sizes=(64, 256, 64, 10))  # 134 KB of weights: more than a 64 KB tmpfs


def test_full_disk_real(tmp_path: Path, tmpfs, cli) -> None:
    """A 64 KB tmpfs cannot hold the 134 KB model: one line, nothing left on it."""
    env = make_env(tmp_path, _wide_mlp(), shape=(64,))
    env.outdir = tmpfs("size=64k")
    before, digest = listing(env.dir), sha256(env.model)
    result = cli(
        "prune", env.model, env.calib, "-o", env.out, "--method", "magnitude", "--refit", "none", "-q"
    )
    assert_clean_failure(result.exit_code, result.stderr, "no space left on device", env, before, digest)
    with pytest.raises(OutputError, match="No space left on device"):
        prune_model(env.model, env.calib, PruneConfig(method="magnitude", refit="none"), output=env.out)
    assert listing(env.outdir) == set()


def test_full_disk_no_inode_left_real(tmp_path: Path, tmpfs) -> None:
    """A tmpfs without a free inode: even the staging directory cannot be created."""
    env = make_env(tmp_path)
    env.outdir = tmpfs("size=1m,nr_inodes=1")
    with pytest.raises(OutputError, match="No space left on device"):
        prune_model(env.model, env.calib, PruneConfig(method="magnitude"), output=env.out)


class DiskFull:
    """A simulated full disk: each file opened for writing under `folder` takes `room` bytes,
    then its writes fail with ENOSPC as write(2) does (or raise `error` instead).

    Every Python-level way of opening a file goes through io.open (builtins.open, Path.open and
    so Path.write_bytes, os.fdopen), so the patch does not depend on how the writer writes.
    """

    def __init__(self, folder: Path, room: int = 256, error: BaseException | None = None) -> None:
        self.folder = folder.resolve()
        self.room = room
        self.error = error
        self.hits = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> DiskFull:
        real_open = io.open

        def fake_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if set(str(mode)) & set("wax+") and self._inside(file):
                return _FullFile(handle, self)
            return handle

        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(builtins, "open", fake_open)
        return self

    def _inside(self, file) -> bool:
        if isinstance(file, int):
            try:
                file = os.readlink(f"/proc/self/fd/{file}")
            except OSError:
                return True
        path = Path(os.fsdecode(file)).resolve()
        return path == self.folder or self.folder in path.parents


class _FullFile:
    def __init__(self, handle, disk: DiskFull) -> None:
        self._handle, self._disk = handle, disk

    def write(self, data):
        if self._disk.error is not None:
            self._disk.hits += 1
            raise self._disk.error
        size = len(data)
        if size <= self._disk.room:
            self._disk.room -= size
            return self._handle.write(data)
        if self._disk.room:
            self._handle.write(data[: self._disk.room])
            self._handle.flush()
        self._disk.room = 0
        self._disk.hits += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def test_full_disk_simulated_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(tmp_path)
    before, digest = listing(env.dir), sha256(env.model)
    disk = DiskFull(env.outdir).install(monkeypatch)
    with pytest.raises(OutputError, match="No space left on device") as info:
        prune_model(env.model, env.calib, PruneConfig(), output=env.out)
    assert str(env.out) in str(info.value)
    assert disk.hits >= 1, "the simulated disk was never written to"
    assert listing(env.outdir) == set()
    assert listing(env.dir) == before and sha256(env.model) == digest


def test_full_disk_simulated_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    env = make_env(tmp_path)
    before, digest = listing(env.dir), sha256(env.model)
    disk = DiskFull(env.outdir).install(monkeypatch)
    result = cli("prune", env.model, env.calib, "-o", env.out, "-q")
    assert disk.hits >= 1
    assert_clean_failure(result.exit_code, result.stderr, "no space left on device", env, before, digest)


def test_staging_directory_cannot_be_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory passed the up-front check, then a full disk (or a permission change)
    refuses the staging directory; as a real disk does in test_full_disk_no_inode_left_real."""
    env = make_env(tmp_path)
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir).resolve() == env.outdir.resolve():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dir))
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(OutputError, match="No space left on device"):
        prune_model(env.model, env.calib, PruneConfig(method="magnitude"), output=env.out)


def test_report_cannot_be_written_leaves_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """Model and report are one result: when the report fails, the model is removed again."""
    env = make_env(tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    before, digest = listing(env.dir), sha256(env.model)
    DiskFull(reports).install(monkeypatch)
    result = cli("prune", env.model, env.calib, "-o", env.out, "-q", "--report", reports / "r.json")
    assert_clean_failure(result.exit_code, result.stderr, "no space left on device", env, before, digest)
    assert "r.json" in result.stderr
    assert listing(reports) == set()


def test_interrupt_while_writing_report_leaves_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    env = make_env(tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    before, digest = listing(env.dir), sha256(env.model)
    disk = DiskFull(reports, error=KeyboardInterrupt()).install(monkeypatch)
    result = cli("prune", env.model, env.calib, "-o", env.out, "-q", "--report", reports / "r.json")
    assert disk.hits == 1
    assert result.exit_code == 130
    assert_clean_failure(
        result.exit_code, result.stderr, "nothing was written", env, before, digest, prefix="interrupted: "
    )
    assert not (reports / "r.json").exists()


def test_interrupt_while_writing_report_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    env = make_env(tmp_path)
    reports = tmp_path / "reports"
    reports.mkdir()
    DiskFull(reports, error=KeyboardInterrupt()).install(monkeypatch)
    result = cli("prune", env.model, env.calib, "-o", env.out, "-q", "--report", reports / "r.json")
    assert result.exit_code == 130
    assert listing(reports) == set()


def test_interrupt_after_writing_says_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """An interrupt once the files are in place must not claim that nothing was written."""
    env = make_env(tmp_path)

    def interrupted(self) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(PruneReport, "format_table", interrupted)
    result = cli("prune", env.model, env.calib, "-o", env.out)
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1] == f"interrupted: after writing {env.out}"
    onnx.checker.check_model(str(env.out))
    assert listing(env.outdir) == {"pruned.onnx"}


def test_library_interrupt_while_saving_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyboardInterrupt just before the staged file is moved into place: nothing is left."""
    env = make_env(tmp_path)
    before, digest = listing(env.dir), sha256(env.model)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).resolve().parent == env.outdir.resolve():
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        prune_model(env.model, env.calib, PruneConfig(), output=env.out)
    assert listing(env.outdir) == set()
    assert listing(env.dir) == before and sha256(env.model) == digest


# ----------------------------------------------------------------------------- signals


BIG_WIDTH, BIG_DEPTH, BIG_SAMPLES = 512, 6, 400


def big_mlp() -> onnx.ModelProto:
    """Six 512x512 Gemm + Relu layers: with 400 samples in batches of 8 the capture stage alone
    lasts about a second on a laptop core, time enough to interrupt it."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(BIG_DEPTH):
        w = rng.normal(size=(BIG_WIDTH, BIG_WIDTH)) / np.sqrt(BIG_WIDTH)
        inits += [builders.tensor(f"W{i}", w), builders.tensor(f"b{i}", np.zeros(BIG_WIDTH))]
        out = f"r{i}" if i < BIG_DEPTH - 1 else "y"
        nodes += [
            helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1),
            helper.make_node("Relu", [f"h{i}"], [out], name=f"relu{i}"),
        ]
        prev = out
    io_shape = ["batch", BIG_WIDTH]
    return builders.finish(nodes, [builders.value("x", io_shape)], [builders.value("y", io_shape)], inits)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("big")
    model = builders.save(big_mlp(), folder / "big.onnx")
    calib = folder / "big_calib.npz"
    np.savez(calib, x=builders.gaussian_calibration((BIG_WIDTH,), n=BIG_SAMPLES))
    return model, calib


STALL_SAVE = """
import os, sys, time
from pathlib import Path

real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if Path(src).parent.name.startswith("."):  # the staged model in save_model_atomic's temp dir
        print("test-hook: saving", file=sys.stderr, flush=True)
        time.sleep(120)
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace
from sipp_onnx.cli import main

main(prog_name="sipp-onnx")
"""
"""`python -c STALL_SAVE prune ...`: the real CLI, stalled in the save stage with its files
staged, so that a signal lands there for sure (a test hook, not a monkeypatch of the result)."""


def signal_run(args: list, marker: str, sig: int, script: str | None = None) -> tuple[int, list[str]]:
    """Run the CLI, send `sig` once a stderr line starts with `marker`; (exit code, stderr lines)."""
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "sipp_onnx.cli"]
    proc = subprocess.Popen(
        [*head, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"the run ended before {marker!r} (exit {proc.wait()}): {seen}")
            seen.append(line)
            if line.startswith(marker):
                proc.send_signal(sig)
                break
        code = proc.wait(timeout=120)
        while (line := lines.get(timeout=30)) is not None:
            seen.append(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, seen


def _signal_env(tmp_path: Path, big_files: tuple[Path, Path]) -> tuple[Path, Path, Path, str]:
    model, calib = big_files
    outdir = tmp_path / "out"
    outdir.mkdir()
    return model, calib, outdir, sha256(model)


# Before the fix, SIGTERM during the save killed the process and left '.out.onnx.XXXXXXXX/out.onnx'.
SIGNALS = pytest.mark.parametrize(
    "sig, code, message",
    [
        (signal.SIGINT, 130, "interrupted: nothing was written"),
        (signal.SIGTERM, 143, "interrupted: SIGTERM, nothing was written"),
    ],
    ids=["SIGINT", "SIGTERM"],
)


@POSIX
@SIGNALS
def test_signal_during_capture(sig, code, message, tmp_path: Path, big_files) -> None:
    model, calib, outdir, digest = _signal_env(tmp_path, big_files)
    args = ["prune", model, calib, "-o", outdir / "out.onnx", "--batch-size", "8"]
    exit_code, lines = signal_run(args, "capture:", sig)
    assert exit_code == code, lines
    assert lines[-1] == message, lines
    assert not any(line.startswith("error:") or "Traceback" in line for line in lines), lines
    assert listing(outdir) == set(), "output or hidden temporary files left"
    assert sha256(model) == digest


@POSIX
@SIGNALS
def test_signal_during_save(sig, code, message, tmp_path: Path, big_files) -> None:
    model, calib, outdir, digest = _signal_env(tmp_path, big_files)
    args = [
        "prune",
        model,
        calib,
        "-o",
        outdir / "out.onnx",
        "--method",
        "magnitude",
        "--refit",
        "none",
        "-q",
    ]
    exit_code, lines = signal_run(args, "test-hook: saving", sig, STALL_SAVE)
    assert exit_code == code, lines
    assert lines == ["test-hook: saving", message]
    assert listing(outdir) == set(), "output or hidden temporary files left"
    assert sha256(model) == digest


def test_module_entry_point_has_every_command() -> None:
    """`python -m sipp_onnx.cli` used to run before `sweep` was defined, so it lacked it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sipp_onnx.cli", "sweep", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "EVALUATION" in proc.stdout


def bfloat16_bias() -> onnx.ModelProto:
    """builders.mlp() with its last bias stored as bfloat16 and Cast to float: a valid model."""
    model = builders.mlp()
    graph = model.graph
    b3 = next(t for t in graph.initializer if t.name == "b3")
    values = numpy_helper.to_array(b3)
    graph.initializer.remove(b3)
    graph.initializer.append(
        helper.make_tensor("b3_bf16", TensorProto.BFLOAT16, values.shape, values.tolist())
    )
    nodes = [helper.make_node("Cast", ["b3_bf16"], ["b3"], name="cast_b3", to=TensorProto.FLOAT), *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_stdout_holds_only_our_output_with_a_bfloat16_tensor(tmp_path: Path) -> None:
    env = make_env(tmp_path, bfloat16_bias())

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sipp_onnx.cli", *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    pruned = run("prune", env.model, env.calib, "-o", env.out, "-q", "--method", "magnitude")
    assert pruned.returncode == 0, pruned.stderr
    inspected = run("inspect", env.model, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert pruned.stdout == "", pruned.stdout
    assert inspected.stdout.startswith("{"), inspected.stdout[:300]
    assert json.loads(inspected.stdout)["prunable_params"] > 0


# ----------------------------------------------------------------------------- new layer kinds: oddities


def _recurrent(op="LSTM", direction="forward", layout=0, **kwargs):
    model, _ = kind_builders.recurrent_model(op, direction, layout, hidden=8, inputs=6, **kwargs)
    return model


def _gru_linear_before_reset_0() -> onnx.ModelProto:
    model = _recurrent("GRU", "bidirectional", initial_h="none")
    node = next(n for n in model.graph.node if n.name == "rnn")
    next(a for a in node.attribute if a.name == "linear_before_reset").i = 0
    return model


def _rnn_weight_read_elsewhere() -> onnx.ModelProto:
    model = _recurrent("RNN", "reverse", initial_h="none")
    model.graph.node.append(helper.make_node("Identity", ["R"], ["R_copy"], name="peek"))
    model.graph.output.append(builders.value("R_copy", [1, 8, 8]))
    return model


def _lstm_constant_lengths() -> onnx.ModelProto:
    """sequence_lens and initial_h as initializers: both fix the batch size to 8."""
    model = _recurrent("LSTM", "bidirectional", initial_h="constant")
    node = next(n for n in model.graph.node if n.name == "rnn")
    node.input[4] = "lens_c"
    model.graph.initializer.append(builders.tensor("lens_c", np.array([7, 3, 1, 7, 5, 2, 6, 4]), np.int32))
    return model


def _lstm_layout_1() -> onnx.ModelProto:
    return _recurrent("LSTM", "forward", layout=1, initial_h="none")


def _conv_transpose_odd() -> onnx.ModelProto:
    """Two ConvTransposes: output_shape with SAME_UPPER, and odd pads with output_padding and a
    dilation; then a Gemm head."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node(
            "ConvTranspose",
            ["x", "w1"],
            ["a"],
            name="ct_shape",
            strides=[2, 2],
            auto_pad="SAME_UPPER",
            output_shape=[9, 9],
        ),
        helper.make_node(
            "ConvTranspose",
            ["a", "w2", "b2"],
            ["c"],
            name="ct_odd",
            strides=[3, 2],
            dilations=[2, 1],
            pads=[1, 0, 2, 1],
            output_padding=[1, 1],
        ),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    inits = [
        builders.tensor("w1", rng.normal(size=(4, 6, 3, 3)) / 6),
        builders.tensor("w2", rng.normal(size=(6, 5, 3, 2)) / 6),
        builders.tensor("b2", rng.normal(size=5) * 0.1),
        builders.tensor("fc", rng.normal(size=(3, 5))),
    ]
    return builders.finish(
        nodes, [builders.value("x", ["N", 4, 5, 5])], [builders.value("y", ["N", 3])], inits
    )


def _einsum_weird() -> onnx.ModelProto:
    """One plain Einsum dense layer and three that are not dense layers: a diagonal of the
    activation, a sum over the weight's own index, an outer product."""
    rng = np.random.default_rng(1)
    specs = [
        ("ok", "bij,jk->bik", (4, 5), [None, 4, 5]),
        ("diagonal", "bii,ik->bik", (4, 5), [None, 4, 5]),
        ("weight_sum", "bij,jk->bi", (4, 5), [None, 4]),
        ("outer", "bij,kl->bijkl", (2, 3), [None, 4, 4, 2, 3]),
    ]
    nodes, inits, outputs = [], [], []
    for name, equation, shape, out_shape in specs:
        nodes.append(helper.make_node("Einsum", ["x", f"w_{name}"], [name], name=name, equation=equation))
        inits.append(builders.tensor(f"w_{name}", rng.normal(size=shape)))
        outputs.append(builders.value(name, ["N", *out_shape[1:]]))
    return builders.finish(nodes, [builders.value("x", ["N", 4, 4])], outputs, inits)


@dataclass
class Oddity:
    id: str
    model: Callable[[], onnx.ModelProto]
    data: Callable[[], dict[str, np.ndarray]]
    outcome: str
    """'pruned' or 'refused'."""
    expect: str = ""
    """A substring of a skipped candidate's reason (pruned) or of the error (refused)."""
    layers: frozenset[str] = frozenset()
    """Weights the report must list as pruned."""
    batch_size: int = 8


def _x(*shape: int, n: int = N_SAMPLES) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: {"x": builders.gaussian_calibration(shape, n=n)}


def _xr(*shape: int) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: {"X": builders.gaussian_calibration(shape, n=N_SAMPLES)}


def _lens_with_zero() -> dict[str, np.ndarray]:
    _, data = kind_builders.recurrent_kind("GRU", "bidirectional", lens=True, initial_h=True)
    data = {k: v[:N_SAMPLES] for k, v in data.items()}
    data["lens"][2] = 0  # a sequence of no steps: ONNX Runtime accepts it
    return data


ODDITIES = [
    Oddity(
        "lstm-unnamed-y-no-bias",
        lambda: _recurrent(with_bias=False, initial_h="none"),
        _xr(7, 6),
        "pruned",
        layers=frozenset({"W", "R"}),
    ),
    Oddity(
        "gru-linear-before-reset-0",
        _gru_linear_before_reset_0,
        _xr(7, 6),
        "pruned",
        "linear_before_reset=0",
        frozenset({"W"}),
    ),
    Oddity(
        "rnn-weight-read-elsewhere", _rnn_weight_read_elsewhere, _xr(7, 6), "pruned", "peek", frozenset({"W"})
    ),
    pytest.param(
        Oddity(
            "lstm-constant-lengths-and-initial-h",
            _lstm_constant_lengths,
            _xr(7, 6),
            "pruned",
            layers=frozenset({"W", "R"}),
        ),
    ),
    pytest.param(
        Oddity(
            "gru-zero-length-sequence",
            lambda: kind_builders.recurrent_kind("GRU", "bidirectional", lens=True, initial_h=True)[0],
            _lens_with_zero,
            "pruned",
            layers=frozenset({"W", "R"}),
        ),
    ),
    Oddity("lstm-layout-1-onnx-runtime-refuses", _lstm_layout_1, _xr(7, 6), "refused", "ONNX Runtime"),
    Oddity(
        "convtranspose-output-shape-odd-pads",
        _conv_transpose_odd,
        _x(4, 5, 5),
        "pruned",
        layers=frozenset({"w1", "w2"}),
    ),
    Oddity(
        "einsum-weird-equations",
        _einsum_weird,
        _x(4, 4),
        "pruned",
        "repeated in the activation",
        frozenset({"w_ok"}),
    ),
    Oddity(
        "if-nested",
        lambda: kind_builders.if_convs(nested=True),
        kind_builders.if_calibration,
        "pruned",
        layers=frozenset({"t_w1", "t_iw"}),
    ),
    Oddity(
        "if-data-dependent-one-way",
        lambda: kind_builders.if_convs(cond="sign"),
        lambda: {"x": np.abs(builders.gaussian_calibration((3, 8, 8), n=N_SAMPLES))},
        "pruned",
        "which no calibration batch takes",
        frozenset({"t_w1"}),
    ),
    Oddity(
        "quantized-static-per-channel-zero-points",
        lambda: kind_builders.quantized_shipped("static", per_channel=True),
        lambda: {"input": kind_builders.cnn_data()[:64]},
        "pruned",
        layers=frozenset({"conv1.weight_quantized"}),
    ),
    Oddity(
        "quantized-dynamic-per-channel",
        lambda: kind_builders.quantized_shipped("dynamic", per_channel=True),
        lambda: {"input": kind_builders.cnn_data()[:64]},
        "pruned",
        layers=frozenset({"fc1.weight_quantized"}),
    ),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id)
        if isinstance(c, Oddity)
        else pytest.param(*c.values, marks=c.marks, id=c.values[0].id)
        for c in ODDITIES
    ],
)
def test_new_layer_kind_oddities(case: Oddity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No crash: a valid pruned model (checker, ONNX Runtime on the first calibration batch) with
    the expected layers and skip reasons, or one clear SippError line and nothing written.
    `np.empty` is poisoned in the library, so that a read of memory never written fails here."""
    kind_builders.poison_empty(monkeypatch)
    env = make_env(tmp_path)
    model = env.use_model(case.model(), "kind.onnx")
    calib = env.npz("kind.npz", **case.data())
    before, digest = listing(env.dir), sha256(env.model)
    config = PruneConfig(sparsity=0.5, batch_size=case.batch_size)
    if case.outcome == "refused":
        with pytest.raises(SippError) as info:
            prune_model(model, calib, config, output=env.out)
        message = str(info.value)
        assert case.expect.lower() in message.lower() and "\n" not in message, message
        assert listing(env.outdir) == set()
    else:
        report = prune_model(model, calib, config, output=env.out).report
        onnx.checker.check_model(str(env.out), full_check=True)
        assert report.verification and all(np.isfinite(c.rel_l2_error) for c in report.verification)
        for t in onnx.load(str(env.out)).graph.initializer:
            assert np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all(), t.name
        assert case.layers <= {layer.weight for layer in report.layers}, [
            layer.weight for layer in report.layers
        ]
        if case.expect:
            assert any(case.expect in s.reason for s in report.skipped), [s.reason for s in report.skipped]
    assert listing(env.dir) == before and sha256(env.model) == digest
