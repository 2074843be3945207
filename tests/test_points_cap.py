"""`max_points`: the max reduction over a random subset of positions when a layer has many."""

import numpy as np
from builders import convnet, gaussian_calibration

from sipp_onnx import PruneConfig
from sipp_onnx.layers import ConvGeometry
from sipp_onnx.pipeline import prepare
from sipp_onnx.sensitivity import ConvAccumulator

GEOM = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), "NOTSET", 1)


def conv_stats(cap, seed=0):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 2 * 9)).astype(np.float32)
    acc = ConvAccumulator(rows, GEOM, reduction="max", terms="absolute", max_points_per_sample=cap, seed=seed)
    for _ in range(3):
        acc.update(rng.normal(size=(5, 2, 6, 6)).astype(np.float32))
    return acc.result()


def test_cap_above_the_positions_changes_nothing():
    full, capped = conv_stats(None), conv_stats(36)
    np.testing.assert_array_equal(full.sensitivity, capped.sensitivity)


def test_capped_max_is_a_max_over_fewer_points():
    full, capped = conv_stats(None), conv_stats(5)
    assert np.all(capped.sensitivity <= full.sensitivity * (1 + 1e-6))  # float32 rounding
    assert np.any(capped.sensitivity < full.sensitivity)
    assert capped.points == full.points == 3 * 5 * 36  # counts and norms still see every point
    np.testing.assert_allclose(capped.input_sqnorm, full.input_sqnorm)
    np.testing.assert_array_equal(conv_stats(5, seed=1).sensitivity, conv_stats(5, seed=1).sensitivity)


def test_pipeline_cap_follows_the_sample_count():
    feed = {"x": gaussian_calibration((3, 8, 8), n=20)}
    everything = prepare(convnet(), feed, PruneConfig(max_points=None))
    roomy = prepare(convnet(), feed, PruneConfig(max_points=20 * 64))  # 64 positions per sample: all
    tight = prepare(convnet(), feed, PruneConfig(max_points=20 * 4))
    for node in everything.stats:
        np.testing.assert_array_equal(everything.stats[node].sensitivity, roomy.stats[node].sensitivity)
        assert np.all(tight.stats[node].sensitivity <= everything.stats[node].sensitivity + 1e-7)
    assert any(np.any(tight.stats[n].sensitivity < everything.stats[n].sensitivity) for n in everything.stats)
