"""Per-layer budgets (budgets.py): SiPP's shared-eps keys, the measured error curves and their
split, against slow loops and brute force; and the allocations end to end."""

import itertools
from dataclasses import replace

import numpy as np
import onnx
import pytest
from builders import convnet, gaussian_calibration, mlp, save

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.budgets import (
    ErrorCurve,
    bound_keys,
    error_curve,
    mask_cost,
    norm_shares,
    refit_curve,
    split_budget,
    uninformative,
)
from sipp_onnx.errors import ConfigError
from sipp_onnx.refit import damped
from sipp_onnx.select import WeightScores, pattern_score, select


def test_bound_keys_match_a_loop():
    rng = np.random.default_rng(0)
    sens = rng.random((5, 9))
    sens[0, :3] = 0.5  # ties: the smaller |w| ranks lower
    absw = rng.random((5, 9))
    keys = bound_keys(sens, absw)
    for i in range(5):
        for j in range(9):
            below = [
                k
                for k in range(9)
                if sens[i, k] < sens[i, j] or (sens[i, k] == sens[i, j] and absw[i, k] <= absw[i, j])
            ]
            assert keys[i, j] == pytest.approx(sens[i, below].sum())


def test_sipp_allocation_equalises_row_bounds_across_fan_in():
    """Shares of about 1/K: one global threshold empties the wide layer first; the shared eps
    prunes the same fraction of both."""
    rng = np.random.default_rng(1)
    weights = []
    for k in (16, 256):
        w = rng.normal(size=(8, k)).astype(np.float32)
        s = (rng.uniform(0.5, 1.5, size=(8, k)) / k).astype(np.float32)
        weights.append(WeightScores(w, s, np.ones((8, k))))
    glob = select(weights, "sipp-det", 0.5)
    eps = select(weights, "sipp-det", 0.5, allocation="sipp")
    kept = [[float(np.mean(s.rows != 0)) for s in out] for out in (glob, eps)]
    assert kept[0][0] > 0.95 and kept[0][1] < 0.5  # global: the wide layer pays
    assert abs(kept[1][0] - kept[1][1]) < 0.15  # shared eps: about the same fraction
    assert sum(int(np.count_nonzero(s.rows)) for s in eps) == round(0.5 * (8 * 16 + 8 * 256))
    # the bound the report gives is the row's pruned sensitivity, the same eps everywhere
    bounds = [s.bound for s in eps]
    assert max(bounds) / min(bounds) < 1.3


def test_uninformative_detects_one_hot_sensitivities():
    rows = np.random.default_rng(2).normal(size=(6, 10))
    one_hot = np.where(np.arange(10) < 7, 1.0, 0.0)[None].repeat(6, 0)  # bytes 7-9 never seen
    assert uninformative(one_hot, rows)
    assert not uninformative(np.random.default_rng(3).random((6, 10)), rows)
    shares = norm_shares(rows, np.arange(10.0)[None].repeat(6, 0))
    assert np.allclose(shares.sum(1), 1.0, atol=1e-6)
    assert shares[:, 0].max() == 0  # an input that never fires has no share


def test_mask_cost_is_w_squared_times_the_input_norm():
    rng = np.random.default_rng(4)
    w, sq = rng.normal(size=(3, 6)), rng.random((3, 6))
    cost, total = mask_cost(w, sq)
    assert np.allclose(cost, w**2 * sq) and total == pytest.approx(float((w**2 * sq).sum()))


def _slow_refit_error(w0, keep, h, refit):
    """Relative squared error of the masked rows, each refitted by its own damped solve (never
    worse than its mask), summed over rows: one row at a time."""
    num = den = 0.0
    for w, k in zip(w0, keep, strict=True):
        d_mask = np.where(k, 0.0, -w)
        d = d_mask
        if refit and k.any() and not k.all():
            hd = damped(h)
            s, p = np.flatnonzero(k), np.flatnonzero(~k)
            new = np.zeros_like(w)
            new[s] = w[s] + np.linalg.solve(hd[np.ix_(s, s)], hd[np.ix_(s, p)] @ w[p])
            cand = new - w
            d = cand if cand @ h @ cand <= d_mask @ h @ d_mask else d_mask
        num += d @ h @ d
        den += w @ h @ w
    return num / den


