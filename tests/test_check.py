"""`check_pattern` / `sipp-onnx check`: N:M structured sparsity of every kind of layer.

The compliant weights are made by a slow explicit loop over (output channel, kernel position,
channel group) in each weight's stored layout, the obviously-correct reference that the
vectorized check is compared with; a non-compliant one breaks exactly one group.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sipp_onnx import ModelError, check_pattern
from sipp_onnx.checking import CheckStatus, PatternReport
from sipp_onnx.pattern import Pattern

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
except ImportError:  # pragma: no cover
    from tests import builders  # type: ignore[no-redef]

P24 = Pattern(2, 4)

# Stored weights of the zoo model: name -> (shape, kind). The kind says where a weight's input
# channels are in its stored layout: "conv" [C_out, C_in/g, kh, kw]; "rows" [N, K] (Gemm
# transB=1, and W_s, which a Transpose turns into a MatMul's [K, N]); "cols" [K, N] (Gemm
# transB=0, MatMul).
ZOO = {
    "W_c": ((16, 8, 3, 3), "conv"),
    "W_g": ((16, 8, 1, 1), "conv"),
    "W_d": ((16, 1, 3, 3), "conv"),
    "W_t": ((8, 16), "rows"),
    "W_n": ((8, 12), "cols"),
    "W_m": ((12, 8), "cols"),
    "W_s": ((4, 8), "rows"),
    "W_o": ((4, 6), "cols"),
    "W_odd": ((3, 6), "rows"),
}
NODE_OF = {
    "W_c": "conv",
    "W_g": "gconv",
    "W_d": "dwconv",
    "W_t": "fc_t",
    "W_n": "fc_n",
    "W_m": "mm",
    "W_s": "mm_chain",
    "W_o": "mm_o",
    "W_odd": "fc_odd",
}
NOT_APPLICABLE = {"W_d", "W_odd"}
# Groups of 4 input channels: outputs x kernel positions x (input channels per group / 4).
GROUPS = {
    "conv": 16 * 9 * 2,
    "gconv": 16 * 1 * 2,
    "fc_t": 8 * 4,
    "fc_n": 12 * 2,
    "mm": 8 * 3,
    "mm_chain": 4 * 2,
    "mm_o": 6 * 1,
}


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # No exact zeros: every entry is at least 0.1 away from 0.
    return {
        name: (rng.uniform(0.1, 1.0, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
        for name, (shape, _) in ZOO.items()
    }


def comply(w: np.ndarray, kind: str, rng: np.random.Generator, n: int = 2, m: int = 4) -> np.ndarray:
    """Zero m - n random entries of every group of m consecutive input channels, one by one."""
    w = w.copy()
    if kind == "conv":
        c_out, c_in, kh, kw = w.shape
        for o in range(c_out):
            for i in range(kh):
                for j in range(kw):
                    for g in range(c_in // m):
                        for c in rng.choice(m, m - n, replace=False):
                            w[o, g * m + c, i, j] = 0.0
    elif kind == "rows":  # [N, K]
        for o in range(w.shape[0]):
            for g in range(w.shape[1] // m):
                for c in rng.choice(m, m - n, replace=False):
                    w[o, g * m + c] = 0.0
    else:  # "cols": [K, N]
        for o in range(w.shape[1]):
            for g in range(w.shape[0] // m):
                for c in rng.choice(m, m - n, replace=False):
                    w[g * m + c, o] = 0.0
    return w


# Where each applicable weight gets broken: output channel, channel group, kernel position.
BREAK = {
    "W_c": (3, 1, (1, 2)),
    "W_g": (9, 1, (0, 0)),
    "W_t": (5, 2, ()),
    "W_n": (7, 1, ()),
    "W_m": (2, 2, ()),
    "W_s": (2, 1, ()),
    "W_o": (4, 0, ()),
}


def break_one(w: np.ndarray, kind: str, out: int, group: int, pos: tuple[int, ...], m: int = 4) -> np.ndarray:
    """Give one group one non-zero too many (its first zero becomes 1)."""
    w = w.copy()
    for c in range(group * m, (group + 1) * m):
        if kind == "conv":
            index: tuple[int, ...] = (out, c, *pos)
        elif kind == "rows":
            index = (out, c)
        else:
            index = (c, out)
        if w[index] == 0:
            w[index] = 1.0
            return w
    raise AssertionError("the group has no zero to break")


def compliant_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    weights = random_weights(seed)
    return {
        name: w if name in NOT_APPLICABLE else comply(w, ZOO[name][1], rng) for name, w in weights.items()
    }


def zoo(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Conv, grouped Conv, depthwise Conv -> GAP -> Gemm transB=1, Gemm transB=0, MatMul,
    MatMul through a Transpose, MatMul, Gemm with K=6; and an activation x activation MatMul."""
    v = builders.value
    nodes = [
        helper.make_node("Conv", ["x", "W_c"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "W_g"], ["c2"], name="gconv", group=2),
        helper.make_node("Conv", ["c2", "W_d"], ["c3"], name="dwconv", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "W_t"], ["h1"], name="fc_t", transB=1),
        helper.make_node("Gemm", ["h1", "W_n"], ["h2"], name="fc_n", transB=0),
        helper.make_node("MatMul", ["h2", "W_m"], ["h3"], name="mm"),
        helper.make_node("Transpose", ["W_s"], ["W_s_t"], name="transpose_w", perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "W_s_t"], ["h4"], name="mm_chain"),
        helper.make_node("MatMul", ["h4", "W_o"], ["h5"], name="mm_o"),
        helper.make_node("Gemm", ["h5", "W_odd"], ["y"], name="fc_odd", transB=1),
        helper.make_node("Transpose", ["y"], ["y_t"], name="transpose_y"),
        helper.make_node("MatMul", ["y_t", "y"], ["gram"], name="gram"),
    ]
    inits = [builders.tensor(name, w) for name, w in weights.items()]
    return builders.finish(
        nodes, [v("x", ["batch", 8, 5, 5])], [v("y", ["batch", 3]), v("gram", [3, 3])], inits
    )


