"""`evaluate`: accuracy of a model on labelled data, and fidelity of a pruned model to it.

Runs in batches and keeps only running sums, so large evaluation sets need no more memory than
one batch. Accuracy needs a classifier output `[N, C]` and integer labels `[N]`; fidelity works on
any output: the relative L2 error over the whole output, the mean per-sample cosine similarity and,
for `[N, C]` outputs, the top-1 agreement.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calibration import BatchAxes, CalibrationSource, iter_feeds, open_calibration
from .config import Provider
from .errors import CalibrationError, ModelError
from .modelio import load_model, model_inputs
from .runtime import make_session, run_error


@dataclass(frozen=True)
class ModelScore:
    accuracy: float | None
    """Top-1 accuracy in [0, 1]; None without labels."""
    samples: int


@dataclass(frozen=True)
class Comparison:
    """The compared (pruned) model against the reference model on the same data."""

    accuracy: float | None
    accuracy_drop: float | None
    """Reference accuracy minus compared accuracy, in percentage points."""
    top1_agreement: float | None
    rel_l2_error: float
    cosine: float


@dataclass(frozen=True)
class EvalReport:
    output: str
    model: ModelScore
    compare: Comparison | None = None
    latency: dict[str, Any] | None = None
    """With `eval --latency`: per batch size, both models' median ONNX Runtime seconds."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LabelledFeeds:
    """The feeds of an iterable or a reader with their labels (under `key`, `[n]` per feed)
    taken out, and collected as `open_calibration` reads them."""

    def __init__(self, source: Any, key: str) -> None:
        self.source, self.key = source, key
        self.parts: list[np.ndarray] = []
        self.unlabelled = 0

    def __iter__(self) -> Iterator[Any]:
        for feed in iter_feeds(self.source):
            if isinstance(feed, Mapping) and self.key in feed:
                feed = dict(feed)
                self.parts.append(np.atleast_1d(np.asarray(feed.pop(self.key))))
            else:
                self.unlabelled += 1
            yield feed

    def labels(self) -> np.ndarray | None:
        if self.parts and self.unlabelled:
            raise CalibrationError(f"labels {self.key!r} are in some evaluation batches only")
        return np.concatenate(self.parts) if self.parts else None


def _labels_after_open(source: Any, labels: np.ndarray | None) -> np.ndarray | None:
    return source.labels() if isinstance(source, _LabelledFeeds) else labels


def _read_eval_data(data: CalibrationSource, labels_key: str) -> tuple[Any, np.ndarray | None]:
    """The inputs (arrays, or feeds whose labels are taken out as they are read) and the labels."""
    if isinstance(data, np.ndarray):
        return data, None  # open_calibration says what to give instead
    if isinstance(data, Mapping):
        arrays = dict(data)
    elif not isinstance(data, (str, os.PathLike)):
        return _LabelledFeeds(data, labels_key), None
    else:
        path = Path(data)
        if not path.is_file() or path.suffix != ".npz":
            raise CalibrationError(f"evaluation data {str(path)!r} must be an existing .npz file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise CalibrationError(f"{path}: cannot read as .npz: {exc}") from None
    labels = arrays.pop(labels_key, None)
    return arrays, labels


def _session_model(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto | Path]:
    """The model's graph (without external weights) and what to open a session on (the file
    itself, so ORT finds external data beside it). Loading checks it: one-line errors."""
    if isinstance(model, onnx.ModelProto):
        return model, model
    return load_model(model), Path(model)


class _Sums:
    """Running sums of one comparison (and the accuracy of both models), batch by batch."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.correct = [0, 0]
        self.agree = 0
        self.err_sq = self.ref_sq = self.cos_sum = 0.0
        self.seen = 0
        self.classifier = True
        self.axis: int | None = None
        """The output's sample axis, once a batch has shown it unambiguously."""

    def add(self, ref: np.ndarray, new: np.ndarray | None, labels: np.ndarray | None, n: int) -> None:
        """One batch of `n` samples (counted on the inputs' batch axes)."""
        if new is not None and new.shape != ref.shape:
            raise ModelError(f"output {self.name!r} shapes differ: {list(ref.shape)} vs {list(new.shape)}")
        axis = self.axis if self.axis is not None and ref.shape[self.axis] == n else None
        if axis is None:
            axis, unique = _sample_axis(self.name, ref, n)
            self.axis = axis if unique else self.axis
        ref = np.moveaxis(ref, axis, 0)
        new = np.moveaxis(new, axis, 0) if new is not None else None
        self.classifier &= ref.ndim == 2
        if labels is not None:
            if not self.classifier:
                raise ModelError(
                    f"output {self.name!r} has shape {list(ref.shape)}; accuracy needs [N, classes]"
                )
            self.correct[0] += int((ref.argmax(axis=1) == labels).sum())
            if new is not None:
                self.correct[1] += int((new.argmax(axis=1) == labels).sum())
        if new is not None:
            self.err_sq += float(((new - ref) ** 2).sum())
            self.ref_sq += float((ref**2).sum())
            a, b = ref.reshape(n, -1), new.reshape(n, -1)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            self.cos_sum += float(
                np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0).sum()
            )
            if self.classifier:
                self.agree += int((ref.argmax(axis=1) == new.argmax(axis=1)).sum())
        self.seen += n

    def score(self, labelled: bool) -> ModelScore:
        return ModelScore(self.correct[0] / self.seen if labelled else None, self.seen)

    def comparison(self, labelled: bool) -> Comparison:
        accuracy = self.correct[0] / self.seen if labelled else None
        acc2 = self.correct[1] / self.seen if labelled else None
        return Comparison(
            accuracy=acc2,
            accuracy_drop=(accuracy - acc2) * 100 if accuracy is not None and acc2 is not None else None,
            top1_agreement=self.agree / self.seen if self.classifier else None,
            rel_l2_error=float(np.sqrt(self.err_sq / self.ref_sq))
            if self.ref_sq > 0
            else float(np.sqrt(self.err_sq)),
            cosine=self.cos_sum / self.seen,
        )


