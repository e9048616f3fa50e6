"""What a checkpoint is: config, size, and what reparameterization changes."""

from __future__ import annotations

import copy
from collections import Counter

import torch

from fnexport.console import step
from fnexport.model.checkpoint import Checkpoint
from fnexport.model.fasternet import count, hw
from fnexport.model.reparam import reparameterize
from fnexport.recipes import Recipe
from fnexport.targets.base import Source
from fnexport.targets.graph import export_plain, op_counts


def inspect(ckpt: Checkpoint, imgsz: int | tuple[int, int] = 224, graph: bool = False) -> dict:
    """Config, size and what reparameterization changes (module counts; ONNX ops with `graph`); a backbone's
    outputs with channels, stride and shape at `imgsz`."""
    params, macs = count(ckpt.model, imgsz)
    cfg = ckpt.config
    info = cfg.to_dict() | {
        "kind": cfg.kind,
        "params": params,
        "macs": macs,
        "imgsz": imgsz if isinstance(imgsz, int) else list(imgsz),
        "source": ckpt.source(),
        "labels": ckpt.labels,
        "modules": {"before": module_counts(ckpt.model), "after": module_counts(reparameterize(ckpt.model))},
    }
    if cfg.features:
        h, w = hw(imgsz)
        info["outputs"] = [o | {"shape": [1, o["channels"], h // o["stride"], w // o["stride"]]} for o in cfg.outputs()]
    if graph:
        info["onnx_ops"] = graph_ops(ckpt, imgsz)
    return info


def module_counts(model: torch.nn.Module) -> dict[str, int]:
    return dict(Counter(type(m).__name__ for m in model.modules() if not list(m.children())).most_common())


def graph_ops(ckpt: Checkpoint, imgsz: int | tuple[int, int]) -> dict[str, dict[str, int]]:
    """ONNX ops of a plain export (official inference form, `slicing`) next to fnexport's graph."""
    with Source(ckpt, Recipe(target="onnx", imgsz=imgsz, dynamic=True)) as src:
        with step("Exporting the plain and the fnexport ONNX graphs"):
            plain = copy.deepcopy(ckpt.model)
            plain.set_pconv_form("slicing")
            before = op_counts(export_plain(plain, src.workdir / "plain.onnx", imgsz))
            after = op_counts(src.onnx())
    return {"plain": before, "fnexport": after}