def by_node(report: PatternReport) -> dict[str, object]:
    return {layer.label: layer for layer in report.layers}


# ----------------------------------------------------------------------------- library


def test_compliant_zoo() -> None:
    report = check_pattern(zoo(compliant_weights()), P24)
    layers = by_node(report)
    assert report.ok
    assert [layer.label for layer in report.layers] == [*NODE_OF.values(), "gram"]
    for name, node in NODE_OF.items():
        layer = layers[node]
        if name in NOT_APPLICABLE:
            assert layer.status is CheckStatus.NOT_APPLICABLE
            assert layer.groups == 0 and layer.violating_groups == 0
            assert layer.zero_fraction == 0.0
        else:
            assert layer.status is CheckStatus.COMPLIES, node
            assert (layer.groups, layer.violating_groups) == (GROUPS[node], 0), node
            assert layer.zero_fraction == 0.5
            assert layer.first_violation is None
    # pattern_problem's wording of what it counts may change; the numbers are the point.
    assert layers["dwconv"].reason.endswith(" 1 is not a multiple of 4 (2:4 does not fit)")
    assert layers["fc_odd"].reason.endswith(" 6 is not a multiple of 4 (2:4 does not fit)")
    assert layers["gram"].status is CheckStatus.NOT_CHECKED
    assert "both operands are activations" in layers["gram"].reason
    assert layers["gram"].zero_fraction is None and layers["gram"].shape == ()

    chain = layers["mm_chain"]
    assert chain.weight == "W_s_t" and chain.stored == "W_s" and chain.via == "Transpose[1, 0]"
    assert chain.shape == (8, 4)
    assert layers["fc_t"].stored == "" and layers["fc_t"].via == ""
    assert report.summary() == "2:4: 7 of 7 layers comply, 2 not applicable, 1 not checked"


