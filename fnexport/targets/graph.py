"""fnexport's FP32 ONNX graph, the starting point of every target: BN folded, PConv as Split/Conv/Concat."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from fnexport.errors import FnexportError
from fnexport.model.checkpoint import Checkpoint
from fnexport.model.fasternet import FasterNet, FasterNetConfig, hw
from fnexport.recipes import MAX_IMGSZ, Recipe
from fnexport.version import __version__

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Ops that must never reach an fnexport graph: BN is folded, ScatterND is the `slicing` PConv.
FORBIDDEN_OPS = ("BatchNormalization", "ScatterND")


def export_onnx(model: FasterNet, path: Path, recipe: Recipe, meta: dict[str, str]) -> Path:
    """Export a reparameterized `split_cat` model to a single-file, simplified, checked ONNX with metadata."""
    import onnx
    import onnxslim

    # split_cat, not slicing: slicing exports as ScatterND plus ~50 Shape/Range/Where nodes per
    # block, none removed by onnxsim/onnxslim, and the dynamo exporter then pins batch to 1.
    tmp = export_plain(
        model,
        path.with_suffix(".raw.onnx"),
        recipe.imgsz,
        recipe.batch,
        recipe.dynamic,
        recipe.opset,
        recipe.dynamic_hw,
    )
    graph = onnxslim.slim(onnx.load(str(tmp)))
    tmp.unlink()
    if recipe.dynamic_hw:
        name_dims(graph, model)
    # onnxslim 0.1.98 lists every value_info twice, which breaks onnxconverter-common's op blocking.
    unique = {v.name: v for v in graph.graph.value_info}
    del graph.graph.value_info[:]
    graph.graph.value_info.extend(unique.values())
    ops = Counter(n.op_type for n in graph.graph.node)
    bad = {op: ops[op] for op in FORBIDDEN_OPS if ops[op]}
    if bad:
        raise FnexportError(f"exported graph still holds {bad}; reparameterization missed a layer")
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name, graph.producer_version = "fnexport", __version__
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return path


def output_names(cfg: FasterNetConfig) -> list[str]:
    """`logits` for a classifier; feat_s4 ... feat_s32 (stride order) for a backbone."""
    return [o["name"] for o in cfg.outputs()] if cfg.features else [OUTPUT_NAME]


def name_dims(graph: Any, model: FasterNet) -> None:
    """Readable dynamic dimensions: input height/width, outputs height/4 ... (the exporter writes 32*h32, 8*s39)."""
    inp = graph.graph.input[0].type.tensor_type.shape.dim
    inp[2].dim_param, inp[3].dim_param = "height", "width"
    for out, spec in zip(graph.graph.output, model.cfg.outputs(), strict=True):
        dims = out.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = f"height/{spec['stride']}", f"width/{spec['stride']}"


def export_plain(
    model: FasterNet,
    path: Path,
    imgsz: int | tuple[int, int],
    batch: int = 1,
    dynamic: bool = True,
    opset: int = 20,
    dynamic_hw: bool = False,
) -> Path:
    """torch.onnx.export (dynamo) of `model` as it is, single file, stdout kept clean."""
    import torch

    x = torch.zeros(batch, 3, *hw(imgsz))
    kwargs: dict[str, Any] = {}
    dims: dict[int, Any] = {}
    if dynamic:
        dims[0] = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_hw:
        # Multiples of 32 by construction (what FasterNet's strides need), so the exporter proves every shape.
        dims[2] = 32 * torch.export.Dim("h32", min=1, max=MAX_IMGSZ * 4 // 32)
        dims[3] = 32 * torch.export.Dim("w32", min=1, max=MAX_IMGSZ * 4 // 32)
    if dims:
        kwargs["dynamic_shapes"] = {"x": dims}
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
            output_names=output_names(model.cfg),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            **kwargs,
        )
    return path


def onnx_metadata(ckpt: Checkpoint, recipe: Recipe) -> dict[str, str]:
    """Model config and preprocessing as metadata props, so the file explains itself (OpenVINO and Core ML too)."""
    p = recipe.preprocess
    pre = {
        "size": recipe.imgsz,
        "mean": list(p.mean),
        "std": list(p.std),
        "crop_pct": p.crop_pct,
        "interpolation": p.interpolation,
        "layout": "NCHW RGB float32",
    }
    if ckpt.config.features:
        pre = {k: v for k, v in pre.items() if k != "crop_pct"} | {"size": list(recipe.hw), "resize": p.resize}
    meta = {
        "fnexport.model": json.dumps(ckpt.config.to_dict(), sort_keys=True),
        "fnexport.preprocess": json.dumps(pre, sort_keys=True),
    }
    if ckpt.labels:
        meta["fnexport.labels"] = json.dumps(ckpt.labels)
    return meta


def onnx_opset(path: Path) -> int | None:
    """The default-domain opset an ONNX file declares (what runtimes go by, whatever was asked for)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).most_common())


def layer_nodes(path: Path) -> dict[str, str]:
    """PyTorch module name -> ONNX node name for every Conv/Gemm/MatMul whose weight is an initializer: the
    exporter names initializers after the parameters ("head.weight"), and quantizers exclude nodes by name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return {
        node.input[1].removesuffix(".weight"): node.name
        for node in graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul")
        and len(node.input) > 1
        and node.input[1] in weights
        and node.input[1].endswith(".weight")
    }
