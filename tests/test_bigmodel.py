"""Models with external data and models over 2 GB: tensors read on demand, written tensor by
tensor, the external-data layout kept, and the same pruned weights as the all-in-memory path.

The 2 GB limit is lowered (monkeypatched) so that small models take the big-model branches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import convnet, gaussian_calibration, mlp, save_external
from onnx import external_data_helper, numpy_helper

from sipp_onnx import ModelError, PruneConfig, modelio, prune_model, runtime
from sipp_onnx.modelio import read_tensor, tensor_protos
from sipp_onnx.pipeline import prepare

CONFIGS = [
    PruneConfig(sparsity=0.6),
    PruneConfig(sparsity=0.6, method="wanda", refit="bias"),
    PruneConfig(sparsity=0.6, method="magnitude"),
    PruneConfig(sparsity=0.6, sequential=True),
]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def values(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("config", CONFIGS, ids=["sipp-det-obs", "wanda-bias", "magnitude", "sequential"])
@pytest.mark.parametrize("one_file", [True, False], ids=["one-data-file", "file-per-tensor"])
def test_external_model_prunes_like_the_in_memory_one(tmp_path: Path, config: PruneConfig, one_file: bool):
    model = convnet()
    x = gaussian_calibration((3, 8, 8), n=12)
    src = save_external(model, tmp_path / "ext.onnx", one_file)
    plain = tmp_path / "plain.onnx"
    onnx.save_model(model, str(plain))
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = prune_model(src, {"x": x}, config, output=out_dir / "ext.onnx")
    reference = prune_model(plain, {"x": x}, config, output=out_dir / "plain.onnx")

    assert {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["ext.onnx", "ext.onnx.data", "plain.onnx"]
    stored = onnx.load(str(out_dir / "ext.onnx"), load_external_data=False)
    original = {t.name for t in onnx.load(str(src), load_external_data=False).graph.initializer}
    external = {t.name for t in stored.graph.initializer if external_data_helper.uses_external_data(t)}
    assert original <= external  # the layout is kept; a bias the refit adds may join it
    got, want = values(out_dir / "ext.onnx"), values(out_dir / "plain.onnx")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert result.report.sparsity_achieved == pytest.approx(reference.report.sparsity_achieved)


def test_untouched_external_tensors_are_never_loaded(tmp_path: Path, monkeypatch):
    """Only the pruned weights are read; the rest are copied file to file by the writer."""
    src = save_external(convnet(), tmp_path / "ext.onnx")
    read: list[str] = []
    original = modelio.read_tensor

    def spy(tensor, base_dir=None):
        read.append(tensor.name)
        return original(tensor, base_dir)

    monkeypatch.setattr("sipp_onnx.weightchain.read_tensor", spy)
    monkeypatch.setattr(
        external_data_helper, "load_external_data_for_model", lambda *a: pytest.fail("whole model loaded")
    )
    x = gaussian_calibration((3, 8, 8), n=8)
    prepared = prepare(src, {"x": x}, PruneConfig(sparsity=0.5, method="wanda", refit="none"))
    assert sorted(read) == sorted(w.name for w in prepared.found.weights)
    protos = tensor_protos(prepared.proto)
    assert all(external_data_helper.uses_external_data(protos[name]) for name in protos)
    result = prune_model(
        src, {"x": x}, PruneConfig(sparsity=0.5, method="wanda", refit="none"), output=tmp_path / "o.onnx"
    )
    untouched = {t.name for t in result.model.graph.initializer} - set(read)
    assert untouched and all(
        external_data_helper.uses_external_data(tensor_protos(result.model)[name]) for name in untouched
    )
    for name in untouched:  # copied byte for byte
        assert np.array_equal(
            read_tensor(tensor_protos(result.model)[name], tmp_path),
            numpy_helper.to_array(tensor_protos(onnx.load(str(tmp_path / "o.onnx")))[name]),
        )


@pytest.fixture
def two_gb_is_small(monkeypatch):
    """Make every model 'over 2 GB', so the big-model branches run on tiny models."""
    monkeypatch.setattr(modelio, "TWO_GB", 512)


def test_a_size_protobuf_cannot_compute_reads_as_over_2gb():
    """upb's ByteSize() raises EncodeError over 2 GB instead of returning the size."""

    class Huge:
        def ByteSize(self) -> int:
            raise ValueError("Failed to serialize proto")

    assert modelio.over_2gb(Huge())  # type: ignore[arg-type]
    assert not modelio.over_2gb(mlp())


def test_in_memory_model_over_the_limit_is_written_with_external_data(tmp_path: Path, two_gb_is_small):
    model = mlp(sizes=(20, 64, 32, 5))
    snapshot = model.SerializeToString()
    x = gaussian_calibration((20,), n=16)
    out = tmp_path / "out.onnx"
    result = prune_model(model, {"x": x}, PruneConfig(sparsity=0.5), output=out)
    assert model.SerializeToString() == snapshot
    stored = onnx.load(str(out), load_external_data=False)
    external = {t.name for t in stored.graph.initializer if external_data_helper.uses_external_data(t)}
    assert external == {"W1", "W2"}  # W3 is under 1 KB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    # The pruned model in memory was given to the writer: its big tensors are the output's now.
    in_memory = {t.name for t in result.model.graph.initializer if external_data_helper.uses_external_data(t)}
    assert in_memory == {"W1", "W2"} and result.base_dir == tmp_path
    session, _ = runtime.make_session(result.model, base_dir=result.base_dir)
    reloaded, _ = runtime.make_session(out)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reloaded.run(None, {"x": x})[0], rtol=1e-6)