@pytest.mark.parametrize("refit", [True, False])
@pytest.mark.parametrize("per_row", [False, True])
def test_refit_curve_matches_one_solve_per_row(refit, per_row):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))  # correlated inputs
    gram = (x.T @ x)[None]
    w = rng.normal(size=(10, 12))
    key = rng.random((10, 12))
    live = np.ones_like(w, dtype=bool)
    curve = refit_curve(w, key, live, gram, refit, per_row, 120)
    from sipp_onnx.budgets import _masks

    masks = _masks(key, live, per_row, curve.pruned)
    for n, keep in zip(curve.pruned, masks, strict=True):
        assert (~keep).sum() == pytest.approx(n, abs=10 if per_row else 0)
    # the curve is made non-decreasing: pruning more never counts as cheaper
    want = np.maximum.accumulate([_slow_refit_error(w, keep, gram[0], refit) for keep in masks])
    assert np.allclose(curve.error, want, rtol=1e-6, atol=1e-12)
    assert curve.error[0] == 0


def test_refit_curve_long_rows_use_the_sweep():
    """Rows longer than EXACT_WIDTH go through the SparseGPT sweep: the same errors as
    refit.solve_sweep on the same masks, and never above the mask alone."""
    from sipp_onnx.budgets import EXACT_WIDTH, _masks
    from sipp_onnx.refit import solve_sweep

    rng = np.random.default_rng(11)
    k = EXACT_WIDTH + 8
    x = rng.normal(size=(2 * k, k))
    gram = (x.T @ x)[None]
    w = rng.normal(size=(6, k))
    key = np.abs(w)
    live = np.ones_like(w, dtype=bool)
    curve = refit_curve(w, key, live, gram, True, False, w.size)
    h = gram[0]
    want = []
    for keep in _masks(key, live, False, curve.pruned):
        d = solve_sweep(w, keep, damped(h)) - w
        d_mask = np.where(keep, 0.0, -w)
        per = np.minimum(np.einsum("ik,kl,il->i", d, h, d), np.einsum("ik,kl,il->i", d_mask, h, d_mask))
        want.append(per.sum() / np.einsum("ik,kl,il->", w, h, w))
    assert np.allclose(curve.error, np.maximum.accumulate(want), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("per_row", [False, True])
def test_error_curve_matches_a_loop(per_row):
    rng = np.random.default_rng(5)
    cost = rng.random((4, 10))
    key = rng.random((4, 10))
    live = rng.random((4, 10)) > 0.1
    curve = error_curve(cost, 2.0, key, live, per_row, int(live.sum()))
    for n, err in zip(curve.pruned, curve.error, strict=True):
        if per_row:
            per = round(n / 4)
            want = sum(
                np.sort(cost[i][np.argsort(np.where(live[i], key[i], np.inf))[:per]]).sum() for i in range(4)
            )
        else:
            order = [(key[i, j], i, j) for i in range(4) for j in range(10) if live[i, j]]
            want = sum(cost[i, j] for _, i, j in sorted(order)[:n])
        assert err == pytest.approx(want / 2.0)


def test_split_budget_is_optimal_on_convex_curves():
    """Against brute force over every split, for convex curves (where the hull is the curve)."""
    rng = np.random.default_rng(6)
    curves = []
    for _ in range(3):
        steps = np.sort(rng.random(6))  # increasing marginal costs: convex
        curves.append(ErrorCurve(np.arange(7), np.concatenate([[0.0], np.cumsum(steps)])))
    for prune in range(0, 19):
        got = split_budget(curves, prune)
        assert sum(got) == prune
        best = min(
            sum(c.error[n] for c, n in zip(curves, split, strict=True))
            for split in itertools.product(range(7), repeat=3)
            if sum(split) == prune
        )
        assert sum(c.error[n] for c, n in zip(curves, got, strict=True)) == pytest.approx(best)


def test_split_budget_stops_at_the_curves_ends():
    curves = [ErrorCurve(np.array([0, 5]), np.array([0.0, 1.0]))]
    assert split_budget(curves, 99) == [5]


@pytest.mark.parametrize("method", ["sipp-det", "magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7, 0.9])
def test_error_allocation_reaches_the_target(method, sparsity):
    rng = np.random.default_rng(7)
    weights, curves = [], []
    for n, k in ((12, 30), (8, 12), (5, 8)):
        w = rng.normal(size=(n, k)).astype(np.float32)
        sq = rng.random((n, k)) + 0.1
        score = WeightScores(w, rng.random((n, k)).astype(np.float32), sq)
        weights.append(score)
        cost, total = mask_cost(w, sq)
        curves.append(
            error_curve(cost, total, pattern_score(score, method), w != 0, method == "wanda", w.size)
        )
    out = select(weights, method, sparsity, allocation="error", curves=curves)
    total = sum(w.rows.size for w in weights)
    zeros = sum(int((s.rows == 0).sum()) for s in out)
    assert abs(zeros / total - sparsity) <= 0.02  # wanda rounds per row


def test_error_allocation_spares_the_layer_that_costs_more():
    """Two equal layers, one whose inputs are 100x larger: the cheap one is pruned more."""
    rng = np.random.default_rng(8)
    weights, curves = [], []
    for scale in (1.0, 100.0):
        w = rng.normal(size=(10, 20)).astype(np.float32)
        sq = np.full((10, 20), scale)
        weights.append(WeightScores(w, rng.random((10, 20)).astype(np.float32), sq))
        cost, _ = mask_cost(w, sq)
        curves.append(error_curve(cost, 1.0, np.abs(w), w != 0, False, w.size))  # raw costs compare
    out = select(weights, "magnitude", 0.5, allocation="error", curves=curves)
    assert np.mean(out[0].rows == 0) > np.mean(out[1].rows == 0)


def test_sipp_allocation_needs_sipp_det():
    with pytest.raises(ConfigError, match="sipp-det"):
        PruneConfig(method="magnitude", allocation="sipp")


@pytest.mark.parametrize("allocation", ["global", "sipp", "error"])
@pytest.mark.parametrize("builder,shape", [(mlp, (20,)), (convnet, (3, 8, 8))])
def test_allocations_end_to_end(tmp_path, allocation, builder, shape):
    model = save(builder(), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=gaussian_calibration(shape, 64))
    result = prune_model(
        model, calib, PruneConfig(sparsity=0.6, allocation=allocation), output=tmp_path / "o.onnx"
    )
    assert result.report.allocation == allocation
    assert abs(result.report.sparsity_achieved - 0.6) < 0.01
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)
    if allocation == "error":
        assert "allocation" in result.report.timings


def test_one_hot_layer_is_ranked_by_norm_and_reported(tmp_path):
    """A one-hot embedding's sensitivities are all 1: with a new allocation it is ranked by
    |w| ||a|| and the report says so; the global allocation stays as it was."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(9)
    emb = rng.normal(size=(16, 6)).astype(np.float32)
    out = rng.normal(size=(6, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "emb"], ["h"], name="embed"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "out"], ["y"], name="head"),
        ],
        "onehot",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [onnx.numpy_helper.from_array(emb, "emb"), onnx.numpy_helper.from_array(out, "out")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = save(model, tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.eye(16, dtype=np.float32)[rng.integers(0, 16, 128)])
    notes = {}
    for allocation in ("global", "sipp", "error"):
        result = prune_model(path, calib, PruneConfig(sparsity=0.5, allocation=allocation))
        notes[allocation] = {layer.nodes[0]: layer.score_note for layer in result.report.layers}
    assert notes["global"] == {"embed": "", "head": ""}
    for allocation in ("sipp", "error"):
        assert "uninformative" in notes[allocation]["embed"] and notes[allocation]["head"] == ""


def test_refit_reuses_the_allocations_factor_with_the_same_result():
    """The factor refit_curve hands over gives the refit exactly what it computes itself."""
    from sipp_onnx.refit import refit_layer

    rng = np.random.default_rng(12)
    x = rng.normal(size=(400, 80))
    gram, total = (x.T @ x)[None], x.sum(0)[None]
    w = rng.normal(size=(300, 80)).astype(np.float32)
    factors: dict = {}
    refit_curve(w, np.abs(w), w != 0, gram, True, False, w.size, factors=factors)
    assert set(factors) == {0}
    masked = np.where(np.abs(w) > 0.8, w, 0).astype(np.float32)
    plain = refit_layer(w, masked, gram, total, 400, exact_flops=0)
    reused = refit_layer(w, masked, gram, total, 400, exact_flops=0, factors=factors)
    assert plain.solver == reused.solver == "sparsegpt"
    np.testing.assert_array_equal(plain.rows, reused.rows)


def test_envelope_and_preference_follow_the_lower_curve():
    own = ErrorCurve(np.array([0, 10, 20]), np.array([0.0, 0.1, 0.5]))
    alt = ErrorCurve(np.array([0, 10, 20]), np.array([0.0, 0.2, 0.3]))
    both = replace(own, alternative=alt)
    np.testing.assert_array_equal(both.envelope().error, [0.0, 0.1, 0.3])
    assert own.envelope() is own
    assert not both.prefers_alternative(0)
    assert not both.prefers_alternative(10)  # own lower
    assert both.prefers_alternative(20)  # alternative lower
    # interpolated: at 15 own 0.3, alternative 0.25
    assert both.prefers_alternative(15)
    # a tie keeps the method's own order
    assert not replace(own, alternative=own).prefers_alternative(15)


def test_measured_ranking_prunes_a_layer_in_the_order_that_measured_lower():
    """Two layers with refit curves in both orders; a layer whose sensitivities are noise gets
    Wanda's order (its measured error is lower there), the mask is then exactly Wanda's for the
    layer's count, and the bound is the SiPP bound of that mask."""
    rng = np.random.default_rng(12)
    weights, curves = [], []
    for noisy in (False, True):
        n, k = 16, 24
        x = rng.normal(size=(400, k)) * rng.uniform(0.1, 3.0, size=k)
        gram = (x.T @ x)[None]
        w = rng.normal(size=(n, k)).astype(np.float32)
        sq = np.broadcast_to(np.diag(gram[0]), (n, k))
        wanda_key = np.abs(w) * np.sqrt(sq)
        sens = rng.random((n, k)) if noisy else wanda_key / wanda_key.sum(axis=1, keepdims=True)
        score = WeightScores(w, sens.astype(np.float32), sq)
        weights.append(score)
        live = w != 0
        own = refit_curve(w, sens, live, gram, True, False, w.size)
        alt = refit_curve(w, pattern_score(score, "wanda"), live, gram, True, True, w.size)
        curves.append(replace(own, alternative=alt))
    out = select(weights, "sipp-det", 0.6, allocation="error", curves=curves)
    assert out[1].ranking == "wanda"
    kept = int(np.count_nonzero(out[1].rows))
    wanda = select([weights[1]], "wanda", 1 - kept / weights[1].rows.size)[0]
    np.testing.assert_array_equal(out[1].rows != 0, wanda.rows != 0)
    pruned = np.where(out[1].rows == 0, weights[1].sensitivity, 0.0)
    expect = max(
        np.where(weights[1].rows > 0, pruned, 0).sum(axis=1).max(),
        np.where(weights[1].rows < 0, pruned, 0).sum(axis=1).max(),
    )
    assert out[1].bound == pytest.approx(expect, rel=1e-6)
    zeros = sum(int((s.rows == 0).sum()) for s in out)
    assert abs(zeros / sum(w.rows.size for w in weights) - 0.6) <= 0.02


@pytest.mark.parametrize("ranking", ["measured", "own"])
def test_ranking_reaches_the_report(tmp_path, ranking):
    model = save(convnet(), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=gaussian_calibration((3, 8, 8), 64))
    result = prune_model(model, calib, PruneConfig(sparsity=0.7, ranking=ranking))
    rankings = {layer.ranking for layer in result.report.layers}
    if ranking == "own":
        assert rankings == {None}
        assert "ranking:" not in result.report.format_table()
    else:
        assert rankings <= {"sensitivity", "wanda"} and None not in rankings
        assert "tensors pruned in Wanda's" in result.report.format_table()
    # the baselines keep their own order whatever the flag
    base = prune_model(model, calib, PruneConfig(sparsity=0.7, method="magnitude", allocation="error"))
    assert {layer.ranking for layer in base.report.layers} == {None}
