"""Measure the scale-relative parity figure (max abs logit error / RMS of the reference logits) of healthy
reduced-precision artifacts, which the default `max_abs_rms` thresholds must pass with margin.

python benchmarks/gate_scale.py [--out benchmarks/gate_scale.md] [--workdir DIR]

Models: the digits-trained T0 the demo makes (150 steps, 10 classes; its head cut to its first 2 and 1 classes
too), and random-weight T0 and T2 (1000 classes, BatchNorm statistics and head scaled as in tests/conftest.py,
so logits are of order 1). Every installed target and reduced precision is converted at 64x64 with the gate
switched off (so every figure is recorded) and judged on the digits test split (trained models) or the
embedded natural images (random models). Logits scaled 5x score at least 4 by construction (see
fnexport/comparison.py::scaled_error); the table shows how far below that healthy artifacts stay.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from fnexport.bench import describe_machine
from fnexport.console import log, setup_logging
from fnexport.conversion import convert_checkpoint
from fnexport.demo import split_digits, train_digits
from fnexport.errors import BackendUnavailable, CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.model.fasternet import VARIANTS, FasterNet
from fnexport.recipes import Recipe, Tolerance

# The gate off: every figure is recorded, nothing fails.
OFF = Tolerance(atol=1e9, min_cosine=-1.0, min_top1=0.0, max_abs_rms=1e9)
RUNS = (
    ("onnx", "fp16", None),
    ("onnx", "int8", "onnxruntime"),
    ("openvino", "fp16", "openvino"),
    ("openvino", "bf16", "openvino"),
    ("openvino", "int8", "openvino"),
    ("onnx-arm", "int8", "onnxruntime"),
)


def random_model(variant: str, seed: int) -> FasterNet:
    """Random weights with non-trivial BatchNorm statistics and logits of order 1 (tests/conftest.py)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FasterNet(VARIANTS[variant])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.mul_(10)
    return model.eval()


def checkpoints(workdir: Path) -> list[tuple[str, Path, str]]:
    """(label, checkpoint file, parity data) for every model measured."""
    train, test = split_digits(workdir)
    digits = train_digits(train, steps=150)
    found = []
    for classes in (10, 2, 1):
        sd = digits.state_dict()
        sd["head.weight"], sd["head.bias"] = sd["head.weight"][:classes], sd["head.bias"][:classes]
        path = workdir / f"digits-{classes}.pth"
        torch.save(sd, path)
        found.append((f"digits T0, {classes} class{'es' if classes > 1 else ''}", path, str(test)))
    for variant, seed in (("fasternet_t0", 0), ("fasternet_t2", 1)):
        path = workdir / f"{variant}.pth"
        torch.save(random_model(variant, seed).state_dict(), path)
        found.append((f"random {variant.removeprefix('fasternet_').upper()}, 1000 classes", path, "embedded:natural"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--workdir", type=Path, help="keep checkpoints and artifacts here (default: a temp dir)")
    args = parser.parse_args()
    setup_logging()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gate-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        "| model | target | precision | max abs | max abs / logit RMS | worst cosine | top-1 agreement |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for label, path, data in checkpoints(workdir):
        ckpt = load_checkpoint(path)
        for target, precision, module in RUNS:
            if module and importlib.util.find_spec(module) is None:
                continue
            calib = {"calib": data, "calib_samples": 64, "calib_method": "percentile"} if precision == "int8" else {}
            recipe = Recipe(
                target=target, precision=precision, imgsz=64, parity_data=data, parity_samples=200, tolerance=OFF,
                **calib,
            )  # fmt: skip
            out = workdir / f"{path.stem}-{target}-{precision}"
            try:
                report = convert_checkpoint(dataclasses.replace(ckpt, labels=None), recipe, out).report
            except (BackendUnavailable, CheckFailed) as err:
                log.warning("%s %s %s: %s", label, target, precision, err)
                continue
            if report is None:
                continue
            top1 = "n/a" if report.top1 is None else f"{report.top1:.2%}"
            lines.append(
                f"| {label} | {target} | {precision} | {report.max_abs:.3g} | {report.max_abs_rms:.3g} "
                f"| {report.cosine:.5f} | {top1} |"
            )
            print(lines[-1], flush=True)
    machine = describe_machine(torch.get_num_threads())
    versions = ", ".join(
        f"{k} {v}" for k, v in machine["versions"].items() if k in ("torch", "onnxruntime", "openvino")
    )
    text = "\n".join([
        "# Parity error relative to the logit scale, measured on healthy artifacts",
        "",
        f"`python benchmarks/gate_scale.py --out {args.out}` (64x64; parity on 200 images: the digits test split for",
        "the trained models, the embedded natural photos for the random ones; INT8 calibrated on 64 images, percentile).",
        f"{machine['cpu']}, {machine['cores']} cores, ISA {' '.join(machine['isa'])}, load average "
        f"{os.getloadavg()[0]:.1f} at the end (these are errors, not timings); {versions}.",
        "`max abs / logit RMS` is the gate's `max_abs_rms`; defaults: fp16 0.02, bf16 0.1, int8 2.0. Logits scaled 5x",
        "score at least 4.",
        "",
        *lines,
        "",
    ])  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
