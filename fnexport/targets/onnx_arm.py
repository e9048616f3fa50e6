"""ONNX Runtime for ARM and mobile: the ORT format model (.ort) and the operator list for a reduced build."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar

from fnexport.console import require
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Int8Plan, Source
from fnexport.targets.onnx import OrtRunner, int8_plans, quantize_plan

CONFIG_NAME = "model.required_operators.config"


class OnnxArmTarget:
    name: ClassVar[str] = "onnx-arm"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    pconv_form: ClassVar[str] = "split_cat"  # from fnexport's ONNX, see targets/onnx.py
    packages: ClassVar[dict[str, str]] = {"onnxruntime": "core", "onnxslim": "core"}

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        onnx_path = src.onnx()
        details: dict[str, Any] = {"source": "fnexport ONNX (split_cat, BatchNorm folded)", "opset": recipe.opset}
        if recipe.precision == "int8":
            # QDQ with signed 8-bit activations and weights (S8S8), per-channel weights, symmetric
            # activations: what ONNX Runtime recommends for ARM CPUs and XNNPACK.
            onnx_path = src.workdir / "int8.onnx"
            details["quantization"] = quantize_plan(src, onnx_path)
        details |= to_ort(onnx_path, src.workdir / "ort", out_dir)
        return Exported(out_dir / "model.ort", details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> OrtRunner:
        return OrtRunner(artifact, threads, spinning=alone)

    def int8_plans(self, recipe: Recipe, full: bool) -> list[Int8Plan]:
        return int8_plans(recipe, full)  # the same quantizer as onnx; ARM's kernels judge it apart


def to_ort(onnx_path: Path, workdir: Path, out_dir: Path) -> dict[str, Any]:
    """Convert with ONNX Runtime's own tool; write model.ort and its required-operators config into out_dir."""
    ort = require("onnxruntime", "onnx")
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "model.onnx"
    shutil.copyfile(onnx_path, model)
    # target_platform="arm": leaves out the x86-only NCHWc layout and allows int8 (S8S8) QDQ fusion.
    # Fixed style: optimizations are applied now; the Runtime style is only for the NNAPI/Core ML EPs.
    with contextlib.redirect_stdout(sys.stderr):  # the tool prints progress; stdout is for machine output
        convert_onnx_models_to_ort(
            model, output_dir=workdir, optimization_styles=[OptimizationStyle.Fixed], target_platform="arm"
        )
    shutil.copyfile(workdir / "model.ort", out_dir / "model.ort")
    # Its header names the model by the temp path it was made from; name the shipped file instead.
    config = (workdir / CONFIG_NAME).read_text().replace(str(workdir.resolve() / "model.ort"), "model.ort")
    (out_dir / CONFIG_NAME).write_text(config)
    return {
        "converter": f"onnxruntime.tools.convert_onnx_models_to_ort (onnxruntime {ort.__version__})",
        "optimization": "Fixed style, level all, target_platform arm",
        "required_operators": CONFIG_NAME,
        "ops": required_ops(out_dir / CONFIG_NAME),
    }


def required_ops(config: Path) -> dict[str, list[str]]:
    """Operators by `domain;opset` from a required_operators config (lines like `ai.onnx;18;Conv,Concat`)."""
    ops = {}
    for line in config.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops[f"{domain};{opset}"] = sorted(n.strip() for n in names.split(","))
    return ops
