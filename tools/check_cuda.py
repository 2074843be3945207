"""Check the CUDA provider path on a GPU machine: same pruning on CPU and CUDA, compared.

    python tools/check_cuda.py [MODEL.onnx CALIB.npz]...   (default: every models/NAME.onnx)

For each model, prunes with --provider cpu and --provider cuda (sipp-det and sipp-rand), and
prints the provider each run really used, the sparsity, the fraction of weights whose keep/prune
decision agrees (GPU kernels round differently, so near-ties may flip), the output error of the
pruned model, and the capture time of each provider. Exits 1 when CUDA was not used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from sipp_onnx import Provider, PruneConfig, prune_model


def masks(result) -> np.ndarray:
    tensors = {t.name: t for t in result.model.graph.initializer}
    parts = [
        numpy_helper.to_array(tensors[layer.weight]).ravel() != 0
        for layer in result.report.layers
        if layer.weight in tensors
    ]
    return np.concatenate(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pairs", nargs="*", help="MODEL.onnx CALIB.npz pairs")
    args = parser.parse_args()
    pairs = list(zip(args.pairs[::2], args.pairs[1::2], strict=True)) or [
        (str(p), str(p.with_name(p.stem + "_calib.npz")))
        for p in sorted(Path("models").glob("*.onnx"))
        if not p.name.endswith(".pruned.onnx")
    ]
    used_cuda = True
    print(
        f"{'model':<28} {'method':<10} {'provider':<8} {'sparsity':>8} {'agree':>7} "
        f"{'rel_l2':>8} {'capture_s':>9}"
    )
    for model, calib in pairs:
        for method in ("sipp-det", "sipp-rand"):
            results = {}
            for provider in (Provider.CPU, Provider.CUDA):
                t0 = time.perf_counter()
                result = prune_model(
                    model, calib, PruneConfig(sparsity=0.5, method=method, provider=provider)
                )
                results[provider] = (result, time.perf_counter() - t0)
            cpu, gpu = results[Provider.CPU][0], results[Provider.CUDA][0]
            agree = float((masks(cpu) == masks(gpu)).mean())
            used_cuda &= gpu.report.provider == "cuda"
            for result, _seconds in results.values():
                r = result.report
                print(
                    f"{Path(model).name:<28} {method:<10} {r.provider:<8} {r.sparsity_achieved:>8.4f} "
                    f"{agree:>7.4f} {r.verification[0].rel_l2_error:>8.4f} {r.timings['capture']:>9.3f}"
                )
    print("CUDA provider used:", used_cuda)
    return 0 if used_cuda else 1


if __name__ == "__main__":
    sys.exit(main())
