"""Speed side by side: latency, throughput, achieved GFLOPS and speedup vs PyTorch eager, all interleaved."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import fnexport.manifest as mf
from fnexport.console import log, require, step
from fnexport.errors import BackendUnavailable, BadInput, what_is
from fnexport.model.checkpoint import Checkpoint, load_checkpoint
from fnexport.model.fasternet import PCONV_FORMS, FasterNet, FasterNetConfig, Partial_conv3, count, hw
from fnexport.model.reparam import reparameterize
from fnexport.recipes import MAX_BATCH, MAX_IMGSZ
from fnexport.targets import get_target

DEFAULT_BATCHES = (1, 16)
DEFAULT_SECONDS = 4.0
# Each configuration runs this long per round; short slices interleave finely so drift cancels.
SLICE_S = 0.2
# Calls per configuration per round when --iters fixes the count instead of the time.
ITER_ROUNDS = 10
# Threads of the runtime that ran last keep spinning for a few ms (libgomp, ONNX Runtime's pool);
# a pause between slices lets them sleep so they do not steal cores from the next configuration.
SETTLE_S = 0.005
# Warm-up stops early past this, so a slow eager batch cannot eat the run's time budget.
WARMUP_MAX_S = 1.0
MAX_SECONDS = 3600.0
GEMM_N = 1024
ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",
)  # fmt: skip


@dataclass
class Group:
    """One model at one input size: its PyTorch reference and the baseline every speedup divides by."""

    label: str
    model: FasterNet
    imgsz: int | tuple[int, int]  # (height, width) for a non-square backbone
    macs: int
    sha256: str | None = None
    accuracy: float | None = None


@dataclass
class Config:
    """One thing to time: a call on a fixed batch, and the row it becomes."""

    row: dict[str, Any]
    call: Callable[[], object]
    group: Group | None = None
    times: list[float] = field(default_factory=list)
    per_call: float = 0.0


def bench(
    inputs: list[str | Checkpoint],
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    threads: int | None = None,
    warmup: int = 3,
    iters: int | None = None,
    seconds: float | None = None,
    imgsz: int = 224,
    act: str | None = None,
    unsafe_load: bool = False,
) -> dict[str, Any]:
    """Time every input (checkpoint, variant name, artifact directory or loaded Checkpoint); {"machine", "rows"}."""
    check_options(inputs, batches, warmup, iters, seconds, imgsz, threads)
    seconds = DEFAULT_SECONDS if iters is None and seconds is None else seconds
    threads = threads or available_cores()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    plan = Plan()
    try:
        with step("Loading models and artifacts"):
            for spec in inputs:
                if not isinstance(spec, Checkpoint) and Path(spec).is_dir():
                    plan.add_artifact(Path(spec), batches, threads)
                    continue
                ckpt = spec if isinstance(spec, Checkpoint) else load_checkpoint(spec, act=act, unsafe_load=unsafe_load)
                plan.group_for(ckpt.config, imgsz, ckpt.name, ckpt)
            for group in plan.groups.values():
                plan.configs += pytorch_configs(group, batches)
        gemms = gemm_configs()
        before = cpu_times()
        with torch.inference_mode(), threadpool_limits(threads, user_api="blas"):
            measure([*plan.configs, *gemms], warmup, iters, seconds)
        others = other_cpu_pct(before, cpu_times())
    finally:
        for runner in plan.runners:
            runner.close()
        torch.set_num_threads(old_threads)
    gemm = {c.row["name"]: 2 * GEMM_N**3 / float(np.median(c.times)) / 1e9 for c in gemms}
    peak = max(gemm.values())
    info = describe_machine(threads) | {
        "fp32_gemm_peak_gflops": round_sig(peak),
        "fp32_gemm": f"{GEMM_N}x{GEMM_N} float32 matmul, {threads} threads, median of the same rounds; the better of "
        + ", ".join(f"{k} {round_sig(v)}" for k, v in gemm.items())
        + " GFLOPS",
        "load_avg_1m": {"before": load, "after": round(os.getloadavg()[0], 2) if load is not None else None},
        "other_processes_cpu_pct": others,
        "timing": {
            "warmup_calls": warmup,
            "iters": iters,
            "seconds_per_row": seconds,
            "interleaved": f"round-robin in shuffled order, {SLICE_S:g} s slices",
            "throughput": "batch / median call time",
        },
    }
    return {"machine": info, "rows": summarize(plan.configs, peak) + plan.skipped}


def check_options(
    inputs: list,
    batches: tuple[int, ...],
    warmup: int,
    iters: int | None,
    seconds: float | None,
    imgsz: int,
    threads: int | None = None,
) -> None:
    if iters is not None and seconds is not None:
        raise BadInput("give --iters or --seconds, not both")
    if not inputs:
        raise BadInput("give at least one checkpoint, variant name or artifact directory")
    if not batches or min(batches) < 1 or max(batches) > MAX_BATCH:
        raise BadInput(f"--batch {','.join(map(str, batches))}: batch sizes must be 1..{MAX_BATCH}")
    # `not seconds > 0` also refuses nan, which no comparison would ever stop on.
    if seconds is not None and not (0 < seconds <= MAX_SECONDS):
        raise BadInput(f"--seconds {seconds}: give seconds per configuration in (0, {MAX_SECONDS:g}]")
    if (iters is not None and iters < 1) or warmup < 0:
        raise BadInput("--iters must be positive, --warmup >= 0")
    if threads is not None and threads < 1:
        raise BadInput(f"--threads {threads}: give a number of threads >= 1")
    if imgsz < 32 or imgsz % 32 or imgsz > MAX_IMGSZ:
        raise BadInput(f"--imgsz {imgsz}: FasterNet needs a multiple of 32, at most {MAX_IMGSZ}")


# What matplotlib writes with fnexport's mark in the file's metadata, so a later --plot knows it may replace it.
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
PLOT_MARK = "fnexport bench"


def check_plot(path: Path) -> None:
    """Before any timing: --plot names a .png/.svg/.pdf in an existing folder, new or an earlier plot of ours."""
    require("matplotlib", "bench")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise BadInput(f"--plot {path}: use a {', '.join(PLOT_SUFFIXES)} file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"--plot {path}: its folder {parent}: {what_is(parent)}; create it first")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise BadInput(f"--plot {path}: {what_is(path)}")
        if PLOT_MARK.encode() not in path.read_bytes():
            raise BadInput(f"--plot {path}: exists and is not a plot fnexport wrote; choose a new file name")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_times() -> tuple[float, float, float] | None:
    """Machine busy and total CPU seconds (Linux /proc/stat) and this process's own CPU seconds."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()
    return (sum(fields) - idle) / tick, sum(fields) / tick, own.user + own.system


