"""Peak memory and speed of `fnexport parity` and `fnexport val` as the number of images grows.

python -m benchmarks.streaming [--sizes 600,6000,1000,10000,50000] [--jobs parity,val] [--workdir DIR]
                               [--out benchmarks/streaming.md]

Images are GENERATED, not ImageNet: 400x300 RGB JPEGs (quality 90) of smooth random colour fields plus noise,
in 10 class folders (c0 ... c9), written once into --workdir (about 25 KB each; ImageNet val averages ~110 KB
at ~500x375, so decoding real files costs somewhat more). The model is a random-weight FasterNet-T0 (BatchNorm
statistics and head scaled so logits are of order 1, as in benchmarks/gate_scale.py), converted to an ONNX
FP32 artifact with a dynamic batch at 224x224. Each size runs, each in a fresh process,
`fnexport parity CKPT ART --data DIR --samples N --json` and `fnexport val ART --data DIR --samples N --json`
(the class folders map to outputs 0-9 in sorted order; the accuracy of random weights means nothing here).
Peak RSS is read with getrusage(RUSAGE_CHILDREN) from a wrapper process of its own; images/s is N over the
command's wall time (start-up and model load included). Then the reader alone (`ImageStream.batches(32)`:
decode + preprocess, nothing else) and `fnexport bench ART --batch 32` (throughput of the artifact on
ready-made inputs) give the two rates `val` has to combine on the same cores.
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
    """n JPEGs c{i % 10}/{i:06d}.jpg; the ones already there are kept (generation is the slow part)."""
    have = len(list(folder.glob("c*/*.jpg")))
    rng = np.random.default_rng(have)
    for c in range(10):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(have, n):
        small = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((400, 300), Image.BICUBIC)
        noisy = np.asarray(small, np.int16) + rng.integers(-12, 12, (300, 400, 3), dtype=np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            folder / f"c{i % 10}" / f"{i:06d}.jpg", quality=90
        )


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


def measure(job: str, n: int, ckpt: Path, art: Path, images: Path, batch: int) -> dict:
    """One fresh process of `fnexport parity` or `fnexport val` on a seeded sample of n images."""
    if job == "parity":
        run = fnexport("parity", str(ckpt), str(art), "--data", str(images), "--samples", str(n), "--json")
        figure = "max_abs"
        report = json.loads(run["stdout"])[0]["report"] if run["code"] == 0 else {}
    else:
        run = fnexport("val", str(art), "--data", str(images), "--samples", str(n), "--batch", str(batch), "--json")
        figure = "top1"
        report = json.loads(run["stdout"]) if run["code"] == 0 else {}
    return {
        "job": job,
        "n": n,
        **{k: run[k] for k in ("code", "seconds", "peak_rss")},
        "figure": figure,
        "value": report.get(figure),
        "own_ips": report.get("images_per_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="600,6000,1000,10000,50000")
    parser.add_argument("--jobs", default="parity,val")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fnexport-streaming"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "streaming.md")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    jobs = args.jobs.split(",")
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
        for job in jobs:
            saved = work / f"{job}-{n}.json"  # a finished run is kept: 10,000 parity images take ~30 min on a busy box
            if not saved.exists():
                saved.write_text(json.dumps(measure(job, n, ckpt, art, images, args.batch)))
            rows.append(json.loads(saved.read_text()))
            print(rows[-1], file=sys.stderr)
    reader = reader_rate(images, min(sizes), args.batch)
    bench = fnexport("bench", str(art), "--batch", str(args.batch), "--json")
    bench_ips = next(r["throughput_ips"] for r in json.loads(bench["stdout"])["rows"] if r.get("backend") == "onnx")
    machine = describe_machine(os.cpu_count() or 1)
    lines = [
        "# Streaming parity and val at scale",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(machine['isa'])}). Generated 400x300 "
        "JPEGs in 10 class folders (not ImageNet), random-weight FasterNet-T0, ONNX FP32 artifact (dynamic batch), "
        f"224x224, batches of {args.batch}. Command: `python -m benchmarks.streaming --sizes {args.sizes} "
        f"--jobs {args.jobs}`.",
        "",
        "| command | images | peak RSS | wall time | images/s (wall, start-up included) | images/s (its own figure) "
        "| result | exit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["job"], r["n"])):
        value = "-" if r["value"] is None else f"{r['figure']} {r['value']:.3g}"
        own = "-" if r["own_ips"] is None else f"{r['own_ips']:.1f}"
        lines.append(
            f"| `{r['job']}` | {r['n']:,} | {r['peak_rss'] / 2**20:,.0f} MiB | {r['seconds']:.0f} s "
            f"| {r['n'] / r['seconds']:.1f} | {own} | {value} | {r['code']} |"
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
