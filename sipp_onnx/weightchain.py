"""Weights that reach a layer through ops: read them as the layer sees them, write them back.

Exporters often store a weight in another form than the layer uses: transposed (`Transpose`
before a MatMul), in half precision (`Cast` to float), reshaped, or quantized (`DequantizeLinear`).
Discovery follows such a chain only when every op maps stored elements one to one onto weight
elements and zero onto zero. Then the weight is pruned in the layer's own coordinates and the
result is mapped back, op by op in reverse, into the stored tensor: its dtype, shape and
quantization parameters stay as they were.

A quantized weight is written back as `zero_point` where pruned (it dequantizes to exactly 0).
Kept entries whose value did not change keep their integer; values a refit changed are
requantized with the same scale (rounded and clipped to the integer type).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from .layers import ChainStep, PrunableWeight
from .modelio import read_tensor, write_tensor


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
    if step.op == "Reshape":
        return values.reshape(step.out_shape)
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
    if step.op == "Reshape":
        return values.reshape(step.in_shape)
    if step.op == "Cast":
        return values.astype(original.dtype)
    if step.op == "DequantizeLinear":
        scale, zero = _quantization(step, original.ndim, protos)
        info = np.iinfo(original.dtype)
        dequantized = _forward(step, original, protos)
        requantized = np.clip(np.rint(values.astype(np.float64) / scale + zero), info.min, info.max)
        out = np.where(values == dequantized, original, requantized.astype(original.dtype))
        return np.where(values == 0, np.broadcast_to(zero, values.shape).astype(original.dtype), out)
    return values.astype(original.dtype, copy=False)  # Identity


def _quantization(
    step: ChainStep, ndim: int, protos: dict[str, onnx.TensorProto]
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of a DequantizeLinear, shaped to broadcast over its input."""
    scale = read_tensor(protos[step.scale]).astype(np.float64)
    zero = read_tensor(protos[step.zero_point]).astype(np.float64) if step.zero_point else np.zeros(())
    if scale.ndim == 1 and ndim > 1:
        shape = [1] * ndim
        shape[step.axis % ndim] = scale.shape[0]
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero.ndim == 1 else zero
    return scale, zero