def other_cpu_pct(before: tuple | None, after: tuple | None) -> float | None:
    """Share of the machine's CPU time other processes used while timing: noise to quote beside the numbers."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return round(max(0.0, 100 * (busy - own) / total), 1)


@dataclass
class Plan:
    """What one bench run times: models by architecture and size, their configs, skipped rows, open runners."""

    groups: dict[tuple, Group] = field(default_factory=dict)
    configs: list[Config] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    runners: list[Any] = field(default_factory=list)

    def group_for(
        self, cfg: FasterNetConfig, imgsz: int | tuple[int, int], label: str, ckpt: Checkpoint | None = None
    ) -> Group:
        h, w = hw(imgsz)
        imgsz = h if h == w else (h, w)
        key = (json.dumps(cfg.to_dict(), sort_keys=True), imgsz)
        if key not in self.groups:
            # Speed does not depend on the weights, so an artifact alone is compared with its architecture.
            model = ckpt.model if ckpt else FasterNet(cfg).eval()
            self.groups[key] = Group(label, model, imgsz, count(model, imgsz)[1], ckpt.sha256 if ckpt else None)
        return self.groups[key]

    def add_artifact(self, path: Path, batches: tuple[int, ...], threads: int) -> None:
        """An artifact directory beside the PyTorch model of its architecture and size."""
        manifest = mf.read(path)
        cfg = FasterNetConfig(**{k: v for k, v in manifest["model"].items() if k not in ("params", "macs", "variant")})
        # A backbone is timed at its exported size (a --dynamic-hw one would take any).
        size = manifest["input"]["size"] if manifest.get("kind") == "backbone" else manifest["recipe"]["imgsz"]
        group = self.group_for(cfg, size, cfg.variant)
        parity = manifest.get("parity", {})
        if (
            group.accuracy is None
            and parity.get("ref_accuracy") is not None
            and group.sha256 in (None, manifest["source"]["sha256"])
        ):
            group.accuracy = parity["ref_accuracy"]
        configs, skipped, runner = artifact_configs(path, manifest, group, batches, threads)
        self.configs += configs
        self.skipped += skipped
        if runner is not None:
            self.runners.append(runner)


def artifact_configs(
    path: Path, manifest: dict, group: Group, batches: tuple[int, ...], threads: int
) -> tuple[list[Config], list[dict[str, Any]], Any]:
    """The artifact's runner and one config per batch it can take, a skipped row per other (or one, unrunnable)."""
    target = get_target(manifest["target"])
    base = {
        "name": path.name,
        "kind": "artifact",
        "model": group.model.cfg.variant,
        "backend": target.name,
        "precision": manifest["precision"],
        "imgsz": group.imgsz,
        "macs": manifest["model"]["macs"],
        "pconv_form": manifest.get("details", {}).get("pconv_form", target.pconv_form),
        "accuracy": manifest.get("parity", {}).get("accuracy"),
        "artifact": str(path / manifest["artifact"]),
    }
    try:
        runner = target.runner(path / manifest["artifact"], manifest, threads, alone=True)
    except BackendUnavailable as err:
        log.warning("Skipping %s: %s", path, err)
        return [], [base | {"batch": None, "skipped": str(err)}], None
    base["runtime"] = dict(runner.info)
    configs, skipped = [], []
    for b in batches:
        if runner.batch not in (None, b):
            reason = f"artifact has a fixed batch of {runner.batch}; convert with --batch {b} or --dynamic where {target.name} offers them"
            skipped.append(base | {"batch": b, "skipped": reason})
            continue
        x = random_batch(group.imgsz, b)
        configs.append(Config(base | {"batch": b}, lambda runner=runner, x=x: runner(x), group))
    return configs, skipped, runner


