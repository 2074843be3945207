"""Property-based fuzzing of `prune_model` with hostile models and calibration data (issue 7).

The property: `prune_model` either succeeds, and the file it wrote loads with onnx and passes
onnx.checker, or raises a `SippError` subclass and leaves nothing in the output directory. It
never raises another exception type, and never changes its input files.

Three sources of hostile input: the serialized bytes of a small valid model mutated (bits
flipped, truncated, byte runs inserted, deleted or duplicated), the model mutated through the
onnx API (nodes removed, dims/dtypes changed, inputs dropped, outputs renamed, ... : protobuf
stays valid), and the calibration data mutated (dtype, shape, NaN/inf/huge values, dropped or
renamed keys, empty or object arrays), each with a cheap configuration.

`derandomize=True`: every run tries the same examples, so CI is reproducible. The bugs it found
are fixed; each has a direct test at the end.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sipp_onnx import CalibrationError, ModelError, PruneConfig, SippError, prune_model

try:  # tests/ as a plain directory (rootdir-prepend import mode) or as a package
    import builders
    import kind_builders
except ImportError:  # pragma: no cover
    from tests import (
        builders,  # type: ignore[no-redef]
        kind_builders,  # type: ignore[no-redef]
    )

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow in hostile data

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

N_CALIB = 6
BASES: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[int, ...]]] = {
    "mlp": (builders.mlp, (20,)),
    "conv": (builders.convnet, (3, 8, 8)),
    "tokens": (builders.tokens, (5, 6)),
}
MODELS = {name: build() for name, (build, _) in BASES.items()}
MODEL_BYTES = {name: model.SerializeToString() for name, model in MODELS.items()}

CONFIGS = [
    {"method": "magnitude", "refit": "none"},
    {"method": "magnitude"},
    {"method": "sipp-det"},
    {"method": "sipp-det", "refit": "none", "sequential": True},
    {"method": "sipp-rand", "refit": "bias"},
    {"method": "sipp-hybrid", "refit": "none", "reduction": "mean"},
    {"method": "wanda", "refit": "none"},
]


def config_strategy() -> st.SearchStrategy[PruneConfig]:
    return st.builds(
        lambda kwargs, sparsity, batch: PruneConfig(**kwargs, sparsity=sparsity, batch_size=batch),
        st.sampled_from(CONFIGS),
        st.sampled_from([0.0, 0.3, 0.5, 0.9]),
        st.integers(1, 4),
    )


# ----------------------------------------------------------------------------- the property


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(paths: list[Path]) -> dict[Path, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    return {f: sha256(f) for f in files if f.is_file()}


def check_prune(
    model: Path, calibration: Path | Mapping[str, np.ndarray], config: PruneConfig, outdir: Path
) -> str:
    """Run the property on one input; returns 'pruned' or 'refused'."""
    inputs = [model] + ([calibration] if isinstance(calibration, Path) else [])
    before = digests(inputs)
    out = outdir / "pruned.onnx"
    try:
        with np.errstate(all="ignore"):
            prune_model(model, calibration, config, output=out)
    except SippError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        assert not any(outdir.iterdir()), f"refused, but left {sorted(outdir.iterdir())}"
        outcome = "refused"
    else:
        onnx.checker.check_model(onnx.load(str(out)))
        outcome = "pruned"
    assert digests(inputs) == before, "an input file changed"
    event(outcome)  # pytest --hypothesis-show-statistics: how often each outcome came up
    return outcome


# ----------------------------------------------------------------------------- model bytes


@st.composite
def mutated_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(MODEL_BYTES[name])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return name, bytes(data)


@settings(FUZZ, max_examples=250)
@given(mutated_bytes(), config_strategy())
def test_fuzz_model_bytes(sample: tuple[str, bytes], config: PruneConfig) -> None:
    name, data = sample
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        model.write_bytes(data)
        calib = folder / "calib.npz"
        np.savez(calib, x=builders.gaussian_calibration(BASES[name][1], n=N_CALIB))
        outdir = folder / "out"
        outdir.mkdir()
        check_prune(model, calib, config, outdir)


# ----------------------------------------------------------------------------- model structure

ELEM_TYPES = [
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.INT64,
    TensorProto.INT8,
    TensorProto.BOOL,
    TensorProto.STRING,
    TensorProto.COMPLEX64,
    TensorProto.FLOAT8E4M3FN,
    TensorProto.UNDEFINED,
]
ATTRIBUTES = ["transA", "transB", "group", "pads", "strides", "dilations", "alpha", "auto_pad", "perm"]
ATTRIBUTE_VALUES = [0, 1, 2, -1, 0.0, 1e30, [0, 0], [1, 1, 1, 1], [2, 2], [0, 2, 1], "VALID", "SAME_LOWER"]


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    out = list(model.graph.initializer)
    out += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return out


def _values(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The tensor's values, or None when an earlier mutation made it unreadable."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception:
        return None


def _mutate(model: onnx.ModelProto, op: str, draw: st.DrawFn) -> None:
    """One structural change through the onnx API (the protobuf stays valid)."""
    g = model.graph
    pick = lambda items: draw(st.sampled_from(list(items)))  # noqa: E731
    tensor_ops = ("initializer-dims", "initializer-dtype", "poison-weight", "typed-data", "external-data")
    if op in tensor_ops and not _tensors(model):
        return
    if op == "remove-node" and g.node:
        del g.node[draw(st.integers(0, len(g.node) - 1))]
    elif op == "initializer-dims":
        tensor = pick(_tensors(model))
        del tensor.dims[:]
        tensor.dims.extend(draw(st.lists(st.integers(0, 40), max_size=4)))
    elif op == "initializer-dtype":
        pick(_tensors(model)).data_type = pick(ELEM_TYPES)
    elif op == "poison-weight":
        tensor = pick(_tensors(model))
        values = _values(tensor)
        if values is not None and values.size and values.dtype.kind == "f":
            values = values.copy()
            values.reshape(-1)[draw(st.integers(0, values.size - 1))] = pick([np.nan, np.inf, -np.inf, 3e38])
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    elif op == "drop-input" and g.input:
        del g.input[draw(st.integers(0, len(g.input) - 1))]
    elif op == "rename-output" and g.output:
        g.output[0].name = pick(["renamed", "x", "W1", "r1", ""])
    elif op == "drop-outputs":
        del g.output[:]
    elif op == "rewire" and g.node:
        node = pick(g.node)
        if node.input:
            names = [v.name for v in g.input] + [t.name for t in g.initializer]
            names += [o for n in g.node for o in n.output] + ["", "ghost"]
            node.input[draw(st.integers(0, len(node.input) - 1))] = pick(names)
    elif op == "attribute" and g.node:
        node, key = pick(g.node), pick(ATTRIBUTES)
        for attr in [a for a in node.attribute if a.name == key]:
            node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute(key, pick(ATTRIBUTE_VALUES)))
    elif op == "duplicate-node" and g.node:
        g.node.add().CopyFrom(pick(g.node))
    elif op == "swap-nodes" and len(g.node) > 1:
        i, j = draw(st.integers(0, len(g.node) - 1)), draw(st.integers(0, len(g.node) - 1))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
    elif op == "weight-as-input" and g.initializer:
        tensor = pick(g.initializer)
        g.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    elif op == "input-dtype" and g.input:
        g.input[0].type.tensor_type.elem_type = pick(ELEM_TYPES)
    elif op == "input-shape" and g.input and g.input[0].type.tensor_type.shape.dim:
        dims = g.input[0].type.tensor_type.shape.dim
        dim = dims[draw(st.integers(0, len(dims) - 1))]
        value = pick([0, 1, 2, 7, "n", None])
        if value is None:
            dim.Clear()
        elif isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    elif op == "opset":
        model.opset_import[0].version = pick([1, 7, 11, 13, 21, 99])
    elif op == "ir-version":
        model.ir_version = pick([0, 3, 4, 7, 11, 99])
    elif op == "remove-initializer" and g.initializer:
        del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
    elif op == "typed-data":
        tensor = pick(_tensors(model))
        values = _values(tensor)
        if values is not None and tensor.data_type == TensorProto.FLOAT and tensor.HasField("raw_data"):
            flat = values.ravel().tolist()
            tensor.ClearField("raw_data")
            tensor.float_data.extend(flat[: draw(st.integers(0, len(flat)))])  # maybe short
    elif op == "external-data":
        tensor = pick(_tensors(model))
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = (
            "location",
            pick(["weights.bin", "../weights.bin", "/etc/hostname", "calib.npz"]),
        )
    elif op == "op-type" and g.node:
        pick(g.node).op_type = pick(["Gemm", "MatMul", "Conv", "Relu", "NoSuchOp", "ConvTranspose"])
    elif op == "domain" and g.node:
        pick(g.node).domain = pick(["com.microsoft", "ai.onnx.ml", "no.such.domain"])


MUTATIONS = [
    "remove-node",
    "initializer-dims",
    "initializer-dtype",
    "poison-weight",
    "drop-input",
    "rename-output",
    "drop-outputs",
    "rewire",
    "attribute",
    "duplicate-node",
    "swap-nodes",
    "weight-as-input",
    "input-dtype",
    "input-shape",
    "opset",
    "ir-version",
    "remove-initializer",
    "typed-data",
    "external-data",
    "op-type",
    "domain",
]


@st.composite
def mutated_model(draw: st.DrawFn) -> tuple[str, onnx.ModelProto, list[str]]:
    name = draw(st.sampled_from(sorted(BASES)))
    model = onnx.ModelProto()
    model.CopyFrom(MODELS[name])
    ops = draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3))
    for op in ops:
        _mutate(model, op, draw)
    return name, model, ops


@settings(FUZZ, max_examples=400)
@given(mutated_model(), config_strategy())
def test_fuzz_model_structure(sample: tuple[str, onnx.ModelProto, list[str]], config: PruneConfig) -> None:
    name, proto, _ops = sample
    _prune_in_tmp(proto, BASES[name][1], config)


def _prune_in_tmp(proto: onnx.ModelProto, sample_shape, config: PruneConfig) -> None:
    """Write the model and Gaussian calibration data of `sample_shape` to a temporary folder and
    check the prune's contract there."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = folder / "model.onnx"
        model.write_bytes(proto.SerializeToString())
        calib = folder / "calib.npz"
        np.savez(calib, x=builders.gaussian_calibration(sample_shape, n=N_CALIB))
        outdir = folder / "out"
        outdir.mkdir()
        check_prune(model, calib, config, outdir)


