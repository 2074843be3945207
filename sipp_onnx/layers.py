"""Typed descriptions of prunable layers and the canonical row view of their weights.

Every prunable weight is viewed as a matrix of rows `[N_out, K]`: row i holds the weights of
output neuron i (spec section 1). The stored tensor's layout decides how to get there:

- ROWS:    stored `[N_out, K]`                    (Gemm with transB=1)
- COLUMNS: stored `[K, N_out]`                    (Gemm with transB=0, MatMul)
- CONV:    stored `[C_out, C_in/g, k1, ..., kn]`  (row i = W[i] flattened in (c, k...) order)
- STACKED: stored `[..., N, K]`                   (LSTM/GRU/RNN `[dirs, gates*hidden, K]`: the
                                                   rows of every direction, one after another)
- CONV_TRANSPOSE: stored `[C_in, C_out/g, k1, ..., kn]`: output channel `o = g * C_out/g + j` of
  group g reads `W[c, j]` for the input channels c of group g, so its row is `W[group g, j]`
  flattened in (c, k...) order: the same row order as CONV, and it needs the group count.

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
    STACKED = "stacked"
    CONV_TRANSPOSE = "conv_transpose"


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
class RecurrentGeometry:
    """What an LSTM/GRU/RNN weight reads, per ONNX's recurrent-op semantics.

    The input weights W `[dirs, gates*hidden, input]` read every time step's `x_t`; the
    recurrent weights R `[dirs, gates*hidden, hidden]` read the hidden state `h_{t-1}`, which is
    the op's own output Y one step earlier (`initial_h`, or zeros, at the first step; the
    reverse direction runs from the last step to the first). Both are tensors ONNX Runtime can
    return, so the points are exact, not approximated.
    """

    op: str
    directions: int
    reverse: bool
    """A single direction that runs backwards (direction='reverse')."""
    hidden_size: int
    gates: int
    layout: int
    """ONNX `layout`: 0 = `[seq, batch, ...]` tensors, 1 = `[batch, seq, ...]`."""
    hidden: bool
    """True for R (the points are `h_{t-1}`), False for W (the points are `x_t`)."""
    initial_h: str = ""
    """The `initial_h` input ('' when absent: zeros)."""
    initial_h_constant: bool = False
    """`initial_h` is a constant (read from the model, not captured)."""
    name_output: bool = False
    """R only: the op's Y output is unnamed (unused), so the calibration copy names it."""
    sequence_lens: str = ""
    """The `sequence_lens` input ('' when absent: every sequence runs all steps)."""
    sequence_lens_constant: bool = False


@dataclass(frozen=True)
class ConvTransposeGeometry(ConvGeometry):
    """Attributes of a ConvTranspose node (ONNX semantics; `patches.transpose_pads` resolves
    them as ONNX Runtime does).

    `output_shape`, when given, fixes the output size and the pads are derived from it;
    `output_padding` adds positions at the end of each axis.
    """

    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()


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
    part: tuple[int, int] | None = None
    """Recurrent ops: the bias is entries `[start, stop)` of the last axis of B `[dirs, width]`
    (W's part, then R's); the shift `[dirs * (stop - start)]` goes there, direction by
    direction. A new B is `[dirs, width]` zeros with `width = 2 * (stop - start)`."""


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
    """One use of a constant weight by a Gemm, MatMul, Conv, ConvTranspose, Einsum or recurrent
    (LSTM/GRU/RNN) node, or a quantized form (ConvInteger, MatMulInteger, QLinearConv,
    QLinearMatMul, com.microsoft QGemm). A recurrent node has two layers, W and R, named
    `<node>/W` and `<node>/R`."""

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
    recurrent: RecurrentGeometry | None = None
    weight_input: int = 1
    """Which input of the node the weight is (2 for a recurrent op's R, 0 for an Einsum whose
    weight comes first)."""
    refit_problem: str = ""
    """Why the least-squares refit must not move this layer's kept weights (mask and bias only)."""
    input_axes: tuple[int, ...] = ()
    """Axes of the activation (counted from its end) that hold a point, in the weight's order;
    () for the last axis. Set for an Einsum that contracts other axes (`bji,jk->bik`, or two
    axes at once, `abcd,cde->abe`): the accumulator moves them last and flattens them."""
    input_quant: InputQuantization | None = None
    """Quantized ops: how the captured integer input is dequantized (None: used as it is)."""

    @property
    def n_out(self) -> int:
        """Output neurons (rows)."""
        if self.layout is WeightLayout.COLUMNS:
            return self.weight_shape[1]
        if self.layout is WeightLayout.STACKED:
            return prod(self.weight_shape[:-1])
        if self.layout is WeightLayout.CONV_TRANSPOSE:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[0]

    @property
    def fan_in(self) -> int:
        """Row length K."""
        if self.layout is WeightLayout.COLUMNS:
            return self.weight_shape[0]
        if self.layout is WeightLayout.STACKED:
            return self.weight_shape[-1]
        if self.layout is WeightLayout.CONV_TRANSPOSE:
            return self.weight_shape[0] // self.groups * prod(self.weight_shape[2:])
        return prod(self.weight_shape[1:])

    @property
    def groups(self) -> int:
        """Row groups with their own input points: a grouped Conv's (or ConvTranspose's) groups,
        which `to_rows` also needs; a recurrent R's directions (each reads its own direction's
        hidden state); else 1."""
        if self.conv is not None:
            return self.conv.group
        if self.recurrent is not None and self.recurrent.hidden:
            return self.recurrent.directions
        return 1

    @property
    def kernel_size(self) -> int:
        """`kh*kw*...` for Conv/ConvTranspose, 1 for Gemm/MatMul (K_layer of spec section 4)."""
        return prod(self.conv.kernel_shape) if self.conv is not None else 1