def pytorch_configs(group: Group, batches: tuple[int, ...]) -> list[Config]:
    """Eager FP32 as loaded (the baseline), and the reparameterized model in each PConv form."""
    loaded_form = next(m.form for m in group.model.modules() if isinstance(m, Partial_conv3))
    models = [("eager", loaded_form, group.model.eval())]
    models += [("reparam", form, reparameterize(group.model, form)) for form in PCONV_FORMS]
    configs = []
    for b in batches:
        x = torch.from_numpy(random_batch(group.imgsz, b))
        for kind, form, model in models:
            row = {
                "name": f"{group.label} {kind}",
                "kind": kind,
                "model": group.model.cfg.variant,
                "backend": "pytorch",
                "precision": "fp32",
                "imgsz": group.imgsz,
                "batch": b,
                "macs": group.macs,
                "pconv_form": form,
                "accuracy": group.accuracy,
                "runtime": {"runtime": f"torch {torch.__version__} eager", "threads": torch.get_num_threads()},
            }
            configs.append(Config(row, lambda model=model, x=x: model(x), group))
    return configs


def random_batch(imgsz: int | tuple[int, int], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, *hw(imgsz)), dtype=np.float32)


def gemm_configs() -> list[Config]:
    """FP32 matmuls at the bench's thread count: the machine's own compute limit, timed in the same rounds."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    an, bn = a.numpy(), b.numpy()
    # Both, because the best BLAS differs by CPU: on a 2-core EPYC (Zen 4) torch's MKL reached 173
    # GFLOPS and numpy's OpenBLAS 193, near the cores' 2 x 32 FLOP/cycle limit.
    return [Config({"name": "torch"}, lambda: torch.mm(a, b)), Config({"name": "numpy"}, lambda: an @ bn)]


def measure(configs: list[Config], warmup: int, iters: int | None, seconds: float | None) -> None:
    """Warm every config up, then run short slices of each in shuffled round-robin until all are done."""
    for c in configs:
        start = time.perf_counter()
        for _ in range(warmup):
            c.call()
            if time.perf_counter() - start > WARMUP_MAX_S:
                break
        start = time.perf_counter()
        c.call()
        c.per_call = time.perf_counter() - start
    rng = np.random.default_rng(0)
    spent = dict.fromkeys(range(len(configs)), 0.0)
    todo = list(range(len(configs)))
    rounds = 0
    while todo:
        rounds += 1
        for i in rng.permutation(todo):
            c = configs[i]
            if iters is not None:
                n = min(math.ceil(iters / ITER_ROUNDS), iters - len(c.times))
            else:
                n = max(1, round(SLICE_S / max(c.per_call, 1e-6)))
            time.sleep(SETTLE_S)
            for _ in range(n):
                start = time.perf_counter()
                c.call()
                elapsed = time.perf_counter() - start
                c.times.append(elapsed)
                spent[i] += elapsed
            # Re-estimate from this slice: one slow warm-up call must not shrink every later slice to one call.
            c.per_call = float(np.median(c.times[-n:]))
        todo = [i for i in todo if (len(configs[i].times) < iters if iters is not None else spent[i] < seconds)]
    log.info("Timed %d configurations in %d interleaved rounds", len(configs), rounds)


def summarize(configs: list[Config], peak: float) -> list[dict[str, Any]]:
    """Percentiles, throughput, GFLOPS and speedups; of the two reparameterized PConv forms only the faster is kept."""
    for c in configs:
        ms = np.array(c.times) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        ips = c.row["batch"] * 1e3 / p50
        gflops = 2 * c.row["macs"] * ips / 1e9
        c.row |= {
            "latency_ms_p50": round_sig(p50),
            "latency_ms_p90": round_sig(p90),
            "latency_ms_p99": round_sig(p99),
            "throughput_ips": round_sig(ips),
            "gflops": round_sig(gflops),
            "pct_of_fp32_peak": round_sig(100 * gflops / peak),
            "calls": len(c.times),
            "skipped": None,
        }
    kept = []
    for c in configs:
        slot = [d for d in configs if d.group is c.group and d.row["batch"] == c.row["batch"]]
        if c.row["kind"] == "reparam":
            rivals = [d.row for d in slot if d.row["kind"] == "reparam"]
            if min(rivals, key=lambda r: r["latency_ms_p50"]) is not c.row:
                continue
            c.row["pconv_forms_ms_p50"] = {r["pconv_form"]: r["latency_ms_p50"] for r in rivals}
        eager = next(d.row for d in slot if d.row["kind"] == "eager")
        c.row["speedup_vs_eager"] = round_sig(c.row["throughput_ips"] / eager["throughput_ips"])
        kept.append(c.row)
    return kept


def round_sig(x: float) -> float:
    """Four significant digits: finer than timing noise, coarse enough to read."""
    return float(f"{x:.4g}")


def describe_machine(threads: int) -> dict[str, Any]:
    """What the numbers were measured on, so they can be compared later."""
    cpu, flags = platform.processor() or platform.machine(), set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in ("", platform.processor(), platform.machine()):
                cpu = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": available_cores(),
        "threads": threads,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "gpu": gpu,
        "os": platform.platform(),
        "versions": mf.versions("numpy", "onnxruntime", "openvino", "nncf", "tensorrt", "coremltools"),
    }


def tabulate_speed(result: dict[str, Any]) -> str:
    """The result as a Markdown table, with the machine above it and skipped rows below."""
    m = result["machine"]
    load = m["load_avg_1m"]
    lines = [
        f"{m['cpu']}, {m['threads']} of {m['cores']} threads, ISA {' '.join(m['isa']) or '-'}"
        + (f", GPU {m['gpu']}" if m["gpu"] else ""),
        f"FP32 GEMM peak {m['fp32_gemm_peak_gflops']:g} GFLOPS; load average {load['before']} before, {load['after']} after; "
        f"other processes used {m['other_processes_cpu_pct']}% of the CPU while timing",
        "",
        "| name | backend | precision | PConv | batch | p50 ms | p90 ms | p99 ms | img/s | GMACs | GFLOPS | % FP32 peak | vs eager |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    measured = [r for r in result["rows"] if not r["skipped"]]
    for r in measured:
        mark = "" if r["precision"] == "fp32" else "*"
        lines.append(
            f"| {r['name']} | {r['backend']} | {r['precision']} | {r['pconv_form'] or '-'} | {r['batch']} "
            f"| {r['latency_ms_p50']:.2f} | {r['latency_ms_p90']:.2f} | {r['latency_ms_p99']:.2f} "
            f"| {r['throughput_ips']:.1f} | {r['macs'] / 1e9:.3f} | {r['gflops']:.1f} "
            f"| {r['pct_of_fp32_peak']:.0f}%{mark} | {r['speedup_vs_eager']:.2f}x |"
        )
    if any(r["precision"] != "fp32" for r in measured):
        lines.append("\n\\* against the FP32 GEMM peak, although the row computes in lower precision.")
    forms = [r for r in measured if "pconv_forms_ms_p50" in r]
    for r in forms:
        text = ", ".join(f"{k} {v:.2f} ms" for k, v in r["pconv_forms_ms_p50"].items())
        lines.append(f"\nPConv forms in eager, {r['name']}, batch {r['batch']} (p50): {text}; kept {r['pconv_form']}.")
    for r in result["rows"]:
        if r["skipped"]:
            lines.append(
                f"\nSkipped {r['name']}" + (f" at batch {r['batch']}" if r["batch"] else "") + f": {r['skipped']}"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Latency vs accuracy (when every point has one) or vs MACs, one marker per backend/precision."""
    require("matplotlib", "bench")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in result["rows"] if not r["skipped"]]
    if not measured:
        raise BadInput("--plot: no row was measured, nothing to draw")
    batch = min(r["batch"] for r in measured)
    rows = [r for r in measured if r["batch"] == batch]
    by_accuracy = all(r.get("accuracy") is not None for r in rows)
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = f"{r['backend']} {r['precision']}" + (f" {r['kind']}" if r["kind"] != "artifact" else "")
        if any(p["model"] == r["model"] for p in series.get(label, [])):
            label = r["name"]  # a second artifact of the same model: its own point, not a line to it
        series.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = "o^sDv<>pP*Xh"
    for i, (label, points) in enumerate(series.items()):
        points.sort(key=lambda r: r["macs"])
        xs = [r["latency_ms_p50"] for r in points]
        ys = [100 * r["accuracy"] if by_accuracy else r["macs"] / 1e9 for r in points]
        # The paper's figures: one line per family across model sizes, markers at each model.
        ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=7, linewidth=1.5, label=label)
        for r, x, y in zip(points, xs, ys, strict=True):
            short = r["model"].removeprefix("fasternet_").upper()
            ax.annotate(short, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    m = result["machine"]
    ax.set_xlabel(f"Latency (ms), batch {batch}, p50")
    ax.set_ylabel("Top-1 accuracy (%)" if by_accuracy else "MACs (G)")
    ax.set_title(f"{m['cpu']}, {m['threads']} threads", fontsize=10)
    ax.grid(True, linestyle="--", alpha=0.5)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    # Uncompressed metadata with fnexport's mark: check_plot finds it and lets a rerun replace the file.
    key = "Software" if path.suffix.lower() == ".png" else "Creator"
    fig.savefig(path, dpi=150, metadata={key: PLOT_MARK})
    plt.close(fig)
    return path