def _sample_axis(name: str, output: np.ndarray, n: int) -> tuple[int, bool]:
    """The axis of a model output that holds the batch's `n` samples (a recurrent state
    `[2, batch, 128]` has them on axis 1), and whether it is the only axis of that size. Of
    several, axis 0 or else the first; a later batch of another size can tell them apart."""
    axes = [axis for axis, size in enumerate(output.shape) if size == n]
    if axes:
        return (0 if 0 in axes else axes[0]), len(axes) == 1
    raise ModelError(
        f"output {name!r} has shape {list(output.shape)}: no axis holds the batch's {n} samples "
        "(score another output with --output)"
    )


class Reference:
    """A reference model's scored output on evaluation data, computed once and kept, so that many
    pruned models (a sweep) are compared with it without running the reference again. Keeps the
    scored output of every sample (not the activations): `evaluate` streams instead."""

    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        data: CalibrationSource,
        labels_key: str = "labels",
        output: str | None = None,
        batch_size: int = 256,
        provider: Provider = Provider.AUTO,
        base_dir: Path | None = None,
        batch_axes: BatchAxes | None = None,
    ) -> None:
        """`base_dir`: where the external tensors of a ModelProto `model` are; `batch_axes`:
        overrides of the inputs' batch axes (see calibration.py)."""
        proto, source = _session_model(model)
        arrays, self.labels = _read_eval_data(data, labels_key)
        self.data = open_calibration(arrays, model_inputs(proto), batch_axes=batch_axes)
        self.labels = _labels_after_open(arrays, self.labels)
        session, self.provider = make_session(source, provider, base_dir=base_dir)
        self.output = _output_name(session, output)
        self.labels = _check_labels(self.labels, labels_key, self.data.samples)
        self.batch_size = batch_size
        self.outputs: list[np.ndarray] = []
        sums = _Sums(self.output)
        for feed in self.data.batches(batch_size):
            ref, n = _run(session, self.output, feed), self.data.count(feed)
            sums.add(ref, None, self._labels(sums.seen, n), n)
            self.outputs.append(ref)
        self.score = sums.score(self.labels is not None)

    def _labels(self, start: int, n: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[start : start + n]

    def compare(self, model: str | Path | onnx.ModelProto, base_dir: Path | None = None) -> Comparison:
        """Fidelity (and accuracy) of `model` against the kept reference outputs."""
        session, _ = make_session(_session_model(model)[1], Provider(self.provider), base_dir=base_dir)
        if self.output not in [o.name for o in session.get_outputs()]:
            raise ModelError(f"the compared model has no output {self.output!r}")
        sums = _Sums(self.output)
        for ref, feed in zip(self.outputs, self.data.batches(self.batch_size), strict=True):
            n = self.data.count(feed)
            sums.add(ref, _run(session, self.output, feed), self._labels(sums.seen, n), n)
        return sums.comparison(self.labels is not None)


def _output_name(session: Any, output: str | None) -> str:
    outputs = [o.name for o in session.get_outputs()]
    name = output or outputs[0]
    if name not in outputs:
        raise ModelError(f"model has no output {name!r}; it has {outputs}")
    return name


def _check_labels(labels: np.ndarray | None, key: str, samples: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.shape[0] != samples:
        raise CalibrationError(
            f"labels {key!r} must be integers of shape [{samples}], got {labels.dtype} {list(labels.shape)}"
        )
    return labels


def _run(session: Any, name: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    try:
        return np.asarray(session.run([name], feed)[0], dtype=np.float64)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime failed during evaluation: {run_error(exc)}") from None


def evaluate(
    model: str | Path | onnx.ModelProto,
    data: CalibrationSource,
    compare: str | Path | onnx.ModelProto | None = None,
    labels_key: str = "labels",
    output: str | None = None,
    batch_size: int = 256,
    provider: Provider = Provider.AUTO,
    batch_axes: BatchAxes | None = None,
) -> EvalReport:
    """Accuracy of `model` (and `compare`) on `data`, and the fidelity of `compare` to `model`.
    Streams: memory holds one batch of outputs, whatever the size of `data`. `data` holds the
    inputs as calibration data does (batch axes inferred, or overridden by `batch_axes`), and
    labels `[N]` per sample; an iterable of feeds or a reader gives each feed's labels in it."""
    proto, source = _session_model(model)
    arrays, labels = _read_eval_data(data, labels_key)
    calib = open_calibration(arrays, model_inputs(proto), batch_axes=batch_axes)
    labels = _labels_after_open(arrays, labels)
    session, used = make_session(source, provider)
    other = None
    if compare is not None:
        other, _ = make_session(_session_model(compare)[1], Provider(used))
    name = _output_name(session, output)
    if other is not None and name not in [o.name for o in other.get_outputs()]:
        raise ModelError(f"the compared model has no output {name!r}")
    labels = _check_labels(labels, labels_key, calib.samples)
    sums = _Sums(name)
    for feed in calib.batches(batch_size):
        ref = _run(session, name, feed)
        new = _run(other, name, feed) if other is not None else None
        n = calib.count(feed)
        sums.add(ref, new, None if labels is None else labels[sums.seen : sums.seen + n], n)
    labelled = labels is not None
    return EvalReport(name, sums.score(labelled), sums.comparison(labelled) if other is not None else None)