@pytest.mark.parametrize("name", sorted(BREAK))
def test_one_broken_group_is_found(name: str) -> None:
    weights = compliant_weights()
    out, group, pos = BREAK[name]
    weights[name] = break_one(weights[name], ZOO[name][1], out, group, pos)
    report = check_pattern(zoo(weights), P24)
    node = NODE_OF[name]
    assert not report.ok
    assert [layer.label for layer in report.violating] == [node]
    bad = by_node(report)[node]
    assert (bad.groups, bad.violating_groups) == (GROUPS[node], 1)
    v = bad.first_violation
    assert (v.output, v.kernel_position, v.input_channels, v.nonzeros) == (
        out,
        pos if ZOO[name][1] == "conv" else (),
        (4 * group, 4 * group + 4),
        3,
    )
    assert len(report.complying) == 6 and len(report.not_applicable) == 2
    assert report.summary() == (
        f"2:4: 6 of 7 layers comply, 1 violates ({node}: 1 of {GROUPS[node]} groups), "
        "2 not applicable, 1 not checked"
    )


def test_random_dense_weights_violate_everywhere() -> None:
    report = check_pattern(zoo(random_weights()), P24)
    assert len(report.violating) == 7
    for layer in report.violating:
        assert layer.violating_groups == layer.groups == GROUPS[layer.label]
        assert layer.first_violation.output == 0 and layer.first_violation.nonzeros == 4


def test_other_patterns() -> None:
    model = zoo(compliant_weights())
    # 1:4: every group of a 2:4 weight has one non-zero too many.
    strict = check_pattern(model, Pattern(1, 4))
    assert {layer.label for layer in strict.violating} == set(GROUPS)
    assert all(layer.violating_groups == layer.groups for layer in strict.violating)
    # 4:8: two 2:4 groups make one 4:8 group; 12 or 4 input channels cannot follow it.
    loose = {layer.label: layer for layer in check_pattern(model, Pattern(4, 8)).layers}
    assert {k for k, v in loose.items() if v.status is CheckStatus.COMPLIES} == {
        "conv",
        "gconv",
        "fc_t",
        "fc_n",
        "mm_chain",
    }
    assert loose["conv"].groups == 16 * 9 * 1
    assert loose["mm"].reason.endswith(" 12 is not a multiple of 8 (4:8 does not fit)")
    assert loose["mm_o"].status is CheckStatus.NOT_APPLICABLE


def single_layer(kind: str, w: np.ndarray) -> onnx.ModelProto:
    v = builders.value
    if kind == "conv":
        node = helper.make_node("Conv", ["x", "W"], ["y"], name="layer")
        x, y = v("x", ["batch", w.shape[1], 4, 4]), v("y", ["batch", w.shape[0], 2, 2])
    elif kind == "rows":
        node = helper.make_node("Gemm", ["x", "W"], ["y"], name="layer", transB=1)
        x, y = v("x", ["batch", w.shape[1]]), v("y", ["batch", w.shape[0]])
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        x, y = v("x", ["batch", w.shape[0]]), v("y", ["batch", w.shape[1]])
    return builders.finish([node], [x], [y], [builders.tensor("W", w)])


@pytest.mark.parametrize(
    ("kind", "shape", "violating", "groups"),
    [
        ("cols", (8, 8), 8, 16),  # MatMul [K, N]: zeros along N
        ("rows", (8, 8), 8, 16),  # Gemm transB=1 [N, K]: zeros along N
        ("conv", (8, 8, 3, 3), 4 * 9 * 2, 8 * 9 * 2),  # Conv: zeros along the output channels
    ],
)
def test_pattern_along_the_output_axis_violates(kind: str, shape, violating: int, groups: int) -> None:
    """2:4 zeros along the wrong (output) axis: half the output channels keep every input."""
    w = np.ones(shape, np.float32)
    output_axis = {"cols": 1, "rows": 0, "conv": 0}[kind]
    index = [slice(None)] * len(shape)
    for o in range(shape[output_axis]):
        if o % 4 in (2, 3):
            index[output_axis] = slice(o, o + 1)
            w[tuple(index)] = 0.0
    # It is 2:4 along the output axis ...
    along_out = np.moveaxis(w, output_axis, -1).reshape(-1, 4)
    assert np.all(np.count_nonzero(along_out, axis=1) == 2)
    # ... and not along the input channels.
    (layer,) = check_pattern(single_layer(kind, w), P24).layers
    assert layer.status is CheckStatus.VIOLATES
    assert (layer.violating_groups, layer.groups) == (violating, groups)
    assert layer.zero_fraction == 0.5

    # The same array read by a layer whose input axis is the zeroed one complies.
    if kind != "conv":
        swapped = "rows" if kind == "cols" else "cols"
        (fixed,) = check_pattern(single_layer(swapped, w), P24).layers
        assert fixed.status is CheckStatus.COMPLIES


