"""INT8 that ships: try a target's calibration settings, then keep the most sensitive layers in float, until
the artifact passes the INT8 gate against PyTorch on the parity images (which the calibration never sees)."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fnexport.comparison import ParityReport, check, labels_for, reference, run, tolerance_for
from fnexport.console import log
from fnexport.errors import BadInput, CheckFailed
from fnexport.recipes import Recipe, Tolerance
from fnexport.targets.base import Exported, Int8Plan, Source, Target

# Seconds of search before it gives up, checked before each candidate (a started candidate finishes).
# quick: the settings a target tries by default, then float layers (T0 at 224 with 52 calibration images:
# ~10 s per candidate on 2 quiet cores, 30-40 s when other jobs share them); full: every setting, more layers.
BUDGET_S = {"quick": 300.0, "full": 1200.0}
# Where the CPU that converts is the CPU that runs, so a latency measured here means something. The
# onnx-arm artifact runs on ARM: timing it on the x86 build machine would say nothing about phones.
SPEED_TARGETS = ("onnx", "openvino")
SPEED_ROUNDS, SPEED_CALLS = 5, 8


@dataclass
class Candidate:
    """One INT8 setting tried: its gate figures, the time it took, and (if it passed) its latency."""

    plan: Int8Plan
    report: ParityReport
    seconds: float
    exported: Exported
    accuracy_drop: float | None = None  # max_drop: FP32 top-1 minus INT8 top-1 on the held-out labelled images
    failures: list[str] = field(default_factory=list)
    latency_ms: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def rank(self) -> tuple:
        """Better candidates sort higher: passing first, then top-1 agreement, then worst cosine."""
        r = self.report
        return (self.passed, 1.0 if r.top1 is None else r.top1, r.cosine, -r.max_abs_rms)

    def figures(self) -> str:
        r = self.report
        top1 = "n/a" if r.top1 is None else f"{r.top1:.1%}"
        drop = "" if self.accuracy_drop is None else f", accuracy drop {self.accuracy_drop:.1%}"
        return f"cos {r.cosine:.4f} top-1 {top1} abs/RMS {r.max_abs_rms:.2f}{drop}"

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return self.plan.to_dict() | {
            "passed": self.passed,
            "cosine": r.cosine,
            "top1": r.top1,
            "max_abs_rms": r.max_abs_rms,
            "accuracy_drop": self.accuracy_drop,
            "failures": self.failures,
            "seconds": round(self.seconds, 2),
            "latency_ms": self.latency_ms,
        }


def applies(src: Source, target: Target) -> bool:
    """The search drives a classifier's INT8 on targets that offer settings; OpenVINO's max_drop is NNCF's own
    loop. Backbones (feature maps, judged per output) are quantized once with the recipe's settings."""
    recipe = src.recipe
    return (
        not src.ckpt.config.features
        and recipe.precision == "int8"
        and recipe.int8_search != "off"
        and hasattr(target, "int8_plans")
        and not (target.name == "openvino" and recipe.max_drop is not None)
    )


def check_request(src: Source) -> None:
    """Before any long work: --int8-exclude names modules of this model, --max-drop has labelled images."""
    recipe = src.recipe
    if recipe.int8_exclude:
        valid = src.layer_names()
        unknown = [n for n in recipe.int8_exclude if n not in valid]
        if unknown:
            raise BadInput(
                f"--int8-exclude {','.join(unknown)}: not a Conv2d/Linear module of this model; valid names: "
                + ", ".join(valid)
            )
    if recipe.max_drop is not None and recipe.target != "openvino" and held_out(src) is None:
        raise BadInput(
            f"--max-drop needs a labelled --calib folder (one subfolder per class, matching the model's "
            f"{src.ckpt.config.num_classes} classes or its labels, at least 8 images); {recipe.calib} has none"
        )


def held_out(src: Source) -> tuple[np.ndarray, np.ndarray] | None:
    """max_drop's validation images and their model class indices (labelled, never calibrated on)."""
    val = src.validation()
    labels = None if val is None else labels_for(src.ckpt.labels, src.ckpt.config.num_classes, val)
    return None if labels is None else (val.x, labels)


