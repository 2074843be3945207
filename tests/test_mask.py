"""Padding tokens (attention_mask = 0) are not calibration points."""

import numpy as np
import pytest
from builders import finish, tensor, value
from onnx import TensorProto, helper

from sipp_onnx import PruneConfig, prune_model
from sipp_onnx.errors import ConfigError
from sipp_onnx.pipeline import prepare
from sipp_onnx.sensitivity import DenseAccumulator


def masked_batch(seed=0, b=4, t=6, k=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, t, k)).astype(np.float32)
    lengths = rng.integers(1, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    return x, mask


@pytest.mark.parametrize("terms", ["absolute", "signed"])
def test_masked_update_equals_the_real_tokens_alone(terms):
    rows = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    x, mask = masked_batch()
    masked = DenseAccumulator(rows, terms=terms, gram=True)
    masked.update(x, mask)
    real = DenseAccumulator(rows, terms=terms, gram=True)
    real.update(x[mask != 0])  # [n_real, K]: every real token as its own point
    a, b = masked.result(), real.result()
    assert a.points == b.points == int(mask.sum())
    np.testing.assert_allclose(a.sensitivity, b.sensitivity, rtol=1e-6)
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-6)
    np.testing.assert_allclose(a.input_sum, b.input_sum, rtol=1e-6)
    np.testing.assert_allclose(a.input_sqnorm, b.input_sqnorm, rtol=1e-6)


def test_mask_of_another_shape_is_ignored():
    rows = np.ones((2, 5), dtype=np.float32)
    x, mask = masked_batch()
    acc = DenseAccumulator(rows)
    acc.update(x[:, :3], mask)  # sequence length differs: not this layer's tokens
    assert acc.result().points == 4 * 3


def masked_model():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["h", "m3"], ["hm"], name="apply_mask"),
        helper.make_node("MatMul", ["hm", "W2"], ["y"], name="out"),
    ]
    inits = [
        tensor("W", rng.normal(size=(5, 8))),
        tensor("W2", rng.normal(size=(8, 3))),
        tensor("axes", np.array([2]), np.int64),
    ]
    inputs = [value("x", ["b", "t", 5]), value("attention_mask", ["b", "t"], TensorProto.INT64)]
    return finish(nodes, inputs, [value("y", ["b", "t", 3])], inits)


def test_attention_mask_is_detected_and_changes_the_statistics():
    x, mask = masked_batch(b=16)
    x[mask == 0] = 50.0  # huge padding values: they would dominate if they counted
    feed = {"x": x, "attention_mask": mask}
    auto = prepare(masked_model(), feed, PruneConfig())
    off = prepare(masked_model(), feed, PruneConfig(mask_input="none"))
    assert auto.mask_input == "attention_mask" and off.mask_input is None
    assert auto.stats["proj"].points == int(mask.sum())
    assert off.stats["proj"].points == mask.size
    assert np.abs(off.stats["proj"].input_sum).max() > 10 * np.abs(auto.stats["proj"].input_sum).max()
    report = prune_model(masked_model(), feed, PruneConfig()).report
    assert report.mask_input == "attention_mask"


def test_mask_input_by_name_and_bad_names():
    x, mask = masked_batch()
    feed = {"x": x, "attention_mask": mask}
    named = prepare(masked_model(), feed, PruneConfig(mask_input="attention_mask"))
    assert named.mask_input == "attention_mask"
    with pytest.raises(ConfigError, match="'nope' is not a model input"):
        prepare(masked_model(), feed, PruneConfig(mask_input="nope"))
    with pytest.raises(ConfigError, match="must be \\[batch, sequence\\]"):
        prepare(masked_model(), feed, PruneConfig(mask_input="x"))
    with pytest.raises(ConfigError, match="mask_input"):
        PruneConfig(mask_input="")


@pytest.mark.parametrize("reduction", ["max", "mean", "expected"])
def test_all_padding_adds_nothing(reduction):
    rows = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    x, mask = masked_batch()
    acc = DenseAccumulator(rows, reduction=reduction, gram=True)
    acc.update(x, np.zeros_like(mask))
    stats = acc.result()
    assert stats.points == 0 and not stats.sensitivity.any() and not stats.gram.any()
    acc.update(x, mask)
    assert acc.result().points == int(mask.sum())
