"""OpenVINO IR for x86 CPUs: FP32/FP16 weights run in f32, bf16 where the CPU has it, INT8 by NNCF."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from fnexport.comparison import labels_for
from fnexport.console import log, require
from fnexport.data import ImageSet
from fnexport.errors import BadInput
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Int8Plan, Source
from fnexport.targets.graph import onnx_metadata

IR_DIR, XML = "openvino_model", "model.xml"
# Precision -> (weights stored in the IR, CPU inference precision the artifact needs). OpenVINO's
# CPU plugin defaults to bf16 on AVX512-BF16/AMX CPUs (max abs logit error 1e-2 on the digits T0
# vs 5e-6 in f32), so every artifact names its execution precision and the runner enforces it.
# INT8 keeps f32 for its unquantized ops at little cost: T0 224 batch 1 ran 2.43/2.58 ms vs
# 2.40/2.43 ms with bf16 (two runs, EPYC, 2 threads).
PLANS = {"fp32": ("fp32", "f32"), "fp16": ("fp16", "f32"), "bf16": ("fp32", "bf16"), "int8": ("int8", "f32")}


def cpu_capabilities(ov: ModuleType) -> list[str]:
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def export_ir(src: Source, out_dir: Path, recipe: Recipe) -> Exported:
    """Convert fnexport's ONNX to an IR directory (model.xml + model.bin) at the recipe's precision."""
    ov = require("openvino", "openvino")
    weights, hint = PLANS[recipe.precision]
    if hint == "bf16" and "BF16" not in cpu_capabilities(ov):
        raise BadInput(
            f"--precision bf16: this CPU ({ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}) cannot run bf16 "
            f"(OpenVINO capabilities: {', '.join(cpu_capabilities(ov))}); it needs AVX512-BF16 or AMX. "
            "Use --precision fp32 or int8 here."
        )
    # From the ONNX, not the PyTorch module: both give the same graph (T0: 44 Convolution, 13
    # VariadicSplit/Concat; 166 vs 163 ops, the ONNX has 3 more Constants) and the same latency, and
    # the ONNX is the checked export with the input/output names and metadata every target shares.
    model = ov.convert_model(str(src.onnx()))
    for key, value in onnx_metadata(src.ckpt, recipe).items():
        model.set_rt_info(value, ["fnexport", key.removeprefix("fnexport.")])
    details: dict[str, Any] = {
        "format": "OpenVINO IR",
        "converted_from": "fnexport ONNX (split_cat, BatchNorm folded)",
        "pconv_form": OpenVinoTarget.pconv_form,
        "weights": weights,
        "inference_precision_hint": hint,
        # THROUGHPUT pays only when a batch is split over parallel requests, which needs a dynamic
        # batch: one request under THROUGHPUT gets one stream's threads (T0 224, static batch 16,
        # 2 threads: 131 ms vs 66 ms under LATENCY; INT8 42 vs 24.5 ms). Split, it matched LATENCY
        # on a quiet 2-core machine and was 20-25% faster while other processes loaded it.
        "performance_hint": "THROUGHPUT" if recipe.dynamic and recipe.batch > 1 else "LATENCY",
    }
    if recipe.precision == "int8":
        model, quant = quantize(ov, model, src)
        details |= quant
    ir = out_dir / IR_DIR
    ir.mkdir()
    ov.save_model(model, str(ir / XML), compress_to_fp16=weights == "fp16")
    details["files"] = sorted(p.name for p in ir.iterdir())
    details["ops"] = dict(Counter(op.get_type_name() for op in model.get_ordered_ops()).most_common())
    return Exported(ir, details)


def quantize(ov: ModuleType, model: Any, src: Source) -> tuple[Any, dict[str, Any]]:
    """INT8 post-training quantization with NNCF on the recipe's calibration images."""
    recipe = src.recipe
    # NNCF's logger binds the stdout of the moment it is imported; stdout carries only machine output.
    with contextlib.redirect_stdout(sys.stderr):
        nncf = require("nncf", "openvino")
    calib = src.calibration()
    shape = model.inputs[0].get_partial_shape()
    batched = list(shape.to_shape()) if shape.is_static and shape[0].get_length() != 1 else None
    if batched:
        # Calibrate one image per item whatever the artifact's batch: NNCF's range statistics
        # differ with the item batch size, and the batch is restored below.
        model.reshape({0: [1, *batched[1:]]})
    plan = src.int8_plan or int8_plans(recipe, full=False)[0]
    settings = plan.kwargs
    ops = weighted_ops(model)
    options = {
        "preset": getattr(nncf.QuantizationPreset, settings["preset"].upper()),
        "fast_bias_correction": settings["bias_correction"] == "fast",
        "subset_size": len(calib.x),
        "target_device": nncf.TargetDevice.CPU,
    }
    if settings["range"] == "histogram":
        # Activation ranges from NNCF's histogram estimator instead of the min/max over the images.
        options["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
            activations_range_estimator_params=nncf.quantization.range_estimator.RangeEstimatorParametersSet.HISTOGRAM
        )
    if plan.exclude:
        options["ignored_scope"] = nncf.IgnoredScope(names=[ops[m] for m in plan.exclude])
    details: dict[str, Any] = {
        "quantizer": f"nncf.quantize (nncf {nncf.__version__})",
        "preset": settings["preset"],
        "bias_correction": settings["bias_correction"],
        "activation_range": settings["range"],
        "float_layers": list(plan.exclude),
        "subset_size": len(calib.x),
        "calibration": {"data": calib.source, "samples": len(calib.x), "skipped": len(calib.skipped)},
    }
    with contextlib.redirect_stdout(sys.stderr):
        if recipe.max_drop is None:
            quantized = nncf.quantize(model, nncf.Dataset([calib.x[i : i + 1] for i in range(len(calib.x))]), **options)
        else:
            items = labelled_items(src, calib)
            dataset = nncf.Dataset(items, lambda item: item[0])
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, dataset, top1, max_drop=recipe.max_drop, drop_type=nncf.DropType.ABSOLUTE, **options
            )
            details["quantizer"] = f"nncf.quantize_with_accuracy_control (nncf {nncf.__version__})"
            details["accuracy_control"] = {
                "max_drop": recipe.max_drop,
                "drop_type": "absolute, top-1 accuracy",
                "validation": f"the {len(items)} labelled calibration images",
                "accuracy_fp32": top1_accuracy(ov, model, items),
                "accuracy_int8": top1_accuracy(ov, quantized, items),
            }
    if batched:
        quantized.reshape({0: batched})
    return quantized, details


