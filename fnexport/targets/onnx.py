"""ONNX: fnexport's clean graph (BN folded, PConv as Split/Conv/Concat), run by ONNX Runtime."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fnexport.console import require
from fnexport.data import batches
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Int8Plan, Source
from fnexport.targets.graph import layer_nodes, op_counts

CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def quantize_int8(
    src_onnx: Path,
    out: Path,
    calib_x: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = True,
    weight_symmetric: bool = True,
    op_types: tuple[str, ...] | None = None,
    extra_options: dict[str, Any] | None = None,
    nodes_to_exclude: list[str] | None = None,
) -> dict[str, Any]:
    """Static INT8 post-training quantization in QDQ format with ONNX Runtime; returns manifest details."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader, n_batches = calibration_reader(src_onnx, calib_x)
    options = {
        "ActivationSymmetric": symmetric_activations,
        "WeightSymmetric": weight_symmetric,
        # MinMax keeps every activation of every image unless capped (GBs at 224). ORT 1.31 raises
        # "No data is collected" when the batch count is a multiple of the cap, so avoid those.
        "CalibMaxIntermediateOutputs": next(k for k in range(16, 1, -1) if n_batches % k),
        **(extra_options or {}),
    }
    # ORT's recommended first step: shape inference and constant folding (same standard ops after).
    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(src_onnx), str(prepared), skip_optimization=False)
    with contextlib.redirect_stdout(sys.stderr):
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=nodes_to_exclude,
            extra_options=options,
        )
    prepared.unlink()
    return {
        "quantizer": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "int8 per-tensor " + ("symmetric" if symmetric_activations else "asymmetric"),
        "weights": "int8 "
        + ("per-channel" if per_channel else "per-tensor")
        + (" symmetric" if weight_symmetric else ""),
        "calibration_method": method,
        "calibration_samples": len(calib_x),
        "op_types": list(op_types) if op_types else "default",
    }


def calibration_reader(src_onnx: Path, calib_x: np.ndarray) -> tuple[Any, int]:
    """An ORT calibration data reader over `calib_x` in the graph's batch size (16 when dynamic), and its length."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    inp = onnx.load(str(src_onnx), load_external_data=False).graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0]
    chunks = [part for part, _ in batches(calib_x, dim0.dim_value if dim0.HasField("dim_value") else 16, pad=True)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(chunks)

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {inp.name: chunk}

    return Reader(), len(chunks)


def convert_fp16(src_onnx: Path, out: Path, keep_fp32_ops: tuple[str, ...] = ()) -> dict[str, Any]:
    """Weights and compute in FP16 (onnxconverter-common), FP32 inputs and outputs kept."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every weight it clips to the FP16 range
        graph = float16.convert_float_to_float16(
            onnx.load(str(src_onnx)), keep_io_types=True, op_block_list=list(keep_fp32_ops) or None
        )
    onnx.save(graph, str(out))
    return {"converter": "onnxconverter_common.float16", "io": "float32", "fp32_ops": list(keep_fp32_ops)}


# Quantized ops of the narrower ONNX Runtime plans: the convolutions and the head, nothing in between.
COMPUTE_OPS = ("Conv", "Gemm")


def int8_plans(recipe: Recipe, full: bool) -> list[Int8Plan]:
    """ONNX Runtime's INT8 settings in the order the search tries them (the first is the recipe's own).

    MinMax first (fastest to calibrate, best when ranges carry no outliers), then percentile (99.999%:
    clips rare outliers; passed on the ARM .ort of the hard T0 where MinMax failed), then entropy (KL
    divergence, slowest; passed on ONNX Runtime x86). `full` adds asymmetric activations, which fit GELU's
    one-sided outputs better but cost a zero-point on every activation. A pinned method is the only one.
    Then the same with only Conv and Gemm quantized (COMPUTE_OPS): the residual Adds, Concats, Splits and
    GELUs stay float, which removes most activation rounding (hard T0 at 64, percentile: cosine 0.984 ->
    0.990, top-1 91% -> 97%) and keeps the INT8 convolutions, where the time goes. Float layers come
    after these, on the best of them."""
    methods = [recipe.calib_method] if recipe.calib_method_pinned else ["minmax", "percentile", "entropy"]
    return [
        Int8Plan((("method", m), ("activations", act), ("ops", ops)), recipe.int8_exclude)
        for ops in ("all", "+".join(COMPUTE_OPS))
        for act in (("symmetric", "asymmetric") if full else ("symmetric",))
        for m in methods
    ]


def quantize_plan(src: Source, out: Path) -> dict[str, Any]:
    """Quantize fnexport's ONNX into `out` by the search's current plan (or the recipe's), float layers kept."""
    plan = src.int8_plan or int8_plans(src.recipe, full=False)[0]
    calib = src.calibration()
    nodes = layer_nodes(src.onnx())
    opts = plan.kwargs
    details = quantize_int8(
        src.onnx(),
        out,
        calib.x,
        method=opts["method"],
        symmetric_activations=opts["activations"] == "symmetric",
        op_types=None if opts["ops"] == "all" else tuple(opts["ops"].split("+")),
        nodes_to_exclude=[nodes[m] for m in plan.exclude],
    )
    return details | {
        "float_layers": list(plan.exclude),
        "calibration_data": calib.source,
        "calibration_skipped": calib.skipped,
    }


class OrtRunner:
    """ONNX Runtime on CPU for `.onnx` and `.ort` files."""

    def __init__(
        self,
        artifact: Path,
        threads: int | None = None,
        disabled_optimizers: tuple[str, ...] = (),
        spinning: bool = False,
    ) -> None:
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Idle pool threads spin (ORT's default) only when ORT has the cores to itself (bench: T0 batch 1 5.7 vs
        # 8.5 ms idle). Everywhere else fnexport runs ORT beside other work (decoding threads in val/predict/
        # parity, the PyTorch reference in the gate) and spinning threads take the cores that work needs:
        # on a busy 2-core machine, T0 224 batch 32 went 18 -> 59-85 images/s and val 16 -> 45-49 without.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(artifact), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled_optimizers)
        )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.info = {
            "runtime": f"onnxruntime {ort.__version__}",
            "provider": self.session.get_providers()[0],
            "threads": threads or os.cpu_count(),
            "spinning": spinning,
        } | ({"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {})

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return outs[0] if len(outs) == 1 else outs  # a backbone: its feature maps in stride order

    def close(self) -> None:
        del self.session


class OnnxTarget:
    name: ClassVar[str] = "onnx"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    pconv_form: ClassVar[str] = "split_cat"
    packages: ClassVar[dict[str, str]] = {
        "onnxruntime": "core",
        "onnxslim": "core",
        "onnxscript": "core",
        "onnxconverter-common": "core",
    }

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        path = out_dir / "model.onnx"
        details: dict[str, Any] = {"opset": recipe.opset, "pconv_form": self.pconv_form}
        if recipe.precision == "fp16":
            details |= convert_fp16(src.onnx(), path)
        elif recipe.precision == "int8":
            # Symmetric INT8 activations and per-channel weights by default: what ORT's CPU kernels and
            # every other INT8 runtime (TensorRT, XNNPACK) accept without re-quantizing.
            details |= quantize_plan(src, path)
        else:
            path.write_bytes(src.onnx().read_bytes())
        details["ops"] = op_counts(path)
        return Exported(path, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> OrtRunner:
        return OrtRunner(artifact, threads, spinning=alone)

    def int8_plans(self, recipe: Recipe, full: bool) -> list[Int8Plan]:
        return int8_plans(recipe, full)