def quantized_gemm(stored: np.ndarray) -> onnx.ModelProto:
    """Gemm transB=1 reading DequantizeLinear(int8 [4, 8], scale 0.5, zero point 3)."""
    v = builders.value
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["W"], name="dq"),
        helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1),
    ]
    inits = [
        builders.tensor("Wq", stored, np.int8),
        builders.tensor("scale", np.float32(0.5)),
        builders.tensor("zp", np.int8(3), np.int8),
    ]
    return builders.finish(nodes, [v("x", ["batch", 8])], [v("y", ["batch", 4])], inits)


def test_quantized_weight_zero_point_is_zero() -> None:
    rng = np.random.default_rng(5)
    stored = rng.integers(10, 100, (4, 8)).astype(np.int8)
    for o in range(4):
        for g in range(2):
            for c in rng.choice(4, 2, replace=False):
                stored[o, 4 * g + c] = 3  # dequantizes to exactly 0
    (layer,) = check_pattern(quantized_gemm(stored), P24).layers
    assert layer.status is CheckStatus.COMPLIES and layer.zero_fraction == 0.5
    assert layer.via == "DequantizeLinear" and layer.stored == "Wq"
    # Stored zeros are not zeros of the weight: (0 - 3) * 0.5 = -1.5.
    (naive,) = check_pattern(quantized_gemm(np.where(stored == 3, 0, stored)), P24).layers
    assert naive.status is CheckStatus.VIOLATES and naive.violating_groups == 8
    assert naive.zero_fraction == 0.0


def test_shared_weight_is_one_entry() -> None:
    w = comply(random_weights()["W_t"][:, :8], "rows", np.random.default_rng(0))
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="g1", transB=1),
        helper.make_node("Gemm", ["h", "W"], ["y"], name="g2", transB=1),
    ]
    v = builders.value
    model = builders.finish(nodes, [v("x", ["b", 8])], [v("y", ["b", 8])], [builders.tensor("W", w)])
    (layer,) = check_pattern(model, P24).layers
    assert layer.nodes == ("g1", "g2") and layer.label == "g1,g2" and layer.op_type == "Gemm"
    assert layer.status is CheckStatus.COMPLIES


def test_no_prunable_layer() -> None:
    report = check_pattern(builders.tokens(), P24)  # Wq 6x6 and Wc 6x10: K = 6
    assert report.ok and not report.complying and len(report.not_applicable) == 2
    assert report.summary() == "2:4: no layer can follow the pattern, 2 not applicable, 2 not checked"


# ----------------------------------------------------------------------------- external data


def test_external_data(tmp_path: Path, cli) -> None:
    weights = compliant_weights()
    weights["W_c"] = break_one(weights["W_c"], "conv", *BREAK["W_c"])
    model = zoo(weights)
    path = builders.save_external(model, tmp_path / "ext.onnx")
    stored = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)

    in_memory = check_pattern(model, P24)
    from_file = check_pattern(path, P24)
    assert from_file.layers == in_memory.layers
    assert from_file.model == str(path) and [c.label for c in from_file.violating] == ["conv"]

    # A ModelProto with external tensors needs their directory.
    with pytest.raises(ModelError, match="external data"):
        check_pattern(stored, P24)
    assert check_pattern(stored, P24, base_dir=tmp_path).layers == in_memory.layers

    result = cli("check", path, "--pattern", "2:4")
    assert result.exit_code == 4
    assert "1 violates (conv: 1 of 288 groups)" in result.stdout

    (tmp_path / "ext.onnx.data").unlink()
    missing = cli("check", path, "--pattern", "2:4")
    assert missing.exit_code == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error: ") and len(missing.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- CLI


