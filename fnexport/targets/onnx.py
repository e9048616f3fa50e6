"""ONNX: fnexport's clean graph (BN folded, PConv as Split/Conv/Concat), run by ONNX Runtime."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fnexport import __version__
from fnexport.console import require
from fnexport.errors import FnexportError
from fnexport.recipes import Recipe

if TYPE_CHECKING:
    from fnexport.targets import Exported, Source

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Ops that must never reach an fnexport graph: BN is folded, ScatterND is the `slicing` PConv.
FORBIDDEN_OPS = ("BatchNormalization", "ScatterND")


def export_onnx(src: Source, path: Path) -> Path:
    """Export the reparameterized model to a single-file, simplified, checked ONNX with metadata."""
    import onnx
    import onnxslim

    recipe = src.recipe
    # split_cat, not slicing: slicing exports as ScatterND plus ~50 Shape/Range/Where nodes per
    # block, none removed by onnxsim/onnxslim, and the dynamo exporter then pins batch to 1.
    tmp = export_plain(
        src.module("split_cat"), path.with_suffix(".raw.onnx"), recipe.imgsz, recipe.batch, recipe.dynamic, recipe.opset
    )
    graph = onnxslim.slim(onnx.load(str(tmp)))
    tmp.unlink()
    # onnxslim 0.1.98 lists every value_info twice, which breaks onnxconverter-common's op blocking.
    unique = {v.name: v for v in graph.graph.value_info}
    del graph.graph.value_info[:]
    graph.graph.value_info.extend(unique.values())
    ops = Counter(n.op_type for n in graph.graph.node)
    bad = {op: ops[op] for op in FORBIDDEN_OPS if ops[op]}
    if bad:
        raise FnexportError(f"exported graph still holds {bad}; reparameterization missed a layer")
    meta = metadata(src)
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name, graph.producer_version = "fnexport", __version__
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return path


def export_plain(model, path: Path, imgsz: int, batch: int = 1, dynamic: bool = True, opset: int = 20) -> Path:
    """torch.onnx.export (dynamo) of `model` as it is, single file, stdout kept clean."""
    import torch

    x = torch.zeros(batch, 3, imgsz, imgsz)
    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    # The exporter prints progress on stdout, which is reserved for machine output, and warns
    # about torchvision ops this model never uses.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            **kwargs,
        )
    return path


def metadata(src: Source) -> dict[str, str]:
    """Model config and preprocessing as ONNX metadata props, so the file explains itself."""
    p = src.recipe.preprocess
    meta = {
        "fnexport.model": json.dumps(src.ckpt.config.to_dict(), sort_keys=True),
        "fnexport.preprocess": json.dumps(
            {
                "size": src.recipe.imgsz,
                "mean": list(p.mean),
                "std": list(p.std),
                "crop_pct": p.crop_pct,
                "interpolation": p.interpolation,
                "layout": "NCHW RGB float32",
            },
            sort_keys=True,
        ),
    }
    if src.ckpt.labels:
        meta["fnexport.labels"] = json.dumps(src.ckpt.labels)
    return meta


CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def quantize_int8(
    src_onnx: Path,
    out: Path,
    calib_x: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = True,
    weight_symmetric: bool = True,
    op_types: list[str] | None = None,
    extra_options: dict[str, Any] | None = None,
    nodes_to_exclude: list[str] | None = None,
) -> dict[str, Any]:
    """Static INT8 post-training quantization in QDQ format with ONNX Runtime; returns manifest details."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph = onnx.load(str(src_onnx))
    inp = graph.graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0]
    step_size = dim0.dim_value if dim0.HasField("dim_value") else 16

    batches = _fixed_batches(calib_x, step_size)
    n_batches = len(batches)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {inp.name: chunk}

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
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            op_types_to_quantize=op_types,
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
        "op_types": op_types or "default",
    }


def _fixed_batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    """Chunks of exactly `size` (the last padded by repeating its final image) for static-batch graphs."""
    chunks = []
    for i in range(0, len(x), size):
        part = x[i : i + size]
        if len(part) < size:
            part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)])
        chunks.append(np.ascontiguousarray(part, np.float32))
    return chunks


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


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).most_common())


class OrtRunner:
    """ONNX Runtime on CPU for `.onnx` and `.ort` files."""

    def __init__(self, artifact: Path, threads: int | None = None) -> None:
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(artifact), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.info = {
            "runtime": f"onnxruntime {ort.__version__}",
            "provider": self.session.get_providers()[0],
            "threads": threads or os.cpu_count(),
        }

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def close(self) -> None:
        del self.session


class OnnxTarget:
    name: ClassVar[str] = "onnx"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    pconv_form: ClassVar[str] = "split_cat"
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnxslim", "onnxscript")

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        from fnexport.targets import Exported

        path = out_dir / "model.onnx"
        details: dict[str, Any] = {"opset": recipe.opset, "pconv_form": self.pconv_form}
        if recipe.precision == "fp16":
            details |= convert_fp16(src.onnx(), path)
        elif recipe.precision == "int8":
            calib = src.calibration()
            # Symmetric INT8 activations and per-channel weights: what ORT's CPU kernels and
            # every other INT8 runtime (TensorRT, XNNPACK) accept without re-quantizing.
            details |= quantize_int8(src.onnx(), path, calib.x, method=recipe.calib_method)
            details["calibration_data"] = calib.source
            details["calibration_skipped"] = calib.skipped
        else:
            path.write_bytes(src.onnx().read_bytes())
        details["ops"] = op_counts(path)
        return Exported(path, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None) -> OrtRunner:
        return OrtRunner(artifact, threads)
