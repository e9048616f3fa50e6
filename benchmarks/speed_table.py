"""Reproduce the README speed table: FasterNet T0, T1, T2 at 224 on every installed backend, as Markdown.

python benchmarks/speed_table.py --out benchmarks/speed_table.md [--json raw.json] [--seconds 4] [--threads N]

Weights are random: speed does not depend on them, and nothing is downloaded. Each variant and batch size is
one `fnexport bench` run (PyTorch eager, the reparameterized model, and the fixed-batch artifact of every
target and precision that converts and runs here), so every ratio comes from interleaved rounds of one run;
--repeat N runs each N times and reports the median ratio and its range.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from fnexport.bench import bench
from fnexport.console import log, setup_logging
from fnexport.conversion import convert
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance
from fnexport.targets import TARGETS

VARIANTS = ("fasternet_t0", "fasternet_t1", "fasternet_t2")
# Random weights give near-uniform logits, so reduced-precision top-1 agreement means nothing here;
# parity is what the target tests check. FP32 keeps its absolute tolerance.
SPEED_ONLY = Tolerance(min_cosine=-1.0, min_top1=0.0, max_abs_rms=1e9)


def build(
    variant: str, workdir: Path, targets: set[str] | None, batches: tuple[int, ...]
) -> tuple[dict[int, list[str]], list[tuple[str, str]]]:
    """Convert one variant to every installed target and precision, one fixed-batch artifact per batch size
    (what a deployment ships; OpenVINO runs static shapes up to ~10% faster); returns ({batch: dirs}, skips)."""
    ckpt = load_checkpoint(variant)
    short = variant.removeprefix("fasternet_")
    dirs: dict[int, list[str]] = {b: [] for b in batches}
    notes = []
    for target in TARGETS:
        if targets and target.name not in targets:
            continue
        if target.name == "coreml" and sys.platform != "darwin":  # its runner needs the Core ML framework
            notes.append((f"{short.upper()} coreml", "Core ML prediction needs macOS"))
            continue
        if target.name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            notes.append(
                (f"{short.upper()} tensorrt", "TensorRT is not installed here (engines need an NVIDIA GPU host)")
            )
            continue
        for precision in target.precisions:
            for batch in batches:
                recipe = Recipe(
                    target=target.name,
                    precision=precision,
                    batch=batch,
                    calib="embedded:natural" if precision == "int8" else None,
                    calib_samples=32,
                    parity_samples=8,
                    tolerance=SPEED_ONLY if precision != "fp32" else Tolerance(),
                )
                out = workdir / f"{short}-{target.name}-{precision}-b{batch}"
                if (out / "manifest.json").exists():
                    dirs[batch].append(str(out))  # kept from an earlier run with the same --workdir
                    continue
                try:
                    convert(ckpt, recipe, out)
                except (BackendUnavailable, BadInput, CheckFailed) as err:
                    log.warning("%s %s %s batch %d: %s", variant, target.name, precision, batch, err)
                    why = str(err).split(";")[0].replace(str(out), "DIR")
                    notes.append((f"{short.upper()} {target.name} {precision} b{batch}", why))
                    continue
                dirs[batch].append(str(out))
    return dirs, notes


def table(results: list[list[dict]], batches: tuple[int, ...]) -> str:
    """One line per model, backend and precision; latency at the smallest batch, throughput at the largest.

    `results` holds one list of repeated bench runs per variant. Every ratio is taken within one run; the
    table gives the median over runs and, with several runs, the range."""
    small, large = min(batches), max(batches)
    head = (
        f"| Model | GMACs | Backend | Precision | PConv | Latency b{small} p50 ms | vs eager "
        f"| img/s b{large} | vs eager | GFLOPS b{large} | % FP32 peak |"
    )
    lines = [head, "|---|--:|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for runs in results:
        rows = [r for run in runs for r in run["rows"] if not r["skipped"]]
        keys = dict.fromkeys((r["model"], r["kind"], r["backend"], r["precision"]) for r in rows)
        for key in keys:
            mine = [r for r in rows if (r["model"], r["kind"], r["backend"], r["precision"]) == key]
            lo = [r for r in mine if r["batch"] == small]
            hi = [r for r in mine if r["batch"] == large]
            model, kind, backend, precision = key
            backend += f" {kind}" if kind != "artifact" else ""
            # The reparameterized row keeps the faster PConv form per batch; name every form that won.
            form = "/".join(dict.fromkeys(r["pconv_form"] for r in lo + hi))
            mark = "" if precision == "fp32" else "*"
            lines.append(
                f"| {model.removeprefix('fasternet_').upper()} | {mine[0]['macs'] / 1e9:.3f} | {backend} "
                f"| {precision} | {form} "
                + (f"| {median(lo, 'latency_ms_p50'):.2f} | {ratio(lo)} " if lo else "| - | - ")
                + (
                    f"| {median(hi, 'throughput_ips'):.1f} | {ratio(hi)} | {median(hi, 'gflops'):.1f} "
                    f"| {median(hi, 'pct_of_fp32_peak'):.0f}%{mark} |"
                    if hi
                    else "| - | - | - | - |"
                )
            )
    return "\n".join(lines)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def ratio(rows: list[dict]) -> str:
    """Speedup vs eager: the median over runs, and the range when there are several."""
    values = [r["speedup_vs_eager"] for r in rows]
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}x{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/speed_table.md"))
    parser.add_argument("--json", type=Path, help="Also write the raw bench results here.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--targets", help="Comma-separated targets (default: every registered one).")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeat", type=int, default=1, help="Bench runs per variant (ratios: median and range).")
    parser.add_argument("--workdir", type=Path, help="Keep artifacts here and reuse them on the next run.")
    args = parser.parse_args()
    setup_logging()
    batches = tuple(int(b) for b in args.batch.split(","))
    targets = set(args.targets.split(",")) if args.targets else None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fnexport-speed-"))
    results, notes = [], []
    for variant in args.variants.split(","):
        dirs, skipped = build(variant, workdir, targets, batches)
        notes += skipped
        log.info("Benchmarking %s: PyTorch and %d artifacts", variant, sum(map(len, dirs.values())))
        # One bench per batch size: eager and the artifacts of that batch interleaved. Loading every runtime
        # for every batch into one process slowed the batch-1 rows by up to 1.5x (OpenVINO INT8 T0: 2.8-3.1
        # ms beside batch-16 models, 1.9-2.1 ms without), which no deployment sees.
        results.append(
            [
                bench([variant, *dirs[b]], (b,), args.threads, seconds=args.seconds)
                for _ in range(args.repeat)
                for b in batches
            ]
        )
    runs = [run for variant_runs in results for run in variant_runs]
    m = runs[0]["machine"]
    peaks = ", ".join(f"{r['machine']['fp32_gemm_peak_gflops']:g}" for r in runs)
    loads = ", ".join(f"{r['machine']['load_avg_1m']['before']}-{r['machine']['load_avg_1m']['after']}" for r in runs)
    others = ", ".join(f"{r['machine']['other_processes_cpu_pct']}%" for r in runs)
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    text = [
        f"Measured on {m['cpu']} ({m['cores']} cores, {m['threads']} threads used; ISA {' '.join(m['isa'])}"
        + (f"; GPU {m['gpu']}" if m["gpu"] else "")
        + f"), {versions}.",
        f"{len(runs)} bench runs ({args.repeat} per model and batch size). FP32 GEMM peak per run: {peaks} GFLOPS. Load average "
        f"(1 min) before-after each run: {loads}; CPU used by other processes while timing: {others}.",
        f"Command: `python {shlex.join(sys.argv)}` ({os.path.basename(sys.executable)}).",
        "",
        table(results, batches),
        "",
        "\\* INT8/bf16/fp16 rows are put against the FP32 GEMM peak: over 100% is possible and means the",
        "lower precision buys more than FP32 can reach. `vs eager`: throughput ratio to PyTorch eager FP32",
        "(the model as loaded, BatchNorm unfolded) in the same interleaved run; with several runs, the median",
        "ratio and its range over runs. Latency, img/s and GFLOPS are medians over runs.",
    ]
    for variant_runs in results:
        # Each artifact has one fixed batch; its "fixed batch" skips at the other sizes are by design.
        notes += dict.fromkeys(
            (r["name"], r["skipped"])
            for run in variant_runs
            for r in run["rows"]
            if r["skipped"] and r["batch"] is None
        )
    if notes:
        reasons: dict[str, list[str]] = {}
        for what, why in notes:
            reasons.setdefault(why, []).append(what)
        text += ["", "Not measured here:", *(f"- {', '.join(whats)}: {why}" for why, whats in reasons.items())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