# Classifier layers kept in float by the third candidate: the stem, the 1280-wide pre-head 1x1 conv and the
# head Linear. On an official-code T0 NNCF MIXED with these three float passed the gate (0.984 / 98.8%), and
# the head is the sensitive part; leaving only the two head layers float was not enough on the hard T0 at 64
# (histogram ranges: cosine 0.985 but top-1 93.8%).
HEAD_AND_STEM = ("patch_embed.proj", "avgpool_pre_head.1", "head")


def int8_plans(recipe: Recipe, full: bool) -> list[Int8Plan]:
    """NNCF settings in the order the search tries them (the first is today's default).

    1. PERFORMANCE, min/max ranges: on two digits-trained T0s (360 held-out images) it kept 99.7% top-1
       agreement with FP32 both times, MIXED 98.9% and 99.7%; symmetric activations, fastest kernels.
    2. MIXED (asymmetric activations: GELU's one-sided outputs keep more levels) with NNCF's HISTOGRAM
       activation range estimator (ranges that minimise the quantization error of each activation's
       histogram instead of covering its extremes). Hard T0 at 64 (seed 1): 0.9856 vs 0.977 for PERFORMANCE
       min/max; PERFORMANCE histogram 0.9805.
    3. The same with HEAD_AND_STEM in float (plus any --int8-exclude). Hard T0 at 64: 0.9914 / 100%, passes;
       with min/max ranges the same three float layers gave 0.9711, so the estimator matters more than them.
    `full` first adds MIXED min/max and PERFORMANCE histogram, then repeats everything with NNCF's full bias
    correction instead of the fast one (slower to calibrate). After these the search keeps more layers float
    by sensitivity, starting from the best candidate.
    SmoothQuant is left out: NNCF applies it to transformer MatMuls (model_type TRANSFORMER), and
    FasterNet's only MatMul is the head, whose input is a pooled feature, not an activation with outliers.
    Leaving the residual Adds float (IgnoredScope types=["Add"], what ONNX Runtime's Conv+Gemm plans do)
    changed nothing on the hard T0 at 224 (worst cosine 0.9758 vs 0.9759), so it is not a candidate."""
    extra = tuple(m for m in HEAD_AND_STEM if m not in recipe.int8_exclude)
    settings = [("performance", "minmax", ()), ("mixed", "histogram", ())] + [("mixed", "histogram", extra)] * bool(
        extra
    )
    if full:
        settings[2:2] = [("mixed", "minmax", ()), ("performance", "histogram", ())]
    return [
        Int8Plan((("preset", preset), ("bias_correction", bias), ("range", rng)), recipe.int8_exclude + more)
        for bias in (("fast", "full") if full else ("fast",))
        for preset, rng, more in settings
    ]


