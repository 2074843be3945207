"""Happy paths of the `sipp-onnx` command line (prune and inspect)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sipp_onnx import __version__

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]

MLP_LAYERS = {"fc1": "W1", "fc2": "W2", "fc3": "W3"}
REPORT_KEYS = {
    "model",
    "output",
    "method",
    "reduction",
    "seed",
    "sparsity_target",
    "sparsity_achieved",
    "params_total",
    "params_kept",
    "samples",
    "samples_available",
    "recommended_samples",
    "batch_size",
    "provider",
    "timings",
    "layers",
    "skipped",
    "verification",
    "unused_calibration_arrays",
    "warnings",
    "versions",
}


def weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def raw_initializers(path: Path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(str(path)).graph.initializer}


def ok(result) -> None:
    assert result.exit_code == 0, (
        f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    assert "Traceback" not in result.stdout + result.stderr


def table_rows(stdout: str) -> dict[str, list[str]]:
    """First column -> cells of the per-layer table printed by `prune`."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and not set(line.strip()) <= {"-", " "}:
            rows[cells[0]] = cells
    return rows


# ----------------------------------------------------------------------------- prune


@pytest.mark.parametrize("method", ["sipp-det", "sipp-rand", "sipp-hybrid", "magnitude", "wanda"])
def test_prune_each_method(method: str, mlp_files, tmp_path: Path, cli, cuda_usable: bool) -> None:
    model, calib = mlp_files
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    original = weights(model)
    result = cli(
        "prune",
        model,
        calib,
        "-o",
        out,
        "--method",
        method,
        "--sparsity",
        "0.7",
        "--seed",
        "3",
        "--refit",
        "none",
        "--report",
        report_path,
    )
    ok(result)
    onnx.checker.check_model(str(out), full_check=True)

    rows = table_rows(result.stdout)
    for node in MLP_LAYERS:
        assert node in rows, result.stdout
    assert "total" in rows
    assert f"wrote {out}" in result.stdout
    assert method in result.stdout

    report = json.loads(report_path.read_text())
    assert set(report) >= REPORT_KEYS
    assert report["method"] == method and report["seed"] == 3
    assert report["sparsity_target"] == 0.7
    assert abs(report["sparsity_achieved"] - 0.7) <= 0.005
    assert report["params_total"] == 640 + 512 + 80
    assert report["output"] == str(out)
    assert report["provider"] == ("cuda" if cuda_usable else "cpu")  # --provider auto
    assert {"load", "selection", "save", "total"} <= set(report["timings"])
    assert all(isinstance(v, (int, float)) and v >= 0 for v in report["timings"].values())
    assert report["versions"]["sipp-onnx"] == __version__
    assert {"onnx", "onnxruntime", "numpy"} <= set(report["versions"])
    assert [tuple(layer["nodes"]) for layer in report["layers"]] == [(n,) for n in MLP_LAYERS]
    assert report["skipped"] == []
    assert [v["output"] for v in report["verification"]] == ["y"]
    if method.startswith("sipp"):
        assert report["samples"] == 64
        assert isinstance(report["recommended_samples"], int) and report["recommended_samples"] > 0

    # The file agrees with the report: pruned weights exactly zero, kept ones unchanged (or,
    # in row parts that sipp-rand/hybrid sampled, reweighted by a positive factor).
    pruned = weights(out)
    kept = 0
    for layer in report["layers"]:
        before, after = original[layer["weight"]], pruned[layer["weight"]]
        assert after.shape == before.shape and after.dtype == before.dtype
        if layer["sampled_row_parts"]:
            assert np.all((after == 0) | (np.sign(after) == np.sign(before)))
        else:
            assert np.all((after == 0) | (after == before))
        assert int(np.count_nonzero(after)) == layer["kept"]
        kept += layer["kept"]
    assert kept == report["params_kept"]
    for bias in ("b1", "b2", "b3"):
        np.testing.assert_array_equal(pruned[bias], original[bias])


def test_default_output_beside_input_and_overwrite(mlp_files, cli) -> None:
    model, calib = mlp_files
    default = model.with_name("mlp.pruned.onnx")
    model_bytes = model.read_bytes()
    ok(cli("prune", model, calib, "-q"))
    assert default.is_file()
    first = default.read_bytes()

    again = cli("prune", model, calib, "--sparsity", "0.3")
    assert again.exit_code == 1
    assert again.stderr.strip().startswith("error: ") and "--overwrite" in again.stderr
    assert default.read_bytes() == first

    ok(cli("prune", model, calib, "--sparsity", "0.3", "--overwrite", "-q"))
    assert default.read_bytes() != first
    assert model.read_bytes() == model_bytes
    names = sorted(p.name for p in model.parent.iterdir())
    assert names == ["calib.npz", "mlp.onnx", "mlp.pruned.onnx"]


