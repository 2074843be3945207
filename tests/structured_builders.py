"""Tiny ONNX models built in code for the structured (channel / head) pruning tests.

Every model is float32, opset 17, ir_version 10, has unique node names, a dynamic batch dimension
named "batch" (and "seq" for the sequence models), and random weights drawn from
`np.random.default_rng(seed)` scaled by 1/sqrt(fan_in) so activations stay O(1). BatchNormalization
parameters are random but sane (scale and var in [0.5, 1.5], small mean and bias).

A "channel group" below is a set of tensors whose channel axis must be pruned together (the output
channels of the producers, the input channels of the consumers).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    from builders import IR_VERSION, OPSET, finish, tensor, value
except ImportError:  # pragma: no cover
    from tests.builders import IR_VERSION, OPSET, finish, tensor, value  # type: ignore[no-redef]

BN_EPS = 1e-5


class _Net:
    """Collects nodes and initializers; draws every parameter from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    # parameters -------------------------------------------------------------------------------
    def weight(self, *shape: int, fan_in: int) -> np.ndarray:
        return (self.rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

    def small(self, *shape: int, scale: float = 0.1) -> np.ndarray:
        return (self.rng.normal(size=shape) * scale).astype(np.float32)

    def around_one(self, *shape: int) -> np.ndarray:
        return self.rng.uniform(0.5, 1.5, size=shape).astype(np.float32)

    def init(self, name: str, array: np.ndarray, dtype: type = np.float32) -> str:
        self.inits.append(tensor(name, array, dtype))
        return name

    def ints(self, name: str, values: list[int] | int) -> str:
        return self.init(name, np.asarray(values, dtype=np.int64), np.int64)

    # nodes ------------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, **attrs: object) -> str:
        outputs = [name] if n_out == 1 else [f"{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv_params(
        self, cin: int, cout: int, k: int, group: int = 1, bias: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        fan_in = cin // group * k * k
        w = self.weight(cout, cin // group, k, k, fan_in=fan_in)
        b = self.small(cout) if bias else None
        return w, b

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int = 0,
        group: int = 1,
        bias: bool = True,
    ) -> str:
        w, b = self.conv_params(cin, cout, k, group, bias)
        return self.conv_from(x, name, w, b, stride, pad, group)

    def conv_from(
        self,
        x: str,
        name: str,
        w: np.ndarray,
        b: np.ndarray | None,
        stride: int = 1,
        pad: int = 0,
        group: int = 1,
    ) -> str:
        inputs = [x, self.init(f"{name}.weight", w)]
        if b is not None:
            inputs.append(self.init(f"{name}.bias", b))
        k = w.shape[-1]
        return self.node(
            "Conv",
            inputs,
            name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=group,
        )

    def bn_params(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        scale = self.around_one(c)
        bias = self.small(c)
        mean = self.small(c)
        var = self.around_one(c)
        return scale, bias, mean, var

    def bn_from(self, x: str, name: str, params: tuple[np.ndarray, ...]) -> str:
        scale, bias, mean, var = params
        inputs = [x] + [
            self.init(f"{name}.{p}", a)
            for p, a in zip(("scale", "bias", "mean", "var"), (scale, bias, mean, var), strict=True)
        ]
        return self.node("BatchNormalization", inputs, name, epsilon=BN_EPS)

    def gemm(self, x: str, name: str, n_in: int, n_out: int) -> str:
        w = self.init(f"{name}.weight", self.weight(n_out, n_in, fan_in=n_in))
        b = self.init(f"{name}.bias", self.small(n_out))
        return self.node("Gemm", [x, w, b], name, transB=1)

    def linear(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """MatMul [n_in, n_out] + Add bias, as torch exports nn.Linear on 3-D inputs."""
        w = self.init(f"{name}.weight", self.weight(n_in, n_out, fan_in=n_in))
        b = self.init(f"{name}.bias", self.small(n_out))
        mm = self.node("MatMul", [x, w], f"{name}_matmul")
        return self.node("Add", [mm, b], f"{name}_add")

    def head(self, x: str, n_in: int, n_out: int, out: str = "logits") -> None:
        """GlobalAveragePool -> Flatten -> Gemm (transB=1) writing graph output `out`."""
        gap = self.node("GlobalAveragePool", [x], "gap")
        flat = self.node("Flatten", [gap], "flatten", axis=1)
        self.gemm_to(flat, "fc", n_in, n_out, out)

    def gemm_to(self, x: str, name: str, n_in: int, n_out: int, out: str) -> None:
        w = self.init(f"{name}.weight", self.weight(n_out, n_in, fan_in=n_in))
        b = self.init(f"{name}.bias", self.small(n_out))
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [out], name=name, transB=1))

    def finish(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
    ) -> onnx.ModelProto:
        return finish(self.nodes, inputs, outputs, self.inits, name=name)


def _fold_bn(
    w: np.ndarray, b: np.ndarray | None, bn: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray]:
    scale, beta, mean, var = (a.astype(np.float64) for a in bn)
    s = scale / np.sqrt(var + BN_EPS)
    b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    w_f = w.astype(np.float64) * s[:, None, None, None]
    b_f = (b0 - mean) * s + beta
    return w_f.astype(np.float32), b_f.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# ResNet basic blocks
# ---------------------------------------------------------------------------------------------


def _resnet(seed: int, fold: bool) -> onnx.ModelProto:
    net = _Net(seed)
    # Draw every parameter first, in a fixed order, so both variants share them exactly.
    specs = [  # name, cin, cout, k, stride, pad
        ("stem_conv", 3, 8, 3, 1, 1),
        ("a_conv1", 8, 8, 3, 1, 1),
        ("a_conv2", 8, 8, 3, 1, 1),
        ("b_conv1", 8, 16, 3, 2, 1),
        ("b_conv2", 16, 16, 3, 1, 1),
        ("b_down_conv", 8, 16, 1, 2, 0),
    ]
    params = {}
    for name, cin, cout, k, stride, pad in specs:
        w, _ = net.conv_params(cin, cout, k, bias=False)
        params[name] = (w, net.bn_params(cout), stride, pad)

    def conv_bn(x: str, name: str) -> str:
        w, bn, stride, pad = params[name]
        if fold:
            wf, bf = _fold_bn(w, None, bn)
            return net.conv_from(x, name, wf, bf, stride, pad)
        c = net.conv_from(x, name, w, None, stride, pad)
        return net.bn_from(c, name.replace("conv", "bn"), bn)

    h = net.node("Relu", [conv_bn("x", "stem_conv")], "stem_relu")
    # block A: identity shortcut
    a = net.node("Relu", [conv_bn(h, "a_conv1")], "a_relu1")
    a = conv_bn(a, "a_conv2")
    a = net.node("Add", [a, h], "a_add")
    a = net.node("Relu", [a], "a_relu2")
    # block B: stride-2 main path, 1x1 stride-2 downsample shortcut
    b = net.node("Relu", [conv_bn(a, "b_conv1")], "b_relu1")
    b = conv_bn(b, "b_conv2")
    sc = conv_bn(a, "b_down_conv")
    b = net.node("Add", [b, sc], "b_add")
    b = net.node("Relu", [b], "b_relu2")
    net.head(b, 16, 5)
    return net.finish(
        [value("x", ["batch", 3, 8, 8])],
        [value("logits", ["batch", 5])],
        "resnet_block_folded" if fold else "resnet_block",
    )


def resnet_block(seed: int = 0) -> onnx.ModelProto:
    """Two ResNet basic blocks with BatchNormalization kept as separate nodes.

    Nodes: stem_conv (3->8, 3x3 pad 1, no bias) + stem_bn + stem_relu;
    block A: a_conv1 (8->8 3x3) + a_bn1 + a_relu1, a_conv2 (8->8 3x3) + a_bn2, a_add (identity
    shortcut from stem_relu), a_relu2;
    block B: b_conv1 (8->16 3x3 stride 2) + b_bn1 + b_relu1, b_conv2 (16->16 3x3) + b_bn2,
    b_down_conv (8->16 1x1 stride 2) + b_down_bn, b_add, b_relu2;
    gap -> flatten -> fc (Gemm 16->5, transB=1) -> "logits" [batch, 5].

    Channel groups:
      * 8 channels tied by the block-A residual Add: stem_conv/stem_bn and a_conv2/a_bn2 outputs;
        a_conv1, b_conv1 and b_down_conv inputs.
      * 8 internal channels of block A: a_conv1/a_bn1 out -> a_conv2 in (freely prunable).
      * 16 internal channels of block B: b_conv1/b_bn1 out -> b_conv2 in (freely prunable).
      * 16 channels tied by the block-B Add: b_conv2/b_bn2 and b_down_conv/b_down_bn outputs,
        fc input columns (through GAP + Flatten, one column per channel).
    """
    return _resnet(seed, fold=False)


def resnet_block_folded(seed: int = 0) -> onnx.ModelProto:
    """`resnet_block(seed)` with every BatchNormalization folded into its Conv (weight and bias),
    as PyTorch exports eval-mode models: no BatchNormalization nodes, every Conv has a bias.

    Nodes: stem_conv + stem_relu; a_conv1 + a_relu1, a_conv2, a_add, a_relu2; b_conv1 + b_relu1,
    b_conv2, b_down_conv, b_add, b_relu2; gap -> flatten -> fc -> "logits".
    Computes the same function as `resnet_block(seed)` (up to float32 rounding).
    Channel groups: the same four as `resnet_block`, without the BN members.
    """
    return _resnet(seed, fold=True)


# ---------------------------------------------------------------------------------------------
# MobileNetV3-style inverted residual with squeeze-and-excitation
# ---------------------------------------------------------------------------------------------


def mobilenet_block(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3-style inverted residual block with squeeze-and-excitation.

    Nodes: stem_conv (3->8 3x3 pad 1) + stem_hswish;
    expand_conv (8->16 1x1) + expand_hswish;
    dw_conv (16->16 3x3 pad 1, group 16, no bias) + dw_bn + dw_hswish;
    SE: se_gap -> se_reduce (Conv 16->4 1x1, bias) -> se_relu -> se_expand (Conv 4->16 1x1, bias)
    -> se_hsigmoid (HardSigmoid alpha 1/6, as torch exports) -> se_mul (with dw_hswish);
    project_conv (16->8 1x1) -> res_add (with stem_hswish) -> last_conv (8->12 1x1) +
    last_hswish -> gap -> flatten -> fc (Gemm 12->5) -> "logits".

    Channel groups:
      * 8 channels tied by the residual: stem_conv and project_conv outputs; expand_conv and
        last_conv inputs.
      * 16 expanded channels: expand_conv out -> dw_conv (depthwise: its in and out channel are
        the same channel) -> dw_bn -> se_mul; se_reduce inputs, se_expand outputs (the SE gate),
        project_conv inputs.
      * 4 SE bottleneck channels: se_reduce out -> se_expand in (freely prunable).
      * 12 head channels: last_conv out -> fc input columns.
    """
    net = _Net(seed)
    h = net.conv("x", "stem_conv", 3, 8, 3, pad=1)
    h = net.node("HardSwish", [h], "stem_hswish")
    e = net.conv(h, "expand_conv", 8, 16, 1)
    e = net.node("HardSwish", [e], "expand_hswish")
    d = net.conv(e, "dw_conv", 16, 16, 3, pad=1, group=16, bias=False)
    d = net.bn_from(d, "dw_bn", net.bn_params(16))
    d = net.node("HardSwish", [d], "dw_hswish")
    s = net.node("GlobalAveragePool", [d], "se_gap")
    s = net.conv(s, "se_reduce", 16, 4, 1)
    s = net.node("Relu", [s], "se_relu")
    s = net.conv(s, "se_expand", 4, 16, 1)
    s = net.node("HardSigmoid", [s], "se_hsigmoid", alpha=1.0 / 6.0, beta=0.5)
    d = net.node("Mul", [d, s], "se_mul")
    p = net.conv(d, "project_conv", 16, 8, 1)
    r = net.node("Add", [p, h], "res_add")
    t = net.conv(r, "last_conv", 8, 12, 1)
    t = net.node("HardSwish", [t], "last_hswish")
    net.head(t, 12, 5)
    return net.finish([value("x", ["batch", 3, 8, 8])], [value("logits", ["batch", 5])], "mobilenet_block")


# ---------------------------------------------------------------------------------------------
# BERT encoder layer
# ---------------------------------------------------------------------------------------------

SHAPE_MODES = ("constant", "minus_one", "dynamic")


def _bert(
    seed: int, hidden: int, heads: int, ffn: int, shape_mode: str, masked: bool, name: str
) -> onnx.ModelProto:
    if shape_mode not in SHAPE_MODES:
        raise ValueError(f"shape_mode must be one of {SHAPE_MODES}, not {shape_mode!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    head_dim = hidden // heads
    net = _Net(seed)

    if shape_mode == "constant":
        split_shape = net.ints("split_heads_shape", [0, 0, heads, head_dim])
        merge_shape = net.ints("merge_heads_shape", [0, 0, hidden])
    elif shape_mode == "minus_one":
        split_shape = net.ints("split_heads_shape", [0, -1, heads, head_dim])
        merge_shape = net.ints("merge_heads_shape", [0, -1, hidden])
    else:
        net.ints("gather_idx_0", 0)  # 0-d indices: Gather yields a scalar, as torch exports
        net.ints("gather_idx_1", 1)
        net.ints("unsqueeze_axes_0", [0])
        net.ints("const_heads", [heads])
        net.ints("const_head_dim", [head_dim])
        net.ints("const_hidden", [hidden])

    def shape_of(t: str, prefix: str, tail: list[str]) -> str:
        """Shape(t) -> Gather 0, Gather 1 -> Unsqueeze -> Concat with the constant tail."""
        shp = net.node("Shape", [t], f"{prefix}_shape")
        dims = []
        for i in (0, 1):
            g = net.node("Gather", [shp, f"gather_idx_{i}"], f"{prefix}_gather{i}", axis=0)
            dims.append(net.node("Unsqueeze", [g, "unsqueeze_axes_0"], f"{prefix}_unsqueeze{i}"))
        return net.node("Concat", [*dims, *tail], f"{prefix}_concat", axis=0)

    def split_heads(t: str, prefix: str, perm: list[int]) -> str:
        if shape_mode == "dynamic":
            target = shape_of(t, f"{prefix}_split", ["const_heads", "const_head_dim"])
        else:
            target = split_shape
        r = net.node("Reshape", [t, target], f"{prefix}_reshape")
        return net.node("Transpose", [r], f"{prefix}_transpose", perm=perm)

    def layer_norm(t: str, prefix: str) -> str:
        scale = net.init(f"{prefix}.weight", net.around_one(hidden))
        bias = net.init(f"{prefix}.bias", net.small(hidden))
        return net.node("LayerNormalization", [t, scale, bias], prefix, axis=-1, epsilon=1e-12)

    q = split_heads(net.linear("x", "query", hidden, hidden), "q", [0, 2, 1, 3])  # [b, h, s, d]
    k = split_heads(net.linear("x", "key", hidden, hidden), "k", [0, 2, 3, 1])  # [b, h, d, s]
    v = split_heads(net.linear("x", "value", hidden, hidden), "v", [0, 2, 1, 3])  # [b, h, s, d]
    scores = net.node("MatMul", [q, k], "scores_matmul")
    sqrt_d = net.init("sqrt_head_dim", np.array(np.sqrt(head_dim), dtype=np.float32))
    scores = net.node("Div", [scores, sqrt_d], "scores_div")
    if masked:
        one = net.init("mask_one", np.array(1.0, dtype=np.float32))
        neg = net.init("mask_neg", np.array(-10000.0, dtype=np.float32))
        axes = net.ints("mask_unsqueeze_axes", [1, 2])
        m = net.node("Cast", ["attention_mask"], "mask_cast", to=TensorProto.FLOAT)
        m = net.node("Sub", [one, m], "mask_sub")
        m = net.node("Mul", [m, neg], "mask_mul")
        m = net.node("Unsqueeze", [m, axes], "mask_unsqueeze")  # [b, 1, 1, s]
        scores = net.node("Add", [scores, m], "scores_mask_add")
    probs = net.node("Softmax", [scores], "softmax", axis=-1)
    ctx = net.node("MatMul", [probs, v], "context_matmul")  # [b, h, s, d]
    ctx = net.node("Transpose", [ctx], "context_transpose", perm=[0, 2, 1, 3])  # [b, s, h, d]
    if shape_mode == "dynamic":
        merge_shape = shape_of(ctx, "merge", ["const_hidden"])
    ctx = net.node("Reshape", [ctx, merge_shape], "context_reshape")  # [b, s, hidden]
    attn = net.linear(ctx, "attn_out", hidden, hidden)
    h1 = layer_norm(net.node("Add", [attn, "x"], "attn_residual"), "attn_ln")

    f = net.linear(h1, "ffn_in", hidden, ffn)
    # Gelu as torch exports it: x * 0.5 * (1 + erf(x / sqrt(2)))
    sqrt2 = net.init("gelu_sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    g_one = net.init("gelu_one", np.array(1.0, dtype=np.float32))
    g_half = net.init("gelu_half", np.array(0.5, dtype=np.float32))
    g = net.node("Div", [f, sqrt2], "gelu_div")
    g = net.node("Erf", [g], "gelu_erf")
    g = net.node("Add", [g, g_one], "gelu_add")
    g = net.node("Mul", [f, g], "gelu_mul")
    g = net.node("Mul", [g, g_half], "gelu_mul_half")
    f = net.linear(g, "ffn_out", ffn, hidden)
    h2 = net.node("Add", [f, h1], "ffn_residual")
    scale = net.init("ffn_ln.weight", net.around_one(hidden))
    bias = net.init("ffn_ln.bias", net.small(hidden))
    net.nodes.append(
        helper.make_node(
            "LayerNormalization", [h2, scale, bias], ["y"], name="ffn_ln", axis=-1, epsilon=1e-12
        )
    )

    inputs = [value("x", ["batch", "seq", hidden])]
    if masked:
        inputs.append(value("attention_mask", ["batch", "seq"], TensorProto.INT64))
    return net.finish(inputs, [value("y", ["batch", "seq", hidden])], name)


def bert_layer(
    seed: int = 0, hidden: int = 16, heads: int = 4, ffn: int = 32, shape_mode: str = "constant"
) -> onnx.ModelProto:
    """One BERT encoder layer (post-LN) on already-embedded input "x" [batch, seq, hidden].

    Nodes: query/key/value_matmul + _add (MatMul [hidden, hidden] + bias) -> q/k/v_reshape
    ([batch, seq, heads, head_dim]) -> q/v_transpose (perm 0,2,1,3), k_transpose (perm 0,2,3,1)
    -> scores_matmul -> scores_div (scalar sqrt(head_dim)) -> softmax (axis -1) -> context_matmul
    -> context_transpose (0,2,1,3) -> context_reshape ([batch, seq, hidden]) -> attn_out_matmul +
    attn_out_add -> attn_residual (+ x) -> attn_ln (LayerNormalization) -> ffn_in_matmul +
    ffn_in_add -> Gelu as Erf decomposition (gelu_div, gelu_erf, gelu_add, gelu_mul,
    gelu_mul_half) -> ffn_out_matmul + ffn_out_add -> ffn_residual (+ attn_ln) -> ffn_ln -> "y".

    shape_mode: the Reshape targets are
      * "constant": int64 initializers [0, 0, heads, head_dim] and [0, 0, hidden];
      * "minus_one": [0, -1, heads, head_dim] and [0, -1, hidden];
      * "dynamic": as torch.onnx exports HF BERT: for each Reshape, Shape(its input) ->
        Gather(0-d index 0) and Gather(index 1) -> Unsqueeze (axes initializer [0]) -> Concat
        (axis 0) with int64 constants [heads], [head_dim] (split) or [hidden] (merge). Nodes
        {q,k,v}_split_{shape,gather0,gather1,unsqueeze0,unsqueeze1,concat}, merge_{...}.

    Channel groups:
      * heads: `heads` groups of head_dim columns each, tied across query/key/value weight
        columns and biases, and attn_out weight rows (the context columns of that head); pruning
        a head changes the `heads` constant in the split Reshape targets and `hidden` in the
        merge target (hidden then means heads*head_dim, not the residual width).
      * FFN: `ffn` intermediate channels: ffn_in weight columns + bias -> Gelu (elementwise) ->
        ffn_out weight rows (freely prunable).
      * hidden (residual stream): tied through both residual Adds and LayerNorms; not meant to
        be pruned.
    """
    return _bert(seed, hidden, heads, ffn, shape_mode, masked=False, name=f"bert_layer_{shape_mode}")


def bert_layer_masked(seed: int = 0) -> onnx.ModelProto:
    """`bert_layer(seed)` (hidden 16, heads 4, ffn 32, constant shapes) with a second input
    "attention_mask" int64 [batch, seq] converted the HF way: mask_cast (to float) -> mask_sub
    (1 - m) -> mask_mul (* -10000) -> mask_unsqueeze (axes [1, 2] -> [batch, 1, 1, seq]) ->
    scores_mask_add (added to the scaled scores before softmax).
    Channel groups: as `bert_layer` (the mask broadcasts over heads, so it ties nothing).
    """
    return _bert(seed, 16, 4, 32, "constant", masked=True, name="bert_layer_masked")


# ---------------------------------------------------------------------------------------------
# Concat / Split / Reshape / grouped / custom / Gather nets
# ---------------------------------------------------------------------------------------------


def concat_net(seed: int = 0) -> onnx.ModelProto:
    """Two branches from the same input concatenated along channels, then Flatten into a Gemm.

    Nodes: conv_a (3->8 3x3 pad 1) + relu_a, conv_b (3->4 1x1) + relu_b -> concat (axis 1, 12
    channels: 0..7 from a, 8..11 from b) -> conv_c (12->8 3x3 pad 1) + relu_c -> maxpool (2x2,
    stride 2, 6x6 -> 3x3) -> flatten -> fc (Gemm 72->5, transB=1) -> "logits".

    Channel groups:
      * 8 channels of branch a: conv_a out -> conv_c in channels 0..7.
      * 4 channels of branch b: conv_b out -> conv_c in channels 8..11.
      * 8 channels of conv_c: conv_c out -> fc input columns, channel c owns the 9 columns
        9c..9c+8 (Flatten of [8, 3, 3]).
    """
    net = _Net(seed)
    a = net.node("Relu", [net.conv("x", "conv_a", 3, 8, 3, pad=1)], "relu_a")
    b = net.node("Relu", [net.conv("x", "conv_b", 3, 4, 1)], "relu_b")
    c = net.node("Concat", [a, b], "concat", axis=1)
    c = net.node("Relu", [net.conv(c, "conv_c", 12, 8, 3, pad=1)], "relu_c")
    p = net.node("MaxPool", [c], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    f = net.node("Flatten", [p], "flatten", axis=1)
    net.gemm_to(f, "fc", 72, 5, "logits")
    return net.finish([value("x", ["batch", 3, 6, 6])], [value("logits", ["batch", 5])], "concat_net")


def split_net(seed: int = 0) -> onnx.ModelProto:
    """A Split along channels, each half through its own conv, concatenated back.

    Nodes: conv_in (3->8 1x1) + relu_in -> split (axis 1, sizes [4, 4] as int64 initializer
    "split_sizes"; outputs split_0, split_1) -> conv_0 (4->4 3x3 pad 1) + relu_0 and
    conv_1 (4->4 3x3 pad 1) + relu_1 -> concat (axis 1) -> gap -> flatten -> fc (Gemm 8->5).

    Channel groups:
      * conv_in's 8 output channels: 0..3 feed conv_0 in, 4..7 feed conv_1 in (pruning changes
        the split sizes).
      * conv_0's 4 outputs -> fc input columns 0..3; conv_1's 4 outputs -> fc columns 4..7.
    """
    net = _Net(seed)
    h = net.node("Relu", [net.conv("x", "conv_in", 3, 8, 1)], "relu_in")
    sizes = net.ints("split_sizes", [4, 4])
    s0 = net.node("Split", [h, sizes], "split", n_out=2, axis=1)
    s1 = "split_1"
    b0 = net.node("Relu", [net.conv(s0, "conv_0", 4, 4, 3, pad=1)], "relu_0")
    b1 = net.node("Relu", [net.conv(s1, "conv_1", 4, 4, 3, pad=1)], "relu_1")
    c = net.node("Concat", [b0, b1], "concat", axis=1)
    net.head(c, 8, 5)
    return net.finish([value("x", ["batch", 3, 6, 6])], [value("logits", ["batch", 5])], "split_net")


def _conv_to_fc(seed: int, flatten_matmul: bool, name: str) -> onnx.ModelProto:
    net = _Net(seed)
    h = net.node("Relu", [net.conv("x", "conv", 2, 6, 3, stride=2, pad=1)], "relu_conv")  # [b,6,3,3]
    if flatten_matmul:
        f = net.node("Flatten", [h], "flatten", axis=1)
        f = net.node("Relu", [net.linear(f, "fc1", 54, 16)], "relu_fc1")
        w = net.init("fc2.weight", net.weight(16, 5, fan_in=16))
        b = net.init("fc2.bias", net.small(5))
        mm = net.node("MatMul", [f, w], "fc2_matmul")
        net.nodes.append(helper.make_node("Add", [mm, b], ["logits"], name="fc2_add"))
    else:
        f = net.node("Reshape", [h, net.ints("reshape_shape", [-1, 54])], "reshape")
        f = net.node("Relu", [net.gemm(f, "fc1", 54, 16)], "relu_fc1")
        net.gemm_to(f, "fc2", 16, 5, "logits")
    return net.finish([value("x", ["batch", 2, 6, 6])], [value("logits", ["batch", 5])], name)


def reshape_gemm_net(seed: int = 0) -> onnx.ModelProto:
    """Conv output reshaped (constant shape) into a Gemm.

    Nodes: conv (2->6 3x3 stride 2 pad 1, 6x6 -> 3x3) + relu_conv -> reshape (int64 initializer
    "reshape_shape" [-1, 54]) -> fc1 (Gemm 54->16, transB=1) + relu_fc1 -> fc2 (Gemm 16->5) ->
    "logits".

    Channel groups:
      * 6 conv channels: conv out -> fc1 input columns, channel c owns columns 9c..9c+8 (the
        54 in the reshape target must shrink by 9 per pruned channel).
      * 16 hidden units: fc1 out rows -> fc2 input columns.
    """
    return _conv_to_fc(seed, flatten_matmul=False, name="reshape_gemm_net")


def flatten_matmul_net(seed: int = 0) -> onnx.ModelProto:
    """`reshape_gemm_net` with Flatten(axis 1) and MatMul + Add instead of Reshape and Gemm.

    Nodes: conv (2->6 3x3 stride 2 pad 1) + relu_conv -> flatten -> fc1_matmul ([54, 16]) +
    fc1_add -> relu_fc1 -> fc2_matmul ([16, 5]) + fc2_add -> "logits".

    Channel groups:
      * 6 conv channels: conv out -> fc1 weight rows, channel c owns rows 9c..9c+8.
      * 16 hidden units: fc1 weight columns + bias -> fc2 weight rows.
    """
    return _conv_to_fc(seed, flatten_matmul=True, name="flatten_matmul_net")


def grouped_conv_net(seed: int = 0) -> onnx.ModelProto:
    """A grouped (group 2) conv between two 1x1 convs.

    Nodes: conv_in (4->8 1x1) + relu_in -> gconv (8->8 3x3 pad 1, group 2) + relu_g ->
    conv_out (8->6 1x1) + relu_out -> gap -> flatten -> fc (Gemm 6->5) -> "logits".

    Channel groups:
      * 8 channels of conv_in: conv_in out -> gconv in; gconv's group g reads channels 4g..4g+3,
        so pruning must keep the two groups equal-sized (or prune whole groups).
      * 8 channels of gconv: gconv out (group g writes 4g..4g+3) -> conv_out in.
      * 6 channels of conv_out: conv_out out -> fc input columns.
    """
    net = _Net(seed)
    h = net.node("Relu", [net.conv("x", "conv_in", 4, 8, 1)], "relu_in")
    h = net.node("Relu", [net.conv(h, "gconv", 8, 8, 3, pad=1, group=2)], "relu_g")
    h = net.node("Relu", [net.conv(h, "conv_out", 8, 6, 1)], "relu_out")
    net.head(h, 6, 5)
    return net.finish([value("x", ["batch", 4, 6, 6])], [value("logits", ["batch", 5])], "grouped_conv_net")


CUSTOM_DOMAIN = "com.example"


def custom_op_net(seed: int = 0) -> onnx.ModelProto:
    """A node of an unknown custom op between two convs (ONNX Runtime cannot run this model).

    Nodes: conv_in (3->8 1x1) -> fancy_relu (op_type "FancyRelu", domain "com.example", opset
    import version 1) -> conv_out (8->4 1x1) -> gap -> flatten -> fc (Gemm 4->3) -> "logits".
    Input "x" [batch, 3, 6, 6]. The custom node's output carries a value_info [batch, 8, 6, 6]
    so shape inference can continue past it (full_check passes).

    Channel groups:
      * 8 channels of conv_in: conv_in out -> fancy_relu -> conv_out in; the pruner cannot know
        that FancyRelu is channelwise, so this group should be left unpruned.
      * 4 channels of conv_out: conv_out out -> fc input columns.
    """
    net = _Net(seed)
    h = net.conv("x", "conv_in", 3, 8, 1)
    net.nodes.append(
        helper.make_node("FancyRelu", [h], ["fancy_relu"], name="fancy_relu", domain=CUSTOM_DOMAIN)
    )
    h = net.conv("fancy_relu", "conv_out", 8, 4, 1)
    net.head(h, 4, 3)
    graph = helper.make_graph(
        net.nodes,
        "custom_op_net",
        [value("x", ["batch", 3, 6, 6])],
        [value("logits", ["batch", 3])],
        net.inits,
        value_info=[value("fancy_relu", ["batch", 8, 6, 6])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CUSTOM_DOMAIN, 1)]
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)  # passes: the value_info covers FancyRelu
    return model


def gather_channel_net(seed: int = 0) -> onnx.ModelProto:
    """A Gather that picks channels 0, 2, 4, 6 of a conv output.

    Nodes: conv_in (3->8 1x1) + relu_in -> gather (axis 1, int64 initializer "gather_indices"
    [0, 2, 4, 6]) -> conv_out (4->4 1x1) -> gap -> flatten -> fc (Gemm 4->3) -> "logits".
    Input "x" [batch, 3, 6, 6].

    Channel groups:
      * 8 channels of conv_in: channels 1, 3, 5, 7 are dead (nothing reads them); the even ones
        feed conv_out in channels 0..3 through the Gather (pruning must remap the indices).
      * 4 channels of conv_out: conv_out out -> fc input columns.
    """
    net = _Net(seed)
    h = net.node("Relu", [net.conv("x", "conv_in", 3, 8, 1)], "relu_in")
    g = net.node("Gather", [h, net.ints("gather_indices", [0, 2, 4, 6])], "gather", axis=1)
    h = net.conv(g, "conv_out", 4, 4, 1)
    net.head(h, 4, 3)
    return net.finish([value("x", ["batch", 3, 6, 6])], [value("logits", ["batch", 3])], "gather_channel_net")


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------


def image_calibration(shape: tuple[int, ...], n: int = 32, seed: int = 1) -> np.ndarray:
    """n float32 standard-normal samples of per-sample `shape` (e.g. (3, 8, 8)): [n, *shape]."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype(np.float32)


def sequence_calibration(n: int = 16, seq: int = 5, hidden: int = 16, seed: int = 1) -> np.ndarray:
    """n float32 standard-normal embedded sequences: [n, seq, hidden]."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, seq, hidden)).astype(np.float32)


def mask_calibration(n: int = 16, seq: int = 5, seed: int = 1) -> np.ndarray:
    """int64 HF-style attention masks [n, seq] for `bert_layer_masked`: each row is 1 for a random
    prefix of length 1..seq (the real tokens) and 0 after it (padding)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq + 1, size=n)
    return (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