def test_big_model_with_external_data_stages_links(tmp_path: Path, two_gb_is_small):
    """Over the limit with some tensors external and some rewritten in memory (sequential)."""
    src = save_external(mlp(sizes=(20, 64, 32, 5)), tmp_path / "ext.onnx")
    plain = tmp_path / "plain.onnx"
    onnx.save_model(mlp(sizes=(20, 64, 32, 5)), str(plain))
    x = gaussian_calibration((20,), n=16)
    config = PruneConfig(sparsity=0.5, sequential=True)
    prune_model(src, {"x": x}, config, output=tmp_path / "a.onnx")
    prune_model(plain, {"x": x}, config, output=tmp_path / "b.onnx")
    got, want = values(tmp_path / "a.onnx"), values(tmp_path / "b.onnx")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_external_data_is_one_line_error(tmp_path: Path):
    src = save_external(convnet(), tmp_path / "ext.onnx")
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated external data"):
        prune_model(
            src, {"x": gaussian_calibration((3, 8, 8), n=4)}, PruneConfig(), output=tmp_path / "o.onnx"
        )
    assert not (tmp_path / "o.onnx").exists()


def test_missing_external_data_is_one_line_error(tmp_path: Path):
    src = save_external(convnet(), tmp_path / "ext.onnx")
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelError) as info:
        prune_model(
            src, {"x": gaussian_calibration((3, 8, 8), n=4)}, PruneConfig(), output=tmp_path / "o.onnx"
        )
    assert "ext.onnx.data" in str(info.value) and "\n" not in str(info.value)


def test_failed_write_restores_the_model_and_leaves_nothing(tmp_path: Path, monkeypatch):
    model = mlp()
    snapshot = model.SerializeToString()
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".data"):
            handle = real_open(path, mode, *args, **kwargs)

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    handle.close()

                def tell(self):
                    return handle.tell()

                def write(self, data):
                    raise OSError(28, "No space left on device")

            return Full()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(modelio.OutputError, match="No space left"):
        modelio.save_model_atomic(model, tmp_path / "o.onnx", frozenset({"W1", "W2"}))
    assert model.SerializeToString() == snapshot
    assert list(tmp_path.iterdir()) == []


def test_sweep_and_evaluate_on_an_external_data_model(tmp_path: Path):
    """The sweep keeps the external tensors on disk: its reference and every pruned model read
    them from the input's directory."""
    from sipp_onnx.config import Method, Refit
    from sipp_onnx.evaluate import evaluate
    from sipp_onnx.sweep import Variant, sweep

    src = save_external(convnet(), tmp_path / "ext.onnx")
    plain = tmp_path / "plain.onnx"
    onnx.save_model(convnet(), str(plain))
    x = gaussian_calibration((3, 8, 8), n=12)
    ev = {"x": gaussian_calibration((3, 8, 8), n=20, seed=4)}
    variants = [Variant(Method.SIPP_DET, Refit.OBS), Variant(Method.MAGNITUDE, Refit.NONE)]
    got = sweep(src, {"x": x}, ev, variants, [0.5, 0.8])
    want = sweep(plain, {"x": x}, ev, variants, [0.5, 0.8])
    assert [p.metric for p in got.points] == pytest.approx([p.metric for p in want.points])
    report = evaluate(src, ev, compare=plain)
    assert report.compare is not None and report.compare.cosine == pytest.approx(1.0)


def test_pruned_external_tensors_go_straight_to_the_output_file(tmp_path: Path, monkeypatch):
    """Their bytes never enter the protobuf (which would hold them until the model is freed)."""
    src = save_external(convnet(), tmp_path / "ext.onnx")
    into_protobuf: list[str] = []
    original = modelio.write_tensor

    def spy(tensor, values):
        into_protobuf.append(tensor.name)
        original(tensor, values)

    monkeypatch.setattr("sipp_onnx.weightchain.write_tensor", spy)
    monkeypatch.setattr("sipp_onnx.modelio.write_tensor", spy)
    x = gaussian_calibration((3, 8, 8), n=8)
    result = prune_model(src, {"x": x}, PruneConfig(sparsity=0.5, refit="none"), output=tmp_path / "o.onnx")
    assert into_protobuf == []
    pruned = {layer.weight for layer in result.report.layers}
    protos = tensor_protos(result.model)
    assert all(not protos[name].HasField("raw_data") for name in pruned)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["ext.onnx", "ext.onnx.data", "o.onnx", "o.onnx.data"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_while_staging_leaves_nothing(tmp_path: Path, monkeypatch, failure):
    src = save_external(convnet(), tmp_path / "ext.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    calls = []

    def put(self, tensor, values):
        calls.append(tensor.name)
        if len(calls) == 2:
            raise failure
        return real_put(self, tensor, values)

    real_put = modelio.StagedOutput.put
    monkeypatch.setattr(modelio.StagedOutput, "put", put)
    x = gaussian_calibration((3, 8, 8), n=8)
    with pytest.raises((OSError, KeyboardInterrupt)):
        prune_model(src, {"x": x}, PruneConfig(sparsity=0.5), output=tmp_path / "o.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_gram_bytes_is_what_the_refit_statistics_take():
    """The estimate behind the refit's memory warning, against the matrices really kept."""
    from sipp_onnx.pipeline import gram_bytes

    x = gaussian_calibration((3, 8, 8), n=8)
    prepared = prepare(convnet(), {"x": x}, PruneConfig(sparsity=0.5, method="wanda", refit="obs"))
    kept = sum(st.gram.nbytes for st in prepared.stats.values() if st.gram is not None)
    assert gram_bytes(prepared.found) == kept > 0