# ----------------------------------------------------------------------------- new layer kinds


def _small_lstm() -> onnx.ModelProto:
    return kind_builders.recurrent_model("LSTM", "bidirectional", 0, hidden=4, inputs=6, initial_h="none")[0]


def _small_gru_with_lengths() -> onnx.ModelProto:
    """A GRU whose sequence_lens is a constant [N_CALIB] initializer (so the model stays single-input)."""
    model = kind_builders.recurrent_model("GRU", "reverse", 0, hidden=4, inputs=6, initial_h="none")[0]
    node = next(n for n in model.graph.node if n.name == "rnn")
    while len(node.input) < 5:
        node.input.append("")
    node.input[4] = "lens_c"
    model.graph.initializer.append(builders.tensor("lens_c", np.arange(1, N_CALIB + 1) % 7 + 1, np.int32))
    return model


KIND_BASES: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[int, ...]]] = {
    "lstm": (_small_lstm, (7, 6)),
    "gru-lengths": (_small_gru_with_lengths, (7, 6)),
    "convtranspose": (lambda: kind_builders.unet_decoder(2, width=8), (3, 8, 8)),
    "einsum": (kind_builders.einsum_model, (3, 16)),
    "if": (lambda: kind_builders.if_convs(cond="sign", nested=True), (3, 8, 8)),
    "quantized": (lambda: kind_builders.quantized_shipped("dynamic"), (1, 8, 8)),
    "quantized-static": (lambda: kind_builders.quantized_shipped("static"), (1, 8, 8)),
}
KIND_MODELS = {name: build() for name, (build, _) in KIND_BASES.items()}
KIND_ATTRIBUTES = {
    "direction": ["forward", "reverse", "bidirectional", "sideways"],
    "hidden_size": [0, 1, 3, 4, 1000],
    "layout": [0, 1, 2],
    "linear_before_reset": [0, 1, 7],
    "clip": [0.0, 1e-30, 3.0],
    "activations": [["Relu", "Tanh", "Sigmoid"], ["NoSuch"]],
    "equation": ["bij,jk->bik", "bii,ik->bik", "...j,jk->...k", "ij,jk", "b,c->", "bij,jk->bi", "x"],
    "output_shape": [[9, 9], [1], [0, 0], [100, 100]],
    "output_padding": [[1, 1], [5, 5], [0]],
    "group": [1, 2, 3, 16],
    "auto_pad": ["SAME_UPPER", "SAME_LOWER", "VALID", "BOGUS"],
    "transB": [0, 1],
}


