"""ONNX Runtime latency of a model: what a user of the pruned model sees.

Sessions run with ONNX Runtime's default graph optimizations on the CPU provider (or the one
asked for), the same way a deployment would load the file. Each batch size is warmed up, then
timed `runs` times; the median is reported (robust to the odd slow run on a shared machine).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..calibration import BatchAxes, repeat_samples
from ..config import Provider
from ..runtime import make_session


@dataclass(frozen=True)
class Latency:
    """Median seconds per run at each batch size."""

    batch: int
    seconds: float
    runs: int


def feed_of(
    sample: Mapping[str, np.ndarray], batch: int, axes: BatchAxes | None = None
) -> dict[str, np.ndarray]:
    """A feed of `batch` samples, repeating `sample`'s samples as needed along each input's
    batch axis (`axes`, see calibration.py; default axis 0; constants are fed as they are)."""
    return repeat_samples(sample, axes or {}, batch)


def compare_latency(
    dense: onnx.ModelProto | str | Path,
    pruned: onnx.ModelProto | str | Path,
    sample: Mapping[str, np.ndarray],
    batches: tuple[int, ...],
    *,
    runs: int = 20,
    provider: Provider = Provider.CPU,
    base_dir: Path | None = None,
    axes: BatchAxes | None = None,
) -> tuple[list[Latency], list[Latency]]:
    """Latency of two models measured in alternating blocks of runs, so that a change in the
    machine's load during the measurement affects both alike."""
    before: list[list[Latency]] = []
    after: list[list[Latency]] = []
    block = max(1, runs // 4)
    for _ in range(-(-runs // block)):
        before.append(
            measure_latency(
                dense, sample, batches, runs=block, provider=provider, base_dir=base_dir, axes=axes
            )
        )
        after.append(
            measure_latency(
                pruned, sample, batches, runs=block, provider=provider, base_dir=base_dir, axes=axes
            )
        )
    return _merge(before), _merge(after)


def _merge(blocks: list[list[Latency]]) -> list[Latency]:
    """Median of the per-block medians, per batch size."""
    out = []
    for i, first in enumerate(blocks[0]):
        values = [b[i].seconds for b in blocks]
        out.append(Latency(first.batch, statistics.median(values), sum(b[i].runs for b in blocks)))
    return out


def measure_latency(
    model: onnx.ModelProto | str | Path,
    sample: Mapping[str, np.ndarray],
    batches: tuple[int, ...],
    *,
    runs: int = 20,
    warmup: int = 3,
    provider: Provider = Provider.CPU,
    base_dir: Path | None = None,
    axes: BatchAxes | None = None,
) -> list[Latency]:
    """Median latency of `model` at each batch size of `batches`, fed from `sample`."""
    session, _ = make_session(model, provider, optimize=True, base_dir=base_dir)
    out = []
    for batch in batches:
        feed = feed_of(sample, batch, axes)
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        out.append(Latency(batch, statistics.median(times), runs))
    return out
