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
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .config import Provider
from .errors import ModelError, ProviderError
from .modelio import np_dtype, over_2gb, tensor_nbytes

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
    base_dir: Path | None = None,
) -> tuple[ort.InferenceSession, str]:
    """A session for `model` and the provider it really runs on ('cuda' or 'cpu').

    A ModelProto whose tensors are external data finds them under `base_dir` (the directory
    of the file it was read from). One over 2 GB in memory hands its big initializers to ORT
    as buffers (see `_handed_over`).

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
    if not isinstance(model, onnx.ModelProto):
        try:
            session = _session(str(model), options, providers)
        except ModelError as exc:
            if _DUPLICATE_NAMES not in str(exc):
                raise
            graph = onnx.load(str(model), load_external_data=False)
            return make_session(graph, provider, optimize, Path(model).parent)
    else:
        if base_dir is not None:
            options.add_session_config_entry(_EXTERNAL_FOLDER, str(Path(base_dir).resolve()))
        bfloat16 = _has_bfloat16(model)
        with _unique_node_names(model):
            if not over_2gb(model):
                session = _session(model.SerializeToString(), options, providers, bfloat16)
            else:
                with _handed_over(model, options):
                    session = _session(model.SerializeToString(), options, providers, bfloat16)
    used = _PROVIDER_NAMES.get(session.get_providers()[0], session.get_providers()[0])
    if provider is Provider.CUDA and used != "cuda":
        raise ProviderError("--provider cuda: a CUDA session could not be created (no usable GPU?)")
    log.info("ONNX Runtime provider: %s", used)
    return session, used


# Where ORT looks for the external data of a model given as bytes.
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def _session(
    source: str | bytes, options: ort.SessionOptions, providers: list[str], bfloat16: bool = False
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:
        message = _explain(_ort_message(exc), bfloat16)
        raise ModelError(f"ONNX Runtime cannot load the model: {message}") from None


def _has_bfloat16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    return any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in values
    )


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")


def _explain(message: str, bfloat16: bool) -> str:
    """ORT's load errors for ops it cannot run, said in the user's terms."""
    if match := _UNKNOWN_OP.search(message):
        domain, op = match.group(1) or "ai.onnx", match.group(2)
        return (
            f"op {op} of domain {domain} is not an op ONNX Runtime knows (a custom op: its library "
            "must be registered with ONNX Runtime, which this tool does not do)"
        )
    if match := _NO_KERNEL.search(message):
        op, version, node = match.groups()
        hint = " (the CPU provider has few bfloat16 kernels: try --provider cuda)" if bfloat16 else ""
        return (
            f"ONNX Runtime has no kernel for {op} (opset {version}) node {node!r} for its input types{hint}"
        )
    return message


_DUPLICATE_NAMES = "two nodes with same node name"


@contextlib.contextmanager
def _unique_node_names(model: onnx.ModelProto) -> Iterator[None]:
    """Rename repeated node names while the block runs: ONNX allows them, ONNX Runtime does not.

    Only the session sees the new names; the model (and so the pruned output) keeps its own."""
    renamed: list[tuple[onnx.NodeProto, str]] = []
    seen: set[str] = set()
    try:
        for index, node in enumerate(model.graph.node):
            if node.name and node.name in seen:
                renamed.append((node, node.name))
                node.name = f"{node.name}__sipp_onnx_{index}"
            seen.add(node.name)
        yield
    finally:
        for node, name in renamed:
            node.name = name


@contextlib.contextmanager
def _handed_over(model: onnx.ModelProto, options: ort.SessionOptions) -> Iterator[None]:
    """Hand a big in-memory model's initializers to ORT as buffers, not inside the protobuf.

    Protobuf cannot serialize over 2 GB. Each top-level initializer of 1 KB or more is, while the
    block runs, declared external (ORT requires that of a tensor it is given a buffer for) and
    its bytes are passed with `add_external_initializers`, without a copy and without a file.
    The caller's model is the same afterwards.
    """
    moved: list[tuple[onnx.TensorProto, bytes]] = []
    names: list[str] = []
    values: list[ort.OrtValue] = []
    try:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or tensor_nbytes(tensor) < 1024:
                continue
            dtype = np_dtype(tensor.data_type)
            if dtype.kind not in "fiub":  # bfloat16 and float8 (kind V) stay in the protobuf
                continue
            raw = tensor.raw_data
            array = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            moved.append((tensor, raw))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (
                ("location", "sipp-onnx-in-memory"),
                ("offset", "0"),
                ("length", str(len(raw))),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        options.add_external_initializers(names, values)
        yield
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


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