def _nodes_everywhere(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs (If branches)."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _nodes_everywhere(attr.g)
    return out


def _mutate_kind(model: onnx.ModelProto, op: str, draw: st.DrawFn) -> None:
    """The structural mutations above, plus the attributes of the new kinds and mutations of
    nodes inside If branches."""
    if op == "kind-attribute":
        node = draw(st.sampled_from(_nodes_everywhere(model.graph)))
        key = draw(st.sampled_from(sorted(KIND_ATTRIBUTES)))
        for attr in [a for a in node.attribute if a.name == key]:
            node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute(key, draw(st.sampled_from(KIND_ATTRIBUTES[key]))))
    elif op == "branch-node":
        branches = [a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
        if branches:
            branch = draw(st.sampled_from(branches))
            if branch.node:
                node = draw(st.sampled_from(list(branch.node)))
                choice = draw(st.sampled_from(["remove", "rewire", "op-type"]))
                if choice == "remove":
                    branch.node.remove(node)
                elif choice == "rewire" and node.input:
                    node.input[0] = draw(st.sampled_from(["x", "ghost", "", "feat", "c"]))
                else:
                    node.op_type = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "If", "Identity"]))
    elif op == "recurrent-input":
        recurrent = [
            n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM")
        ]
        if recurrent:
            node = draw(st.sampled_from(recurrent))
            index = draw(st.integers(1, 7))
            while len(node.input) <= index:
                node.input.append("")
            names = ["", "W", "R", "B", "lens_c", "X_t", "ghost"] + [t.name for t in model.graph.initializer]
            node.input[index] = draw(st.sampled_from(names))
    else:
        _mutate(model, op, draw)


