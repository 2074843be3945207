"""The max-times product behind SiPP's max reduction.

    out[g] = max(out[g], max_p r[g, p, :, None] * a[g, p, None, :])

It has as many multiply-max operations as the layer has multiply-adds, but no BLAS form. Two
routes give identical values (each product is one float32 multiply, max does not round, and
both keep the running value on ties):

- the compiled kernel `sipp_onnx._maxtimes` (C, GEMM-style packed panels and a register tile,
  AVX-512 / AVX2 / portable bodies chosen at import by what the CPU supports), built at install
  time where a C compiler is available; 8-34x the NumPy route on this project's 2-core
  machine (docs/benchmarks.md, `tools/bench_maxtimes.py`);
- NumPy (`numpy_max_times`), used where the extension is missing, for tiny per-group products
  (depthwise convs) where NumPy's broadcast over all groups wins, and when the environment
  variable `SIPP_ONNX_MAX_TIMES=numpy` asks for it.

`kernel()` names the route the next large product takes; the report records it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 23  # ~32 MB of float32 temporaries in the chunked NumPy product
_POINTWISE_ELEMENTS = 1 << 15  # from this many weights per group on, NumPy goes point by point
_BLOCK_ELEMENTS = 1 << 18  # rows of a point-by-point product per block (1 MB of float32)
_COMPILED_MIN_ELEMENTS = 64  # per-group rows x columns below which NumPy's all-groups broadcast wins


def _load_compiled() -> Any | None:
    """The compiled extension with the body the environment asks for, or None (NumPy)."""
    wanted = os.environ.get("SIPP_ONNX_MAX_TIMES", "").strip().lower()
    if wanted == "numpy":
        return None
    try:
        from . import _maxtimes  # type: ignore[attr-defined]
    except ImportError as exc:  # no compiler at install time, or a foreign build
        log.debug("compiled max-times kernel unavailable (%s); using NumPy", exc)
        return None
    if wanted:
        try:
            _maxtimes.set_kernel(wanted)
        except ValueError as exc:
            log.warning("SIPP_ONNX_MAX_TIMES=%s: %s; using %s", wanted, exc, _maxtimes.kernel())
    return _maxtimes


_compiled = _load_compiled()


def kernel() -> str:
    """The route large products take: 'c-avx512', 'c-avx2', 'c-portable' or 'numpy'."""
    return _compiled.kernel() if _compiled is not None else "numpy"


def _cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_WORKERS = min(4, _cpus())
"""Threads for the max-times product. NumPy's loops release the GIL, but every call takes it
back: on a 16-core machine 4 threads gave 9.4 G multiply-max/s on ResNet-50's widest layer, 8
gave 8.7 and 16 gave 7.0; on a 64 x 576 layer 16 threads gave 0.2 against 1.2 on one."""
_MIN_TASK_ELEMENTS = 1 << 14  # no thread gets a row block smaller than this (products per call)
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="sipp-max-times")
    return _pool


def numpy_max_times(r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """`out[g] = max(out[g], max_p r[g, p, :, None] * a[g, p, None, :])` in bounded memory.

    r: `[G, n, Ng]`, a: `[G, n, K]`, out: `[G, Ng, K]`. The product has as many operations as the
    layer itself but no BLAS form; chunks over points keep temporaries near `_CHUNK_ELEMENTS`.
    """
    groups, n, rows = r.shape
    cols = a.shape[2]
    if rows * cols >= _POINTWISE_ELEMENTS:
        # Large layers: one point at a time into a reused buffer that stays in cache, 2-3x
        # faster than materialising a chunk of products (measured on MiniLM/magika shapes); the
        # same products and maxima, so the same bits. Beyond `_BLOCK_ELEMENTS` rows go in
        # blocks so the buffer and its rows of `out` stay in L2 (2-3x again on ResNet-50's
        # 512 x 4608 layers). NumPy's element-wise loops run on one core and release the GIL,
        # so the row blocks are shared out to up to `_WORKERS` threads; each writes only its rows.
        block = rows if rows * cols <= 4 * _BLOCK_ELEMENTS else max(1, _BLOCK_ELEMENTS // cols)
        workers = min(_WORKERS, max(1, rows * cols // _MIN_TASK_ELEMENTS))
        if workers > 1:
            block = min(block, -(-rows // workers))
        tasks = [
            (g, start, min(rows, start + block)) for g in range(groups) for start in range(0, rows, block)
        ]

        def run(task: tuple[int, int, int]) -> None:
            g, start, stop = task
            best, rg, ag = out[g, start:stop], r[g, :, start:stop], a[g]
            part = np.empty(best.shape, dtype=np.float32)
            for p in range(n):
                np.multiply(rg[p, :, None], ag[p, None, :], out=part)
                np.maximum(best, part, out=best)

        if workers > 1 and len(tasks) > 1:
            list(_executor().map(run, tasks))
        else:
            for task in tasks:
                run(task)
        return
    # Small layers: chunks of points, one chunk per thread at a time, maxima combined at the end.
    chunk = max(1, _CHUNK_ELEMENTS // max(1, groups * rows * cols))
    if _WORKERS > 1:
        chunk = min(chunk, -(-n // _WORKERS))

    def chunk_max(start: int) -> np.ndarray:
        stop = min(n, start + chunk)
        return (r[:, start:stop, :, None] * a[:, start:stop, None, :]).max(axis=1)

    starts = range(0, n, chunk)
    maxima = (
        _executor().map(chunk_max, starts) if _WORKERS > 1 and len(starts) > 1 else map(chunk_max, starts)
    )
    for m in maxima:
        np.maximum(out, m, out=out)


def _float32(x: np.ndarray) -> np.ndarray:
    """`x` as float32 with element-aligned strides (the kernel counts strides in elements)."""
    if x.dtype != np.float32 or any(st % 4 for st in x.strides):
        return np.ascontiguousarray(x, dtype=np.float32)
    return x


def _compiled_max_times(lib: Any, r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """The compiled route of `max_times_points`: r `[B, G, Ng, L]`, a `[B, G, K, L]` in any
    strides (a `[G, n, Ng]` / `[G, n, K]` pair is the view with B = 1 and the points axis
    moved last), out `[G, Ng, K]` C-contiguous."""
    r, a = _float32(r), _float32(a)
    if not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError("max_times writes into a C-contiguous float32 output")
    batch, groups, rows, n = r.shape
    cols = a.shape[2]
    # The kernel releases the GIL, so row blocks of one large product can share the cores
    # (each thread writes only its rows and packs its own panels).
    workers = min(_WORKERS, max(1, rows // 24)) if rows * cols * n * batch >= (1 << 24) else 1
    step = max(1, -(-rows // workers))
    rsb, _, rsi, rsx = (st // 4 for st in r.strides)
    asb, _, asj, asx = (st // 4 for st in a.strides)

    def run(g: int, start: int) -> None:
        stop = min(rows, start + step)
        lib.max_times(
            r.ctypes.data + r.strides[1] * g + r.strides[2] * start,
            rsb,
            rsx,
            rsi,
            a.ctypes.data + a.strides[1] * g,
            asb,
            asx,
            asj,
            out.ctypes.data + out.strides[0] * g + out.strides[1] * start,
            out.strides[1] // 4,
            batch,
            n,
            stop - start,
            cols,
        )

    for g in range(groups):
        if workers == 1:
            run(g, 0)
        else:
            list(_executor().map(lambda s, g=g: run(g, s), range(0, rows, step)))


def max_times_points(r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """`out[g] = max(out[g], max over b, p of r[b, g, :, p, None] * a[b, g, None, :, p])`, in
    place: r `[B, G, Ng, L]` (reciprocals per sample, row and point), a `[B, G, K, L]` (the
    points, conv patches as `conv_patches` lays them out), out `[G, Ng, K]` float32.

    The compiled kernel reads both in their own layout; NumPy's route needs them as
    `[G, points, rows]` and `[G, points, K]` copies. Same values either way."""
    lib = _compiled
    if lib is not None and out.dtype == np.float32 and r.shape[2] * a.shape[2] >= _COMPILED_MIN_ELEMENTS:
        _compiled_max_times(lib, r, a, out)
        return
    batch, groups, rows, n = r.shape
    if rows == 1:
        # One row per group (depthwise convs): broadcast over the patches as they lie, a chunk of
        # samples at a time, instead of transposed copies of both operands.
        step = max(1, _CHUNK_ELEMENTS // max(1, a[0].size))
        best = out[:, 0, :]
        for start in range(0, batch, step):
            part = a[start : start + step] * r[start : start + step, :, 0, None, :]
            np.maximum(best, part.max(axis=(0, 3)), out=best)
        return
    numpy_max_times(
        r.transpose(1, 0, 3, 2).reshape(groups, -1, r.shape[2]),
        a.transpose(1, 0, 3, 2).reshape(groups, -1, a.shape[2]),
        out,
    )


def max_times(r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """`out[g] = max(out[g], max_p r[g, p, :, None] * a[g, p, None, :])`, in place.

    r: `[G, n, Ng]`, a: `[G, n, K]`, out: `[G, Ng, K]` float32. The compiled kernel where it is
    built and the per-group product is not tiny; NumPy otherwise. Same values either way.
    """
    max_times_points(r.transpose(0, 2, 1)[None], a.transpose(0, 2, 1)[None], out)
