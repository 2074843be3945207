"""Max-times kernel benchmark: multiply-max per second of every route on layer-like shapes.

    python tools/bench_maxtimes.py [--repeat 3]

For each shape (rows x points x columns: output rows, calibration points, inputs per row, the
ResNet-50 and MiniLM layer shapes the sensitivities meet), one run measures every body of the
compiled kernel this CPU can run and NumPy's route on the same arrays, checks that they give the
same values, and prints G multiply-max per second and the ratio to NumPy as a Markdown table
(docs/benchmarks.md quotes it). Times are the best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

from sipp_onnx import maxtimes

# rows x points x columns
SHAPES = (
    (64, 12544, 576),  # ResNet-50 stage 1 3x3 conv, one 56x56 sample x 4
    (128, 6272, 1152),  # stage 2 3x3 conv, two 28x28 samples x 4
    (256, 3136, 2304),  # stage 3 3x3 conv
    (512, 1568, 4608),  # stage 4 3x3 conv
    (256, 6272, 64),  # a 1x1 conv with 64 inputs
    (1536, 1024, 384),  # MiniLM FFN-in over 1024 tokens
    (384, 1024, 1536),  # MiniLM FFN-out
)


def compiled(lib, r: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """The compiled route on `[1, n, rows]` / `[1, n, cols]` (one group, points first)."""
    maxtimes._compiled_max_times(lib, r.transpose(0, 2, 1)[None], a.transpose(0, 2, 1)[None], out)


def best_time(route, r: np.ndarray, a: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    """The best of `repeat` runs of `route(r, a, out)` from zeros, and its result."""
    times, out = [], None
    for _ in range(repeat):
        out = np.zeros((1, r.shape[2], a.shape[2]), dtype=np.float32)
        t0 = time.perf_counter()
        route(r, a, out)
        times.append(time.perf_counter() - t0)
    assert out is not None
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lib = maxtimes._load_compiled()
    bodies = list(lib.kernels()) if lib is not None else []
    chosen = lib.kernel() if lib is not None else "numpy"
    rng = np.random.default_rng(0)
    print(f"default route here: {chosen}")
    print("| rows x points x inputs | " + " | ".join(bodies + ["numpy"]) + " | best / numpy |")
    print("|---" * (len(bodies) + 3) + "|")
    for rows, n, cols in SHAPES:
        r = rng.random((1, n, rows), dtype=np.float32)
        a = np.maximum(rng.standard_normal((1, n, cols), dtype=np.float32), 0)
        ops = rows * n * cols
        rates, results = {}, {}
        for body in bodies:
            lib.set_kernel(body)
            seconds, results[body] = best_time(partial(compiled, lib), r, a, args.repeat)
            rates[body] = ops / seconds
        seconds, out = best_time(maxtimes.numpy_max_times, r, a, 1)
        rates["numpy"] = ops / seconds
        for body, value in results.items():
            if not np.array_equal(value, out):
                raise SystemExit(f"{body} differs from NumPy on {rows}x{n}x{cols}")
        cells = " | ".join(f"{rates[b] / 1e9:.1f}" for b in bodies + ["numpy"])
        gain = max(rates.values()) / rates["numpy"]
        print(f"| {rows} x {n} x {cols} | {cells} | {gain:.1f}x |", flush=True)
    if lib is not None:
        lib.set_kernel(chosen)


if __name__ == "__main__":
    main()
