"""The target interface (Runner, Target, Exported) and Source, the data one conversion makes once."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from fnexport.comparison import feature_reference, labels_for, reference
from fnexport.console import log
from fnexport.data import DEFAULT_DATA, PARITY_SEED, ImageSet, load_images, resolve
from fnexport.model.checkpoint import Checkpoint
from fnexport.model.fasternet import FasterNet
from fnexport.model.reparam import reparameterize
from fnexport.recipes import Recipe
from fnexport.targets.graph import export_onnx, onnx_metadata


class Runner(Protocol):
    batch: int | None  # the artifact's fixed batch size, None when dynamic
    info: dict[str, Any]  # what actually ran (provider, execution precision, threads)

    # NCHW float32 -> logits float32; a backbone's runner returns its outputs as a list, in stride order.
    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]: ...
    def close(self) -> None: ...


@dataclass
class Exported:
    path: Path  # the artifact (file or directory) inside the output directory
    details: dict[str, Any] = field(default_factory=dict)  # target-specific facts for the manifest
    # Set when the target wrote a usable intermediate but cannot finish on this machine (TensorRT without a
    # GPU): convert still writes the directory, then exits 3 with this message ("{dir}" = the output dir).
    unfinished: str | None = None


@dataclass(frozen=True)
class Int8Plan:
    """One INT8 setting: the target's quantizer options and the layers (PyTorch module names) kept in float."""

    options: tuple[tuple[str, Any], ...]  # keyword options of the target's quantizer, in a stable order
    exclude: tuple[str, ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def describe(self) -> str:
        """One short line: option values, and the float layers (the last one added named)."""
        text = " ".join(str(v) for _, v in self.options)
        return text + (f" +{len(self.exclude)} float ({self.exclude[-1]})" if self.exclude else "")

    def to_dict(self) -> dict[str, Any]:
        return {"options": self.kwargs, "float_layers": list(self.exclude)}


class Target(Protocol):
    name: ClassVar[str]  # CLI word = recipe key = module name
    precisions: ClassVar[tuple[str, ...]]
    pconv_form: ClassVar[str]  # chosen by measurement, see the target's module
    # Distributions the target runs on -> the pyproject extra that installs them ("core": always there).
    # Their versions go into the manifest, and `fnexport doctor` lists them.
    packages: ClassVar[dict[str, str]]

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported: ...
    # `alone`: the runtime has the cores to itself (bench), so it may keep idle threads spinning for latency;
    # otherwise (gate, val, predict: decoding threads or the PyTorch reference run beside it) it must not.
    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> Runner: ...


def parity_images(recipe: Recipe) -> ImageSet:
    """The images convert checks parity on (and `build-engine` again, later, on the GPU host)."""
    return load_images(recipe.parity_data or DEFAULT_DATA, recipe.pre(), recipe.parity_samples, seed=PARITY_SEED)


class Source:
    """What every target starts from, each made once per conversion and handed down.

    The folded model per PConv form, fnexport's FP32 ONNX, the calibration and parity images and the
    reference logits of the original model on the latter. A context manager: its temp dir goes on exit.
    """

    def __init__(self, ckpt: Checkpoint, recipe: Recipe) -> None:
        self.ckpt, self.recipe = ckpt, recipe
        self.workdir = Path(tempfile.mkdtemp(prefix="fnexport-"))
        self._modules: dict[str, FasterNet] = {}
        self._onnx: Path | None = None
        self._calibration: ImageSet | None = None
        self._parity: ImageSet | None = None
        self._reference: np.ndarray | list[np.ndarray] | None = None
        self._validation: ImageSet | None = None
        # Set by the INT8 search for each candidate; None: the recipe's own setting (targets' int8_plans()[0]).
        self.int8_plan: Int8Plan | None = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def module(self, pconv_form: str) -> FasterNet:
        """The reparameterized model in `pconv_form`; shared, so a target that edits weights copies it first."""
        if pconv_form not in self._modules:
            self._modules[pconv_form] = reparameterize(self.ckpt.model, pconv_form)
        return self._modules[pconv_form]

    def onnx(self) -> Path:
        """FP32 ONNX of the reparameterized model (split_cat, BN folded, simplified, checked)."""
        if self._onnx is None:
            meta = onnx_metadata(self.ckpt, self.recipe)
            self._onnx = export_onnx(self.module("split_cat"), self.workdir / "fp32.onnx", self.recipe, meta)
        return self._onnx

    @property
    def onnx_file(self) -> Path | None:
        """The FP32 ONNX, if a target asked for it (manifests record its opset)."""
        return self._onnx

    @property
    def calibration_set(self) -> ImageSet | None:
        """The calibration images, if a target used them (manifests record only what was used)."""
        return self._calibration

    def calibration(self) -> ImageSet:
        """The calibration images. When the INT8 search judges candidates, none of them is a parity image
        (the search must not pick a setting for the images it is judged on), and with max_drop every fourth
        labelled image is held out for the accuracy check (validation())."""
        if self._calibration is None:
            recipe = self.recipe
            calib = load_images(recipe.calib or DEFAULT_DATA, recipe.pre(), recipe.calib_samples)
            if recipe.precision == "int8" and recipe.int8_search != "off":
                calib = self._without_parity_images(calib)
            if recipe.max_drop is not None and calib.labels is not None and len(calib.x) >= 8:
                held = np.arange(len(calib.x)) % 4 == 3
                self._validation = _subset(calib, held)
                calib = _subset(calib, ~held)
            self._calibration = calib
        return self._calibration

    def validation(self) -> ImageSet | None:
        """Labelled images held out of the calibration set for max_drop (None without max_drop or labels)."""
        self.calibration()
        return self._validation

    def _without_parity_images(self, calib: ImageSet) -> ImageSet:
        parity_source = self.recipe.parity_data or DEFAULT_DATA
        if resolve(calib.source).resolve() != resolve(parity_source).resolve():
            return calib
        seen = set(self.parity_inputs().files)
        keep = np.array([f not in seen for f in calib.files])
        if keep.sum() < max(1, len(keep) // 4):
            log.warning(
                "%s: most calibration images are parity images too; the INT8 search is judged on images it "
                "calibrated on (give --calib and --data different folders)",
                calib.source,
            )
            return calib
        return _subset(calib, keep)

    def layer_names(self) -> list[str]:
        """The Conv2d/Linear modules of the folded model: the names --int8-exclude takes, in forward order."""
        return [
            n for n, m in self.module("split_cat").named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        ]

    def parity_inputs(self) -> ImageSet:
        if self._parity is None:
            self._parity = parity_images(self.recipe)
        return self._parity

    def reference(self) -> np.ndarray | list[np.ndarray]:
        """Logits (a backbone: its outputs) of the original, un-reparameterized model on the parity inputs."""
        if self._reference is None:
            make = feature_reference if self.ckpt.config.features else reference
            self._reference = make(self.ckpt.model, self.parity_inputs().x)
        return self._reference

    def labels(self) -> np.ndarray | None:
        """The parity images' labels as model class indices, when their folders name the model's classes."""
        if self.ckpt.config.features:
            return None
        return labels_for(self.ckpt.labels, self.ckpt.config.num_classes, self.parity_inputs())


def _subset(images: ImageSet, keep: np.ndarray) -> ImageSet:
    return ImageSet(
        x=np.ascontiguousarray(images.x[keep]),
        labels=None if images.labels is None else images.labels[keep],
        classes=images.classes,
        files=[f for f, k in zip(images.files, keep, strict=True) if k],
        skipped=images.skipped,
        source=images.source,
    )
