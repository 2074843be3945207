"""Configuration of one pruning run (`PruneConfig`), validated on construction."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from .errors import ConfigError
from .pattern import Pattern, parse_pattern


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
    of each sample (conv patches, sequence tokens) and takes the worst case over samples (the
    reference implementation's SiPP-Det choice for conv); EXPECTED averages over every point.
    MAX is the default: it won on every reference model (docs/algorithm.md).
    """

    MAX = "max"
    MEAN = "mean"
    EXPECTED = "expected"


class Terms(StrEnum):
    """What a weight's share of a point is (see sensitivity._Accumulator).

    SIGNED is the spec: shares within each sign part, inputs split by sign. ABSOLUTE is the share
    of `|w_ij a_j|` in the row's absolute mass `sum_k |w_ik a_k|`: the same form of guarantee,
    measured directly, and much better rankings on zero-mean inputs.
    """

    SIGNED = "signed"
    ABSOLUTE = "absolute"


class Refit(StrEnum):
    """What happens to the kept weights after the mask is chosen (see refit.py).

    NONE keeps their values; BIAS adds each output's mean shift on the calibration data back
    through its bias; OBS re-solves the kept weights of every row for the smallest output error
    on the calibration inputs, then corrects the bias as BIAS does.
    """

    NONE = "none"
    BIAS = "bias"
    OBS = "obs"


class Allocation(StrEnum):
    """How one global sparsity target is split across the weight tensors (see budgets.py).

    GLOBAL is the original rule: one threshold over every score (Wanda: the same ratio in every
    row). SIPP is SiPP's shared error level eps: every row prunes while its summed sensitivity
    stays within eps (sipp-det only). ERROR splits the budget by each tensor's measured
    mask-plus-refit error curve, for the least summed relative error. OUTPUT weights those curves
    by each tensor's measured influence on the model's outputs (influence.py: each tensor
    pruned alone on a few calibration samples), for the least summed output error. AUTO (the
    default) is OUTPUT for sipp-det (ERROR for a model with external data: the probe would hold
    a second copy of its weights) and GLOBAL for magnitude and wanda, so the baselines stay the published
    methods; sipp-rand and sipp-hybrid always split by their own sampling bound.
    """

    AUTO = "auto"
    GLOBAL = "global"
    SIPP = "sipp"
    ERROR = "error"
    OUTPUT = "output"

    @property
    def curves(self) -> bool:
        """Whether the budget is split by measured error curves (ERROR and OUTPUT)."""
        return self in (Allocation.ERROR, Allocation.OUTPUT)


class Ranking(StrEnum):
    """In which order the error allocation prunes inside a sipp-det layer (see budgets.py).

    MEASURED (the default): each layer's error curve is measured in SiPP's sensitivity order and
    in Wanda's per-row `|w| ||a||` order, and the layer is pruned in whichever measured lower at
    the count it gets; the report names the layers that took Wanda's order. OWN: the
    sensitivity order only (the paper's method, for comparisons). Other methods and allocations
    always use their own order.
    """

    MEASURED = "measured"
    OWN = "own"


