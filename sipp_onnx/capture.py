"""The calibration pass: run the model once over the calibration data and stream every layer's
input into its accumulator.

The layer inputs are added as extra graph outputs of a copy of the serialized model and the
session runs with graph optimizations disabled. Each batch's captured tensors are handed to the
accumulators and dropped, so memory holds one batch of activations plus O(weights) statistics,
whatever the number of samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from .calibration import CalibrationData
from .config import Provider
from .errors import CalibrationError
from .layers import InputQuantization
from .modelio import read_tensor
from .runtime import add_outputs, make_session, run_error

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class Accumulator(Protocol):
    """What capture needs of a per-layer statistic (see sensitivity.py)."""

    def update(self, x: np.ndarray, token_mask: np.ndarray | None = None) -> None: ...


@dataclass(frozen=True)
class Dequantized:
    """A quantized layer's accumulator: it sees `(x - zero_point) * scale`, the float input the
    layer's integer product stands for, not the captured integers (see discover's quantized-op
    section for why). A name is a run-time tensor captured with the input, an array a constant."""

    accumulator: Accumulator
    scale: str | np.ndarray
    zero_point: str | np.ndarray

    @property
    def tensors(self) -> list[str]:
        """The run-time tensors the pass must capture for it."""
        return [t for t in (self.scale, self.zero_point) if isinstance(t, str)]

    def update_from(
        self, x: np.ndarray, token_mask: np.ndarray | None, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Update with the batch's input `x`; `tensors`: the batch's feed and captured tensors."""
        scale, zero = (tensors[t] if isinstance(t, str) else t for t in (self.scale, self.zero_point))
        if scale.size != 1 or zero.size != 1:
            raise CalibrationError(
                f"a quantized layer's input scale/zero point has {scale.size}/{zero.size} values, not 1"
            )
        values = (x.astype(np.float32) - np.float32(zero.reshape(()))) * np.float32(scale.reshape(()))
        self.accumulator.update(values, token_mask)


def dequantized(
    accumulator: Accumulator, quant: InputQuantization, protos: Mapping[str, onnx.TensorProto]
) -> Dequantized:
    """Wrap `accumulator` for a layer with `quant`: constants are read now, the rest captured."""

    def source(name: str) -> str | np.ndarray:
        if not name:
            return np.zeros((), np.float32)
        return read_tensor(protos[name]) if name in protos else name

    return Dequantized(accumulator, source(quant.scale), source(quant.zero_point))


@dataclass(frozen=True)
class CaptureResult:
    provider: str
    samples: int
    batches: int
    first_feed: dict[str, np.ndarray]
    first_outputs: dict[str, np.ndarray]
    """The original model's outputs on the first batch, for verifying the pruned model."""
    run_seconds: float
    """Time spent inside ONNX Runtime."""
    stats_seconds: float
    """Time spent in the accumulators."""
    session_seconds: float = 0.0
    """Time ONNX Runtime took to load the capture model."""
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    """The calibration data's batch axis per input (None: a constant), to slice `first_feed`."""


def capture(
    model: onnx.ModelProto,
    data: CalibrationData,
    accumulators: Mapping[str, Sequence[Accumulator | Dequantized]],
    batch_size: int,
    provider: Provider,
    progress: Progress | None = None,
    mask_input: str | None = None,
    base_dir: Path | None = None,
    teacher: onnx.ModelProto | None = None,
    paired: Mapping[str, tuple[int, list[Accumulator]]] | None = None,
) -> CaptureResult:
    """Run `model` over `data`, feeding input tensor `name` of every batch to `accumulators[name]`.

    With `mask_input` (a graph input such as `attention_mask`), each batch's mask goes along, so
    padding tokens are not counted as calibration points. `base_dir` is where the model's
    external tensors are. With a `teacher` (the dense model, same tensor names), every batch
    also runs through it, and each `paired[name] = (axis, accumulators)` receives the model's
    and the teacher's `name` concatenated along `axis`: their Gram matrix holds the cross
    products the sequential refit needs to fit the dense model's outputs.
    """
    graph_inputs = {i.name for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    wanted = [name for name in accumulators if name not in graph_inputs]
    extra = [
        t for accs in accumulators.values() for a in accs if isinstance(a, Dequantized) for t in a.tensors
    ]
    wanted += [name for name in dict.fromkeys(extra) if name not in graph_inputs and name not in wanted]
    paired = paired or {}
    wanted += [name for name in paired if name not in graph_inputs and name not in wanted]
    t_session = time.perf_counter()
    session, used = _session(model, wanted, provider, base_dir)
    taught_names = [name for name in paired if name not in graph_inputs]
    teaching = None
    if teacher is not None and paired:
        teaching = _session(teacher, taught_names, provider, base_dir)[0]
    session_s = time.perf_counter() - t_session
    fetch = list(dict.fromkeys(outputs + wanted))
    total = data.n_batches(batch_size)
    first_feed: dict[str, np.ndarray] = {}
    first_outputs: dict[str, np.ndarray] = {}
    run_s = stats_s = 0.0
    samples = 0
    for index, feed in enumerate(data.batches(batch_size)):
        t0 = time.perf_counter()
        try:
            values = dict(zip(fetch, session.run(fetch, feed), strict=True))
        except Exception as exc:
            raise CalibrationError(
                f"ONNX Runtime failed on calibration batch {index}: {run_error(exc)}"
            ) from None
        t1 = time.perf_counter()
        if index == 0:
            first_feed = {k: v.copy() for k, v in feed.items()}
            first_outputs = {k: values[k] for k in outputs}
        mask = feed.get(mask_input) if mask_input is not None else None
        if teaching is not None:
            # (an empty list of outputs would make ONNX Runtime return every graph output)
            taught = (
                dict(zip(taught_names, teaching.run(taught_names, feed), strict=True)) if taught_names else {}
            )
            for name, (axis, pair_accs) in paired.items():
                own = feed[name] if name in graph_inputs else values[name]
                both = np.concatenate([own, feed[name] if name in graph_inputs else taught[name]], axis=axis)
                for pair_acc in pair_accs:
                    pair_acc.update(both, mask)
            del taught
        for name, accs in accumulators.items():
            x = feed[name] if name in graph_inputs else values[name]
            if name not in graph_inputs and x.dtype.kind == "f" and not np.isfinite(x).all():
                raise CalibrationError(
                    f"calibration batch {index}: the layer input {name!r} holds NaN/inf, so the model "
                    "overflows on this data (values far outside its range?)"
                )
            for acc in accs:
                if isinstance(acc, Dequantized):
                    acc.update_from(x, mask, {**feed, **values})
                else:
                    acc.update(x, mask)
        del values
        stats_s += time.perf_counter() - t1
        run_s += t1 - t0
        samples += data.count(feed)
        if progress is not None:
            progress("capture", index + 1, total)
    return CaptureResult(
        used, samples, total, first_feed, first_outputs, run_s, stats_s, session_s, dict(data.axes)
    )


def _session(
    model: onnx.ModelProto, wanted: list[str], provider: Provider, base_dir: Path | None
) -> tuple[Any, str]:
    """A session of `model` with the tensors `wanted` as extra outputs (the model is restored)."""
    added = add_outputs(model, wanted)
    try:
        return make_session(model, provider, optimize=False, base_dir=base_dir)
    finally:
        if added:
            del model.graph.output[-added:]