def test_cli_compliant_exit_0(tmp_path: Path, cli) -> None:
    path = builders.save(zoo(compliant_weights()), tmp_path / "zoo.onnx")
    result = cli("check", path, "--pattern", "2:4")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[-1] == "2:4: 7 of 7 layers comply, 2 not applicable, 1 not checked"
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in GROUPS}
    assert set(rows) == set(GROUPS)
    assert rows["conv"].split()[-1] == "complies" and " 0/288 " in rows["conv"]
    assert "W_s via Transpose[1, 0]" in rows["mm_chain"]
    assert "dwconv" in result.stdout and "not applicable: input channels 1 is not" in result.stdout
    assert "gram (MatMul): both operands are activations" in result.stdout


def test_cli_violation_exit_4_and_json(tmp_path: Path, cli) -> None:
    weights = compliant_weights()
    weights["W_n"] = break_one(weights["W_n"], "cols", *BREAK["W_n"])
    path = builders.save(zoo(weights), tmp_path / "zoo.onnx")

    table = cli("check", path, "--pattern", "2:4")
    assert table.exit_code == 4
    assert table.stdout.splitlines()[-1] == (
        "2:4: 6 of 7 layers comply, 1 violates (fc_n: 1 of 24 groups), 2 not applicable, 1 not checked"
    )
    assert "fc_n: first violation at output channel 7, input channels 4-7 (3 non-zeros)" in table.stdout
    assert table.stderr == "fail: 1 layer(s) violate 2:4\n"

    result = cli("check", path, "--pattern", "2:4", "--json")
    assert result.exit_code == 4
    data = json.loads(result.stdout)
    assert data["model"] == str(path) and data["pattern"] == "2:4" and data["ok"] is False
    assert data["counts"] == {"complies": 6, "violates": 1, "not applicable": 2, "not checked": 1}
    layers = {tuple(entry["nodes"]): entry for entry in data["layers"]}
    fc_n = layers[("fc_n",)]
    assert fc_n == {
        "nodes": ["fc_n"],
        "op_type": "Gemm",
        "weight": "W_n",
        "stored": "",
        "via": "",
        "shape": [8, 12],
        "status": "violates",
        "reason": "",
        "groups": 24,
        "violating_groups": 1,
        "zero_fraction": pytest.approx(1 - (48 + 1) / 96),
        "first_violation": {"output": 7, "kernel_position": [], "input_channels": [4, 8], "nonzeros": 3},
    }
    assert layers[("dwconv",)]["status"] == "not applicable"
    assert layers[("gram",)]["status"] == "not checked" and layers[("gram",)]["weight"] == "y"
    assert layers[("mm_chain",)]["stored"] == "W_s"

    ok_json = cli(
        "check", builders.save(zoo(compliant_weights()), tmp_path / "ok.onnx"), "--pattern", "2:4", "--json"
    )
    assert ok_json.exit_code == 0 and json.loads(ok_json.stdout)["ok"] is True


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("4:2", "need 0 < N < M <= 64"),
        ("two:four", "N:M such as 2:4"),
        ("unstructured", "expected an N:M pattern such as 2:4"),
        ("0:4", "need 0 < N < M <= 64"),
    ],
)
def test_cli_bad_pattern_is_a_usage_error(pattern: str, message: str, mlp_files, cli) -> None:
    model, _ = mlp_files
    result = cli("check", model, "--pattern", pattern)
    assert result.exit_code == 2
    assert "--pattern" in result.stderr and message in result.stderr
    assert result.stdout == ""


def test_cli_pattern_required(mlp_files, cli) -> None:
    model, _ = mlp_files
    result = cli("check", model)
    assert result.exit_code == 2 and "Missing option '--pattern'" in result.stderr


def test_cli_bad_model_one_line_error(tmp_path: Path, cli) -> None:
    missing = cli("check", tmp_path / "nope.onnx", "--pattern", "2:4")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == f"error: model file {str(tmp_path / 'nope.onnx')!r} does not exist"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00not a model\xff" * 10)
    result = cli("check", corrupt, "--pattern", "2:4")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_cli_help_mentions_exit_status(cli) -> None:
    result = cli("check", "--help")
    assert result.exit_code == 0
    assert "Exit status 4 when a layer that should comply does not" in " ".join(result.stdout.split())