@st.composite
def mutated_kind_model(draw: st.DrawFn) -> tuple[str, onnx.ModelProto, list[str]]:
    name = draw(st.sampled_from(sorted(KIND_BASES)))
    model = onnx.ModelProto()
    model.CopyFrom(KIND_MODELS[name])
    ops = draw(
        st.lists(
            st.sampled_from(
                [*MUTATIONS, "kind-attribute", "kind-attribute", "branch-node", "recurrent-input"]
            ),
            min_size=1,
            max_size=3,
        )
    )
    for op in ops:
        _mutate_kind(model, op, draw)
    return name, model, ops


@settings(FUZZ, max_examples=120)
@given(mutated_kind_model(), config_strategy())
def test_fuzz_new_layer_kinds(sample: tuple[str, onnx.ModelProto, list[str]], config: PruneConfig) -> None:
    """The property on mutated LSTM/GRU (with constant sequence lengths), UNet ConvTranspose,
    Einsum, nested-If and quantized models."""
    name, proto, _ops = sample
    _prune_in_tmp(proto, KIND_BASES[name][1], config)


@pytest.mark.parametrize("name", sorted(KIND_BASES))
def test_new_kind_bases_prune_unmutated(name: str, tmp_path: Path) -> None:
    """The fuzzed bases themselves prune (so the fuzz starts from valid models)."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=builders.gaussian_calibration(KIND_BASES[name][1], n=N_CALIB))  # the fuzz's data
    model = builders.save(KIND_MODELS[name], tmp_path / "model.onnx")
    out = tmp_path / "pruned.onnx"
    report = prune_model(model, calib, PruneConfig(sparsity=0.5, refit="bias"), output=out).report
    onnx.checker.check_model(onnx.load(str(out)))
    assert report.layers and abs(report.sparsity_achieved - 0.5) <= 0.02


# ----------------------------------------------------------------------------- calibration data

DTYPES = ["float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "U3", "S2", "datetime64[s]"]
KEYS = ["y", "X", "x ", "", "x.npy", "../x", "a/b", "labels"]


def _object_array(a: np.ndarray) -> np.ndarray:
    out = np.empty(max(a.shape[0], 1) if a.ndim else 1, dtype=object)
    for i in range(out.size):
        out[i] = a[i] if a.ndim and i < a.shape[0] else None
    return out


def _mutate_array(a: np.ndarray, op: str, draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    if op == "dtype":
        return a.astype(draw(st.sampled_from(DTYPES)))
    if op == "shape":
        return np.resize(a, tuple(draw(st.lists(st.integers(0, 6), max_size=5))))
    if op == "special" and a.size and a.dtype.kind == "f":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38, -3.4e38, 6e4, 1e-45]))
        a = a.copy()
        if draw(st.booleans()):
            a.reshape(-1)[:] = value
        else:
            a.reshape(-1)[draw(st.integers(0, a.size - 1))] = value
        return a
    if op == "empty" and a.ndim:
        return a[:0]
    if op == "object":
        return _object_array(a)
    if op == "scalar":
        return np.asarray(np.float32(draw(st.floats(width=32))))
    if op == "constant":
        return np.full_like(a, draw(st.sampled_from([0.0, 1.0, -1.0, 1e38])))
    if op == "fortran":
        return np.asfortranarray(a)
    if op == "reversed" and a.ndim:
        return a[::-1]
    if op == "zero-width":
        return np.zeros((a.shape[0] if a.ndim else 1, 0, *shape[1:]), np.float32)
    return a


@st.composite
def mutated_calibration(draw: st.DrawFn) -> tuple[str, dict[str, np.ndarray]]:
    name = draw(st.sampled_from(sorted(BASES)))
    shape = BASES[name][1]
    n = draw(st.integers(0, 9))
    x = builders.gaussian_calibration(shape, n=max(n, 1), seed=draw(st.integers(0, 3)))[:n]
    arrays: dict[str, np.ndarray] = {"x": x}
    ops = ["dtype", "shape", "special", "empty", "object", "scalar", "constant", "fortran", "reversed"]
    ops += ["zero-width", "drop", "rename", "extra"]
    for op in draw(st.lists(st.sampled_from(ops), max_size=3)):
        if not arrays:
            break
        key = draw(st.sampled_from(sorted(arrays)))
        if op == "drop":
            del arrays[key]
        elif op == "rename":
            arrays[draw(st.sampled_from(KEYS))] = arrays.pop(key)
        elif op == "extra":
            arrays[draw(st.sampled_from(["extra", "labels", "z"]))] = draw(
                st.sampled_from([arrays[key], arrays[key][:1], np.zeros(3), np.array("text")])
            )
        else:
            arrays[key] = _mutate_array(arrays[key], op, draw, shape)
    return name, arrays


def _write_calibration(arrays: dict[str, np.ndarray], how: str, name: str, folder: Path):
    """The arrays as the library's mapping, an .npz, an .npy or a directory of two .npz files."""
    if how == "mapping":
        return arrays
    if how == "npy":
        path = folder / "calib.npy"
        np.save(path, next(iter(arrays.values())) if arrays else np.zeros(0), allow_pickle=True)
        return path
    path = folder / "calib.npz"
    np.savez(path, **{key or "_": value for key, value in arrays.items()})  # np.savez pickles objects
    if how == "npz":
        return path
    directory = folder / "calib"
    directory.mkdir()
    path.rename(directory / "a.npz")
    np.savez(directory / "b.npz", x=builders.gaussian_calibration(BASES[name][1], n=3))
    return directory


