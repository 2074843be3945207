"""Calibration data: `open_calibration(source, model_inputs(model), max_samples)`.

Forms: .npz keyed by input name (one array under any key for a single-input model), .npy for
a single-input model, a directory of such files, or a mapping name -> array. Samples on the
first axis; names, ranks, fixed dims, dtypes and finiteness are checked before anything runs.
"""

from __future__ import annotations

import logging
import pathlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from sipp_onnx import CalibrationError, PruneConfig, prune_model
from sipp_onnx.calibration import open_calibration
from sipp_onnx.modelio import model_inputs

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]


def mlp_specs():
    return model_inputs(builders.mlp())


def two_input_model() -> onnx.ModelProto:
    """x [batch, 4] + z [batch, 4] -> Gemm: two required inputs."""
    nodes = [
        helper.make_node("Add", ["x", "z"], ["s"], name="add"),
        helper.make_node("Gemm", ["s", "W"], ["y"], name="fc", transB=1),
    ]
    inputs = [builders.value("x", ["batch", 4]), builders.value("z", ["batch", 4])]
    return builders.finish(
        nodes,
        inputs,
        [builders.value("y", ["batch", 3])],
        [builders.tensor("W", np.arange(12).reshape(3, 4) / 10)],
    )


def fixed_batch_specs(batch: int):
    proto = builders.single_gemm()
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model_inputs(proto)


def data(n: int = 10, width: int = 20, seed: int = 1) -> np.ndarray:
    return builders.gaussian_calibration((width,), n=n, seed=seed)


def sizes(calib, batch_size: int) -> list[int]:
    return [next(iter(feed.values())).shape[0] for feed in calib.batches(batch_size)]


def fed(calib, name: str = "x", batch_size: int = 7) -> np.ndarray:
    return np.concatenate([feed[name] for feed in calib.batches(batch_size)])


# ----------------------------------------------------------------------------- forms


def test_npz_keyed_by_input_name(tmp_path: Path) -> None:
    x = data()
    np.savez(tmp_path / "c.npz", x=x)
    calib = open_calibration(tmp_path / "c.npz", mlp_specs())
    assert calib.inputs == ("x",)
    assert calib.samples == calib.available == 10
    assert calib.unused_arrays == () and calib.warnings == []
    np.testing.assert_array_equal(fed(calib), x)
    assert open_calibration(str(tmp_path / "c.npz"), mlp_specs()).samples == 10


def test_single_input_accepts_one_array_under_any_key(tmp_path: Path) -> None:
    x = data()
    np.savez(tmp_path / "c.npz", images=x)
    calib = open_calibration(tmp_path / "c.npz", mlp_specs())
    np.testing.assert_array_equal(fed(calib), x)
    assert calib.unused_arrays == ()


def test_several_arrays_must_name_the_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", a=data(), b=data())
    with pytest.raises(CalibrationError, match=r"missing \['x'\]"):
        open_calibration(tmp_path / "c.npz", mlp_specs())


def test_unused_arrays_reported_and_warned(tmp_path: Path, caplog) -> None:
    x = data()
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(10), extra=data(seed=5))
    with caplog.at_level(logging.WARNING, logger="sipp_onnx"):
        calib = open_calibration(tmp_path / "c.npz", mlp_specs())
    assert calib.unused_arrays == ("extra", "labels")
    np.testing.assert_array_equal(fed(calib), x)
    assert any("extra" in w and "labels" in w for w in calib.warnings)
    assert any("extra" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_npy_for_single_input(tmp_path: Path) -> None:
    x = data(n=7)
    np.save(tmp_path / "c.npy", x)
    calib = open_calibration(tmp_path / "c.npy", mlp_specs())
    assert calib.samples == 7
    np.testing.assert_array_equal(fed(calib), x)


def test_npy_refused_for_two_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.zeros((5, 4), np.float32))
    with pytest.raises(CalibrationError, match=r"\.npy.*'x'.*'z'"):
        open_calibration(tmp_path / "c.npy", model_inputs(two_input_model()))