def weighted_ops(model: Any) -> dict[str, str]:
    """PyTorch module name -> OpenVINO op name of each Convolution/MatMul: the op's weight Constant keeps the
    ONNX initializer's name ("head.weight"), while op names come from ONNX nodes ("node_conv2d/WithoutBiases")."""
    ops = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul"):
            weight = op.input_value(1).get_node()
            if weight.get_type_name() == "Constant" and weight.get_friendly_name().endswith(".weight"):
                ops[weight.get_friendly_name().removesuffix(".weight")] = op.get_friendly_name()
    return ops


def labelled_items(src: Source, calib: ImageSet) -> list[tuple[np.ndarray, int]]:
    """(image, model class index) pairs for accuracy control; needs class subfolders the model knows."""
    labels = labels_for(src.ckpt.labels, src.ckpt.config.num_classes, calib)
    if labels is None:
        raise BadInput(
            f"--max-drop needs a labelled calibration folder (one subfolder per class, matching the model's "
            f"{src.ckpt.config.num_classes} classes or its labels); {calib.source} has none that match"
        )
    return [(calib.x[i : i + 1], int(labels[i])) for i in range(len(calib.x))]


def top1(compiled: Any, items: Any) -> tuple[float, list[float]]:
    """NNCF validation function: top-1 accuracy, and a hit (1.0/0.0) per item."""
    hits = [float(np.argmax(compiled(x)[0]) == y) for x, y in items]
    return float(np.mean(hits)), hits


def top1_accuracy(ov: ModuleType, model: Any, items: list[tuple[np.ndarray, int]]) -> float:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return top1(compiled, items)[0]


class OvRunner:
    """OpenVINO CPU runner that executes in the precision the manifest names and reports what ran."""

    def __init__(self, artifact: Path, hint: str, performance: str, threads: int | None = None) -> None:
        ov = require("openvino", "openvino")
        core = ov.Core()
        model = core.read_model(str(artifact / XML if artifact.is_dir() else artifact))
        dim0 = model.inputs[0].get_partial_shape()[0]
        self.batch = dim0.get_length() if dim0.is_static else None
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": performance}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        count = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if self.batch is None else 1
        self.requests = [self.compiled.create_infer_request() for _ in range(count)]
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if ran != hint:
            log.warning("OpenVINO runs this artifact in %s, not the %s its manifest asks for", ran, hint)
        self.info = {
            "runtime": f"openvino {ov.get_version()}",
            "device": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "precision": ran,
            "precision_requested": hint,
            "performance_hint": performance,
            "streams": int(self.compiled.get_property("NUM_STREAMS")),
            "requests": count,
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
        }

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        n_out = len(self.compiled.outputs)
        if len(self.requests) == 1 or len(x) == 1:
            result = self.requests[0].infer({0: x})
            outs = [result[i] for i in range(n_out)]
        else:
            # Dynamic batch under THROUGHPUT: one slice per stream, run in parallel, joined in order.
            parts = np.array_split(x, min(len(self.requests), len(x)))
            busy = self.requests[: len(parts)]
            for request, part in zip(busy, parts, strict=True):
                request.start_async({0: part})
            for request in busy:
                request.wait()
            outs = [np.concatenate([r.get_output_tensor(i).data.copy() for r in busy]) for i in range(n_out)]
        return outs[0] if n_out == 1 else outs  # a backbone: its feature maps in stride order

    def close(self) -> None:
        del self.requests, self.compiled


class OpenVinoTarget:
    name: ClassVar[str] = "openvino"
    # bf16 only where OpenVINO reports BF16 for this CPU; export refuses it elsewhere.
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "bf16", "int8")
    pconv_form: ClassVar[str] = "split_cat"  # the ONNX's form; `slicing` converts to 461 ops (13 ScatterNDUpdate)
    packages: ClassVar[dict[str, str]] = {"openvino": "openvino", "nncf": "openvino"}

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        return export_ir(src, out_dir, recipe)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> OvRunner:
        details = manifest["details"]
        return OvRunner(artifact, details["inference_precision_hint"], details["performance_hint"], threads)

    def int8_plans(self, recipe: Recipe, full: bool) -> list[Int8Plan]:
        return int8_plans(recipe, full)