def search(src: Source, target: Target, recipe: Recipe, out_dir: Path) -> tuple[Exported, dict[str, Any]]:
    """Try settings in the target's order, then float layers by sensitivity; move the chosen artifact into
    `out_dir`. CheckFailed, naming the best candidate's figures, when nothing passes within the budget."""
    level = recipe.int8_search
    budget, start = BUDGET_S[level], time.perf_counter()
    tol = with_margin(tolerance_for("int8", recipe.tolerance))
    validation = held_out(src) if recipe.max_drop is not None else None
    fp32_accuracy = None
    if validation is not None:
        fp32_accuracy = float(np.mean(reference(src.ckpt.model, validation[0]).argmax(1) == validation[1]))
    tried: list[Candidate] = []

    def over_budget() -> bool:
        return time.perf_counter() - start >= budget

    def attempt(plan: Int8Plan) -> Candidate:
        cand = evaluate(src, target, recipe, plan, tol, len(tried), validation, fp32_accuracy)
        tried.append(cand)
        log.info(
            "INT8 #%d %s: %s, %.1fs %s", len(tried), plan.describe(), cand.figures(), cand.seconds,
            "PASS" if cand.passed else "FAIL",
        )  # fmt: skip
        return cand

    for plan in target.int8_plans(recipe, full=level == "full"):
        if over_budget():
            break
        if attempt(plan).passed and level == "quick":
            break
    passing = [c for c in tried if c.passed]
    ranking: list[dict[str, Any]] = []
    if not passing and not over_budget():
        base = max(tried, key=Candidate.rank)
        ranking = sensitivity(src)
        exclude = list(base.plan.exclude)
        anyway = target.float_anyway(src) if hasattr(target, "float_anyway") else set()
        for row in ranking:
            if over_budget():
                break
            if row["module"] in exclude or row["module"] in anyway:
                continue
            exclude.append(row["module"])
            if attempt(dataclasses.replace(base.plan, exclude=tuple(exclude))).passed:
                passing = [tried[-1]]
                break
    record: dict[str, Any] = {
        "search": level,
        "budget_s": budget,
        "seconds": round(time.perf_counter() - start, 1),
        "judged_on": f"{len(src.parity_inputs().x)} parity images ({src.parity_inputs().source}), not calibrated on",
        "candidates": [c.to_dict() for c in tried],
        "sensitivity": [{"module": r["module"], "rel_error": r["rel_error"]} for r in ranking],
    }
    if fp32_accuracy is not None:
        record["max_drop"] = {"max_drop": recipe.max_drop, "images": len(validation[0]), "fp32_accuracy": fp32_accuracy}
    if not passing:
        best = max(tried, key=Candidate.rank)
        raise CheckFailed(
            f"{target.name} int8: none of {len(tried)} INT8 candidates passed the gate within the {level} search "
            f"({record['seconds']:.0f} s of a {budget:.0f} s budget); best: {best.plan.describe()}: {best.figures()} "
            f"({'; '.join(best.failures)}). Try --int8-search full, more representative --calib images, "
            "or --precision fp16/fp32"
        )
    if target.name in SPEED_TARGETS:
        record["speed"] = measure_speed(src, target, recipe, passing)
        record["candidates"] = [c.to_dict() for c in tried]  # now with the latencies
    chosen = min(passing, key=lambda c: c.latency_ms or 0.0)  # fastest among those that pass
    record["chosen"] = chosen.to_dict()
    record["float_layers"] = list(chosen.plan.exclude)
    exported = move(chosen.exported, out_dir)
    if hasattr(target, "write_prepared"):  # TensorRT: the chosen prepared ONNX's own check, then engine or hand-off
        exported = target.finish(src, exported, recipe)
    return exported, record


def with_margin(tol: Tolerance) -> Tolerance:
    """The gate a candidate must pass: half the distance to a perfect cosine and half the error bound of the
    INT8 gate. The search judges on the convert-time parity sample (32 images by default), and a worst
    cosine only falls on a larger sample: an OpenVINO candidate of the hard T0 at 224 had 0.9806 on 32
    images and 0.962 on the 84 `fnexport parity` uses. Top-1 agreement keeps its threshold (on 32 images
    one more step is already 3 points)."""
    update: dict[str, float] = {}
    if tol.min_cosine is not None:
        update["min_cosine"] = 1 - (1 - tol.min_cosine) / 2
    if tol.max_abs_rms is not None:
        update["max_abs_rms"] = tol.max_abs_rms / 2
    return tol.model_copy(update=update)


def evaluate(
    src: Source,
    target: Target,
    recipe: Recipe,
    plan: Int8Plan,
    tol: Tolerance,
    index: int,
    validation: tuple[np.ndarray, np.ndarray] | None,
    fp32_accuracy: float | None,
) -> Candidate:
    """Export one candidate into its own folder and judge it like convert's parity check does."""
    start = time.perf_counter()
    folder = src.workdir / f"int8-candidate-{index}"
    folder.mkdir()
    src.int8_plan = plan
    staged = hasattr(target, "write_prepared")  # TensorRT: candidates are prepared ONNX files, judged on ORT CPU
    try:
        exported = target.write_prepared(src, folder, recipe) if staged else target.export(src, folder, recipe)
    finally:
        src.int8_plan = None
    runner = (
        target.candidate_runner(exported) if staged else target.runner(exported.path, {"details": exported.details})
    )
    drop = None
    if validation is not None:
        drop = fp32_accuracy - float(np.mean(run(runner, validation[0]).argmax(1) == validation[1]))
    report = check(runner, src.parity_inputs().x, src.reference(), tol, src.labels())  # closes the runner
    failures = list(report.failures)
    if drop is not None and drop > recipe.max_drop:
        failures.append(f"top-1 accuracy drop {drop:.1%} > max_drop {recipe.max_drop:.1%}")
    return Candidate(plan, report, time.perf_counter() - start, exported, drop, failures)


