"""N:M pruning (--pattern): groups along each layer kind's reduction axis, checked in the weight's
stored layout with plain loops, for every method, with and without refit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import finish, gaussian_calibration, tensor, value
from onnx import helper, numpy_helper

from sipp_onnx import ConfigError, PruneConfig, prune_model
from sipp_onnx.pattern import Pattern, group_mask, parse_pattern

METHODS = ["sipp-det", "sipp-rand", "sipp-hybrid", "magnitude", "wanda"]


def every_kind() -> onnx.ModelProto:
    """Conv with 3 input channels (fits no pattern), Conv with 8, grouped Conv with 4 per group,
    Gemm transB=1 (K 8), Gemm transB=0 (K 12), MatMul (K 16)."""
    rng = np.random.default_rng(11)

    def w(*shape):
        return rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))

    inits = [
        tensor("c0_w", w(8, 3, 3, 3)),
        tensor("c1_w", w(8, 8, 3, 3)),
        tensor("g_w", w(8, 4, 1, 1)),
        tensor("ga_w", w(12, 8)),  # transB=1: [N, K]
        tensor("gb_w", w(12, 16)),  # transB=0: [K, N]
        tensor("mm_w", w(16, 5)),  # MatMul: [K, N]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c0_w"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "c1_w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "g_w"], ["g"], name="gconv", group=2),
        helper.make_node("GlobalAveragePool", ["g"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "ga_w"], ["ga"], name="gemm_t", transB=1),
        helper.make_node("Relu", ["ga"], ["ra"], name="relu_a"),
        helper.make_node("Gemm", ["ra", "gb_w"], ["gb"], name="gemm_n", transB=0),
        helper.make_node("Relu", ["gb"], ["rb"], name="relu_b"),
        helper.make_node("MatMul", ["rb", "mm_w"], ["y"], name="matmul"),
    ]
    return finish(nodes, [value("x", ["batch", 3, 6, 6])], [value("y", ["batch", 5])], inits)


# How each weight's stored layout groups: (axis of the input channels, the other axes).
LAYOUT = {"c1_w": "conv", "g_w": "conv", "ga_w": "rows", "gb_w": "columns", "mm_w": "columns"}


def groups_in_stored_layout(name: str, w: np.ndarray, m: int):
    """Every group of m consecutive input channels, written out with loops."""
    if LAYOUT[name] == "conv":
        for o in range(w.shape[0]):
            for i in range(w.shape[2]):
                for j in range(w.shape[3]):
                    for c in range(0, w.shape[1], m):
                        yield w[o, c : c + m, i, j]
    elif LAYOUT[name] == "rows":  # Gemm transB=1: [N, K]
        for n in range(w.shape[0]):
            for k in range(0, w.shape[1], m):
                yield w[n, k : k + m]
    else:  # [K, N]
        for n in range(w.shape[1]):
            for k in range(0, w.shape[0], m):
                yield w[k : k + m, n]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


X = gaussian_calibration((3, 6, 6), n=24)


@pytest.mark.parametrize("refit", ["none", "obs"])
@pytest.mark.parametrize("method", METHODS)
def test_every_group_keeps_n_of_m_along_the_input_channels(method, refit):
    model = every_kind()
    before = weights(model)
    result = prune_model(model, {"x": X}, PruneConfig(method=method, refit=refit, pattern="2:4"))
    after = weights(result.model)
    for name in LAYOUT:
        for group in groups_in_stored_layout(name, after[name], 4):
            assert np.count_nonzero(group) == 2, name
    # conv0 has 3 input channels: left as it was, with the reason in the report.
    np.testing.assert_array_equal(after["c0_w"], before["c0_w"])
    layers = {layer.weight: layer for layer in result.report.layers}
    assert layers["c0_w"].pattern == "not applied: input channels 3 is not a multiple of 4 (2:4 does not fit)"
    assert {layers[name].pattern for name in LAYOUT} == {"2:4"}
    assert result.report.pattern == "2:4" and result.report.sparsity_target == 0.5
    fitting = sum(before[name].size for name in LAYOUT)
    assert result.report.params_total - result.report.params_kept == fitting // 2
    if refit == "none":  # without a refit the kept values are the original ones
        for name in LAYOUT:
            kept = after[name] != 0
            np.testing.assert_array_equal(after[name][kept], before[name][kept])


def test_magnitude_keeps_the_two_largest_of_each_group():
    model = every_kind()
    before = weights(model)
    after = weights(
        prune_model(model, {"x": X}, PruneConfig(method="magnitude", refit="none", pattern="2:4")).model
    )
    for name in LAYOUT:
        for old, new in zip(
            groups_in_stored_layout(name, before[name], 4),
            groups_in_stored_layout(name, after[name], 4),
            strict=True,
        ):
            top = set(np.argsort(-np.abs(old), kind="stable")[:2])
            assert set(np.flatnonzero(new)) == top, name


def test_zeros_along_the_output_axis_do_not_count():
    """A MatMul weight [K, N] with 2 zeros in every 4 consecutive OUTPUTS is not 2:4."""
    model = every_kind()
    mm = weights(model)["mm_w"].copy()
    mm[:, 0:2] = 0  # columns 0, 1 of every row: along the output axis
    result = prune_model(model, {"x": X}, PruneConfig(method="magnitude", refit="none", pattern="2:4"))
    assert any(np.count_nonzero(g) > 2 for g in groups_in_stored_layout("mm_w", mm, 4))
    for group in groups_in_stored_layout("mm_w", weights(result.model)["mm_w"], 4):
        assert np.count_nonzero(group) == 2


def test_4_of_8_and_layers_it_does_not_fit():
    result = prune_model(every_kind(), {"x": X}, PruneConfig(method="sipp-det", pattern="4:8"))
    after = weights(result.model)
    layers = {layer.weight: layer.pattern for layer in result.report.layers}
    for name in ("c1_w", "ga_w", "mm_w"):  # 8, 8 and 16 input channels
        assert layers[name] == "4:8"
        for group in groups_in_stored_layout(name, after[name], 8):
            assert np.count_nonzero(group) == 4
    assert layers["g_w"].startswith("not applied: input channels 4 is not a multiple of 8")
    assert layers["gb_w"].startswith("not applied: input channels 12 is not a multiple of 8")


def test_group_mask_against_a_loop_with_ties():
    rng = np.random.default_rng(3)
    for kernel, channels in ((1, 8), (9, 4), (4, 12)):
        score = rng.choice([0.0, 1.0, 2.0], size=(5, channels * kernel))
        tie = rng.choice([0.5, 1.0], size=score.shape)
        mask = group_mask(score, tie, kernel, Pattern(2, 4))
        for o in range(5):
            for k in range(kernel):
                for c0 in range(0, channels, 4):
                    idx = [(c0 + c) * kernel + k for c in range(4)]
                    order = sorted(range(4), key=lambda c: (-score[o, idx[c]], -tie[o, idx[c]], c))
                    assert {idx[c] for c in order[:2]} == {i for i in idx if mask[o, i]}


@pytest.mark.parametrize("bad", ["2:2", "0:4", "5:4", "2-4", "2:128", "sparse"])
def test_bad_patterns_are_config_errors(bad):
    with pytest.raises(ConfigError, match="pattern"):
        PruneConfig(pattern=bad)


def test_pattern_parsing_and_the_sparsity_it_sets():
    assert parse_pattern("unstructured") is None and parse_pattern(" 2 : 4 ") == Pattern(2, 4)
    assert PruneConfig(pattern="1:4", sparsity=0.3).sparsity == 0.75
    assert PruneConfig(pattern="unstructured").pattern == "unstructured"


def test_cli_pattern(tmp_path, cli):
    model = tmp_path / "m.onnx"
    onnx.save_model(every_kind(), str(model))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=X)
    out = tmp_path / "o.onnx"
    ok = cli("prune", model, calib, "-o", out, "--pattern", "2:4", "--method", "magnitude")
    assert ok.exit_code == 0, ok.stderr
    assert "pattern 2:4" in ok.stdout and "conv0: pattern not applied" in ok.stdout
    bad = cli("prune", model, calib, "-o", tmp_path / "p.onnx", "--pattern", "2:5:1")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: pattern must be")
    assert not (tmp_path / "p.onnx").exists()


def test_sweep_with_a_pattern_has_one_point_per_method(tmp_path, cli):
    model = tmp_path / "m.onnx"
    onnx.save_model(every_kind(), str(model))
    np.savez(tmp_path / "c.npz", x=X)
    np.savez(tmp_path / "e.npz", x=gaussian_calibration((3, 6, 6), n=30, seed=5))
    result = cli(
        "sweep",
        model,
        tmp_path / "c.npz",
        tmp_path / "e.npz",
        "--methods",
        "sipp-det,magnitude+none",
        "--sparsities",
        "0.3,0.5,0.7",
        "--pattern",
        "2:4",
        "--out",
        tmp_path / "sweep",
    )
    assert result.exit_code == 0, result.stderr
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"]
    assert [(p["variant"], p["sparsity"]) for p in points] == [("sipp-det+obs", 0.5), ("magnitude", 0.5)]
