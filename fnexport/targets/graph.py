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
from fnexport.model.fasternet import FasterNet
from fnexport.recipes import Recipe
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
    tmp = export_plain(model, path.with_suffix(".raw.onnx"), recipe.imgsz, recipe.batch, recipe.dynamic, recipe.opset)
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
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name, graph.producer_version = "fnexport", __version__
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return path


def export_plain(
    model: FasterNet, path: Path, imgsz: int, batch: int = 1, dynamic: bool = True, opset: int = 20
) -> Path:
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


def onnx_metadata(ckpt: Checkpoint, recipe: Recipe) -> dict[str, str]:
    """Model config and preprocessing as metadata props, so the file explains itself (OpenVINO and Core ML too)."""
    p = recipe.preprocess
    meta = {
        "fnexport.model": json.dumps(ckpt.config.to_dict(), sort_keys=True),
        "fnexport.preprocess": json.dumps(
            {
                "size": recipe.imgsz,
                "mean": list(p.mean),
                "std": list(p.std),
                "crop_pct": p.crop_pct,
                "interpolation": p.interpolation,
                "layout": "NCHW RGB float32",
            },
            sort_keys=True,
        ),
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