@dataclass(frozen=True)
class ChainStep:
    """One op between a stored constant and the weight a layer reads (see `weightchain`).

    Every followed op maps stored elements one to one onto weight elements and zero onto zero
    (DequantizeLinear: the zero point onto 0), so a mask on the weight is a mask on the store.
    """

    op: str
    """Identity, Transpose, Reshape, Squeeze, Unsqueeze, Cast, DequantizeLinear, or Concat (of
    Slices of the previous tensor that reorder it along one axis)."""
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
    """DequantizeLinear: the axis of a per-channel scale; Concat: the axis it reorders."""
    index: tuple[int, ...] = ()
    """Concat of Slices (a reordering): the source index of each output position along `axis`."""
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
    """A candidate node (`config.PRUNABLE_OP_TYPES`), or a weight, that is not pruned, and why."""

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


def to_rows(weight: np.ndarray, layout: WeightLayout, groups: int = 1) -> np.ndarray:
    """Stored weight -> canonical `[N_out, K]` rows (a view where possible; a copy for
    CONV_TRANSPOSE). `groups`: the group count, which only CONV_TRANSPOSE needs."""
    if layout is WeightLayout.ROWS:
        return weight
    if layout is WeightLayout.COLUMNS:
        return weight.T
    if layout is WeightLayout.STACKED:
        return weight.reshape(-1, weight.shape[-1])
    if layout is WeightLayout.CONV_TRANSPOSE:
        c_in, per_group, *kernel = weight.shape
        grouped = weight.reshape(groups, c_in // groups, per_group, *kernel)
        order = (0, 2, 1, *range(3, 3 + len(kernel)))  # [G, C_out/G, C_in/G, k...]
        return grouped.transpose(order).reshape(groups * per_group, -1)  # a copy unless broadcast
    return weight.reshape(weight.shape[0], -1)


def from_rows(rows: np.ndarray, layout: WeightLayout, shape: tuple[int, ...], groups: int = 1) -> np.ndarray:
    """Canonical rows -> stored layout `shape` (inverse of `to_rows` with the same `groups`)."""
    if layout is WeightLayout.ROWS:
        return rows.reshape(shape)
    if layout is WeightLayout.COLUMNS:
        return np.ascontiguousarray(rows.T).reshape(shape)
    if layout is WeightLayout.CONV_TRANSPOSE:
        c_in, per_group, *kernel = shape
        grouped = rows.reshape(groups, per_group, c_in // groups, *kernel)
        order = (0, 2, 1, *range(3, 3 + len(kernel)))  # back to [G, C_in/G, C_out/G, k...]
        return np.ascontiguousarray(grouped.transpose(order)).reshape(shape)
    return rows.reshape(shape)
