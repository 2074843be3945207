"""N:M structured sparsity: groups of M consecutive weights along the reduction axis.

NVIDIA's sparse tensor cores (through TensorRT) run a layer faster when, for each output channel
and each kernel position, every M = 4 consecutive input channels hold at most N = 2 non-zeros.
In the canonical rows `[N_out, K]` of `layers.to_rows` that axis is:

- Gemm and MatMul: K itself (the weight's input axis: Gemm's according to `transB`, MatMul's
  first axis), so a group is M consecutive entries of a row;
- Conv: K is `(c, k1, ..., kn)` flattened, input channel major; a group is M consecutive
  input channels `c` at one kernel position, i.e. entries `kernel_size` apart in the row.

A layer whose input channels (per group, for a grouped Conv) are not a multiple of M cannot
follow the pattern; it is left unpruned, with that reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pattern:
    """Keep at most `n` of every `m` consecutive weights along the reduction axis."""

    n: int
    m: int

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str | Pattern | None) -> Pattern | None:
    """'unstructured' (or None) -> None; 'N:M' with 0 < N < M <= 64 -> Pattern; else ValueError."""
    if text is None or isinstance(text, Pattern):
        return text
    if text.strip().lower() == "unstructured":
        return None
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4, got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m <= 64:
        raise ValueError(f"pattern {text!r}: need 0 < N < M <= 64")
    return Pattern(n, m)


def pattern_problem(fan_in: int, kernel_size: int, pattern: Pattern) -> str:
    """Why a layer with rows of length `fan_in` cannot follow `pattern` ('' when it can)."""
    channels = fan_in // kernel_size
    if channels % pattern.m:
        return f"input channels {channels} is not a multiple of {pattern.m} ({pattern.label} does not fit)"
    return ""


def groups(rows: np.ndarray, kernel_size: int, m: int) -> np.ndarray:
    """`rows [N_out, K]` as `[N_out, kernel_size, K / kernel_size / m, m]`: the last axis is one
    group of m consecutive input channels at one kernel position (a view when possible)."""
    n_out, k = rows.shape
    channels = k // kernel_size
    by_channel = rows.reshape(n_out, channels, kernel_size).transpose(0, 2, 1)
    return by_channel.reshape(n_out, kernel_size, channels // m, m)


def ungroup(grouped: np.ndarray, kernel_size: int) -> np.ndarray:
    """Inverse of `groups`: `[N_out, kernel_size, C / m, m]` back to rows `[N_out, K]`."""
    n_out = grouped.shape[0]
    channels = grouped.shape[2] * grouped.shape[3]
    return grouped.reshape(n_out, kernel_size, channels).transpose(0, 2, 1).reshape(n_out, -1)


def group_mask(score: np.ndarray, tiebreak: np.ndarray, kernel_size: int, pattern: Pattern) -> np.ndarray:
    """Mask `[N_out, K]` keeping the `n` highest scores of every group (ties: larger `tiebreak`,
    then the earlier channel)."""
    s = groups(np.asarray(score, dtype=np.float64), kernel_size, pattern.m)
    t = groups(np.asarray(tiebreak, dtype=np.float64), kernel_size, pattern.m)
    channel = np.broadcast_to(np.arange(pattern.m), s.shape)
    order = np.lexsort((channel, -t, -s), axis=-1)[..., : pattern.n]
    keep = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return ungroup(keep, kernel_size)


def group_counts(rows: np.ndarray, kernel_size: int, m: int) -> np.ndarray:
    """Non-zeros in every group, `[N_out, kernel_size, C / m]`."""
    return np.count_nonzero(groups(rows, kernel_size, m), axis=-1)