SENSITIVITY_IMAGES = 16


@torch.no_grad()
def sensitivity(src: Source) -> list[dict[str, Any]]:
    """Conv/Linear layers, most sensitive first: quantizing one layer at a time in PyTorch (INT8 weights per
    output channel, INT8 input per tensor from its calibration max, both symmetric), the relative squared
    error of the logits against the float model, on calibration images (never the parity images).

    One forward pass per layer, so T0 at 224 takes seconds; the error of each layer alone, which an error
    measured inside a fully quantized graph is not (there every layer carries what flows in from upstream)."""
    model = copy.deepcopy(src.module("split_cat")).eval()
    x = torch.from_numpy(src.calibration().x[:SENSITIVITY_IMAGES])
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    ranges: dict[str, float] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, n=n: ranges.__setitem__(n, float(args[0].abs().max())))
        for n, m in layers
    ]
    ref = model(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, layer in layers:
        weight = layer.weight.data.clone()
        dims = tuple(range(1, weight.ndim))
        scale = weight.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / 127
        layer.weight.data = (weight / scale).round().clamp(-127, 127) * scale
        step = max(ranges[name], 1e-12) / 127
        hook = layer.register_forward_pre_hook(lambda m, args, s=step: ((args[0] / s).round().clamp(-127, 127) * s,))
        err = float(((model(x) - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-12))
        hook.remove()
        layer.weight.data = weight
        rows.append({"module": name, "rel_error": err})
    ranked = sorted(rows, key=lambda row: -row["rel_error"])
    log.info(
        "INT8 sensitivity, one layer quantized at a time (relative logit error): %s",
        ", ".join(f"{r['module']} {r['rel_error']:.2e}" for r in ranked[:5]),
    )
    return ranked


def measure_speed(src: Source, target: Target, recipe: Recipe, passing: list[Candidate]) -> dict[str, Any]:
    """Latency of each passing candidate beside the same target's FP32 artifact, interleaved (median over
    rounds of the mean of a few calls); warns when INT8 is not faster here."""
    folder = src.workdir / "int8-fp32"
    folder.mkdir()
    fp32 = target.export(src, folder, recipe.model_copy(update={"precision": "fp32"}))
    runners = [target.runner(fp32.path, {"details": fp32.details})] + [
        target.runner(c.exported.path, {"details": c.exported.details}) for c in passing
    ]
    x0 = src.parity_inputs().x[:1]
    try:
        times: list[list[float]] = [[] for _ in runners]
        for runner in runners:
            runner(np.repeat(x0, runner.batch or 1, axis=0))  # warm-up: first calls allocate
        for _ in range(SPEED_ROUNDS):
            for runner, spent in zip(runners, times, strict=True):
                x = np.repeat(x0, runner.batch or 1, axis=0)
                t = time.perf_counter()
                for _ in range(SPEED_CALLS):
                    runner(x)
                spent.append((time.perf_counter() - t) / SPEED_CALLS * 1000)
    finally:
        for runner in runners:
            runner.close()
    fp32_ms, *int8_ms = (statistics.median(t) for t in times)
    for cand, ms in zip(passing, int8_ms, strict=True):
        cand.latency_ms = round(ms, 3)
    best = min(int8_ms)
    speed = {
        "fp32_ms": round(fp32_ms, 3),
        "int8_ms": round(best, 3),
        "speedup": round(fp32_ms / best, 3),
        "batch": runners[0].batch or 1,
        "method": f"interleaved, median of {SPEED_ROUNDS} rounds of {SPEED_CALLS} calls, on the converting machine",
    }
    if best >= fp32_ms:
        speed["warning"] = (
            f"INT8 ({best:.2f} ms) is not faster than FP32 ({fp32_ms:.2f} ms) on this CPU; "
            "on CPUs without VNNI/AMX INT8 often is not: measure on the deployment CPU or ship FP32"
        )
        log.warning("%s %s", target.name, speed["warning"])
    else:
        log.info("%s INT8 %.2f ms vs FP32 %.2f ms (%.2fx)", target.name, best, fp32_ms, fp32_ms / best)
    return speed


def move(exported: Exported, out_dir: Path) -> Exported:
    """The chosen candidate's files into the output directory; its artifact path follows."""
    folder = exported.path.parent
    for item in folder.iterdir():
        shutil.move(str(item), out_dir / item.name)
    return dataclasses.replace(exported, path=out_dir / exported.path.name)
