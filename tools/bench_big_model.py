"""Big-model benchmark: a model over 2 GB with external data, pruned, timed and measured.

    python tools/bench_big_model.py [--size-gb 2.5] [--samples 32] [--batch-size 8]
                                    [--methods magnitude,wanda,sipp-det] [--refit none]
                                    [--workdir bench_results/big] [--keep] [--markdown PATH]
                                    [--rev REV | --sipp-src DIR]

1. Builds, once, an MLP stack of about `--size-gb` GB of float32 weights (1 GB = 1e9 bytes):
   input x [batch, seq, d], L blocks of `MatMul(d->4d) + bias, Relu, MatMul(4d->d) + bias,
   residual Add`, then a `Gemm` head (transB=1) on the [batch*seq, d] view, reshaped back.
   Weights are normal / sqrt(fan_in) (fixed seed), written tensor by tensor into
   `model.onnx.data` (the whole model is never in memory) and referenced as external data;
   biases stay in the proto. ir_version 10, opset 17. A JSON sidecar of the parameters lets a
   later run reuse the model.
2. Writes `calib_<samples>.npz`: `--samples` samples of x with sequence length `--seq`.
3. Runs, each in a child process whose peak resident memory (VmHWM) is read at exit and
   polled, with its RSS traced against the progress lines it prints (which stage held the
   memory): T_fwd, a plain ONNX Runtime CPU session load plus one pass over the calibration
   set with the same batch size; then `sipp-onnx prune ... --sparsity 0.5` for each method.
   A child is stopped past `--timeout` or when the machine's available memory falls below
   `--min-free-mb`; children never outlive the tool.
4. Checks each output: the model file and its `.data` file exist, its weights are external, and
   a few pruned tensors (read one at a time) have the zero fraction the report says (~50 %).
5. Prints a Markdown table and writes it, with the raw numbers and RSS traces, as JSON into the
   workdir (`--markdown PATH` writes the table to a file too).

`--rev REV` runs the children on `sipp_onnx/` as committed at REV (exported with `git archive`
into the workdir and put first on PYTHONPATH), so a before/after comparison does not depend on
the working tree; `--sipp-src DIR` does the same with a directory holding `sipp_onnx/`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, external_data_helper, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import PEAK_KB, ROOT  # noqa: E402 - tools/ is not a package

GB = 1e9
MB = 2**20
FORMAT = 1  # bump when the built model changes, so an old one is not reused
ALIGN = 65536  # onnx's own alignment of large external tensors (mmap granularity)
STAGES = ("load", "session", "capture", "sensitivity", "selection", "refit", "save")


# --- the model ------------------------------------------------------------------------------


def shape_for(size_gb: float) -> tuple[int, int]:
    """(d, L): the widest d of a few whose L blocks of 8 d^2 weights (plus a d x d head) make
    about `size_gb` GB with at least 4 blocks."""
    target = size_gb * GB
    for d in (2048, 1536, 1024, 768, 512, 256, 128):
        layers = round((target - 4 * d * d) / (32 * d * d))
        if layers >= 4:
            return d, layers
    return 128, max(1, layers)


def model_params(size_gb: float, seed: int) -> dict:
    d, layers = shape_for(size_gb)
    return {"format": FORMAT, "size_gb": size_gb, "d": d, "layers": layers, "seed": seed}


def _external(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    """A float32 initializer whose bytes are in `location` at `offset`."""
    tensor = TensorProto(name=name, dims=shape, data_type=TensorProto.FLOAT)
    tensor.raw_data = b""  # set_external_data wants the field present; nothing is stored
    external_data_helper.set_external_data(tensor, location, offset=offset, length=length)
    tensor.ClearField("raw_data")
    return tensor


def build_model(path: Path, params: dict) -> float:
    """Write `path` and `path`.data (weights tensor by tensor); returns the seconds it took."""
    t0 = time.perf_counter()
    d, layers = params["d"], params["layers"]
    rng = np.random.default_rng(params["seed"])
    data_name = path.name + ".data"
    tmp_data = path.with_name(data_name + ".part")
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(handle: io.BufferedWriter, name: str, shape: tuple[int, int], fan_in: int) -> None:
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(1.0 / math.sqrt(fan_in))
        offset = -(-handle.tell() // ALIGN) * ALIGN
        handle.write(b"\0" * (offset - handle.tell()))
        handle.write(memoryview(w).cast("B"))
        inits.append(_external(name, shape, data_name, offset, w.nbytes))

    def bias(name: str, n: int) -> None:
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.01).astype(np.float32), name))

    x = "x"
    with open(tmp_data, "wb") as handle:
        for i in range(layers):
            p = f"block{i}"
            weight(handle, f"{p}.fc1.weight", (d, 4 * d), d)
            bias(f"{p}.fc1.bias", 4 * d)
            weight(handle, f"{p}.fc2.weight", (4 * d, d), 4 * d)
            bias(f"{p}.fc2.bias", d)
            nodes += [
                helper.make_node("MatMul", [x, f"{p}.fc1.weight"], [f"{p}.mm1"], name=f"{p}.fc1"),
                helper.make_node("Add", [f"{p}.mm1", f"{p}.fc1.bias"], [f"{p}.h1"], name=f"{p}.fc1.add"),
                helper.make_node("Relu", [f"{p}.h1"], [f"{p}.a1"], name=f"{p}.relu"),
                helper.make_node("MatMul", [f"{p}.a1", f"{p}.fc2.weight"], [f"{p}.mm2"], name=f"{p}.fc2"),
                helper.make_node("Add", [f"{p}.mm2", f"{p}.fc2.bias"], [f"{p}.h2"], name=f"{p}.fc2.add"),
                helper.make_node("Add", [x, f"{p}.h2"], [f"{p}.out"], name=f"{p}.residual"),
            ]
            x = f"{p}.out"
        weight(handle, "head.weight", (d, d), d)  # Gemm transB=1: [out, in]
    bias("head.bias", d)
    inits += [
        numpy_helper.from_array(np.array([0], np.int64), "head.start"),
        numpy_helper.from_array(np.array([2], np.int64), "head.end"),
        numpy_helper.from_array(np.array([-1, d], np.int64), "head.flat_shape"),
        numpy_helper.from_array(np.array([d], np.int64), "head.width"),
    ]
    nodes += [
        helper.make_node("Shape", [x], ["head.in_shape"], name="head.shape"),
        helper.make_node(
            "Slice", ["head.in_shape", "head.start", "head.end"], ["head.lead"], name="head.lead"
        ),
        helper.make_node("Reshape", [x, "head.flat_shape"], ["head.flat"], name="head.flatten"),
        helper.make_node(
            "Gemm", ["head.flat", "head.weight", "head.bias"], ["head.gemm"], name="head", transB=1
        ),
        helper.make_node(
            "Concat", ["head.lead", "head.width"], ["head.out_shape"], name="head.concat", axis=0
        ),
        helper.make_node("Reshape", ["head.gemm", "head.out_shape"], ["y"], name="head.unflatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_big_model"
    )
    model.ir_version = 10
    tmp_data.replace(path.with_name(data_name))
    onnx.save_model(model, str(path))  # no raw_data anywhere: nothing is converted or written
    onnx.checker.check_model(str(path))  # the path form: works past 2 GB
    return time.perf_counter() - t0


def ensure_model(work: Path, params: dict) -> tuple[Path, dict]:
    """The model for `params`, built unless the sidecar says an identical one is there."""
    path = work / "model.onnx"
    sidecar = work / "model.json"
    data = path.with_name(path.name + ".data")
    if sidecar.exists() and path.exists() and data.exists():
        info = json.loads(sidecar.read_text())
        if info.get("params") == params and info.get("data_bytes") == data.stat().st_size:
            return path, info | {"reused": True}
    sidecar.unlink(missing_ok=True)  # a half-built model is never taken for a whole one
    print(f"building {path} (d={params['d']}, {params['layers']} blocks) ...", file=sys.stderr, flush=True)
    seconds = build_model(path, params)
    proto = onnx.load(str(path), load_external_data=False)
    sizes = [math.prod(t.dims) * 4 for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]
    external = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    info = {
        "params": params,
        "build_s": round(seconds, 2),
        "weight_bytes": sum(sizes),
        "largest_tensor_bytes": max(sizes),
        "external_tensors": len(external),
        "proto_bytes": path.stat().st_size,
        "data_bytes": data.stat().st_size,
    }
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return path, info | {"reused": False}


def write_calibration(work: Path, samples: int, seq: int, d: int, seed: int) -> Path:
    path = work / f"calib_{samples}x{seq}.npz"
    x = np.random.default_rng(seed + 1).standard_normal((samples, seq, d), dtype=np.float32)
    np.savez(path, x=x)
    return path


# --- children and their memory ----------------------------------------------------------------

PROGRESS = re.compile(r"^([\w .-]+): (\d+)/(\d+)$")


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in kB ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {
        k: int(v.split()[0])
        for k, _, v in (line.partition(":") for line in text.splitlines())
        if k in ("VmRSS", "VmHWM")
    }


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return math.inf


def _progress_windows(lines: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """Stages from progress lines alone: `stage` until its last `stage: N/N`, then `after stage`."""
    windows: list[tuple[str, float, float]] = []
    phase, since = "start", -math.inf
    for when, line in lines:
        match = PROGRESS.match(line)
        if match or line.startswith("SIPP_FROM"):
            if match:
                stage, done, total = match.group(1), int(match.group(2)), int(match.group(3))
                new = f"after {stage}" if done >= total else stage
            else:
                new = "before the first progress line"
            if new != phase:
                windows.append((phase, since, when))
                phase, since = new, when
    return windows + [(phase, since, math.inf)]


def _prune_windows(lines: list[tuple[float, str]], timings: dict) -> list[tuple[str, float, float]] | None:
    """A prune's stages in the child's clock, from the report's durations: the load starts when
    the child has imported the CLI (its `SIPP_FROM` line), the selection ends at its `select: 1/1`
    progress line, and the rest follows. The session set-up comes after the load (untimed before
    the report had a `session` stage; without a capture it includes the reference run), and the
    untimed rest before the selection is the part of the report's total no stage has."""
    start = next((when for when, line in lines if line.startswith("SIPP_FROM")), None)
    anchor = next((when for when, line in lines if line == "select: 1/1"), None)
    if start is None or anchor is None or "selection" not in timings:
        return None
    timed = sum(v for k, v in timings.items() if k != "total")
    sel = anchor - timings["selection"]
    cap_end = max(start, sel - max(0.0, timings.get("total", timed) - timed))
    load_end = min(start + timings["load"], cap_end)
    cap = max(load_end, cap_end - timings.get("capture", 0.0) - timings.get("sensitivity", 0.0))
    session = "session" if "session" in timings else "untimed (session set-up)"
    refit_end = anchor + timings.get("refit", 0.0) + timings.get("sequential", 0.0)
    save_end = refit_end + timings.get("save", 0.0)
    windows = [
        ("start-up", -math.inf, start),
        ("load", start, load_end),
        (session, load_end, cap),
        ("capture+sensitivity", cap, cap_end),
        ("untimed", cap_end, sel),
        ("selection", sel, anchor),
        ("refit", anchor, refit_end),
        ("save", refit_end, save_end),
        ("exit", save_end, math.inf),
    ]
    return [w for w in windows if w[2] - w[1] > 1e-3]