def test_two_input_model_npz_and_mapping(tmp_path: Path) -> None:
    specs = model_inputs(two_input_model())
    x, z = data(n=6, width=4, seed=1), data(n=6, width=4, seed=2)
    np.savez(tmp_path / "c.npz", z=z, x=x)
    for source in (tmp_path / "c.npz", {"x": x, "z": z}):
        calib = open_calibration(source, specs)
        assert set(calib.inputs) == {"x", "z"}
        np.testing.assert_array_equal(fed(calib, "x", 4), x)
        np.testing.assert_array_equal(fed(calib, "z", 4), z)
    with pytest.raises(CalibrationError, match=r"missing \['z'\]"):
        open_calibration({"x": x}, specs)
    with pytest.raises(CalibrationError, match="sample counts"):
        open_calibration({"x": x, "z": z[:5]}, specs)


def test_mapping_source(tmp_path: Path) -> None:
    x = data(n=5)
    calib = open_calibration({"x": x}, mlp_specs())
    np.testing.assert_array_equal(fed(calib), x)
    # One array under another key is fine for a single-input model, as for a .npz.
    assert open_calibration({"whatever": x}, mlp_specs()).samples == 5
    # Plain nested lists are arrays too (float64, so cast with a warning).
    calib = open_calibration({"x": x.tolist()}, mlp_specs())
    assert fed(calib).dtype == np.float32


def test_directory_of_files(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    a, b = data(n=5, seed=1), data(n=3, seed=2)
    np.savez(folder / "b_second.npz", x=b)
    np.save(folder / "a_first.npy", a)
    (folder / "README.txt").write_text("ignored")
    calib = open_calibration(folder, mlp_specs())
    assert calib.samples == calib.available == 8
    np.testing.assert_array_equal(fed(calib), np.concatenate([a, b]))  # name order
    assert sum(sizes(calib, 4)) == 8
    assert calib.n_batches(4) == len(sizes(calib, 4))


def test_directory_unused_arrays_name_their_file(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "p1.npz", x=data(n=4), ids=np.arange(4))
    np.savez(folder / "p2.npz", x=data(n=4))
    calib = open_calibration(folder, mlp_specs())
    assert calib.unused_arrays == ("p1.npz:ids",)
    assert calib.samples == 8


def test_directory_validates_every_file_before_running(tmp_path: Path) -> None:
    """A bad later file is found up front: nothing runs, no progress is reported."""
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "p1.npz", x=data(n=4))
    bad = data(n=4)
    bad[2, 3] = np.nan
    np.savez(folder / "p2.npz", x=bad)
    with pytest.raises(CalibrationError, match="p2.npz"):
        open_calibration(folder, mlp_specs())
    calls = []
    with pytest.raises(CalibrationError, match="NaN"):
        prune_model(builders.mlp(), folder, progress=lambda *a: calls.append(a))
    assert calls == []


def _empty_dir(p: Path) -> Path:
    (p / "empty").mkdir()
    return p / "empty"


def _write(name: str, content: bytes):
    def make(p: Path) -> Path:
        (p / name).write_bytes(content)
        return p / name

    return make


def _no_arrays(p: Path) -> Path:
    np.savez(p / "c.npz")
    return p / "c.npz"


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: p / "missing.npz", "does not exist"),
        (_empty_dir, "no .npz or .npy"),
        (_write("c.csv", b"1,2"), "must be a .npz, a .npy"),
        (_write("c.npz", b"PK\x03\x04 truncated zip"), "cannot read"),
        (_no_arrays, "no arrays"),
    ],
    ids=["missing", "empty-dir", "csv", "truncated-zip", "no-arrays"],
)
def test_unreadable_sources(setup, match: str, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=match):
        open_calibration(setup(tmp_path), mlp_specs())


# ----------------------------------------------------------------------------- validation


def test_wrong_rank() -> None:
    with pytest.raises(CalibrationError, match="rank 3"):
        open_calibration({"x": data().reshape(10, 4, 5)}, mlp_specs())
    with pytest.raises(CalibrationError, match="rank 1"):
        open_calibration({"x": data()[:, 0]}, mlp_specs())


def test_wrong_fixed_dimension() -> None:
    with pytest.raises(CalibrationError, match="axis 1 must be 20"):
        open_calibration({"x": data(width=19)}, mlp_specs())
    tokens = model_inputs(builders.tokens())  # [batch, 5, 6]
    open_calibration({"x": builders.gaussian_calibration((5, 6), n=3)}, tokens)
    with pytest.raises(CalibrationError, match="axis 2 must be 6"):
        open_calibration({"x": builders.gaussian_calibration((5, 7), n=3)}, tokens)


