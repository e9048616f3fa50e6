"""One command for a GPU host with TensorRT: FasterNet-T0 FP16 and INT8 engines, checked and timed, beside trtexec.

    python benchmarks/tensorrt_check.py                   # digits-trained T0 (trained here, ~1 min on CPU) at 64 px
    python benchmarks/tensorrt_check.py --checkpoint best.pth --imgsz 224 --data val/ --calib train/
    python benchmarks/tensorrt_check.py --dry-run         # check what is needed, print the commands, run nothing

For each precision it runs `fnexport convert -t tensorrt --dynamic` (prepared ONNX, engine build, convert-time
parity), then `fnexport parity` and `fnexport bench` on both engines, then trtexec on the same prepared ONNX
with the same build settings (fnexport's own hand-off flags), and prints one Markdown table on stdout.
fnexport times a call from host arrays to host arrays (H2D + compute + D2H, no CUDA graph), so the table puts
it beside trtexec's "Latency" with data transfers included and CUDA graphs off (TensorRT 11's trtexec
excludes transfers and uses graphs by default; `--includeDataTransfers --noCudaGraph` undo that), and shows
trtexec's "GPU Compute Time" too. trtexec copies from pinned host memory, fnexport from pageable numpy arrays.

Needs TensorRT (`pip install 'fnexport[tensorrt]'`, or docker/tensorrt), cuda-bindings, an NVIDIA GPU and
trtexec (on PATH, in $TRTEXEC, or /usr/src/tensorrt/bin as in NVIDIA's containers). Exit 0: all ran and
passed; 1: a parity gate or a command failed; 3: something above is missing here (one line says what).
Not yet run anywhere: the project's machines have no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fnexport.demo import LABELS, split_digits, train_digits
from fnexport.targets.tensorrt import EngineOptions, engine_unavailable, trtexec_args

TRTEXEC_PLACES = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
FLOAT = r"([0-9.eE+-]+)"


def find_trtexec() -> str | None:
    found = os.environ.get("TRTEXEC") or shutil.which("trtexec")
    return found or next((p for p in TRTEXEC_PLACES if Path(p).is_file()), None)


def preflight() -> str | None:
    """Why this cannot run here (TensorRT, cuda-bindings, GPU, trtexec), or None."""
    reason = engine_unavailable()
    if reason is None and find_trtexec() is None:
        reason = "trtexec not found: put it on PATH or set TRTEXEC (NVIDIA's containers have /usr/src/tensorrt/bin)"
    return reason


def fnexport(*args: str) -> list[str]:
    return [sys.executable, "-m", "fnexport", *args]


def inputs(args: argparse.Namespace, out: Path, make: bool) -> tuple[str, list[str], list[str]]:
    """The checkpoint, convert's data flags and parity's; with `make`, trains the digits T0 when none is given."""
    if args.checkpoint:
        data = ["--data", args.data] if args.data else []
        calib = ["--calib", args.calib] if args.calib else []
        return args.checkpoint, [*data, *calib], data
    ckpt = out / "fasternet_t0_digits.pth"
    train, test = split_digits(out) if make else (out / "digits-train", out / "digits-test")  # demo's names
    if make and not ckpt.exists():
        torch.save({"state_dict": train_digits(train).state_dict(), "labels": LABELS}, ckpt)
    pre = ["--crop-pct", "1.0", "--interpolation", "bilinear", "--calib-method", "percentile"]
    return str(ckpt), [*pre, "--data", str(test), "--calib", str(train)], ["--data", str(test)]


def trtexec_commands(trtexec: str, folder: Path, precision: str, imgsz: int, batches: list[int]) -> list[list[str]]:
    """Build once with fnexport's hand-off flags, then time each batch from the saved engine."""
    shape = ["batch", 3, imgsz, imgsz]
    engine = folder / "trtexec.engine"
    build = [trtexec, *trtexec_args(str(folder / "model.onnx"), str(engine), shape, precision, EngineOptions())]
    runs = [[trtexec, f"--loadEngine={engine}", f"--shapes=input:{b}x3x{imgsz}x{imgsz}"] for b in batches]
    return [[*build, "--skipInference"], *runs]


def run(cmd: list[str], capture: bool = True) -> subprocess.CompletedProcess:
    print("+ " + shlex.join(cmd), file=sys.stderr)
    return subprocess.run(cmd, capture_output=capture, text=True)


