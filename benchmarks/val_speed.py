"""`fnexport val` throughput against `fnexport bench` throughput of the same artifact at the same batch size.

python benchmarks/val_speed.py [--variant fasternet_t0] [--images 1000] [--batch 16] [--threads 2] [--repeat 3] [--workdir DIR]

Generated images (not photos, say so when quoting): ImageNet-sized JPEGs (500x375, quality 90, smooth content
so they compress like photos, ~40 KB), in 10 class folders. The artifact is a random-weight FasterNet (T0 by default) at 224,
ONNX FP32 with a dynamic batch. Each repeat runs `fnexport bench ART --batch B` and `fnexport val ART --batch B`
as separate processes, one after the other (the machine is shared: compare within a repeat). val's images/s is
its own figure (decode, preprocessing and inference of every image, process start and model load excluded);
bench's is batch / median call time on a prepared batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"class{i % 10}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 6, (375, 500, 3))
        Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def fnexport(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "fnexport", *args, "--json"], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"fnexport {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="fasternet_t0", help="random weights of this FasterNet variant")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fnexport-val-speed")
    args = ap.parse_args()
    images, art = args.workdir / f"images-{args.images}", args.workdir / f"{args.variant}-224-dynamic"
    make_images(images, args.images)
    if not (art / "manifest.json").exists():
        fnexport("convert", args.variant, "--imgsz", "224", "--dynamic", "-o", str(art))
    common = ["--batch", str(args.batch), "--threads", str(args.threads)]
    rows = []
    for _ in range(args.repeat):
        timed = fnexport("bench", str(art), *common, "--seconds", "5")
        bench_ips = next(r["throughput_ips"] for r in timed["rows"] if r["kind"] == "artifact" and not r["skipped"])
        val_ips = fnexport("val", str(art), "--data", str(images), *common)["images_per_s"]
        rows.append((bench_ips, val_ips, val_ips / bench_ips))
    print(
        f"{args.variant} 224 ONNX FP32, batch {args.batch}, {args.threads} threads, {args.images} generated JPEGs 500x375\n"
    )
    print("| repeat | bench images/s | val images/s | val / bench |\n|---|---|---|---|")
    for i, (b, v, r) in enumerate(rows, 1):
        print(f"| {i} | {b:.1f} | {v:.1f} | {r:.0%} |")
    print(f"\nmedian val / bench: {statistics.median(r for _, _, r in rows):.0%}")


if __name__ == "__main__":
    main()
