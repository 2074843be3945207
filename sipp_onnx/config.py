"""Configuration of one pruning run (`PruneConfig`), validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from .errors import ConfigError


class Method(StrEnum):
    """How the kept weights are chosen (spec section 4 and the baselines of section 6)."""

    SIPP_DET = "sipp-det"
    SIPP_RAND = "sipp-rand"
    SIPP_HYBRID = "sipp-hybrid"
    MAGNITUDE = "magnitude"
    WANDA = "wanda"


class Reduction(StrEnum):
    """How a weight's relative contributions are reduced over the calibration points.

    MAX is the paper's sensitivity (the worst case over every point); MEAN averages the points
    of each sample (conv patches, sequence tokens) and takes the worst case over samples;
    EXPECTED averages over every point. AUTO picks per layer kind what the reference-model
    measurements favour (docs/algorithm.md): MEAN for Conv, EXPECTED for Gemm/MatMul.
    """

    AUTO = "auto"
    MEAN = "mean"
    MAX = "max"
    EXPECTED = "expected"


class Provider(StrEnum):
    """ONNX Runtime execution provider for the calibration pass."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


PRUNABLE_OP_TYPES: tuple[str, ...] = ("Gemm", "MatMul", "Conv")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the result of `prune_model`.

    `sparsity` is the fraction of the prunable weights (all elements of the pruned weight tensors)
    that are zero afterwards. `exclude` holds regular expressions matched (re.search) against node
    names; a layer whose node matches any of them is left alone.
    """

    sparsity: float = 0.5
    method: Method = Method.SIPP_HYBRID
    reduction: Reduction = Reduction.AUTO
    seed: int = 0
    max_samples: int | None = None
    batch_size: int = 32
    provider: Provider = Provider.AUTO
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = PRUNABLE_OP_TYPES
    verify: bool = True

    def __post_init__(self) -> None:
        # Accept plain strings from library users and coerce them to the enums.
        for name, enum in (("method", Method), ("reduction", Reduction), ("provider", Provider)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(m.value for m in enum)
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}") from None
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be a positive integer, got {self.max_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"exclude pattern {pattern!r} is not a valid regex: {exc}") from None
        ops = tuple(self.op_types)
        unknown = [op for op in ops if op not in PRUNABLE_OP_TYPES]
        if unknown or not ops:
            raise ConfigError(
                f"op_types must be a non-empty subset of {', '.join(PRUNABLE_OP_TYPES)}, got {ops}"
            )
        object.__setattr__(self, "op_types", ops)

    def reduction_for(self, op_type: str) -> Reduction:
        """The reduction used for layers of `op_type`: AUTO resolved per layer kind."""
        if self.reduction is not Reduction.AUTO:
            return self.reduction
        return Reduction.MEAN if op_type == "Conv" else Reduction.EXPECTED
