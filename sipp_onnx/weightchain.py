"""Weights that reach a layer through ops: read them as the layer sees them, write them back.

Exporters often store a weight in another form than the layer uses: transposed (`Transpose`
before a MatMul), in half precision (`Cast` to float), reshaped (`Reshape`, `Squeeze`, `Unsqueeze`),
quantized (`DequantizeLinear`), or with their rows reordered (a `Concat` of `Slice`s: the gate order
of an exporter's LSTM).
Discovery follows such a chain only when every op maps stored elements one to one onto weight
elements and zero onto zero. Then the weight is pruned in the layer's own coordinates and the
result is mapped back, op by op in reverse, into the stored tensor: its dtype, shape and
quantization parameters stay as they were.

A quantized weight is written back as `zero_point` where pruned (it dequantizes to exactly 0).
Kept entries whose value did not change keep their integer; values a refit changed are
requantized with the same scale (rounded and clipped to the integer type; never onto the zero
point). The same write-back serves the quantized ops' own weights (QLinearConv etc., see discover).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from .layers import ChainStep, PrunableWeight
from .modelio import read_tensor, write_tensor

log = logging.getLogger(__name__)


def read_weight(
    weight: PrunableWeight, protos: dict[str, onnx.TensorProto], base_dir: Path | None = None
) -> np.ndarray:
    """The weight as its layers read it, in float32."""
    values = read_tensor(protos[weight.stored_name], base_dir)
    for step in weight.chain:
        values = _forward(step, values, protos)
    return values.astype(np.float32, copy=False)


def write_weight(
    weight: PrunableWeight,
    protos: dict[str, onnx.TensorProto],
    values: np.ndarray,
    base_dir: Path | None = None,
    store: Callable[[onnx.TensorProto, np.ndarray], None] = write_tensor,
) -> None:
    """Store new weight values (in the layers' coordinates) into the stored constant, through
    `store` (default: into the protobuf; `StagedOutput.put` writes them to the output file)."""
    tensor = protos[weight.stored_name]
    if not weight.chain:
        store(tensor, values)
        return
    stored = read_tensor(tensor, base_dir)
    # The stored tensor's value after each step, to restore quantized entries exactly.
    before = [stored]
    for step in weight.chain[:-1]:
        before.append(_forward(step, before[-1], protos))
    for step, original in zip(reversed(weight.chain), reversed(before), strict=True):
        values = _backward(step, values, original, protos)
    store(tensor, values)


def _forward(step: ChainStep, values: np.ndarray, protos: dict[str, onnx.TensorProto]) -> np.ndarray:
    if step.op == "Transpose":
        return np.transpose(values, step.perm)
    if step.op in ("Reshape", "Squeeze", "Unsqueeze"):
        return values.reshape(step.out_shape)
    if step.op == "Concat":
        return np.take(values, step.index, axis=step.axis)
    if step.op == "Mul":
        return (values * _factor(step, values.ndim, protos)).astype(values.dtype)
    if step.op == "Cast":
        return values.astype(step.out_dtype)
    if step.op == "DequantizeLinear":
        scale, zero = _quantization(step, values.ndim, protos)
        out = (values.astype(np.float64) - zero) * scale
        return out.astype(step.out_dtype)
    return values  # Identity


def _backward(
    step: ChainStep, values: np.ndarray, original: np.ndarray, protos: dict[str, onnx.TensorProto]
) -> np.ndarray:
    """Inverse of `_forward`: `original` is the step's input before pruning (dtype, integers)."""
    if step.op == "Transpose":
        return np.transpose(values, np.argsort(step.perm))
    if step.op in ("Reshape", "Squeeze", "Unsqueeze"):
        return values.reshape(step.in_shape)
    if step.op == "Concat":
        return np.take(values, np.argsort(step.index), axis=step.axis)
    if step.op == "Mul":  # exact zeros stay zeros; unchanged entries restored bit for bit
        unscaled = (values.astype(np.float64) / _factor(step, values.ndim, protos)).astype(original.dtype)
        return np.where(values == _forward(step, original, protos), original, unscaled)
    if step.op == "Cast":
        return values.astype(original.dtype)
    if step.op == "DequantizeLinear":
        scale, zero = _quantization(step, original.ndim, protos)
        info = np.iinfo(original.dtype)
        dequantized = _forward(step, original, protos)
        unclipped = np.rint(values.astype(np.float64) / scale + zero)
        changed = values != dequantized
        clipped = int(np.count_nonzero(changed & ((unclipped < info.min) | (unclipped > info.max))))
        if clipped:  # the refit asked for more than the fixed scale can hold (per-channel scales)
            # A warning when it touches more than 1 % of the changed values; a handful is noise.
            level = (
                logging.WARNING if clipped > 0.01 * max(int(np.count_nonzero(changed)), 1) else logging.INFO
            )
            log.log(
                level,
                "%d refitted weight value(s) fall outside the %s range of scale %r and were clipped",
                clipped,
                original.dtype,
                step.scale or "(none)",
            )
        # A kept weight stays kept (the mask, and the report's counts, are what was selected): a
        # refitted value within half a step of 0 is stored one step from the zero point instead.
        unclipped = np.where(changed & (values != 0) & (unclipped == zero), zero + np.sign(values), unclipped)
        requantized = np.clip(unclipped, info.min, info.max)
        out = np.where(changed, requantized.astype(original.dtype), original)
        return np.where(values == 0, np.broadcast_to(zero, values.shape).astype(original.dtype), out)
    return values.astype(original.dtype, copy=False)  # Identity


def _quantization(
    step: ChainStep, ndim: int, protos: dict[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a DequantizeLinear, shaped to broadcast over its input.

    Each is per tensor or per axis on its own (a quantized op may pair a per-tensor scale with
    per-channel zero points); a step without a known scale has scale 1 (see discover)."""
    scale = read_tensor(protos[step.scale]).astype(np.float64) if step.scale else np.ones(())
    zero = read_tensor(protos[step.zero_point]).astype(np.float64) if step.zero_point else np.zeros(())
    return _on_axis(scale, step.axis, ndim), _on_axis(zero, step.axis, ndim)


def _factor(step: ChainStep, ndim: int, protos: dict[str, onnx.TensorProto]) -> np.ndarray:
    """A Mul step's constant scale, shaped to broadcast along its axis."""
    return _on_axis(read_tensor(protos[step.scale]).astype(np.float64), step.axis, ndim)


def _on_axis(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-tensor value as a scalar, a per-axis one shaped to broadcast along `axis`."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = values.size
    return values.reshape(shape)
