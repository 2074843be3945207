"""The max-times product: every route (the compiled kernel's bodies and NumPy's paths) gives the
same values as the obvious broadcast, across shapes, strides, groups and edge sizes."""

import numpy as np
import pytest

import sipp_onnx.maxtimes as maxtimes


def direct(r: np.ndarray, a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The definition, one point at a time."""
    expect = out.copy()
    for p in range(r.shape[1]):
        np.maximum(expect, r[:, p, :, None] * a[:, p, None, :], out=expect)
    return expect


def compiled(lib, r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """The compiled route on `[G, n, Ng]` / `[G, n, K]` inputs (one batch, points moved last)."""
    maxtimes._compiled_max_times(lib, r.transpose(0, 2, 1)[None], a.transpose(0, 2, 1)[None], out)


def compiled_bodies() -> list[str]:
    lib = maxtimes._load_compiled()
    return [] if lib is None else list(lib.kernels())


def inputs(rng, groups, n, rows, cols, zeros=0.3):
    r = rng.random((groups, n, rows), dtype=np.float32)
    a = rng.random((groups, n, cols), dtype=np.float32)
    a[a < zeros] = 0  # ReLU-like inputs: many exact zeros (and ties at 0)
    r[:, :, ::5] = 0  # invalid denominators give 0 reciprocals
    return r, a


def test_numpy_paths_give_the_same_values(monkeypatch):
    """Large layers take NumPy's point-by-point path: same products, same maxima, same bits."""
    rng = np.random.default_rng(3)
    r, a = inputs(rng, 2, 40, 300, 256)
    expect = direct(r, a, np.zeros((2, 300, 256), dtype=np.float32))
    # pointwise in one block, pointwise in row blocks of 7 rows (300 = 42 x 7 + 6), chunked;
    # each on one thread and on three (row blocks or point chunks shared out)
    for threshold, block in ((1, 1 << 40), (1, 7 * 256), (1 << 40, 1 << 40)):
        for workers in (1, 3):
            monkeypatch.setattr(maxtimes, "_POINTWISE_ELEMENTS", threshold)
            monkeypatch.setattr(maxtimes, "_BLOCK_ELEMENTS", block)
            monkeypatch.setattr(maxtimes, "_WORKERS", workers)
            out = np.zeros((2, 300, 256), dtype=np.float32)
            maxtimes.numpy_max_times(r, a, out)
            np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize(
    "groups,n,rows,cols",
    [
        (1, 1, 1, 1),
        (1, 300, 6, 64),  # exactly one AVX-512 tile
        (1, 257, 7, 65),  # one past a tile and past a KC block of points
        (1, 513, 13, 17),  # edge tiles on both axes, three point blocks
        (3, 50, 5, 130),  # grouped, fewer rows than a tile
        (2, 100, 48, 16),  # exactly AVX2 tiles
        (1, 0, 4, 9),  # no points: out unchanged
        (1, 600, 130, 200),
    ],
)
def test_compiled_bodies_match_the_definition(groups, n, rows, cols):
    bodies = compiled_bodies()
    if not bodies:
        pytest.skip("the compiled kernel is not built here")
    lib = maxtimes._load_compiled()
    rng = np.random.default_rng(rows * 1000 + cols)
    r, a = inputs(rng, groups, n, rows, cols)
    start = rng.random((groups, rows, cols), dtype=np.float32) * 0.5  # a running max to continue
    expect = direct(r, a, start)
    chosen = lib.kernel()
    try:
        for body in bodies:
            lib.set_kernel(body)
            out = start.copy()
            compiled(lib, r, a, out)
            np.testing.assert_array_equal(out, expect, err_msg=body)
            # the sign of zeros too: NumPy's tie rule keeps the running value
            assert np.array_equal(np.signbit(out), np.signbit(expect)), body
    finally:
        lib.set_kernel(chosen)


def test_compiled_kernel_reads_strided_views_and_threads(monkeypatch):
    """Transposed and sliced inputs (as the accumulators pass them) and row blocks on threads."""
    lib = maxtimes._load_compiled()
    if lib is None:
        pytest.skip("the compiled kernel is not built here")
    rng = np.random.default_rng(9)
    base_r = rng.random((2, 90, 2 * 70), dtype=np.float32)
    base_a = rng.random((2, 45, 90), dtype=np.float32)
    r = base_r[:, :, ::2]  # last-axis stride 2: copied to contiguous rows
    a = base_a.transpose(0, 2, 1)  # [2, 90, 45] with a non-unit last stride
    a = np.maximum(a - 0.4, -0.0)  # negative zeros from the split, as in `_sample_parts`
    expect = direct(r, a, np.zeros((2, 70, 45), dtype=np.float32))
    for workers in (1, 3):
        monkeypatch.setattr(maxtimes, "_WORKERS", workers)
        out = np.zeros((2, 70, 45), dtype=np.float32)
        compiled(lib, r, a, out)
        np.testing.assert_array_equal(out, expect)
        assert np.array_equal(np.signbit(out), np.signbit(expect))


def test_large_product_threads_split_rows(monkeypatch):
    lib = maxtimes._load_compiled()
    if lib is None:
        pytest.skip("the compiled kernel is not built here")
    monkeypatch.setattr(maxtimes, "_WORKERS", 3)
    rng = np.random.default_rng(4)
    r, a = inputs(rng, 1, 1100, 100, 160)  # 17.6 M products: above the threading threshold
    expect = direct(r, a, np.zeros((1, 100, 160), dtype=np.float32))
    out = np.zeros((1, 100, 160), dtype=np.float32)
    maxtimes.max_times(r, a, out)
    np.testing.assert_array_equal(out, expect)


def test_environment_chooses_the_route(monkeypatch):
    monkeypatch.setenv("SIPP_ONNX_MAX_TIMES", "numpy")
    assert maxtimes._load_compiled() is None
    monkeypatch.setattr(maxtimes, "_compiled", None)
    assert maxtimes.kernel() == "numpy"
    rng = np.random.default_rng(1)
    r, a = inputs(rng, 1, 20, 10, 70)
    out = np.zeros((1, 10, 70), dtype=np.float32)
    maxtimes.max_times(r, a, out)
    np.testing.assert_array_equal(out, direct(r, a, np.zeros_like(out)))


def test_unknown_body_in_the_environment_falls_back_with_a_warning(monkeypatch, caplog):
    if not compiled_bodies():
        pytest.skip("the compiled kernel is not built here")
    lib = maxtimes._load_compiled()
    chosen = lib.kernel()
    monkeypatch.setenv("SIPP_ONNX_MAX_TIMES", "c-sse9")
    try:
        with caplog.at_level("WARNING"):
            assert maxtimes._load_compiled() is not None
        assert "unknown kernel c-sse9" in caplog.text
    finally:
        lib.set_kernel(chosen)


def test_the_kernel_is_built_on_x86():
    """CI's machines have gcc and Python headers: the kernel must be there, and picked by CPU."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("only x86-64 has vector bodies")
    bodies = compiled_bodies()
    assert bodies, "sipp_onnx._maxtimes was not built"
    assert maxtimes._load_compiled().kernel() == bodies[-1]  # the best body this CPU runs


@pytest.mark.parametrize(
    "batch,groups,rows,d,points",
    [
        (3, 1, 70, 45, 300),
        (3, 2, 13, 20, 31),
        (3, 1, 6, 64, 257),
        (3, 5, 1, 9, 40),
        (600, 1, 20, 30, 1),  # a token model's rows: one point per entry, blocks across entries
        (7, 1, 8, 17, 100),  # blocks of 256 points straddle entries
    ],
)
def test_points_layout_reads_the_accumulators_arrays_in_place(batch, groups, rows, d, points):
    """`max_times_points` on `[B, G, Ng, L]` reciprocals and `[B, G, K, L]` patches (unit stride
    along the points, as the conv accumulator has them): every body and NumPy's route agree
    with the definition over every sample and point."""
    rng = np.random.default_rng(rows + d)
    recip = rng.random((batch, groups, rows, points), dtype=np.float32)
    patches = np.maximum(rng.standard_normal((batch, groups, d, points), dtype=np.float32), 0)
    if points == 1:  # as DenseAccumulator lays them out: [N, 1, K, 1] views of [N, K] rows
        patches = patches[:, :, :, 0].copy()[..., None]
    expect = np.zeros((groups, rows, d), dtype=np.float32)
    for b in range(batch):
        for p in range(points):
            np.maximum(expect, recip[b, :, :, p, None] * patches[b, :, None, :, p], out=expect)
    lib = maxtimes._load_compiled()
    routes = [] if lib is None else list(lib.kernels())
    chosen = lib.kernel() if lib is not None else None
    try:
        for body in routes:
            lib.set_kernel(body)
            out = np.zeros_like(expect)
            maxtimes._compiled_max_times(lib, recip, patches, out)
            np.testing.assert_array_equal(out, expect, err_msg=body)
    finally:
        if lib is not None:
            lib.set_kernel(chosen)
    out = np.zeros_like(expect)
    groups_ = recip.shape[1]
    maxtimes.numpy_max_times(
        recip.transpose(1, 0, 3, 2).reshape(groups_, -1, rows),
        patches.transpose(1, 0, 3, 2).reshape(groups_, -1, d),
        out,
    )
    np.testing.assert_array_equal(out, expect)
    out = np.zeros_like(expect)
    maxtimes.max_times_points(recip, patches, out)
    np.testing.assert_array_equal(out, expect)
