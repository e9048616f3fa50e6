"""Peak memory and speed of `fnexport parity` as the number of images grows, and the streaming reader's own rate.

python benchmarks/streaming.py [--sizes 1000,10000,50000] [--workdir DIR] [--out benchmarks/streaming.md]

Images are GENERATED, not ImageNet: 400x300 RGB JPEGs (quality 90) of smooth random colour fields plus noise,
written once into --workdir (about 25 KB each; ImageNet val averages ~110 KB at ~500x375, so decoding real
files costs somewhat more). The model is a random-weight FasterNet-T0 (BatchNorm statistics and head scaled
so logits are of order 1, as in benchmarks/gate_scale.py), converted to an ONNX FP32 artifact with a dynamic
batch at 224x224. Each size runs `fnexport parity CKPT ART --data DIR --samples N --json` in a fresh process,
whose peak RSS is read with getrusage(RUSAGE_CHILDREN) from a wrapper process of its own; images/s is N over
the command's wall time (start-up included). Then the reader alone (`ImageStream.batches(32)`: decode +
preprocess, nothing else) and `fnexport bench ART --batch 32` (throughput of the artifact on ready-made
inputs) give the two rates `val` has to combine: it needs both on the same 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.gate_scale import random_model
from fnexport.bench import describe_machine
from fnexport.data import Preprocess, open_images

ROOT = Path(__file__).resolve().parents[1]
PEAK = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True); "
    "print(json.dumps({'code': done.returncode, 'seconds': time.perf_counter() - t, "
    "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, 'stdout': done.stdout}))"
)


def generate(folder: Path, n: int) -> None:
    """n JPEGs named 000000.jpg...; the ones already there are kept (generation is the slow part)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(have)
    for i in range(have, n):
        small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((400, 300), Image.BICUBIC)
        noisy = np.asarray(small, np.int16) + rng.integers(-12, 12, (300, 400, 3), dtype=np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def fnexport(*args: str) -> dict:
    """Run `python -m fnexport ARGS` in a fresh process; its exit code, wall seconds, peak RSS and stdout."""
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "fnexport", *args]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout)


def reader_rate(images: Path, n: int, batch: int) -> float:
    """Images/s of the streaming reader alone: list, decode, preprocess, batch, nothing else."""
    stream = open_images(images, Preprocess(224), n, seed=1)
    start = time.perf_counter()
    count = sum(len(x) for x, _, _ in stream.batches(batch))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fnexport-streaming"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "streaming.md")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.workdir
    images = work / "images"
    start = time.perf_counter()
    generate(images, max(sizes))
    print(f"{max(sizes)} images in {images} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    ckpt, art = work / "t0.pth", work / "onnx"
    if not (art / "manifest.json").exists():
        torch.save(random_model("fasternet_t0", 0).state_dict(), ckpt)
        fnexport("convert", str(ckpt), "--dynamic", "-o", str(art))
    rows = []
    for n in sizes:
        saved = work / f"parity-{n}.json"  # a finished size is kept: 10,000 images take ~30 min on a busy 2-core box
        if not saved.exists():
            run = fnexport("parity", str(ckpt), str(art), "--data", str(images), "--samples", str(n), "--json")
            report = json.loads(run["stdout"])[0]["report"] if run["code"] == 0 else {}
            row = {"n": n, **{k: run[k] for k in ("code", "seconds", "peak_rss")}, "max_abs": report.get("max_abs")}
            saved.write_text(json.dumps(row))
        rows.append(json.loads(saved.read_text()))
        print(rows[-1], file=sys.stderr)
    reader = reader_rate(images, min(sizes), args.batch)
    bench = fnexport("bench", str(art), "--batch", str(args.batch), "--json")
    bench_ips = next(r["throughput_ips"] for r in json.loads(bench["stdout"])["rows"] if r.get("backend") == "onnx")
    machine = describe_machine(os.cpu_count() or 1)
    lines = [
        "# Streaming parity at scale",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(machine['isa'])}). Generated 400x300 JPEGs (not ImageNet), random-weight FasterNet-T0, "
        f"ONNX FP32 artifact (dynamic batch), 224x224, batches of {args.batch}. Command: "
        f"`python benchmarks/streaming.py --sizes {args.sizes}`.",
        "",
        "| images | `fnexport parity` peak RSS | wall time | images/s (start-up included) | max abs | exit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['peak_rss'] / 2**20:,.0f} MiB | {r['seconds']:.0f} s | {r['n'] / r['seconds']:.1f} "
            f"| {r['max_abs']:.1e} | {r['code']} |"
            if r["max_abs"] is not None
            else f"| {r['n']:,} | {r['peak_rss'] / 2**20:,.0f} MiB | {r['seconds']:.0f} s | - | - | {r['code']} |"
        )
    lines += [
        "",
        f"Streaming reader alone (decode + preprocess to 224, {min(sizes)} images, thread pool): "
        f"{reader:.0f} images/s. `fnexport bench` of the artifact at batch {args.batch}: {bench_ips:.0f} images/s.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
