"""Recurrent layers on a real model: ddddocr's captcha recognizer (conv backbone, BiLSTM 2 x 512,
8210-way Gemm per step, CTC), pruned at several sparsities by several methods.

    python tools/fetch_benchmark_models.py          # once: bench_models/captcha.onnx, ...
    python tools/bench_recurrent.py [--models-dir bench_models] [--sparsities 0.5,0.7,0.85]
    python tools/bench_recurrent.py --model captcha_int8 --methods sipp-det,magnitude

`captcha_int8` is the package's older model, int8 dynamically quantized (ConvInteger,
MatMulInteger, com.microsoft DynamicQuantizeLSTM), pruned through its dequantized view.

Labelled captchas are rendered here (4 characters of a confusable-free alphabet, Pillow's default
scalable font, random size, rotation, offsets, lines and noise; 64 x 160 grayscale; fixed seed):
128 for calibration, 128 held out. Metrics on the held-out ones: exact-match accuracy of the
greedy CTC decoding against the label, and agreement with the dense model's decoding. The
`R refit` rows give the recurrent weights the least-squares refit too (the default gives them
mask and bias only, see `discover.RECURRENT_REFIT_PROBLEM`). Prune time is the whole
`prune_model` against one ONNX Runtime pass over the calibration images, measured in the run.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

from sipp_onnx import PruneConfig, prune_model

ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
WIDTH, HEIGHT = 160, 64


MODELS = {"captcha": "CHARSET_BETA", "captcha_int8": "CHARSET_OLD"}
"""Model file stem -> the character set its outputs index (ddddocr's `beta` and `old` models)."""


def charset(path: Path, name: str) -> list[str]:
    """A character set from the package's charsets.py, read with ast (never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{path}: no {name}")


def render(text: str, rng: np.random.Generator) -> np.ndarray:
    img = Image.new("L", (WIDTH, HEIGHT), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(img)
    x = 8
    for ch in text:
        font = ImageFont.load_default(size=int(rng.integers(34, 44)))
        glyph = Image.new("L", (50, HEIGHT), 0)
        ImageDraw.Draw(glyph).text((5, 5), ch, fill=255, font=font)
        glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
        img.paste(int(rng.integers(0, 90)), (x, int(rng.integers(-6, 6))), glyph)
        x += int(rng.integers(28, 36))
    for _ in range(int(rng.integers(1, 4))):
        ends = [(int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))) for _ in range(2)]
        draw.line(ends, fill=int(rng.integers(0, 120)), width=int(rng.integers(1, 3)))
    pixels = np.array(img, dtype=np.float32) + rng.normal(0, 8, (HEIGHT, WIDTH))
    return np.clip(pixels, 0, 255) / 255.0


def captchas(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(ALPHABET), size=4)) for _ in range(n)]
    images = np.stack([render(t, rng)[None] for t in texts]).astype(np.float32)
    return images, texts


def decode(logits: np.ndarray, chars: list[str]) -> str:
    """Greedy CTC: best class per step, repeats merged, blanks (0) dropped."""
    out, prev = [], -1
    for index in logits.reshape(logits.shape[0], -1).argmax(-1):
        if index != prev and index != 0:
            out.append(chars[index])
        prev = index
    return "".join(out)


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
    chars = charset(args.models_dir / "captcha_charsets.py", MODELS[args.model])
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
