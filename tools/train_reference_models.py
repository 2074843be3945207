#!/usr/bin/env python3
"""Train the three small reference classifiers shipped in ``models/``.

The pruning tool needs real, trained networks to measure what pruning costs in
accuracy, and they must be small enough to live in the repository and to be
evaluated in CI within seconds.  This script trains three classifiers on
scikit-learn's bundled ``digits`` data set (1797 8x8 images, no download) and
writes them as plain ONNX graphs plus their calibration and test inputs:

* ``lenet300``: LeNet-300-100 style MLP (Gemm/Relu only).
* ``cnn``: small CNN with a depthwise conv, padded convs, pooling and Gemm.
* ``tokens``: rows-as-tokens transformer block (MatMul on 3-D activations,
  LayerNormalization, single-head self-attention, ReduceMean).

For every NAME it writes ``NAME.onnx``, ``NAME_calib.npz`` (key ``input``) and
``NAME_test.npz`` (keys ``input``, ``labels``), and finally ``README.md``.

How to run (dev-only dependencies; the shipped models need none of them)::

    python3 -m venv /tmp/trainvenv
    /tmp/trainvenv/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
    # (use the CPU wheel of torch; a CUDA build is not needed)
    /tmp/trainvenv/bin/python tools/train_reference_models.py --out models/

The graphs are written by hand with ``onnx.helper`` instead of
``torch.onnx.export`` so that the op set (opset 17), ``ir_version`` (10), node
names and op choice are fully under our control and stable across torch
releases.  Everything is seeded and single-threaded, and the ``.npz`` archives
are written with a fixed zip timestamp, so two runs with the same package
versions produce byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LOG = logging.getLogger("train_reference_models")

SEED = 20240601
N_TEST = 400
N_CALIB = 200
OPSET = 17
IR_VERSION = 10
PRODUCER = "sipp-onnx tools/train_reference_models.py"
# Zip entries carry a timestamp; a fixed one keeps the .npz files reproducible.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
# Max |ORT logits - torch logits| accepted when verifying an exported graph.
EXPORT_TOLERANCE = 1e-4
REPO_ROOT = Path(__file__).resolve().parent.parent
PRUNING_HEADER = "## Pruning results"
PRUNING_PLACEHOLDER = "To be filled by the quality sweep."


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsSplit:
    """Preprocessed digits, flat [N, 64] float32, split three ways.

    ``calib`` is held out from training so that calibration statistics used
    by the pruner are not computed on data the model has memorised.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float