def test_streams_quiet_and_verbose(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    normal = cli("prune", model, calib, "-o", tmp_path / "a.onnx")
    ok(normal)
    # Table and summary on stdout, progress and warnings on stderr.
    assert "fc1" in normal.stdout and "fc1" not in normal.stderr
    assert "capture" in normal.stderr and "capture:" not in normal.stdout
    assert "warning:" not in normal.stdout
    # 64 samples are fewer than spec section 3 recommends for this model: a warning.
    assert re.search(r"^warning: .*recommends", normal.stderr, re.M), normal.stderr

    quiet = cli("prune", model, calib, "-o", tmp_path / "b.onnx", "-q")
    ok(quiet)
    assert quiet.stdout == ""
    assert quiet.stderr == ""
    assert (tmp_path / "b.onnx").is_file()

    verbose = cli("prune", model, calib, "-o", tmp_path / "c.onnx", "-v")
    ok(verbose)
    assert "info:" in verbose.stderr
    assert "fc1" in verbose.stdout and "info:" not in verbose.stdout


def test_quiet_still_writes_report(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    result = cli("prune", model, calib, "-o", tmp_path / "o.onnx", "-q", "--report", tmp_path / "r.json")
    ok(result)
    assert result.stdout == ""
    assert json.loads((tmp_path / "r.json").read_text())["params_total"] == 1232


def test_no_verify(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    ok(cli("prune", model, calib, "-o", tmp_path / "o.onnx", "--no-verify", "--report", tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["verification"] == []


def test_exclude_leaves_weight_byte_identical(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    out = tmp_path / "out.onnx"
    result = cli(
        "prune",
        model,
        calib,
        "-o",
        out,
        "--exclude",
        "fc1",
        "--method",
        "magnitude",
        "--report",
        tmp_path / "r.json",
    )
    ok(result)
    before, after = raw_initializers(model), raw_initializers(out)
    assert after["W1"] == before["W1"]
    assert after["W2"] != before["W2"] and after["W3"] != before["W3"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["weight"] for layer in report["layers"]] == ["W2", "W3"]
    assert [(s["node"], "exclude" in s["reason"]) for s in report["skipped"]] == [("fc1", True)]
    assert abs(report["sparsity_achieved"] - 0.5) <= 0.005
    assert "fc1" not in table_rows(result.stdout)


def test_exclude_is_a_regex_and_repeatable(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    out = tmp_path / "out.onnx"
    ok(cli("prune", model, calib, "-o", out, "--exclude", "^fc[12]$", "--exclude", "nothing", "-q"))
    before, after = raw_initializers(model), raw_initializers(out)
    assert after["W1"] == before["W1"] and after["W2"] == before["W2"]
    assert after["W3"] != before["W3"]


def test_op_types_conv_prunes_only_convs(tmp_path: Path, cli) -> None:
    model = builders.save(builders.convnet(), tmp_path / "conv.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=builders.gaussian_calibration((3, 8, 8), n=32))
    out = tmp_path / "out.onnx"
    result = cli(
        "prune",
        model,
        calib,
        "-o",
        out,
        "--op-types",
        "Conv",
        "--method",
        "magnitude",
        "--report",
        tmp_path / "r.json",
    )
    ok(result)
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(layer["nodes"][0] for layer in report["layers"]) == ["conv1", "dwconv", "gconv"]
    assert {layer["op_type"] for layer in report["layers"]} == {"Conv"}
    assert [s["node"] for s in report["skipped"]] == ["fc"]
    assert abs(report["sparsity_achieved"] - 0.5) <= 0.005
    before, after = raw_initializers(model), raw_initializers(out)
    assert after["fc_w"] == before["fc_w"]
    for name in ("c1_w", "dw_w", "g_w"):
        assert after[name] != before[name]
    rows = table_rows(result.stdout)
    assert {"conv1", "dwconv", "gconv"} <= set(rows) and "fc" not in rows


def test_max_samples_and_batch_size(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    result = cli(
        "prune",
        model,
        calib,
        "-o",
        tmp_path / "o.onnx",
        "--max-samples",
        "10",
        "--batch-size",
        "4",
        "--report",
        tmp_path / "r.json",
    )
    ok(result)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 10
    assert report["samples_available"] == 64
    assert report["batch_size"] == 4
    assert "capture: 3/3" in result.stderr  # 10 samples in batches of 4


def test_calibration_directory_of_two_npz(mlp_files, tmp_path: Path, cli) -> None:
    model, _ = mlp_files
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "part1.npz", x=builders.gaussian_calibration((20,), n=20, seed=1))
    np.savez(folder / "part2.npz", x=builders.gaussian_calibration((20,), n=12, seed=2))
    result = cli("prune", model, folder, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    ok(result)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == report["samples_available"] == 32


def test_npy_for_single_input_model(mlp_files, tmp_path: Path, cli) -> None:
    model, _ = mlp_files
    npy = tmp_path / "calib.npy"
    np.save(npy, builders.gaussian_calibration((20,), n=24))
    ok(cli("prune", model, npy, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == 24


def test_unused_arrays_are_reported(mlp_files, tmp_path: Path, cli) -> None:
    model, _ = mlp_files
    calib = tmp_path / "extra.npz"
    np.savez(
        calib,
        x=builders.gaussian_calibration((20,), n=16),
        labels=np.arange(16),
        mask=np.ones((16, 3), np.float32),
    )
    result = cli("prune", model, calib, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    ok(result)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["unused_calibration_arrays"] == ["labels", "mask"]
    assert any("labels" in w and "mask" in w for w in report["warnings"])
    warning = [line for line in result.stderr.splitlines() if "labels" in line]
    assert warning and warning[0].startswith("warning:") and "mask" in warning[0]


def test_float64_calibration_is_cast_with_warning(mlp_files, tmp_path: Path, cli) -> None:
    model, _ = mlp_files
    calib = tmp_path / "f64.npz"
    np.savez(calib, x=builders.gaussian_calibration((20,), n=16).astype(np.float64))
    result = cli("prune", model, calib, "-o", tmp_path / "o.onnx")
    ok(result)
    assert re.search(r"^warning: .*float64.*float32", result.stderr, re.M), result.stderr


def test_fixed_batch_dimension_forces_batch_size(tmp_path: Path, cli) -> None:
    proto = builders.mlp()
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    model = builders.save(proto, tmp_path / "b1.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=builders.gaussian_calibration((20,), n=12))
    result = cli(
        "prune", model, calib, "-o", tmp_path / "o.onnx", "--batch-size", "8", "--report", tmp_path / "r.json"
    )
    ok(result)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batch_size"] == 1
    assert report["samples"] == 12
    assert "capture: 12/12" in result.stderr


def test_seed_reproducible(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    outs = []
    for i, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"o{i}.onnx"
        ok(cli("prune", model, calib, "-o", out, "--method", "sipp-rand", "--seed", seed, "-q"))
        outs.append(weights(out))
    for name in MLP_LAYERS.values():
        np.testing.assert_array_equal(outs[0][name], outs[1][name])
    assert any(not np.array_equal(outs[0][n], outs[2][n]) for n in MLP_LAYERS.values())


def test_sparsity_zero_keeps_every_weight(mlp_files, tmp_path: Path, cli) -> None:
    model, calib = mlp_files
    out = tmp_path / "o.onnx"
    ok(cli("prune", model, calib, "-o", out, "--sparsity", "0", "--report", tmp_path / "r.json"))
    assert raw_initializers(out) == raw_initializers(model)
    assert json.loads((tmp_path / "r.json").read_text())["sparsity_achieved"] == 0.0


# ----------------------------------------------------------------------------- inspect


def test_inspect_json_mlp(tmp_path: Path, cli) -> None:
    model = builders.save(builders.mlp(), tmp_path / "mlp.onnx")
    result = cli("inspect", model, "--json")
    ok(result)
    data = json.loads(result.stdout)
    layers = {entry["node"]: entry for entry in data["layers"]}
    assert set(layers) == set(MLP_LAYERS)
    for node, weight in MLP_LAYERS.items():
        assert layers[node]["weight"] == weight
    assert layers["fc1"]["op_type"] == "Gemm" and layers["fc1"]["shape"] == [32, 20]
    assert layers["fc1"]["params"] == 640
    assert layers["fc2"]["shape"] == [32, 16] and layers["fc2"]["params"] == 512
    assert layers["fc3"]["op_type"] == "MatMul" and layers["fc3"]["params"] == 80
    assert data["prunable_params"] == 1232
    assert data["skipped"] == []


def test_inspect_json_tokens_lists_skipped_attention(tmp_path: Path, cli) -> None:
    model = builders.save(builders.tokens(), tmp_path / "tokens.onnx")
    result = cli("inspect", model, "--json")
    ok(result)
    data = json.loads(result.stdout)
    assert sorted(entry["node"] for entry in data["layers"]) == ["proj_out", "proj_q"]
    skipped = {s["node"]: s for s in data["skipped"]}
    assert set(skipped) == {"attention", "mix"}
    for entry in skipped.values():
        assert entry["op_type"] == "MatMul"
        assert "activation" in entry["reason"]


def test_inspect_table_and_filters(tmp_path: Path, cli) -> None:
    tokens = builders.save(builders.tokens(), tmp_path / "tokens.onnx")
    text = cli("inspect", tokens)
    ok(text)
    for word in ("proj_q", "proj_out", "attention", "mix", "skipped", "activations"):
        assert word in text.stdout
    conv = builders.save(builders.convnet(), tmp_path / "conv.onnx")
    only_conv = cli("inspect", conv, "--json", "--op-types", "Conv", "--exclude", "^dw")
    ok(only_conv)
    data = json.loads(only_conv.stdout)
    assert sorted(entry["node"] for entry in data["layers"]) == ["conv1", "gconv"]
    assert sorted(s["node"] for s in data["skipped"]) == ["dwconv", "fc"]


def test_inspect_model_without_prunable_layers(tmp_path: Path, cli) -> None:
    node = onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = builders.save(
        builders.finish([node], [builders.value("x", ["batch", 4])], [builders.value("y", ["batch", 4])], []),
        tmp_path / "relu.onnx",
    )
    result = cli("inspect", model, "--json")
    ok(result)
    assert json.loads(result.stdout)["layers"] == []
    text = cli("inspect", model)
    ok(text)
    assert text.stdout.startswith("0 prunable layer(s)")


def test_help_and_version(cli) -> None:
    ok(cli("--version"))
    help_ = cli("prune", "--help")
    ok(help_)
    for option in (
        "--sparsity",
        "--method",
        "--reduction",
        "--seed",
        "--max-samples",
        "--batch-size",
        "--provider",
        "--exclude",
        "--op-types",
        "--report",
        "--overwrite",
        "--no-verify",
        "--quiet",
        "--verbose",
    ):
        assert option in help_.stdout


# ----------------------------------------------------------------------------- real processes


def _subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sipp_onnx.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_subprocess_prune_and_inspect(mlp_files, tmp_path: Path) -> None:
    model, calib = mlp_files
    out = tmp_path / "out.onnx"
    proc = _subprocess("prune", model, calib, "-o", out, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "fc1" in proc.stdout and "fc1" not in proc.stderr
    assert abs(json.loads((tmp_path / "r.json").read_text())["sparsity_achieved"] - 0.5) <= 0.005
    onnx.checker.check_model(str(out))

    proc = _subprocess("inspect", model, "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    assert {entry["node"] for entry in json.loads(proc.stdout)["layers"]} == set(MLP_LAYERS)


@pytest.mark.parametrize("allocation", ["sipp", "error"])
def test_allocation_option_reaches_the_report(mlp_files, cli, tmp_path, allocation) -> None:
    model, calib = mlp_files
    out, report = tmp_path / f"{allocation}.onnx", tmp_path / f"{allocation}.json"
    ok(cli("prune", model, calib, "-o", out, "--allocation", allocation, "--report", report, "-q"))
    doc = json.loads(report.read_text())
    assert doc["allocation"] == allocation
    assert abs(doc["sparsity_achieved"] - 0.5) < 0.01


def test_allocation_sipp_with_magnitude_is_a_one_line_error(mlp_files, cli, tmp_path) -> None:
    model, calib = mlp_files
    result = cli(
        "prune", model, calib, "-o", tmp_path / "o.onnx", "--method", "magnitude", "--allocation", "sipp"
    )
    assert result.exit_code != 0
    assert result.stderr.strip().startswith("error: ") and "sipp-det" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("method", ["sipp-det", "magnitude"])
def test_report_names_the_max_times_kernel(mlp_files, cli, tmp_path, method) -> None:
    from sipp_onnx.maxtimes import kernel

    model, calib = mlp_files
    out, report = tmp_path / "o.onnx", tmp_path / "o.json"
    result = cli("prune", model, calib, "-o", out, "--method", method, "--report", report)
    ok(result)
    doc = json.loads(report.read_text())
    if method == "sipp-det":
        assert doc["max_times_kernel"] == kernel()
        assert f"{kernel()} kernel" in result.output
    else:  # no sensitivities, no max-times product
        assert doc["max_times_kernel"] is None
        assert " kernel" not in result.output


def test_ranking_option_reaches_the_report(mlp_files, cli, tmp_path) -> None:
    model, calib = mlp_files
    for ranking in ("own", "measured"):
        report = tmp_path / f"{ranking}.json"
        ok(
            cli(
                "prune",
                model,
                calib,
                "-o",
                tmp_path / f"{ranking}.onnx",
                "--ranking",
                ranking,
                "--report",
                report,
                "-q",
            )
        )
        layers = json.loads(report.read_text())["layers"]
        assert all((layer["ranking"] is None) == (ranking == "own") for layer in layers)
