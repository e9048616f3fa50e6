"""The target interface, and the one tuple that registers every target."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from fnexport.data import ImageSet, load_images
from fnexport.errors import BadInput
from fnexport.model.checkpoint import Checkpoint
from fnexport.model.fasternet import FasterNet
from fnexport.model.reparam import reparameterize
from fnexport.recipes import Recipe

DEFAULT_DATA = "embedded:natural"


class Runner(Protocol):
    batch: int | None  # the artifact's fixed batch size, None when dynamic
    info: dict[str, Any]  # what actually ran (provider, execution precision, threads)

    def __call__(self, x: np.ndarray) -> np.ndarray: ...  # NCHW float32 -> logits float32
    def close(self) -> None: ...


@dataclass
class Exported:
    path: Path  # the artifact (file or directory) inside the output directory
    details: dict[str, Any] = field(default_factory=dict)  # target-specific facts for the manifest
    # Set when the target wrote a usable intermediate but cannot finish on this machine (TensorRT without a
    # GPU): convert still writes the directory, then exits 3 with this message ("{dir}" = the output dir).
    unfinished: str | None = None


class Target(Protocol):
    name: ClassVar[str]  # CLI word = recipe key = module name
    precisions: ClassVar[tuple[str, ...]]
    pconv_form: ClassVar[str]  # chosen by measurement, see the target's module
    packages: ClassVar[tuple[str, ...]]  # distributions whose versions go into the manifest

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported: ...
    def runner(self, artifact: Path, manifest: dict, threads: int | None = None) -> Runner: ...


@dataclass
class Source:
    """What every target starts from: the checkpoint, its inference form and fnexport's clean ONNX."""

    ckpt: Checkpoint
    recipe: Recipe
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fnexport-")))
    _onnx: Path | None = None

    def module(self, pconv_form: str) -> FasterNet:
        return reparameterize(self.ckpt.model, pconv_form)

    def onnx(self) -> Path:
        """FP32 ONNX of the reparameterized model (split_cat, BN folded, simplified, checked)."""
        if self._onnx is None:
            from fnexport.targets.onnx import export_onnx

            self._onnx = export_onnx(self, self.workdir / "fp32.onnx")
        return self._onnx

    def calibration(self) -> ImageSet:
        return load_images(self.recipe.calib or DEFAULT_DATA, self.recipe.pre(), self.recipe.calib_samples)


# Target modules import their backend inside export()/runner(), so importing them here is cheap.
from fnexport.targets.coreml import CoremlTarget  # noqa: E402
from fnexport.targets.onnx import OnnxTarget  # noqa: E402
from fnexport.targets.onnx_arm import OnnxArmTarget  # noqa: E402
from fnexport.targets.openvino import OpenVinoTarget  # noqa: E402
from fnexport.targets.tensorrt import TensorRtTarget  # noqa: E402

TARGETS: tuple[Target, ...] = (OnnxTarget(), OpenVinoTarget(), TensorRtTarget(), CoremlTarget(), OnnxArmTarget())


def get_target(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise BadInput(f"unknown target {name!r}; choose one of: {', '.join(t.name for t in TARGETS)}")
