"""Typed descriptions of prunable layers and the canonical row view of their weights.

Every prunable weight is viewed as a matrix of rows `[N_out, K]`: row i holds the weights of
output neuron i (spec section 1). The stored tensor's layout decides how to get there:

- ROWS:    stored `[N_out, K]`                    (Gemm with transB=1)
- COLUMNS: stored `[K, N_out]`                    (Gemm with transB=0, MatMul)
- CONV:    stored `[C_out, C_in/g, k1, ..., kn]`  (row i = W[i] flattened in (c, k...) order)

This module imports numpy only, so the maths modules can use it without onnx.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from math import prod

import numpy as np


class WeightLayout(StrEnum):
    ROWS = "rows"
    COLUMNS = "columns"
    CONV = "conv"


@dataclass(frozen=True)
class ConvGeometry:
    """Attributes of a Conv node that define its input patches (ONNX Conv semantics).

    `pads` follows ONNX: all begin values, then all end values. With `auto_pad` other than
    NOTSET the pads are derived from the input size at run time.
    """

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    group: int

    @property
    def spatial_rank(self) -> int:
        return len(self.kernel_shape)


@dataclass(frozen=True)
class BiasSlot:
    """Where the per-output bias of a layer lives, for the bias refit.

    The output shift `delta` (one value per output neuron) is applied as `tensor += delta / scale`;
    with `tensor` None the node has no bias yet and one is added as input `input_index`.
    """

    node_index: int
    """Position in the top-level graph of the node that holds the bias (the layer, or the Add
    after a MatMul)."""
    input_index: int
    tensor: str | None
    scale: float | tuple[float, ...] = 1.0
    """Gemm's beta (the bias is multiplied by it); 1 otherwise. For the int32 bias of a quantized
    op (QLinearConv, QGemm), the bias's own scale per output (`x_scale * w_scale`): the shift is
    then rounded to the bias's integers."""


@dataclass(frozen=True)
class InputQuantization:
    """How a quantized layer's integer input is dequantized before the accumulators see it:
    `(x - zero_point) * scale`, per tensor (see discover's quantized-op section).

    Each name is a constant or a tensor computed at run time (DynamicQuantizeLinear's scale and
    zero point), which the calibration pass then captures with the input."""

    scale: str
    zero_point: str = ""
    """'' when the op has none: zero."""


@dataclass(frozen=True)
class Layer:
    """One use of a constant weight by a Gemm, MatMul or Conv node (or their quantized forms:
    ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul, com.microsoft QGemm)."""

    node: str
    """Unique node identifier: the node name, or `<op>#<index>` when it is empty or repeated."""
    op_type: str
    weight: str
    """Name of the weight tensor (initializer or Constant node output)."""
    input: str
    """Name of the activation tensor that multiplies the weight."""
    weight_shape: tuple[int, ...]
    layout: WeightLayout
    transpose_input: bool = False
    """Gemm transA: the activation is stored `[K, M]` and its columns are the points."""
    conv: ConvGeometry | None = None
    index: int = -1
    """Position of the node in the top-level graph (its topological order)."""
    bias: BiasSlot | None = None
    """Where the bias refit writes; None when it cannot (see `bias_problem`)."""
    bias_problem: str = ""
    input_quant: InputQuantization | None = None
    """Quantized ops: how the captured integer input is dequantized (None: used as it is)."""

    @property
    def n_out(self) -> int:
        """Output neurons (rows)."""
        if self.layout is WeightLayout.COLUMNS:
            return self.weight_shape[1]
        return self.weight_shape[0]

    @property
    def fan_in(self) -> int:
        """Row length K."""
        if self.layout is WeightLayout.COLUMNS:
            return self.weight_shape[0]
        return prod(self.weight_shape[1:])

    @property
    def kernel_size(self) -> int:
        """`kh*kw*...` for Conv, 1 for Gemm/MatMul (K_layer of spec section 4)."""
        return prod(self.conv.kernel_shape) if self.conv is not None else 1


@dataclass(frozen=True)
class ChainStep:
    """One op between a stored constant and the weight a layer reads (see `weightchain`).

    Every followed op maps stored elements one to one onto weight elements and zero onto zero
    (DequantizeLinear: the zero point onto 0), so a mask on the weight is a mask on the store.
    """

    op: str
    """Identity, Transpose, Reshape, Cast or DequantizeLinear."""
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: str
    perm: tuple[int, ...] = ()
    """Transpose."""
    scale: str = ""
    """DequantizeLinear: the scale tensor's name ('' when none is known: a scale of 1)."""
    zero_point: str = ""
    """DequantizeLinear: the zero point tensor's name ('' when absent: zero)."""
    axis: int = 1
    """DequantizeLinear: the axis of a per-channel scale."""
    label: str = ""
    """How inspect names the step when it is not a node of the graph (a quantized op's own
    weight dequantization)."""

    def describe(self) -> str:
        if self.label:
            return self.label
        return self.op if not self.perm else f"{self.op}{list(self.perm)}"


@dataclass(frozen=True)
class PrunableWeight:
    """A constant weight tensor to prune, with every layer that uses it.

    The first use defines the canonical rows; a weight shared by several layers is pruned once,
    with the element-wise maximum of its sensitivities over all uses. `name`, `shape` and
    `dtype` are those of the tensor the layers read; with a `chain`, that tensor is computed
    from the stored constant `stored` by the chain's ops, and pruning rewrites `stored`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str
    """'initializer' or 'constant' (the output of a Constant node)."""
    layers: tuple[Layer, ...]
    stored: str = ""
    """The constant that holds the values ('' when it is `name` itself)."""
    chain: tuple[ChainStep, ...] = ()

    @property
    def stored_name(self) -> str:
        return self.stored or self.name

    @property
    def via(self) -> str:
        """How the layers reach the stored tensor, e.g. 'DequantizeLinear -> Transpose[1, 0]'."""
        return " -> ".join(step.describe() for step in self.chain)

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def primary(self) -> Layer:
        return self.layers[0]


@dataclass(frozen=True)
class SkippedCandidate:
    """A Gemm/MatMul/Conv node, or a weight, that is not pruned, and why."""

    node: str
    op_type: str
    reason: str
    weight: str | None = None


@dataclass(frozen=True)
class Discovery:
    """Result of walking a graph: what will be pruned and what will not."""

    weights: tuple[PrunableWeight, ...]
    skipped: tuple[SkippedCandidate, ...]

    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(layer for w in self.weights for layer in w.layers)


def to_rows(weight: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """Stored weight -> canonical `[N_out, K]` rows (a view where possible)."""
    if layout is WeightLayout.ROWS:
        return weight
    if layout is WeightLayout.COLUMNS:
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def from_rows(rows: np.ndarray, layout: WeightLayout, shape: tuple[int, ...]) -> np.ndarray:
    """Canonical rows -> stored layout `shape` (inverse of `to_rows`)."""
    if layout is WeightLayout.ROWS:
        return rows.reshape(shape)
    if layout is WeightLayout.COLUMNS:
        return np.ascontiguousarray(rows.T).reshape(shape)
    return rows.reshape(shape)