def attribute(run: dict, windows: list[tuple[str, float, float]]) -> None:
    """Add the stage the peak was reached in (the last rise of VmHWM) and the largest RSS
    sampled in each stage."""

    def stage(t: float) -> str:
        return next((name for name, start, end in windows if start <= t < end), windows[-1][0])

    by_stage: dict[str, float] = {}
    for when, rss in run["trace"]:
        by_stage[stage(when)] = max(by_stage.get(stage(when), 0.0), rss)
    run["peak_stage"] = stage(run["hwm_time"]) if run["hwm_time"] is not None else "-"
    run["rss_by_stage_mb"] = by_stage
    run["stages"] = [(name, round(start, 2), round(end, 2)) for name, start, end in windows]


def watch(cmd: list[str], log: Path, timeout: float, min_free_mb: float, env: dict[str, str]) -> dict:
    """Run `cmd` in the directory of `log`, polling its memory; kill it past `timeout` s or when
    memory runs low. (Not in the repository root: `python -c` puts the current directory first
    on sys.path, where ./sipp_onnx would shadow the PYTHONPATH of --rev.)"""
    lines: list[tuple[float, str]] = []
    trace: list[tuple[float, float]] = []  # (seconds, RSS MB)
    t0 = time.perf_counter()

    def read(stream: io.TextIOBase) -> None:
        for line in stream:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    stopped = None
    hwm_kb, hwm_time = 0, None
    with open(log, "w") as stdout:
        proc = subprocess.Popen(
            cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=log.parent, env=env
        )
        reader = threading.Thread(target=read, args=(proc.stderr,), daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                now = time.perf_counter() - t0
                status = _status_kb(proc.pid)
                if status:
                    if status.get("VmHWM", 0) > hwm_kb * 1.001:  # when the peak was (last) raised
                        hwm_kb, hwm_time = status["VmHWM"], now
                    if not trace or now - trace[-1][0] >= 0.5:
                        trace.append((round(now, 2), round(status.get("VmRSS", 0) / 1024, 1)))
                if now > timeout:
                    stopped = f"stopped after {timeout:.0f} s (--timeout)"
                    break
                if (free := _available_mb()) < min_free_mb:
                    stopped = f"stopped: {free:.0f} MB of memory left (--min-free-mb)"
                    break
                time.sleep(0.1)
        finally:  # also on Ctrl-C or SIGTERM: the child never outlives us
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(timeout=10)
    wall = time.perf_counter() - t0
    stderr = "\n".join(line for _, line in lines)
    exit_peak = re.search(r"PEAK_KB (\d+)", stderr)
    peak_mb = (int(exit_peak.group(1)) if exit_peak else hwm_kb) / 1024
    source = re.search(r"SIPP_FROM (\S+)", stderr)
    return {
        "cmd": cmd,
        "rc": proc.returncode,
        "stopped": stopped,
        "wall": wall,
        "peak_mb": peak_mb,
        "peak_exact": exit_peak is not None,
        "hwm_time": hwm_time,
        "sipp_onnx": source.group(1) if source else None,
        "stderr_tail": [line for _, line in lines if not line.startswith(("PEAK_KB", "SIPP_FROM"))][-12:],
        "trace": trace,
        "lines": lines,
    }


def forward_child(model: str, calib: str, batch: int) -> None:
    """In the child: a plain CPU session, loaded and run once over the calibration set."""
    print("load: 0/1", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t0
    print("load: 1/1", file=sys.stderr, flush=True)
    with np.load(calib) as npz:
        arrays = {k: npz[k] for k in npz.files}
    n = next(iter(arrays.values())).shape[0]
    starts = range(0, n, batch)
    print(f"run: 0/{len(starts)}", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    for i, start in enumerate(starts):
        session.run(None, {k: v[start : start + batch] for k, v in arrays.items()})
        print(f"run: {i + 1}/{len(starts)}", file=sys.stderr, flush=True)
    print("FWD " + json.dumps({"load": load, "run": time.perf_counter() - t1}), flush=True)


def _wrapped(body: str) -> list[str]:
    """`python -c` running `body`, then printing the process's own peak (bench_speed's way)."""
    code = f"import sys\ntry:\n    {body}\nfinally:\n    print('PEAK_KB', {PEAK_KB}, file=sys.stderr)"
    return [sys.executable, "-c", code]


def forward_cmd(model: Path, calib: Path, batch: int) -> list[str]:
    tools = str(Path(__file__).resolve().parent)
    return _wrapped(
        f"sys.path.insert(0, {tools!r}); from bench_big_model import forward_child; "
        "forward_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    ) + [str(model), str(calib), str(batch)]


def prune_args(model: Path, calib: Path, out: Path, method: str, args: argparse.Namespace) -> list[str]:
    return [
        "prune",
        str(model),
        str(calib),
        "-o",
        str(out),
        "--sparsity",
        str(args.sparsity),
        "--method",
        method,
        "--refit",
        args.refit,
        "--batch-size",
        str(args.batch_size),
        "--provider",
        "cpu",
        "--report",
        str(out.with_suffix(".report.json")),
        "--overwrite",
    ] + (["--no-verify"] if args.no_verify else [])


def prune_cmd(argv: list[str]) -> list[str]:
    return (
        _wrapped(
            "import sipp_onnx; from sipp_onnx.cli import main; sys.argv = ['sipp-onnx'] + sys.argv[1:]\n"
            "    print('SIPP_FROM', sipp_onnx.__file__, file=sys.stderr, flush=True); main()"
        )
        + argv
    )


def check_output(out: Path, report: dict) -> dict:
    """The output's files, its external data, and the zero fraction of a few pruned tensors
    (read one at a time) against the report's per-layer sparsity."""
    data = out.with_name(out.name + ".data")
    proto = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    external = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    locations = sorted({e.value for t in external for e in t.external_data if e.key == "location"})
    files = [out] + [out.parent / loc for loc in locations]
    layers = {layer["weight"]: layer for layer in report.get("layers", [])}
    names = [n for n in layers if n in inits]
    picked = sorted({names[0], names[len(names) // 2], names[-1]} if names else set(), key=names.index)
    zeros = {}
    for name in picked:
        tensor = TensorProto()
        tensor.CopyFrom(inits[name])  # to_array loads the bytes into the proto it is given
        w = numpy_helper.to_array(tensor, str(out.parent))
        zeros[name] = {"file": float(np.count_nonzero(w == 0) / w.size), "report": layers[name]["sparsity"]}
        del w, tensor
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    return {
        "files": {p.name: p.stat().st_size for p in files if p.exists()},
        "missing": [p.name for p in files if not p.exists()],
        "bytes": sum(p.stat().st_size for p in files if p.exists()),
        "data_beside": data.exists(),
        "external_weights": sum(external_data_helper.uses_external_data(t) for t in weights),
        "weights": len(weights),
        "zeros": zeros,
        "zeros_match_report": all(abs(z["file"] - z["report"]) < 1e-3 for z in zeros.values()),
    }


def export_rev(rev: str, work: Path) -> Path:
    """`sipp_onnx/` as committed at `rev`, extracted under the workdir (the working tree is not
    touched)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = work / f"src-{sha}"
    if not (dest / "sipp_onnx" / "__init__.py").exists():
        archive = subprocess.run(
            ["git", "archive", sha, "sipp_onnx"], cwd=ROOT, capture_output=True, check=True
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
    return dest


# --- the run ------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through watch(), which kills the child


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gb", type=float, default=2.5, help="float32 weights, 1 GB = 1e9 bytes")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16, help="sequence length of the calibration samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="magnitude,wanda,sipp-det")
    parser.add_argument("--refit", default="none", choices=("none", "bias", "obs"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--no-verify", action="store_true", help="pass --no-verify to the prune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench_results" / "big")
    parser.add_argument("--keep", action="store_true", help="keep the pruned models")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child before it is stopped")
    parser.add_argument(
        "--min-free-mb", type=float, default=2048, help="stop a child below this MemAvailable"
    )
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--rev", help="run the children on sipp_onnx/ as committed at this git revision")
    code.add_argument("--sipp-src", type=Path, help="run the children on DIR/sipp_onnx")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: even in the background
        signal.signal(sig, _terminate)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    src = export_rev(args.rev, work) if args.rev else args.sipp_src.resolve() if args.sipp_src else None
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [env.get("PYTHONPATH")] if p])
    tmp = work / "tmp"  # the children's temporary files (a >2 GB session copy), removed after each
    env["TMPDIR"] = str(tmp)

    params = model_params(args.size_gb, args.seed)
    model, info = ensure_model(work, params)
    calib = write_calibration(work, args.samples, args.seq, params["d"], args.seed)
    model_gb = info["weight_bytes"] / GB
    largest_mb = info["largest_tensor_bytes"] / MB
    build = "reused" if info["reused"] else "built"
    print(
        f"model: {model} ({model_gb:.2f} GB of weights, d={params['d']}, {params['layers']} blocks, "
        f"largest tensor {largest_mb:.0f} MB; {build}, build {info['build_s']:.1f} s); calibration: "
        f"{args.samples} x {args.seq} tokens, batch {args.batch_size}",
        file=sys.stderr,
        flush=True,
    )

    tmp.mkdir(exist_ok=True)
    fwd = watch(
        forward_cmd(model, calib, args.batch_size), work / "forward.log", args.timeout, args.min_free_mb, env
    )
    attribute(fwd, _progress_windows(fwd["lines"]))
    fwd_out = re.search(r"^FWD (.*)$", (work / "forward.log").read_text(), re.M)
    fwd["timings"] = json.loads(fwd_out.group(1)) if fwd_out else {}
    t_fwd = sum(fwd["timings"].values()) if fwd_out else None
    print(
        f"T_fwd: {fwd['timings']}, peak {fwd['peak_mb']:.0f} MB ({fwd['peak_stage']})",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run(["rm", "-rf", str(tmp)], check=False)

    runs = []
    for method in args.methods.split(","):
        runs.append(prune_run(model, calib, method, args, work, env))

    text = table(args, params, info, fwd, t_fwd, runs)
    print(text, flush=True)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sipp_onnx_src": str(src) if src else None,
        "model": info,
        "forward": fwd,
        "runs": runs,
        "table": text,
    }
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {work / 'results.json'}", file=sys.stderr)
    return 0 if fwd["rc"] == 0 and all("error" not in r for r in runs) else 1


def prune_run(model: Path, calib: Path, method: str, args: argparse.Namespace, work: Path, env: dict) -> dict:
    """One `sipp-onnx prune` child, measured, its output checked (then deleted unless --keep)."""
    out = work / f"out-{method}.onnx"
    argv = prune_args(model, calib, out, method, args)
    print("sipp-onnx " + shlex.join(argv), file=sys.stderr, flush=True)
    tmp = Path(env["TMPDIR"])
    tmp.mkdir(exist_ok=True)
    run: dict = {}
    try:
        run = watch(prune_cmd(argv), work / f"prune-{method}.log", args.timeout, args.min_free_mb, env)
        run["method"] = method
        report_path = out.with_suffix(".report.json")
        report = json.loads(report_path.read_text()) if run["rc"] == 0 and report_path.exists() else None
        if report is not None:
            run["timings"] = report["timings"]
            run["sparsity_achieved"] = report["sparsity_achieved"]
            run["verification"] = report.get("verification", [])
            run["output"] = check_output(out, report)
        else:
            tail = [line for line in run["stderr_tail"] if not PROGRESS.match(line)]
            run["error"] = run["stopped"] or (tail[-1] if tail else f"exit status {run['rc']}")
        windows = _prune_windows(run["lines"], run.get("timings", {}))
        if windows:  # from the CLI's start to the end of the save, the untimed parts included
            run["cli_seconds"] = windows[-1][1] - windows[0][2]
        attribute(run, windows or _progress_windows(run["lines"]))
    finally:  # also when interrupted: no gigabytes left behind
        # `.ses`: a session id file that importing onnxruntime writes into TMPDIR
        staged = list(work.glob(f".{out.name}.*"))  # a killed prune's atomic-save directory
        run["leftover_temp"] = [p.name for p in tmp.iterdir() if p.name != ".ses"] + [p.name for p in staged]
        subprocess.run(["rm", "-rf", str(tmp), *map(str, staged)], check=False)
        if not args.keep:
            for path in (out, out.with_name(out.name + ".data")):
                path.unlink(missing_ok=True)
    print(
        f"{method}: exit {run['rc']}, wall {run['wall']:.1f} s, peak {run['peak_mb']:.0f} MB "
        f"({run['peak_stage']})" + (f"; {run['error']}" if "error" in run else ""),
        file=sys.stderr,
        flush=True,
    )
    return run


def table(
    args: argparse.Namespace, params: dict, info: dict, fwd: dict, t_fwd: float | None, runs: list[dict]
) -> str:
    """The Markdown table, with a paragraph saying how it was made."""
    model_gb = info["weight_bytes"] / GB
    ft = fwd["timings"]
    header = (
        f"Produced by `python tools/bench_big_model.py --size-gb {args.size_gb} --samples {args.samples} "
        f"--batch-size {args.batch_size} --methods {args.methods} --refit {args.refit}"
        + (f" --rev {args.rev}" if args.rev else "")
        + f"` (onnxruntime {ort.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {_total_gb():.0f} GB RAM). Model: d={params['d']}, "
        f"{params['layers']} blocks + a Gemm head, {info['data_bytes'] / GB:.2f} GB of external data, "
        f"built in {info['build_s']:.1f} s. T_fwd: ORT session load {_fmt(ft.get('load'), 2)} s + one pass "
        f"{_fmt(ft.get('run'), 2)} s over {args.samples} x {args.seq} tokens. wall: the child's, start-up "
        "included; total: the report's (load to save); untimed: what the report's stages leave out "
        "between the CLI's start and the end of the save (session set-up, model copy); ratio: (total + "
        "untimed) / T_fwd. Peak: the child's VmHWM; 'peak in': the stage where it was reached "
        "(the report's stage times, anchored at the child's progress lines). Zeros: the overall sparsity "
        "of the report, and the zero fraction read back from a few pruned tensors of the output."
    )
    columns = ["model GB", "largest tensor MB", "method", "wall s", "total s", "untimed s", "ratio to T_fwd"]
    columns += list(STAGES) + ["peak MB", "peak / model", "peak in", "output GB", "zeros"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lead = [f"{model_gb:.2f}", f"{info['largest_tensor_bytes'] / MB:.0f}"]

    def peak(run: dict) -> list[str]:
        exact = "" if run["peak_exact"] else " (polled)"
        return [
            f"{run['peak_mb']:.0f}{exact}",
            f"{run['peak_mb'] * MB / info['weight_bytes']:.2f}",
            run["peak_stage"],
        ]

    stages = [_fmt(ft.get("load"), 2), "pass " + _fmt(ft.get("run"), 2)] + ["-"] * (len(STAGES) - 2)
    cells = lead + ["ORT load + pass (T_fwd)", f"{fwd['wall']:.1f}", _fmt(t_fwd, 2), "-", "1.0"]
    lines.append("| " + " | ".join(cells + stages + peak(fwd) + ["-", "-"]) + " |")
    for run in runs:
        if "error" in run:
            cells = lead + [
                run["method"],
                f"{run['wall']:.1f}",
                "failed: " + run["error"].replace("|", "/"),
                "-",
                "-",
            ]
            lines.append("| " + " | ".join(cells + ["-"] * len(STAGES) + peak(run) + ["-", "-"]) + " |")
            continue
        t, output = run["timings"], run["output"]
        zeros = [z["file"] for z in output["zeros"].values()]
        zero_cell = f"{run['sparsity_achieved']:.1%}" + (
            f"; read {min(zeros):.1%}-{max(zeros):.1%}" if zeros else ""
        )
        external = output["external_weights"] == output["weights"] and output["data_beside"]
        if not output["zeros_match_report"] or output["missing"] or not external:
            zero_cell += " (check!)"
        cli = run.get("cli_seconds", t["total"])
        ratio = _fmt(cli / t_fwd) if t_fwd else "-"
        cells = lead + [
            run["method"],
            f"{run['wall']:.1f}",
            f"{t['total']:.1f}",
            _fmt(cli - t["total"]),
            ratio,
        ]
        cells += [_fmt(t.get(k)) for k in STAGES]
        lines.append("| " + " | ".join(cells + peak(run) + [f"{output['bytes'] / GB:.2f}", zero_cell]) + " |")
    return "\n".join(lines)


def _total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