def trtexec_numbers(text: str) -> dict[str, float]:
    """Throughput (qps) and the medians of Latency and GPU Compute Time (ms) from trtexec's performance summary."""
    found = {}
    for key, pattern in (
        ("qps", rf"Throughput: {FLOAT} qps"),
        ("latency_ms", rf"Latency: min = {FLOAT} ms, max = {FLOAT} ms, mean = {FLOAT} ms, median = {FLOAT} ms"),
        (
            "compute_ms",
            rf"GPU Compute Time: min = {FLOAT} ms, max = {FLOAT} ms, mean = {FLOAT} ms, median = {FLOAT} ms",
        ),
    ):
        m = re.search(pattern, text)
        if m:
            found[key] = float(m.groups()[-1])
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--checkpoint", help="a trained FasterNet-T0 (default: train one on the bundled digits)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default 64 for digits, else 224)")
    parser.add_argument("--data", help="parity images (ImageFolder); default: held-out digits / embedded:natural")
    parser.add_argument("--calib", help="INT8 calibration images; default: digits train split / embedded:natural")
    parser.add_argument("--batch", default="1,32", help="batch sizes to time (default 1,32)")
    parser.add_argument(
        "--out", type=Path, default=Path("tensorrt-check"), help="work folder (default ./tensorrt-check)"
    )
    parser.add_argument("--dry-run", action="store_true", help="check prerequisites and print the commands only")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    imgsz = args.imgsz or (224 if args.checkpoint else 64)

    reason = preflight()
    if reason is not None:
        print(f"tensorrt_check: cannot run here: {reason.splitlines()[0]}", file=sys.stderr)
        return 3
    trtexec = find_trtexec()
    dirs = {p: args.out / f"t0-tensorrt-{p}" for p in ("fp16", "int8")}
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
    ckpt, convert_data, parity_data = inputs(args, args.out, make=not args.dry_run)
    converts = {
        p: fnexport("convert", ckpt, "-t", "tensorrt", "-p", p, "--imgsz", str(imgsz), "--dynamic", *convert_data,
                    "-o", str(d), "--json")
        for p, d in dirs.items()
    }  # fmt: skip
    parity = fnexport("parity", ckpt, *map(str, dirs.values()), *parity_data, "--json")
    bench = fnexport("bench", *map(str, dirs.values()), "--batch", args.batch, "--json")
    trt_cmds = {p: trtexec_commands(trtexec, d, p, imgsz, batches) for p, d in dirs.items()}
    if args.dry_run:
        for cmd in [*converts.values(), parity, bench, *(c for cmds in trt_cmds.values() for c in cmds)]:
            print(shlex.join(cmd), file=sys.stderr)
        return 0

    failed = []
    for p, cmd in converts.items():
        if run(cmd, capture=False).returncode != 0:
            failed.append(f"convert {p}")
    if failed:
        print(f"tensorrt_check: {', '.join(failed)} failed; see above", file=sys.stderr)
        return 1
    gate = run(parity)
    verdicts = {Path(r["dir"]).name: r for r in json.loads(gate.stdout or "[]")}
    speed = json.loads(run(bench).stdout or "{}").get("rows", [])
    trt: dict[tuple[str, int], dict[str, float]] = {}
    for p, (build_cmd, *timing) in trt_cmds.items():
        built = run(build_cmd)
        major = re.search(r"TensorRT version: (\d+)", built.stdout)
        if built.returncode != 0:
            failed.append(f"trtexec build {p}")
            continue
        like_fnexport = ["--includeDataTransfers", "--noCudaGraph"] if major and int(major.group(1)) >= 11 else []
        for b, cmd in zip(batches, timing, strict=True):
            done = run([*cmd, *like_fnexport])
            trt[(p, b)] = trtexec_numbers(done.stdout) if done.returncode == 0 else {}

    lines = [
        f"FasterNet-T0 at {imgsz} px, {ckpt}",
        "",
        "| precision | engine layers | parity | cosine | top-1 agree | batch | fnexport p50 ms | fnexport img/s"
        " | trtexec latency ms (median) | trtexec GPU compute ms (median) | trtexec img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, d in dirs.items():
        verdict = verdicts.get(d.name, {})
        report = verdict.get("report") or {}
        engine = json.loads((d / "manifest.json").read_text())["details"].get("engine", {})
        layers = (engine.get("layer_precisions") or {}).get("counts") or {}
        for b in batches:
            row = next((r for r in speed if Path(r.get("artifact", "")).parent == d and r.get("batch") == b), {})
            t = trt.get((p, b), {})
            lines.append(
                f"| {p} | {' '.join(f'{n} {k}' for k, n in layers.items()) or '-'} | {verdict.get('status', '?')} "
                f"| {report.get('cosine', float('nan')):.6f} "
                f"| {report.get('top1', float('nan')):.2%} | {b} | {row.get('latency_ms_p50', '-')} "
                f"| {row.get('throughput_ips', '-')} | {t.get('latency_ms', '-')} | {t.get('compute_ms', '-')} "
                f"| {round(t['qps'] * b, 1) if 'qps' in t else '-'} |"
            )
    print("\n".join(lines))
    if gate.returncode != 0:
        failed.append("parity gate")
    if failed:
        print(f"tensorrt_check: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
