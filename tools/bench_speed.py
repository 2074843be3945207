"""Speed and memory benchmark: the whole prune against one plain ONNX Runtime pass.

    python tools/bench_speed.py [--models resnet50,minilm,magika,lenet300,cnn,tokens] [--samples 128]
                                [--methods sipp-det,sipp-det:mean,sipp-hybrid,magnitude,wanda]
                                [--refit obs,none]

For each model, in one run on the same machine and provider:
- T_fwd: plain ONNX Runtime inference (default graph optimizations) over the calibration set,
  with the same batch size as the prune (the median of three passes);
- T_prune: the whole prune of each method (`METHOD[:REDUCTION[:MAX_POINTS]]`; the report's
  total: load to save, without the interpreter's start-up), run as a child `sipp-onnx prune`
  process, with its split by stage from the report (load, capture, sensitivity, selection,
  refit, save), and the ratio T_prune / T_fwd; the child's wall time (start-up and imports
  included) is shown too;
- the peak resident memory of the child with `--mem-samples` (default 64 and 256) calibration
  samples, to show whether memory grows with the calibration set;
- with `--peer` (needs the `[bench]` extra), the onnxsim peer's Wanda and SparseGPT at 50 % on
  the same calibration batches, timed in-process from the loaded model to the pruned proto (no
  load or save, which our T_prune includes), on every model but the ResNet-50-shaped one.

The ResNet-50-shaped CNN is built in code (224x224, bottlenecks [3, 4, 6, 3], batch norm folded
into conv biases, random He-initialised weights: its layers matter here, not its accuracy).
Results are printed as a Markdown table (docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 layer shapes, opset 17, ir_version 10: 53 Conv + 1 Gemm, 25.5 M weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int = 1, relu: bool = True) -> str:
        count[0] += 1
        name = f"conv{count[0]}"
        w = (rng.normal(size=(c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), f"{name}.bias"))
        pad = k // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [name],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv("input", 3, 64, 7, 2)
    nodes.append(
        helper.make_node(
            "MaxPool", [x], ["pool0"], name="pool0", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        )
    )
    x, c_in = "pool0", 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            y = conv(x, c_in, width, 1)
            y = conv(y, width, width, 3, stride)
            y = conv(y, width, width * 4, 1, relu=False)
            short = conv(x, c_in, width * 4, 1, stride, relu=False) if block == 0 else x
            out = f"s{stage}b{block}"
            nodes.append(helper.make_node("Add", [y, short], [out + ".add"], name=out + ".add"))
            nodes.append(helper.make_node("Relu", [out + ".add"], [out], name=out + ".relu"))
            x, c_in = out, width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    w = (rng.normal(size=(1000, 2048)) * np.sqrt(1.0 / 2048)).astype(np.float32)
    inits += [
        numpy_helper.from_array(w, "fc.weight"),
        numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias"),
    ]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet50_shaped",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def model_files(name: str, work: Path, samples: int) -> tuple[Path, Path]:
    """The model and a calibration file with `samples` samples."""
    if name == "resnet50":
        path = work / "resnet50.onnx"
        if not path.exists():
            onnx.save_model(resnet50(), str(path))
        calib = work / f"resnet50_calib_{samples}.npz"
        if not calib.exists():
            x = np.random.default_rng(1).normal(size=(samples, 3, 224, 224)).astype(np.float32)
            np.savez(calib, input=x)
        return path, calib
    if (ROOT / "bench_models" / f"{name}.onnx").exists():
        path, source = ROOT / "bench_models" / f"{name}.onnx", ROOT / "bench_models" / f"{name}_calib.npz"
    else:
        path, source = ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}_calib.npz"
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    n = next(iter(arrays.values())).shape[0]
    reps = -(-samples // n)
    calib = work / f"{name}_calib_{samples}.npz"
    np.savez(calib, **{k: np.concatenate([v] * reps)[:samples] for k, v in arrays.items()})
    return path, calib


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def forward_seconds(model: Path, calib: Path, batch: int, provider: str = "cpu") -> float:
    """Plain inference over the calibration set: default optimizations, same batches."""
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from pip packages, as sipp_onnx.runtime does
    options = ort.SessionOptions()
    session = ort.InferenceSession(str(model), options, providers=PROVIDERS[provider])
    if session.get_providers()[0] != PROVIDERS[provider][0]:
        raise RuntimeError(f"ONNX Runtime did not start the {provider} provider")
    with np.load(calib) as npz:
        arrays = {k: npz[k] for k in npz.files}
    n = next(iter(arrays.values())).shape[0]
    session.run(None, {k: v[:1] for k, v in arrays.items()})  # warm-up, not timed
    times = []
    for _ in range(3):  # the median of three passes: single passes varied by 25 % here
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            session.run(None, {k: v[start : start + batch] for k, v in arrays.items()})
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


# The child's own peak: VmHWM starts afresh at exec, while ru_maxrss keeps the peak of the
# forked parent (after the in-process peer runs that hid every child peak under 962 MB).
PEAK_KB = (
    "next((int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')), None) "
    "or __import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss"
)


def prune_child(
    model: Path, calib: Path, spec: str, refit: str, out: Path, batch: int, provider: str = "cpu"
) -> dict:
    """`sipp-onnx prune` in a child process: its report and its peak RSS (MB).

    `spec` is a method, optionally with the SiPP reduction and a `--max-points`:
    `sipp-det:mean`, `sipp-det:max:4096`."""
    report = out.with_suffix(".json")
    method, _, rest = spec.partition(":")
    reduction, _, max_points = rest.partition(":")
    cmd = (
        [
            sys.executable,
            "-c",
            "import sys; from sipp_onnx.cli import main; "
            "sys.argv = ['sipp-onnx'] + sys.argv[1:]\n"
            "try:\n    main()\nfinally:\n"
            f"    print('PEAK_KB', {PEAK_KB}, file=sys.stderr)",
            "prune",
            str(model),
            str(calib),
            "-o",
            str(out),
            "--overwrite",
            "--method",
            method,
            "--refit",
            refit,
            "--provider",
            "cpu",
            "--batch-size",
            str(batch),
            "--no-verify",
            "-q",
            "--report",
            str(report),
        ]
        + (["--reduction", reduction] if reduction else [])
        + (["--max-points", max_points] if max_points else [])
    )
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"prune failed: {done.stderr.strip().splitlines()[-1:]}")
    peak = int(re.search(r"PEAK_KB (\d+)", done.stderr).group(1)) / 1024  # type: ignore[union-attr]
    data = json.loads(report.read_text())
    return {"wall": wall, "peak_mb": peak, "timings": data["timings"]}


def peer_seconds(model: Path, calib: Path, method: str, batch: int) -> float:
    """The onnxsim peer's `method` at 50 %, timed from the loaded model to its pruned proto."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_quality import run_peer  # noqa: PLC0415 - benchmark-only dependency

    from sipp_onnx.calibration import open_calibration  # noqa: PLC0415
    from sipp_onnx.modelio import model_inputs  # noqa: PLC0415

    proto = onnx.load(str(model))
    batches = list(open_calibration(calib, model_inputs(proto)).batches(batch))
    t0 = time.perf_counter()
    run_peer(proto, method, 0.5, batches)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet50,minilm,magika,lenet300,cnn,tokens")
    parser.add_argument("--peer", action="store_true", help="time the onnxsim peer's Wanda and SparseGPT")
    parser.add_argument("--methods", default="sipp-det,sipp-det:mean,sipp-hybrid,magnitude,wanda")
    parser.add_argument("--refit", default="obs,none")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--mem-samples", default="64,256")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_results" / "speed")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    mem_samples = [int(s) for s in args.mem_samples.split(",") if s]  # "": no memory runs
    lines = [
        f"Produced by `python tools/bench_speed.py --models {args.models} --samples {args.samples}` "
        f"(sipp-onnx, onnxruntime {ort.__version__}, {args.provider} provider, "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"batch {args.batch_size}).",
        "",
        "| model | method | refit | T_fwd (s) | T_prune (s) | ratio | wall (s) | load | session "
        "| capture | sensitivity | selection | refit | save | peak MB "
        + " | ".join(f"({n} samples)" for n in mem_samples)
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(mem_samples),
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmpdir = Path(tmp)
        for name in args.models.split(","):
            model, calib = model_files(name, args.work, args.samples)
            t_fwd = forward_seconds(model, calib, args.batch_size, args.provider)
            for method in args.methods.split(","):
                for refit in args.refit.split(","):
                    run = prune_child(
                        model, calib, method, refit, tmpdir / "out.onnx", args.batch_size, args.provider
                    )
                    t = run["timings"]
                    peaks = []
                    for n in mem_samples:
                        _, mem_calib = model_files(name, args.work, n)
                        peaks.append(
                            prune_child(
                                model,
                                mem_calib,
                                method,
                                refit,
                                tmpdir / "m.onnx",
                                args.batch_size,
                                args.provider,
                            )
                        )
                    cells = [
                        f"{t.get(k, 0.0):.2f}"
                        for k in ("load", "session", "capture", "sensitivity", "selection", "refit", "save")
                    ]
                    line = (
                        f"| {name} | {method} | {refit} | {t_fwd:.3f} | {t['total']:.2f} | "
                        f"{t['total'] / t_fwd:.1f} | {run['wall']:.1f} | "
                        + " | ".join(cells)
                        + " | "
                        + " | ".join(f"{p['peak_mb']:.0f}" for p in peaks)
                        + " |"
                    )
                    print(line, flush=True)
            if args.peer and name != "resnet50":
                for method in ("wanda", "sparsegpt"):
                    seconds = peer_seconds(model, calib, method, args.batch_size)
                    print(
                        f"| {name} | onnxsim-{method} (peer, 50 %) | - | {t_fwd:.3f} | {seconds:.2f} | "
                        f"{seconds / t_fwd:.1f} |" + " - |" * (7 + len(mem_samples)),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