class Provider(StrEnum):
    """ONNX Runtime execution provider for the calibration pass."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


PRUNABLE_OP_TYPES: tuple[str, ...] = (
    "Gemm",
    "MatMul",
    "Conv",
    "ConvTranspose",
    "Einsum",
    "LSTM",
    "GRU",
    "RNN",
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "DynamicQuantizeLSTM",
)
"""The `--op-types` vocabulary. The quantized ops (the last six; QGemm and DynamicQuantizeLSTM are
com.microsoft's) are pruned through their dequantized weights and inputs, under their own names
(see discover)."""
RECURRENT_OP_TYPES: tuple[str, ...] = ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")


def exclude_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """`--exclude` regexes as a tuple, each checked to compile (one-line ConfigError if not)."""
    out = tuple(patterns)
    for pattern in out:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"exclude pattern {pattern!r} is not a valid regex: {exc}") from None
    return out


BatchAxisItems = tuple[tuple[str, int | None], ...]


def parse_batch_axis(text: str) -> tuple[str, int | None]:
    """`NAME=AXIS` or `NAME=none` (a constant input) -> (name, axis); ConfigError otherwise."""
    name, sep, value = text.rpartition("=")
    value = value.strip()
    if not sep or not name.strip():
        raise ConfigError(f"batch axis {text!r} must be NAME=AXIS or NAME=none")
    if value.lower() == "none":
        return name.strip(), None
    try:
        return name.strip(), int(value)
    except ValueError:
        raise ConfigError(f"batch axis {text!r} must be NAME=AXIS (an integer) or NAME=none") from None


def batch_axis_items(
    value: Mapping[str, int | None] | Iterable[str | tuple[str, int | None]],
) -> BatchAxisItems:
    """Batch-axis overrides as a hashable tuple of (input, axis or None), from a mapping, from
    `NAME=AXIS` strings or from pairs. The model's inputs and ranks are checked when the
    calibration data is opened (`calibration.check_batch_axes`)."""
    pairs = value.items() if isinstance(value, Mapping) else value
    out: dict[str, int | None] = {}
    for item in pairs:
        name, axis = parse_batch_axis(item) if isinstance(item, str) else item
        if name in out and out[name] != axis:
            raise ConfigError(f"batch axis for {name!r} given twice ({out[name]} and {axis})")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ConfigError(f"batch axis for {name!r} must be an integer or None, got {axis!r}")
        out[name] = axis
    return tuple(out.items())


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the result of `prune_model`.

    `sparsity` is the fraction of the prunable weights (all elements of the pruned weight tensors)
    that are zero afterwards. `exclude` holds regular expressions matched (re.search) against node
    names; a layer whose node matches any of them is left alone.
    """

    sparsity: float = 0.5
    method: Method = Method.SIPP_DET
    reduction: Reduction = Reduction.MAX
    terms: Terms = Terms.ABSOLUTE
    refit: Refit = Refit.OBS
    allocation: Allocation = Allocation.AUTO
    """How the target is split across tensors (sipp-det, magnitude, wanda; see Allocation)."""
    ranking: Ranking = Ranking.MEASURED
    """sipp-det with the error allocation: prune each layer in the order that measured lower
    (see Ranking)."""
    sequential: bool = False
    """Measure each layer on the outputs of the already pruned (and refitted) earlier layers and
    (with the OBS refit) fit it to the dense model's outputs: one more calibration pass per layer
    depth, so later layers compensate earlier errors instead of compounding them."""
    layer_floor: float = 0.25
    """sipp-det and magnitude: every weight tensor keeps at least this fraction of the average
    kept fraction (0.25 at 90 % sparsity: at least 2.5 % of each tensor), so one global
    threshold cannot wipe out a layer whose scores are uniformly small. 0: off."""
    seed: int = 0
    mask_input: str = "auto"
    """Graph input that marks real tokens (non-zero) and padding (0), `[batch, seq]`: padding
    positions are not calibration points. 'auto' takes an integer/bool rank-2 input named like
    `attention_mask`; 'none' turns this off."""
    max_samples: int | None = None
    max_points: int | None = 16384
    """Calibration points per layer over which the max reduction runs: a conv layer or a token
    model has many points per sample (positions, tokens), and beyond this many in total each
    batch contributes a random subset of its positions (the same number per sample). The Gram
    matrices, norms and the mean/expected reductions always use every point. None: all."""
    batch_size: int = 32
    batch_axes: BatchAxisItems = ()
    """Overrides of the calibration inputs' inferred batch axes: (input, axis) pairs, or
    (input, None) for a constant fed whole with every batch. A mapping or `NAME=AXIS` strings
    are accepted too (see calibration.resolve_batch_axes)."""
    provider: Provider = Provider.AUTO
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = PRUNABLE_OP_TYPES
    verify: bool = True
    store: str = "dense"
    """'sparse': pruned initializers are written as ONNX sparse initializers where that is
    smaller (below a third non-zero for float32). ONNX Runtime densifies them on load: a smaller
    file, not a faster model. Not for tensors stored as external data."""
    pattern: str = "unstructured"
    """'unstructured', or 'N:M' (e.g. '2:4' for NVIDIA sparse tensor cores): every M consecutive
    weights along each layer's reduction axis keep the N with the highest score. It sets each
    fitting layer's sparsity to 1 - N/M (`sparsity` is then not used); a layer it does not fit
    is left unpruned. See `pattern.py`."""

    def __post_init__(self) -> None:
        # Accept plain strings from library users and coerce them to the enums.
        for name, enum in (
            ("method", Method),
            ("reduction", Reduction),
            ("terms", Terms),
            ("refit", Refit),
            ("allocation", Allocation),
            ("ranking", Ranking),
            ("provider", Provider),
        ):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(m.value for m in enum)
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}") from None
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.allocation is Allocation.SIPP and self.method is not Method.SIPP_DET:
            raise ConfigError(
                f"allocation sipp needs sipp-det's sensitivities; method {self.method.value} can use "
                "global or error"
            )
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be a positive integer, got {self.max_samples}")
        if not 0.0 <= float(self.layer_floor) <= 1.0:
            raise ConfigError(f"layer_floor must be in [0, 1], got {self.layer_floor!r}")
        if self.max_points is not None and self.max_points < 1:
            raise ConfigError(f"max_points must be a positive integer, got {self.max_points}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        if not isinstance(self.mask_input, str) or not self.mask_input:
            raise ConfigError(f"mask_input must be 'auto', 'none' or an input name, got {self.mask_input!r}")
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))
        object.__setattr__(self, "batch_axes", batch_axis_items(self.batch_axes))
        ops = tuple(self.op_types)
        unknown = [op for op in ops if op not in PRUNABLE_OP_TYPES]
        if unknown or not ops:
            raise ConfigError(
                f"op_types must be a non-empty subset of {', '.join(PRUNABLE_OP_TYPES)}, got {ops}"
            )
        object.__setattr__(self, "op_types", ops)
        if self.store not in ("dense", "sparse"):
            raise ConfigError(f"store must be dense or sparse, got {self.store!r}")
        try:
            structure = parse_pattern(self.pattern)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        object.__setattr__(self, "pattern", structure.label if structure else "unstructured")
        if structure is not None:  # the pattern decides each layer's sparsity
            object.__setattr__(self, "sparsity", structure.sparsity)

    @property
    def effective_allocation(self) -> Allocation:
        """The allocation that applies: AUTO resolved for the method; GLOBAL (unused) for N:M
        patterns, which fix every count, and for sipp-rand/-hybrid, which sample."""
        if self.method in (Method.SIPP_RAND, Method.SIPP_HYBRID) or self.pattern != "unstructured":
            return Allocation.GLOBAL
        if self.allocation is Allocation.AUTO:
            return Allocation.OUTPUT if self.method is Method.SIPP_DET else Allocation.GLOBAL
        return self.allocation

    @property
    def structure(self) -> Pattern | None:
        """The N:M pattern, or None for unstructured pruning."""
        return parse_pattern(self.pattern)
