"""ONNX Runtime sessions: provider choice and capture-model construction.

The GPU build of onnxruntime runs on machines without a GPU: asking for CUDA then falls back
to CPU with error lines on stderr. `get_available_providers()` describes the build, not the
machine, so the provider really used is read back from the session. ORT's default logger is
raised to FATAL-only before sessions are made, which silences the fallback noise.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from .config import Provider
from .errors import ModelError, ProviderError
from .modelio import TWO_GB

log = logging.getLogger(__name__)

_PROVIDER_NAMES = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def _quiet() -> None:
    # 4 = FATAL: the GPU build logs a failed CUDA load as an ERROR line; a real failure to
    # create or run a session still raises, and is reported by us.
    ort.set_default_logger_severity(4)


@functools.cache
def _preload_cuda() -> None:
    """Let the GPU build find CUDA/cuDNN installed as pip packages (nvidia-*, or PyTorch's).

    Without this ORT only searches the system loader path and silently falls back to CPU in a
    virtual environment whose CUDA libraries came from pip. It prints on stdout, which is ours.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            preload()
        except Exception as exc:  # a missing library only means CPU; the session tells
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


def _providers_for(provider: Provider) -> list[str]:
    available = ort.get_available_providers()
    if provider is Provider.CPU:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        if provider is Provider.CUDA:
            raise ProviderError(
                f"--provider cuda: this onnxruntime build has no CUDA provider (it has {available}); "
                "install onnxruntime-gpu"
            )
        return ["CPUExecutionProvider"]
    _preload_cuda()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def make_session(
    model: onnx.ModelProto | str | Path,
    provider: Provider = Provider.AUTO,
    optimize: bool = True,
) -> tuple[ort.InferenceSession, str]:
    """A session for `model` and the provider it really runs on ('cuda' or 'cpu').

    With `optimize=False` every graph optimization is off, so captured intermediate tensors
    are exactly the node inputs of the original graph (fusions would hide them), and the CPU
    memory arena is off: the arena kept the captured activations' blocks and grew with the
    number of batches (ResNet-50: 2.6 GB peak with 64 samples, 3.2 GB with 256; without it
    2.1 and 2.2 GB, at the same capture speed within 2 %).
    """
    _quiet()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
    providers = _providers_for(provider)
    with tempfile.TemporaryDirectory(prefix="sipp-onnx-") as tmp:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() > TWO_GB:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True, location="model.data")
                source: str | bytes = str(path)
            else:
                source = model.SerializeToString()
        else:
            source = str(model)
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load the model: {_ort_message(exc)}") from None
    used = _PROVIDER_NAMES.get(session.get_providers()[0], session.get_providers()[0])
    if provider is Provider.CUDA and used != "cuda":
        raise ProviderError("--provider cuda: a CUDA session could not be created (no usable GPU?)")
    log.info("ONNX Runtime provider: %s", used)
    return session, used


def _ort_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else text


def run_error(exc: BaseException) -> str:
    """One line for an ORT run failure."""
    return _ort_message(exc)


def add_outputs(model: onnx.ModelProto, names: list[str]) -> int:
    """Append tensors as graph outputs (untyped, which ORT accepts); returns how many were added.

    Callers remove them again with `del model.graph.output[-added:]`.
    """
    present = {o.name for o in model.graph.output}
    added = [n for n in dict.fromkeys(names) if n not in present]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in added)
    return len(added)
