"""`evaluate`: accuracy of a model on labelled data, and fidelity of a pruned model to it.

Runs in batches and keeps only running sums, so large evaluation sets need no more memory than
one batch. Accuracy needs a classifier output `[N, C]` and integer labels `[N]`; fidelity works on
any output: the relative L2 error over the whole output, the mean per-sample cosine similarity and,
for `[N, C]` outputs, the top-1 agreement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calibration import open_calibration
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_eval_data(
    data: str | Path | Mapping[str, np.ndarray], labels_key: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if isinstance(data, Mapping):
        arrays = dict(data)
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
    return load_model(model, load_external=False), Path(model)


def evaluate(
    model: str | Path | onnx.ModelProto,
    data: str | Path | Mapping[str, np.ndarray],
    compare: str | Path | onnx.ModelProto | None = None,
    labels_key: str = "labels",
    output: str | None = None,
    batch_size: int = 256,
    provider: Provider = Provider.AUTO,
) -> EvalReport:
    """Accuracy of `model` (and `compare`) on `data`, and the fidelity of `compare` to `model`."""
    proto, source = _session_model(model)
    arrays, labels = _read_eval_data(data, labels_key)
    calib = open_calibration(arrays, model_inputs(proto))
    session, used = make_session(source, provider)
    other = None
    if compare is not None:
        other, _ = make_session(_session_model(compare)[1], Provider(used))
    outputs = [o.name for o in session.get_outputs()]
    name = output or outputs[0]
    if name not in outputs:
        raise ModelError(f"model has no output {name!r}; it has {outputs}")
    if other is not None and name not in [o.name for o in other.get_outputs()]:
        raise ModelError(f"the compared model has no output {name!r}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.shape[0] != calib.samples:
            raise CalibrationError(
                f"labels {labels_key!r} must be integers of shape [{calib.samples}], got "
                f"{labels.dtype} {list(labels.shape)}"
            )

    correct = [0, 0]
    agree = 0
    err_sq = ref_sq = cos_sum = 0.0
    seen = 0
    classifier = True
    for feed in calib.batches(batch_size):
        n = next(iter(feed.values())).shape[0]
        try:
            ref = np.asarray(session.run([name], feed)[0], dtype=np.float64)
            new = np.asarray(other.run([name], feed)[0], dtype=np.float64) if other is not None else None
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed during evaluation: {run_error(exc)}") from None
        classifier &= ref.ndim == 2 and ref.shape[0] == n
        if labels is not None:
            if not classifier:
                raise ModelError(f"output {name!r} has shape {list(ref.shape)}; accuracy needs [N, classes]")
            batch_labels = labels[seen : seen + n]
            correct[0] += int((ref.argmax(axis=1) == batch_labels).sum())
            if new is not None:
                correct[1] += int((new.argmax(axis=1) == batch_labels).sum())
        if new is not None:
            if new.shape != ref.shape:
                raise ModelError(f"output {name!r} shapes differ: {list(ref.shape)} vs {list(new.shape)}")
            err_sq += float(((new - ref) ** 2).sum())
            ref_sq += float((ref**2).sum())
            a, b = ref.reshape(n, -1), new.reshape(n, -1)
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            cos_sum += float(
                np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0).sum()
            )
            if classifier:
                agree += int((ref.argmax(axis=1) == new.argmax(axis=1)).sum())
        seen += n

    accuracy = correct[0] / seen if labels is not None else None
    comparison = None
    if other is not None:
        acc2 = correct[1] / seen if labels is not None else None
        comparison = Comparison(
            accuracy=acc2,
            accuracy_drop=(accuracy - acc2) * 100 if accuracy is not None and acc2 is not None else None,
            top1_agreement=agree / seen if classifier else None,
            rel_l2_error=float(np.sqrt(err_sq / ref_sq)) if ref_sq > 0 else float(np.sqrt(err_sq)),
            cosine=cos_sum / seen,
        )
    return EvalReport(name, ModelScore(accuracy, seen), comparison)
