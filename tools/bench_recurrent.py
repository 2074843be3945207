"""Recurrent layers on a real model: ddddocr's captcha recognizer (conv backbone, BiLSTM 2 x 512,
8210-way Gemm per step, CTC), pruned at several sparsities by several methods.

    python tools/fetch_benchmark_models.py          # once: bench_models/captcha.onnx, ...
    python tools/bench_recurrent.py [--models-dir bench_models] [--sparsities 0.5,0.7,0.85]
    python tools/bench_recurrent.py --model captcha_int8 --methods sipp-det,magnitude

`captcha_int8` is the package's older model, int8 dynamically quantized (ConvInteger,
MatMulInteger, com.microsoft DynamicQuantizeLSTM), pruned through its dequantized view.

Labelled captchas are rendered by tools/benchmark_data.py (4 characters of a confusable-free
alphabet, Pillow's default scalable font, random size, rotation, offsets, lines and noise;
64 x 160 grayscale; fixed seed): 128 for calibration, 128 held out. Metrics on the held-out
ones: exact-match accuracy of the greedy CTC decoding against the label, and agreement with the
dense model's decoding. The `R refit` rows give the recurrent weights the least-squares refit
too (the default gives them mask and bias only, see `discover.RECURRENT_REFIT_PROBLEM`). Prune
time is the whole `prune_model` against one ONNX Runtime pass over the calibration images,
measured in the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

# tools/ is not a package: the data builder is found next to this script (sys.path[0] when run).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_data import CAPTCHA_CHARSETS as MODELS  # noqa: E402
from benchmark_data import captchas, read_charset  # noqa: E402
from benchmark_data import ctc_greedy as decode  # noqa: E402

from sipp_onnx import PruneConfig, prune_model  # noqa: E402


def read_all(model: str | Path | bytes, images: np.ndarray, chars: list[str]) -> tuple[list[str], float]:
    """The decodings of every image (the model's batch is fixed to 1) and the seconds it took."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    t0 = time.perf_counter()
    texts = [decode(session.run(None, {name: images[i : i + 1]})[0][:, 0], chars) for i in range(len(images))]
    return texts, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--model", choices=sorted(MODELS), default="captcha")
    parser.add_argument("--sparsities", default="0.5,0.7,0.85")
    parser.add_argument("--methods", default="sipp-det,sipp-det+R-refit,magnitude,wanda")
    args = parser.parse_args(argv)
    model = args.models_dir / f"{args.model}.onnx"
    if not model.exists():
        print(f"error: {model} is missing; run tools/fetch_benchmark_models.py first", file=sys.stderr)
        return 1
    chars = read_charset(args.models_dir / "captcha_charsets.py", MODELS[args.model])
    images, texts = captchas(256)
    calib, test, labels = images[:128], images[128:], texts[128:]
    dense, _ = read_all(str(model), test, chars)
    _, t_pass = read_all(str(model), calib, chars)
    accuracy = float(np.mean([d == t for d, t in zip(dense, labels, strict=True)]))
    print(f"dense: accuracy {accuracy:.3f}; one ORT pass over the 128 calibration images {t_pass:.1f} s")
    print("| method | sparsity | accuracy | agreement with dense | prune time / one ORT pass |")
    print("|---|---|---|---|---|")
    discover_module = sys.modules["sipp_onnx.discover"]
    default_problem = discover_module.RECURRENT_REFIT_PROBLEM
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for method in args.methods.split(","):
            discover_module.RECURRENT_REFIT_PROBLEM = "" if method.endswith("+R-refit") else default_problem
            config = PruneConfig(sparsity=sparsity, method=method.split("+")[0])
            t0 = time.perf_counter()
            result = prune_model(model, {"input1": calib}, config)
            elapsed = time.perf_counter() - t0
            pruned, _ = read_all(result.model.SerializeToString(), test, chars)
            acc = np.mean([p == t for p, t in zip(pruned, labels, strict=True)])
            agree = np.mean([p == d for p, d in zip(pruned, dense, strict=True)])
            row = f"| {method} | {sparsity:.2f} | {acc:.3f} | {agree:.3f} | {elapsed / t_pass:.1f}x |"
            print(row, flush=True)
    discover_module.RECURRENT_REFIT_PROBLEM = default_problem
    return 0


if __name__ == "__main__":
    sys.exit(main())