def test_symbolic_dimensions_accept_any_size() -> None:
    proto = builders.mlp()
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    specs = model_inputs(proto)
    assert open_calibration({"x": data(width=20)}, specs).samples == 10


def test_float64_is_cast_with_warning(caplog) -> None:
    x = data().astype(np.float64)
    with caplog.at_level(logging.WARNING, logger="sipp_onnx"):
        calib = open_calibration({"x": x}, mlp_specs())
    out = fed(calib)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))
    assert any("float64" in w and "float32" in w for w in calib.warnings)
    assert any("float64" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_non_float_dtype_for_float_input_is_an_error(dtype) -> None:
    with pytest.raises(CalibrationError, match="dtype"):
        open_calibration({"x": np.ones((4, 20), dtype=dtype)}, mlp_specs())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_refused(value: float) -> None:
    x = data()
    x[6, 2] = value
    with pytest.raises(CalibrationError, match=r"1 NaN/inf.*sample 6"):
        open_calibration({"x": x}, mlp_specs())


def test_empty_array_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=np.zeros((0, 20), np.float32))
    with pytest.raises(CalibrationError, match="no samples"):
        open_calibration(tmp_path / "c.npz", mlp_specs())


class _Payload:
    """Unpickling this would create a file: proves pickles are never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_object_arrays_are_not_unpickled(suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arr = np.empty(3, dtype=object)
    arr[:] = [_Payload(marker)] * 3
    path = tmp_path / f"c{suffix}"
    if suffix == ".npy":
        np.save(path, arr, allow_pickle=True)
    else:
        np.savez(path, x=arr)
    with pytest.raises(CalibrationError, match="object"):
        open_calibration(path, mlp_specs())
    assert not marker.exists()


# ----------------------------------------------------------------------------- samples, batches


def test_max_samples_caps(tmp_path: Path) -> None:
    x = data(n=25)
    calib = open_calibration({"x": x}, mlp_specs(), max_samples=10)
    assert calib.samples == 10 and calib.available == 25
    assert sizes(calib, 4) == [4, 4, 2]
    np.testing.assert_array_equal(fed(calib), x[:10])
    assert open_calibration({"x": x}, mlp_specs(), max_samples=100).samples == 25


def test_max_samples_across_directory(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    a, b = data(n=6, seed=1), data(n=6, seed=2)
    np.savez(folder / "1.npz", x=a)
    np.savez(folder / "2.npz", x=b)
    calib = open_calibration(folder, mlp_specs(), max_samples=9)
    assert calib.samples == 9
    np.testing.assert_array_equal(fed(calib, batch_size=4), np.concatenate([a, b])[:9])


def test_batch_size() -> None:
    calib = open_calibration({"x": data(n=10)}, mlp_specs())
    assert sizes(calib, 3) == [3, 3, 3, 1]
    assert sizes(calib, 32) == [10]
    assert calib.n_batches(3) == 4


def test_fixed_batch_dimension_forces_batch_size(caplog) -> None:
    specs = fixed_batch_specs(1)
    calib = open_calibration({"x": data(n=5, width=16)}, specs)
    assert calib.fixed_batch == 1
    assert sizes(calib, 32) == [1] * 5
    assert calib.n_batches(32) == 5

    specs = fixed_batch_specs(4)
    with caplog.at_level(logging.WARNING, logger="sipp_onnx"):
        calib = open_calibration({"x": data(n=10, width=16)}, specs)
    assert sizes(calib, 3) == [4, 4]
    assert any("last 2 sample" in w for w in calib.warnings)
    with pytest.raises(CalibrationError, match="batch size to 4"):
        open_calibration({"x": data(n=3, width=16)}, specs)


def test_fixed_batch_across_directory_files(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "1.npz", x=data(n=3, width=16, seed=1))
    np.savez(folder / "2.npz", x=data(n=3, width=16, seed=2))
    calib = open_calibration(folder, fixed_batch_specs(2))
    fed_count = sum(sizes(calib, 32))
    assert all(size == 2 for size in sizes(calib, 32))
    assert fed_count == calib.samples, f"samples={calib.samples} but {fed_count} are fed"
    assert fed_count == calib.available or calib.warnings


def test_pipeline_uses_calibration_consistently(tmp_path: Path) -> None:
    """prune_model accepts the same forms; the report counts the samples actually used."""
    x = data(n=12)
    np.savez(tmp_path / "c.npz", x=x, spare=x)
    config = PruneConfig(max_samples=9, batch_size=4)
    result = prune_model(builders.mlp(), tmp_path / "c.npz", config)
    assert result.report.samples == 9
    assert result.report.samples_available == 12
    assert result.report.unused_calibration_arrays == ("spare",)
    result = prune_model(builders.mlp(), {"x": x.astype(np.float64)}, PruneConfig(batch_size=5))
    assert result.report.samples == 12
    assert any("float64" in w for w in result.report.warnings)


# ------------------------------------------------------------------ streamed files


def _two_input_specs():
    return model_inputs(two_input_model())


@pytest.mark.parametrize("form", ["npz", "npz_compressed", "npy"])
def test_files_are_streamed_and_batch_like_arrays_in_memory(tmp_path: Path, form: str) -> None:
    """A file's arrays are not held: batches are read from it block by block, with the same
    values (and the same float64 -> float32 cast) as the arrays given directly."""
    x = data(n=23).astype(np.float64)
    if form == "npy":
        np.save(tmp_path / "c.npy", x)
        path = tmp_path / "c.npy"
    else:
        save = np.savez_compressed if form == "npz_compressed" else np.savez
        save(tmp_path / "c.npz", x=x, labels=np.arange(5))  # an unused array of another length
        path = tmp_path / "c.npz"
    streamed = open_calibration(path, mlp_specs())
    direct = open_calibration({"x": x}, mlp_specs())
    assert all(chunk.cached is None and chunk.stream is not None for chunk in streamed.chunks)
    assert streamed.samples == 23
    for batch in (1, 4, 7, 23, 50):
        got, want = list(streamed.batches(batch)), list(direct.batches(batch))
        assert [b["x"].shape for b in got] == [b["x"].shape for b in want]
        for a, b in zip(got, want, strict=True):
            assert a["x"].dtype == np.float32
            np.testing.assert_array_equal(a["x"], b["x"])


def test_streamed_two_inputs_and_max_samples(tmp_path: Path) -> None:
    x, z = data(n=9, width=4, seed=1), data(n=9, width=4, seed=2)
    np.savez(tmp_path / "c.npz", x=x, z=z)
    calib = open_calibration(tmp_path / "c.npz", _two_input_specs(), max_samples=7)
    assert sizes(calib, 3) == [3, 3, 1]
    np.testing.assert_array_equal(fed(calib, "z", 3), z[:7])
    np.testing.assert_array_equal(fed(calib, "x", 3), x[:7])


def test_streamed_fixed_batch_joins_files(tmp_path: Path) -> None:
    """A model with batch 4 fed from a directory of 3 + 6 samples: 8 used, in order."""
    x = data(n=9, width=16)
    np.savez(tmp_path / "a.npz", x=x[:3])
    np.savez(tmp_path / "b.npz", x=x[3:])
    calib = open_calibration(tmp_path, fixed_batch_specs(4))
    assert sizes(calib, 10) == [4, 4]
    np.testing.assert_array_equal(fed(calib, batch_size=10), x[:8])


def test_streamed_nan_far_into_the_file_is_placed_in_the_file(tmp_path: Path) -> None:
    """The validation pass reads blocks of 256; the message still counts and places the bad
    values in the whole file."""
    x = data(n=600)
    x[300, 1] = np.nan
    x[590, 2] = np.inf
    np.savez(tmp_path / "c.npz", x=x)
    with pytest.raises(CalibrationError, match=r"2 NaN/inf.*sample 300"):
        open_calibration(tmp_path / "c.npz", mlp_specs())


def test_arrays_that_cannot_stream_are_loaded_whole(tmp_path: Path) -> None:
    x = np.asfortranarray(data(n=6))
    np.savez(tmp_path / "c.npz", x=x)
    calib = open_calibration(tmp_path / "c.npz", mlp_specs())
    assert calib.chunks[0].stream is None and calib.chunks[0].cached is not None
    np.testing.assert_array_equal(fed(calib), x)


def test_streamed_inputs_with_different_counts_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=data(n=5, width=4), z=data(n=6, width=4))
    with pytest.raises(CalibrationError, match="different sample counts"):
        open_calibration(tmp_path / "c.npz", _two_input_specs())