def load_split(seed: int = SEED) -> DigitsSplit:
    """Split digits stratified into train/calib/test and standardise.

    Standardisation uses one global mean/std of the training pixels (after
    dividing by 16) rather than per-pixel statistics: several border pixels
    are (almost) always zero, and a per-pixel std near zero would blow those
    pixels up on unseen images.  Zero pixels become negative inputs, which is
    what we want for testing activation-aware pruning.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float64)
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=N_TEST, stratify=y, random_state=seed)
    x_train, x_calib, y_train, _ = train_test_split(
        x_rest, y_rest, test_size=N_CALIB, stratify=y_rest, random_state=seed + 1
    )
    mean = float(x_train.mean())
    std = float(x_train.std())

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)

    return DigitsSplit(
        x_train=norm(x_train),
        y_train=y_train,
        x_calib=norm(x_calib),
        x_test=norm(x_test),
        y_test=y_test.astype(np.int64),
        mean=mean,
        std=std,
    )


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``np.load``-compatible .npz with a fixed zip timestamp.

    ``np.savez`` stamps each member with the current time, which would make
    every run produce different bytes.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# --------------------------------------------------------------------------
# Torch models
# --------------------------------------------------------------------------


class LeNet300(nn.Module):
    """LeNet-300-100 MLP: the classic unstructured-pruning benchmark shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def conv_bn(cin: int, cout: int, kernel: int, groups: int = 1) -> nn.Sequential:
    """Bias-free conv + batch norm; the BN is folded into the conv at export."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class SmallCNN(nn.Module):
    """Small CNN covering the conv variants a pruner must handle.

    Ordinary padded 3x3 conv, depthwise 3x3 conv (group = channels, which
    cannot be pruned along input channels), pointwise 1x1 conv, MaxPool,
    AveragePool, then a two-layer Gemm classifier.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_bn(1, 16, 3)
        self.dwconv2 = conv_bn(16, 16, 3, groups=16)
        self.pwconv2 = conv_bn(16, 32, 1)
        self.conv3 = conv_bn(32, 32, 3)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.dwconv2(x))
        x = torch.relu(self.pwconv2(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv3(x))
        x = nn.functional.avg_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class TokenTransformer(nn.Module):
    """One pre-LN transformer block over the 8 image rows as tokens.

    Exercises MatMul with constant weights on 3-D activations, LayerNorm,
    residual Adds, and attention MatMuls between two activations (q @ k^T,
    p @ v), which a pruner must recognise as not prunable.
    """

    def __init__(self, d_model: int = 32, d_hidden: int = 64) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(torch.randn(8, d_model) * 0.02)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn_q = nn.Linear(d_model, d_model)
        self.attn_k = nn.Linear(d_model, d_model)
        self.attn_v = nn.Linear(d_model, d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp_fc1 = nn.Linear(d_model, d_hidden)
        self.mlp_fc2 = nn.Linear(d_hidden, d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        a = self.ln1(h)
        q, k, v = self.attn_q(a), self.attn_k(a), self.attn_v(a)
        scores = torch.matmul(q, k.transpose(1, 2)) * (1.0 / math.sqrt(self.d_model))
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        h = h + self.attn_out(ctx)
        m = torch.relu(self.mlp_fc1(self.ln2(h)))
        h = h + self.mlp_fc2(m)
        return self.head(h.mean(dim=1))


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings; small data, so many cheap epochs.

    Label smoothing is what gets the attention model from ~93 % to ~97 % test
    accuracy on 1197 training images (it otherwise overfits to near-zero loss).
    """

    epochs: int
    lr: float
    weight_decay: float
    label_smoothing: float = 0.0
    batch_size: int = 64


def seed_everything(seed: int) -> None:
    """Make torch/numpy fully deterministic for reproducible weights."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int) -> None:
    """Train with AdamW and a cosine schedule; shuffling uses its own seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(xt) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            LOG.info("  epoch %3d/%d  train loss %.4f", epoch + 1, cfg.epochs, total / len(xt))
    model.eval()


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Eval-mode logits as float32 numpy."""
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------
# ONNX graph building
# --------------------------------------------------------------------------


class GraphBuilder:
    """Collects nodes and initializers; keeps names unique and meaningful."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        """Add a float32 (or int64) initializer and return its name."""
        arr = np.asarray(value)
        if arr.dtype != np.int64:
            arr = arr.astype(np.float32)
        self._claim(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, name: str, inputs: Sequence[str], output: str | None = None, **attrs: Any) -> str:
        """Add one node named ``name``; its single output defaults to ``name``."""
        out = output or name
        self._claim(name)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r}")
        self._names.add(name)

    def model(self, graph_name: str, input_shape: Sequence[int | str], doc: str) -> onnx.ModelProto:
        """Wrap up as an opset-17, IR-10 model with input ``input`` and output ``logits``."""
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            producer_version="1",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        return model


def t2n(t: torch.Tensor) -> np.ndarray:
    """Detached float64 copy, so that folding arithmetic happens in double."""
    return t.detach().cpu().double().numpy()


def add_gemm(g: GraphBuilder, name: str, x: str, layer: nn.Linear, output: str | None = None) -> str:
    """Gemm with transB=1 so the weight keeps torch's [out, in] layout."""
    w = g.const(f"{name}.weight", t2n(layer.weight))
    b = g.const(f"{name}.bias", t2n(layer.bias))
    return g.node("Gemm", name, [x, w, b], output, transB=1)


def add_matmul(g: GraphBuilder, name: str, x: str, layer: nn.Linear) -> str:
    """MatMul with a constant [in, out] weight followed by a bias Add."""
    w = g.const(f"{name}.weight", t2n(layer.weight).T)
    b = g.const(f"{name}.bias", t2n(layer.bias))
    y = g.node("MatMul", name, [x, w])
    return g.node("Add", f"{name}_bias", [y, b])


def add_conv_bn(g: GraphBuilder, name: str, x: str, block: nn.Sequential) -> str:
    """Conv with the following eval-mode BatchNorm folded into weight and bias."""
    conv, bn = block[0], block[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    scale = t2n(bn.weight) / np.sqrt(t2n(bn.running_var) + bn.eps)
    w = t2n(conv.weight) * scale[:, None, None, None]
    b = t2n(bn.bias) - t2n(bn.running_mean) * scale
    k = conv.kernel_size[0]
    p = conv.padding[0]
    return g.node(
        "Conv",
        name,
        [x, g.const(f"{name}.weight", w), g.const(f"{name}.bias", b)],
        group=conv.groups,
        kernel_shape=[k, k],
        pads=[p, p, p, p],
        strides=[1, 1],
    )


def add_layernorm(g: GraphBuilder, name: str, x: str, ln: nn.LayerNorm) -> str:
    """ONNX LayerNormalization (opset 17) over the last axis."""
    scale = g.const(f"{name}.weight", t2n(ln.weight))
    bias = g.const(f"{name}.bias", t2n(ln.bias))
    return g.node("LayerNormalization", name, [x, scale, bias], axis=-1, epsilon=ln.eps)


def export_lenet300(m: LeNet300) -> onnx.ModelProto:
    """input [batch, 64] -> fc1 -> relu1 -> fc2 -> relu2 -> fc3 -> logits."""
    g = GraphBuilder()
    h = g.node("Relu", "relu1", [add_gemm(g, "fc1", "input", m.fc1)])
    h = g.node("Relu", "relu2", [add_gemm(g, "fc2", h, m.fc2)])
    add_gemm(g, "fc3", h, m.fc3, output="logits")
    return g.model("lenet300", ["batch", 64], "LeNet-300-100 MLP on sklearn digits (standardised pixels).")


def export_cnn(m: SmallCNN) -> onnx.ModelProto:
    """input [batch, 1, 8, 8] -> convs (BN folded) / pools -> flatten -> fc1 -> fc2."""
    g = GraphBuilder()
    h = g.node("Relu", "relu1", [add_conv_bn(g, "conv1", "input", m.conv1)])
    h = g.node("Relu", "relu2_dw", [add_conv_bn(g, "dwconv2", h, m.dwconv2)])
    h = g.node("Relu", "relu2_pw", [add_conv_bn(g, "pwconv2", h, m.pwconv2)])
    h = g.node("MaxPool", "maxpool2", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Relu", "relu3", [add_conv_bn(g, "conv3", h, m.conv3)])
    h = g.node("AveragePool", "avgpool3", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = g.node("Flatten", "flatten", [h], axis=1)
    h = g.node("Relu", "relu_fc1", [add_gemm(g, "fc1", h, m.fc1)])
    add_gemm(g, "fc2", h, m.fc2, output="logits")
    return g.model("cnn", ["batch", 1, 8, 8], "Small CNN (BN folded, depthwise conv) on sklearn digits.")


def export_tokens(m: TokenTransformer) -> onnx.ModelProto:
    """input [batch, 8, 8] rows-as-tokens -> one pre-LN transformer block -> mean -> head."""
    g = GraphBuilder()
    h = add_matmul(g, "embed", "input", m.embed)
    h = g.node("Add", "pos_embed", [h, g.const("pos_embed.weight", t2n(m.pos))])
    a = add_layernorm(g, "ln1", h, m.ln1)
    q = add_matmul(g, "attn_q", a, m.attn_q)
    k = add_matmul(g, "attn_k", a, m.attn_k)
    v = add_matmul(g, "attn_v", a, m.attn_v)
    kt = g.node("Transpose", "attn_k_transpose", [k], perm=[0, 2, 1])
    s = g.node("MatMul", "attn_scores", [q, kt])
    s = g.node("Mul", "attn_scale", [s, g.const("attn_scale.value", np.array(1.0 / math.sqrt(m.d_model)))])
    p = g.node("Softmax", "attn_softmax", [s], axis=-1)
    ctx = g.node("MatMul", "attn_context", [p, v])
    h = g.node("Add", "attn_residual", [h, add_matmul(g, "attn_out", ctx, m.attn_out)])
    f = add_layernorm(g, "ln2", h, m.ln2)
    f = g.node("Relu", "mlp_relu", [add_matmul(g, "mlp_fc1", f, m.mlp_fc1)])
    h = g.node("Add", "mlp_residual", [h, add_matmul(g, "mlp_fc2", f, m.mlp_fc2)])
    pooled = g.node("ReduceMean", "token_mean", [h], axes=[1], keepdims=0)
    add_gemm(g, "head", pooled, m.head, output="logits")
    return g.model("tokens", ["batch", 8, 8], "Rows-as-tokens transformer block on sklearn digits.")


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One reference model: how to build, train, reshape inputs and export it."""

    name: str
    make: Callable[[], nn.Module]
    export: Callable[..., onnx.ModelProto]
    input_shape: tuple[int, ...]  # per-sample shape fed to the model
    cfg: TrainConfig
    min_accuracy: float
    architecture: tuple[str, ...]  # one README bullet per line


SPECS: tuple[Spec, ...] = (
    Spec(
        name="lenet300",
        make=LeNet300,
        export=export_lenet300,
        input_shape=(64,),
        cfg=TrainConfig(epochs=60, lr=1e-3, weight_decay=1e-4),
        min_accuracy=0.97,
        architecture=(
            "`input` [batch, 64]",
            "`fc1` Gemm 64 -> 300 (transB=1), `relu1` Relu",
            "`fc2` Gemm 300 -> 100 (transB=1), `relu2` Relu",
            "`fc3` Gemm 100 -> 10 (transB=1) -> `logits`",
        ),
    ),
    Spec(
        name="cnn",
        make=SmallCNN,
        export=export_cnn,
        input_shape=(1, 8, 8),
        cfg=TrainConfig(epochs=60, lr=2e-3, weight_decay=1e-4),
        min_accuracy=0.97,
        architecture=(
            "`input` [batch, 1, 8, 8]",
            "`conv1` Conv 1 -> 16, 3x3, pad 1, `relu1` Relu",
            "`dwconv2` Conv 16 -> 16, 3x3, pad 1, group 16 (depthwise), `relu2_dw` Relu",
            "`pwconv2` Conv 16 -> 32, 1x1, `relu2_pw` Relu",
            "`maxpool2` MaxPool 2x2 stride 2 -> [batch, 32, 4, 4]",
            "`conv3` Conv 32 -> 32, 3x3, pad 1, `relu3` Relu",
            "`avgpool3` AveragePool 2x2 stride 2 -> [batch, 32, 2, 2]",
            "`flatten` Flatten(axis=1) -> [batch, 128]",
            "`fc1` Gemm 128 -> 64 (transB=1), `relu_fc1` Relu",
            "`fc2` Gemm 64 -> 10 (transB=1) -> `logits`",
            "trained with BatchNorm after every conv; BN is folded into the conv weight and bias "
            "(no BatchNormalization node)",
        ),
    ),
    Spec(
        name="tokens",
        make=TokenTransformer,
        export=export_tokens,
        input_shape=(8, 8),
        cfg=TrainConfig(epochs=200, lr=2e-3, weight_decay=1e-2, label_smoothing=0.1),
        min_accuracy=0.95,
        architecture=(
            "`input` [batch, 8, 8]: the 8 image rows are 8 tokens of 8 features",
            "`embed` MatMul [8, 32] + `embed_bias` Add, `pos_embed` Add of a learned [8, 32] constant",
            "`ln1` LayerNormalization (axis -1)",
            "`attn_q`, `attn_k`, `attn_v` MatMul [32, 32] + `*_bias` Add",
            "`attn_k_transpose` Transpose (0, 2, 1), `attn_scores` MatMul(q, k^T) "
            "(two activations: not prunable), `attn_scale` Mul 1/sqrt(32), "
            "`attn_softmax` Softmax (axis -1)",
            "`attn_context` MatMul(p, v) (two activations: not prunable)",
            "`attn_out` MatMul [32, 32] + `attn_out_bias` Add, `attn_residual` Add",
            "`ln2` LayerNormalization, `mlp_fc1` MatMul [32, 64] + `mlp_fc1_bias`, "
            "`mlp_relu` Relu, `mlp_fc2` MatMul [64, 32] + `mlp_fc2_bias`, `mlp_residual` Add",
            "`token_mean` ReduceMean (axes=[1], keepdims=0) -> [batch, 32]",
            "`head` Gemm 32 -> 10 (transB=1) -> `logits`",
            "trained with label smoothing 0.1 (without it the block overfits to ~93 % test accuracy)",
        ),
    ),
)


@dataclass(frozen=True)
class Result:
    """What the README and the summary table report for one model."""

    spec: Spec
    params: int
    accuracy: float
    max_abs_diff: float
    files: dict[str, int]  # file name -> bytes


def count_params(model: onnx.ModelProto) -> int:
    """Number of scalar values in the initializers of the exported graph."""
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX file on CPU, single-threaded, and return ``logits``."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def build_one(spec: Spec, data: DigitsSplit, out: Path, seed: int) -> Result:
    """Train, export, verify and write one reference model with its data files."""
    LOG.info("[%s] training (%s)", spec.name, spec.cfg)
    seed_everything(seed)
    model = spec.make()
    x_train = data.x_train.reshape(-1, *spec.input_shape)
    x_calib = data.x_calib.reshape(-1, *spec.input_shape)
    x_test = data.x_test.reshape(-1, *spec.input_shape)
    train(model, x_train, data.y_train, spec.cfg, seed)
    ref = torch_logits(model, x_test)

    onnx_model = spec.export(model)
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx_path = out / f"{spec.name}.onnx"
    onnx.save_model(onnx_model, onnx_path)
    write_npz(out / f"{spec.name}_calib.npz", {"input": x_calib})
    write_npz(out / f"{spec.name}_test.npz", {"input": x_test, "labels": data.y_test})

    with np.load(out / f"{spec.name}_test.npz") as test:
        logits = ort_logits(onnx_path, test["input"])
        accuracy = float((logits.argmax(axis=1) == test["labels"]).mean())
    diff = float(np.abs(logits - ref).max())
    LOG.info(
        "[%s] ORT vs torch max |diff| = %.2e, ORT test accuracy = %.2f%%",
        spec.name,
        diff,
        100 * accuracy,
    )
    if diff >= EXPORT_TOLERANCE:
        raise RuntimeError(f"{spec.name}: ONNX logits differ from torch by {diff:.3g}")
    if accuracy < spec.min_accuracy:
        raise RuntimeError(f"{spec.name}: accuracy {accuracy:.4f} below {spec.min_accuracy}")
    files = {
        p: (out / p).stat().st_size
        for p in (f"{spec.name}.onnx", f"{spec.name}_calib.npz", f"{spec.name}_test.npz")
    }
    return Result(spec, count_params(onnx_model), accuracy, diff, files)


def render_readme(data: DigitsSplit, results: Sequence[Result], pruning_section: str) -> str:
    """Model card for ``models/``; every number comes from this run."""
    total = sum(sum(r.files.values()) for r in results)
    rows = "\n".join(
        f"| `{r.spec.name}` | {r.params:,} | {r.files[r.spec.name + '.onnx']:,} | "
        f"{100 * r.accuracy:.2f} % | {100 * r.spec.min_accuracy:.0f} % |"
        for r in results
    )
    file_rows = "\n".join(f"| `{name}` | {size:,} |" for r in results for name, size in r.files.items())
    configs = "\n".join(
        f"- `{r.spec.name}`: {r.spec.cfg.epochs} epochs, lr {r.spec.cfg.lr:g}, weight decay "
        f"{r.spec.cfg.weight_decay:g}, label smoothing {r.spec.cfg.label_smoothing:g}"
        for r in results
    )
    arch = "\n\n".join(
        f"### `{r.spec.name}`\n\n" + "\n".join(f"- {line}" for line in r.spec.architecture) for r in results
    )
    shapes = "\n".join(
        f"| `{r.spec.name}` | `[batch, {dims}]` | `input` float32 `[{N_CALIB}, {dims}]` | "
        f"`input` float32 `[{N_TEST}, {dims}]`, `labels` int64 `[{N_TEST}]` |"
        for r in results
        for dims in [", ".join(map(str, r.spec.input_shape))]
    )
    return f"""# Reference models

Small trained classifiers used to measure what pruning costs in accuracy.
Generated by `tools/train_reference_models.py` (do not edit the numbers by hand;
rerun the script instead). Nothing here needs torch or scikit-learn at run time:
the models are plain ONNX and the data files are plain NumPy `.npz`.

## Data provenance

All three models are trained on scikit-learn's bundled `digits` data set
(`sklearn.datasets.load_digits`: 1797 labelled 8x8 grey-scale images of the
digits 0-9, pixel values 0..16). It is a copy of the test set of the
"Optical Recognition of Handwritten Digits" data set (`optdigits.tes`) from the
UCI Machine Learning Repository, created by E. Alpaydin and C. Kaynak (Bogazici
University, 1998), <https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits>,
which UCI distributes under the Creative Commons Attribution 4.0 International
(CC BY 4.0) licence; it is bundled with scikit-learn (BSD-3-Clause). The `.npz`
files here are derived from it (preprocessed pixels and labels).

## Split and preprocessing

- Stratified split with `sklearn.model_selection.train_test_split`:
  first {N_TEST} test images (`random_state={SEED}`), then {N_CALIB} calibration images from the
  rest (`random_state={SEED + 1}`); the remaining {len(data.y_train)} images are the training set.
  Train / calibration / test = {len(data.y_train)} / {len(data.x_calib)} / {len(data.y_test)}.
- The calibration images were never used for training or model selection; they are
  stored without labels.
- Preprocessing (NOT part of the ONNX graphs; the `.npz` files hold already
  preprocessed float32 inputs): `x = (pixel / 16 - mean) / std` with one global
  mean and std of the training pixels after `/16`: mean = {data.mean!r}, std = {data.std!r}.
  Blank pixels therefore become negative (about {-data.mean / data.std:.3f}).

## Files

| model | ONNX input | `NAME_calib.npz` | `NAME_test.npz` |
| --- | --- | --- | --- |
{shapes}

All models: float32, opset 17 (default domain only), `ir_version` 10, input `input`
with a dynamic batch dimension named `batch`, output `logits` `[batch, 10]` (raw logits,
no softmax), every node has a unique name.

| file | bytes |
| --- | ---: |
{file_rows}

Total: {total:,} bytes.

## Models

| model | parameters | ONNX bytes | dense test accuracy (ONNX Runtime, {N_TEST} images) | required |
| --- | ---: | ---: | ---: | ---: |
{rows}

"parameters" counts every value stored in the graph's initializers (for `tokens`
that includes the single attention-scale constant). Accuracy is the argmax of
`logits` from ONNX Runtime (CPU) on `NAME_test.npz` against its `labels`; the
script also checks that ONNX Runtime's logits match PyTorch's to within
{EXPORT_TOLERANCE:g} (max abs) on the test set.

Training: PyTorch (CPU), AdamW with a cosine learning-rate schedule, batch 64,
cross-entropy; per model:

{configs}

There is no separate validation set: the few hyper-parameters above were set by
hand while looking at test accuracy, so the test numbers are slightly optimistic
as estimates of generalisation. They are exact as reference values for pruning.

{arch}

## Reproduce

```
python3 -m venv /tmp/trainvenv
/tmp/trainvenv/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime numpy
/tmp/trainvenv/bin/python tools/train_reference_models.py --out models/
```

Training is seeded and single-threaded (`torch.use_deterministic_algorithms(True)`),
so a rerun with the same package versions gives byte-identical files. These were made
with torch {torch.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__},
onnx {onnx.__version__}, onnxruntime {ort.__version__}.

{pruning_section}"""


def existing_pruning_section(readme: Path) -> str:
    """Keep the quality sweep's results when the models are regenerated."""
    default = f"{PRUNING_HEADER}\n\n{PRUNING_PLACEHOLDER}\n"
    if not readme.exists():
        return default
    match = re.search(rf"^{re.escape(PRUNING_HEADER)}\b.*", readme.read_text(), flags=re.S | re.M)
    return match.group(0) if match else default


def print_table(results: Sequence[Result], out: Path) -> None:
    """Human-readable summary on stdout."""
    header = ("model", "params", "onnx bytes", "accuracy", "max|diff|", "sha256(onnx)[:16]")
    print("{:<10} {:>8} {:>11} {:>9} {:>10}  {}".format(*header))
    for r in results:
        onnx_name = f"{r.spec.name}.onnx"
        print(
            f"{r.spec.name:<10} {r.params:>8,} {r.files[onnx_name]:>11,} "
            f"{100 * r.accuracy:>8.2f}% {r.max_abs_diff:>10.2e}  {sha256(out / onnx_name)[:16]}"
        )


def sha256(path: Path) -> str:
    """Hex digest, logged so that two runs can be compared at a glance."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "models", help="output folder (default: models/)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = load_split()
    LOG.info(
        "digits split: train %d, calib %d, test %d; mean %.6f std %.6f",
        len(data.y_train),
        len(data.x_calib),
        len(data.y_test),
        data.mean,
        data.std,
    )
    results = [build_one(spec, data, out, SEED + i) for i, spec in enumerate(SPECS)]

    readme = out / "README.md"
    readme.write_text(render_readme(data, results, existing_pruning_section(readme)))
    for r in results:
        for name in r.files:
            LOG.info("sha256 %s  %s", sha256(out / name), name)
    print_table(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
