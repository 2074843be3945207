"""File size and compressed size in the prune report: exact DEFLATE for small models, a sampled
estimate for big ones, and the payoff of zeros after pruning."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import convnet, gaussian_calibration, mlp, save_external

from sipp_onnx import PruneConfig, prune_model, sizes


def test_small_files_are_compressed_exactly(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    rng = np.random.default_rng(0)
    a.write_bytes(rng.normal(size=3000).astype(np.float32).tobytes())
    b.write_bytes(bytes(5000) + b"tail")
    got = sizes.files_size([a, b])
    joined = a.read_bytes() + b.read_bytes()
    assert got == sizes.FileSize(len(joined), len(zlib.compress(joined, 6)))
    assert sizes.bytes_size(joined) == got


def test_big_files_are_estimated_from_samples(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sizes, "_EXACT_LIMIT", 1 << 20)
    monkeypatch.setattr(sizes, "_CHUNK", 1 << 14)
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3 << 20) // 4).astype(np.float32)
    values[rng.random(values.size) < 0.5] = 0  # half zeros, as after pruning
    data = values.tobytes()
    first, second = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    first.write_bytes(data[:100_000])  # samples straddle the boundary between the files
    second.write_bytes(data[100_000:])
    got = sizes.files_size([first, second])
    exact = len(zlib.compress(data, 6))
    assert got.estimated and got.bytes == len(data)
    assert got.compressed == pytest.approx(exact, rel=0.05)
    assert sizes.bytes_size(data).compressed == pytest.approx(exact, rel=0.05)


def test_prune_report_has_sizes_before_and_after(tmp_path: Path, cli):
    model = tmp_path / "m.onnx"
    onnx.save_model(convnet(), str(model))
    np.savez(tmp_path / "c.npz", x=gaussian_calibration((3, 8, 8), n=16))
    out = tmp_path / "o.onnx"
    result = prune_model(model, tmp_path / "c.npz", PruneConfig(sparsity=0.8, refit="none"), output=out)
    before, after = result.report.size_before, result.report.size_after
    assert before == sizes.files_size([model]) and after == sizes.files_size([out])
    assert after.compressed < 0.6 * before.compressed  # 80 % zeros compress
    assert result.report.to_dict()["size_after"]["bytes"] == out.stat().st_size
    printed = cli("prune", model, tmp_path / "c.npz", "-o", tmp_path / "p.onnx", "--sparsity", "0.8")
    assert "size on disk" in printed.stdout and "gzip -6" in printed.stdout


def test_external_data_counts_and_in_memory_models(tmp_path: Path):
    save_external(mlp(), tmp_path / "e.onnx")
    result = prune_model(
        tmp_path / "e.onnx", {"x": gaussian_calibration((20,), n=8)}, output=tmp_path / "o.onnx"
    )
    files = [tmp_path / "e.onnx", tmp_path / "e.onnx.data"]
    assert result.report.size_before == sizes.files_size(files)
    assert result.report.size_after == sizes.files_size(result.written)
    in_memory = prune_model(mlp(), {"x": gaussian_calibration((20,), n=8)})
    assert in_memory.report.size_before == sizes.bytes_size(mlp().SerializeToString())
    assert in_memory.report.size_after is None


def test_store_sparse_writes_smaller_sparse_initializers(tmp_path: Path, cli):
    """At 90 % the pruned float32 weights are smaller as COO sparse initializers; ONNX Runtime
    densifies them on load, so the outputs equal those of the dense file."""
    from sipp_onnx.runtime import make_session

    x = gaussian_calibration((20,), n=16)
    dense = prune_model(mlp(), {"x": x}, PruneConfig(sparsity=0.9, refit="none"), output=tmp_path / "d.onnx")
    sparse = prune_model(
        mlp(), {"x": x}, PruneConfig(sparsity=0.9, refit="none", store="sparse"), output=tmp_path / "s.onnx"
    )
    stored = onnx.load(str(tmp_path / "s.onnx"))
    as_sparse = {t.values.name for t in stored.graph.sparse_initializer}
    assert as_sparse and as_sparse == {
        layer.weight for layer in sparse.report.layers if layer.stored_as == "sparse"
    }
    assert not as_sparse & {t.name for t in stored.graph.initializer}
    assert sparse.report.size_after.bytes < dense.report.size_after.bytes
    feed = {"x": x[:4]}
    np.testing.assert_array_equal(
        make_session(tmp_path / "s.onnx")[0].run(None, feed)[0],
        make_session(tmp_path / "d.onnx")[0].run(None, feed)[0],
    )


def test_store_sparse_keeps_dense_what_would_grow(tmp_path: Path, caplog):
    """At 50 % a float32 tensor is bigger sparse (12 bytes per non-zero against 4 per entry)."""
    result = prune_model(
        mlp(),
        {"x": gaussian_calibration((20,), n=16)},
        PruneConfig(sparsity=0.5, store="sparse"),
        output=tmp_path / "o.onnx",
    )
    assert not onnx.load(str(tmp_path / "o.onnx")).graph.sparse_initializer
    assert {layer.stored_as for layer in result.report.layers} == {"dense"}
    assert "no pruned tensor is smaller" in caplog.text