@settings(FUZZ, max_examples=300)
@given(mutated_calibration(), st.sampled_from(["mapping", "npz", "npy", "dir"]), config_strategy())
def test_fuzz_calibration(sample: tuple[str, dict[str, np.ndarray]], how: str, config: PruneConfig) -> None:
    name, arrays = sample
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = builders.save(MODELS[name], folder / "model.onnx")
        calibration = _write_calibration(arrays, how, name, folder)
        outdir = folder / "out"
        outdir.mkdir()
        check_prune(model, calibration, config, outdir)


# ----------------------------------------------------------------------------- the bugs found


@pytest.mark.parametrize(
    ("case", "message"),
    [("no-graph-outputs", "no graph outputs"), ("conv-group-mismatch", "ONNX Runtime")],
)
def test_original_model_failing_without_statistics_is_a_sipp_error(case: str, message: str) -> None:
    """Magnitude with no refit runs the original model once, outside the calibration pass."""
    if case == "no-graph-outputs":
        model = builders.mlp()
        del model.graph.output[:]
        x = builders.gaussian_calibration((20,), n=N_CALIB)
    else:
        model = builders.convnet()
        gconv = next(n for n in model.graph.node if n.name == "gconv")
        next(a for a in gconv.attribute if a.name == "group").i = 1
        x = builders.gaussian_calibration((3, 8, 8), n=N_CALIB)
    with pytest.raises(SippError, match=message):
        prune_model(model, {"x": x}, PruneConfig(method="magnitude", refit="none"))


def test_non_finite_weight_is_a_model_error() -> None:
    model = builders.mlp()
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    values = numpy_helper.to_array(w1).copy()
    values[0, 0] = np.nan
    w1.CopyFrom(numpy_helper.from_array(values, "W1"))
    with pytest.raises(ModelError, match="'W1' holds 1 NaN/inf"):
        prune_model(model, {"x": builders.gaussian_calibration((20,), n=16)})


def test_calibration_that_overflows_the_model_is_a_calibration_error() -> None:
    x = np.full((8, 3, 8, 8), -1e38, np.float32)
    with np.errstate(all="ignore"), pytest.raises(CalibrationError, match="holds NaN/inf"):
        prune_model(builders.convnet(), {"x": x}, PruneConfig())
