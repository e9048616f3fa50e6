"""Core ML: an ML Program (.mlpackage) with preprocessing and labels built in (a backbone: its four feature maps);
validated on Linux, run on macOS."""

from __future__ import annotations

import copy
import json
import platform
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

import fnexport.manifest as mf
from fnexport.errors import BackendUnavailable, BadInput
from fnexport.model.fasternet import FasterNet, FasterNetConfig
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Source
from fnexport.targets.coreml_package import (
    INPUT_IMAGE,
    INPUT_TENSOR,
    OUTPUT_NAME,
    WEIGHT_THRESHOLD,
    enumerated_hw,
    load_coremltools,
    quiet,
    validate_package,
)
from fnexport.targets.graph import onnx_metadata, output_names
from fnexport.version import __version__

# torch.jit.trace gives the same program (101 ops, same types and attributes, on the digits T0) but is
# deprecated in torch 2.13; coremltools reads an ExportedProgram only after run_decompositions({}).
CONVERSION = "torch.export.export + run_decompositions({})"
# Per precision: compute precision, lowest OS that runs it, weight compression (coremltools.optimize.coreml).
# Per-channel scales and per-tensor palettes compress every layer; iOS18's blocks/groups of 16 or 32
# skip layers whose channels they do not divide (T0: 18 of 43 with int4 blocks of 32), and 4-bit
# palettes per group of 4 took 22x longer (238 s vs 11 s on the digits T0) for cosine 0.981 vs 0.972.
# int4 needs iOS18 in any form. Measured on the digits T0: see README, "Mobile targets".
PRECISIONS: dict[str, dict[str, Any]] = {
    "fp16": {"compute": "fp16", "os": "iOS16", "compress": None},
    "fp32": {"compute": "fp32", "os": "iOS16", "compress": None},
    "int8": {
        "compute": "fp16",
        "os": "iOS16",
        "compress": ("linear", {"mode": "linear_symmetric", "dtype": "int8", "granularity": "per_channel"}),
    },
    "int4": {
        "compute": "fp16",
        "os": "iOS18",
        "compress": ("linear", {"mode": "linear_symmetric", "dtype": "int4", "granularity": "per_channel"}),
    },
    "palettize8": {"compute": "fp16", "os": "iOS16", "compress": ("palettize", {"mode": "kmeans", "nbits": 8})},
    "palettize4": {"compute": "fp16", "os": "iOS16", "compress": ("palettize", {"mode": "kmeans", "nbits": 4})},
}


class _Classifier(torch.nn.Module):
    """Logits and softmax: ClassifierConfig turns the probabilities into classLabel and a label -> p dict."""

    def __init__(self, model: FasterNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def input_kind(recipe: Recipe, cfg: FasterNetConfig) -> str:
    """--input, else an image for a classifier and a tensor for a backbone."""
    # A detector pads its letterbox with zeros after normalisation: the mean colour, which no 8-bit image
    # holds. Rounded to 8 bits it moved the test backbone's outputs by 2.4e-3..3.1e-3 of their range
    # (64x96, 32 letterboxed embedded:natural images), 24x the fp32 gate; the app has the tensor anyway.
    return recipe.input or ("tensor" if cfg.features else "image")


def fold_std(model: FasterNet, std: tuple[float, float, float]) -> FasterNet:
    """A copy whose stem conv divides its input channels by std, so it takes (pixel/255 - mean) unscaled."""
    # Core ML images have one scale for all channels and a per-channel bias: scale 1/255 and bias
    # -mean give pixel/255 - mean, and conv(u / std) == conv with weights / std per input channel (the
    # stem has no padding, and zero padding would be unchanged by a pure scale anyway).
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.patch_embed.proj.weight.div_(torch.tensor(std, dtype=torch.float32)[None, :, None, None])
    return model


class CoremlTarget:
    name: ClassVar[str] = "coreml"
    precisions: ClassVar[tuple[str, ...]] = tuple(PRECISIONS)
    # split_cat: it converts to one split + conv + concat per block; `slicing` gives slice_by_index
    # + scatter + 3 reshapes per block (T0: 40 reshapes, 13 scatters) for the same math.
    pconv_form: ClassVar[str] = "split_cat"
    packages: ClassVar[dict[str, str]] = {"coremltools": "coreml"}

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        ct = load_coremltools()
        kind = input_kind(recipe, src.ckpt.config)
        if recipe.dynamic:
            raise BadInput(
                "--dynamic: a Core ML package takes a fixed batch (several images: predict([...]) / "
                "MLBatchProvider); drop --dynamic (--batch N sets it; 1 for image inputs and classifiers)"
            )
        if recipe.batch != 1 and (kind == "image" or src.ckpt.labels):
            raise BadInput(
                "--target coreml: image inputs and classifiers take one image per prediction "
                "(batch with predict([...]) / MLBatchProvider); use --batch 1 without --dynamic"
            )
        spec = PRECISIONS[recipe.precision]
        model = src.module(self.pconv_form)
        if kind == "image":
            model = fold_std(model, recipe.preprocess.std)
        module: torch.nn.Module = _Classifier(model).eval() if src.ckpt.labels else model
        x = torch.zeros(recipe.batch, src.ckpt.config.in_chans, *recipe.hw)
        # --dynamic-hw: height and width symbolic (multiples of 32) in the program; coremltools replaces them
        # with the enumerated sizes (it refuses sizes that contradict a static dimension of the program).
        dims = {2: 32 * torch.export.Dim("h32"), 3: 32 * torch.export.Dim("w32")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's own deprecation notices, not the user's concern
            program = torch.export.export(
                module, (x,), dynamic_shapes={"x": dims} if recipe.dynamic_hw else None
            ).run_decompositions({})
        mlmodel, compression = to_mlprogram(ct, program, src, recipe, kind)
        details: dict[str, Any] = {
            "conversion": f"{CONVERSION} of the {self.pconv_form} model, then coremltools {ct.__version__}",
            "coremltools_tested_torch_up_to": _tested_torch(),
            "format": "mlprogram",
            "minimum_deployment_target": recipe.deployment_target or spec["os"],
            "compute_precision": spec["compute"],
            "input": kind,
            "classifier": bool(src.ckpt.labels),
            "pconv_form": self.pconv_form,
        }
        if recipe.dynamic_hw:
            details["enumerated_hw"] = [list(size) for size in enumerated_hw(recipe)]
        if compression:
            details["compression"] = compression
        describe(mlmodel, src, recipe, kind, details)
        path = out_dir / "model.mlpackage"
        mlmodel.save(str(path))
        details["validation"] = validate_package(ct, path, module, src, recipe, kind, self.pconv_form)
        return Exported(path, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> CoremlRunner:
        return CoremlRunner(artifact, manifest)


def _tested_torch() -> str:
    """The newest torch coremltools says it was tested with (it converts FasterNet from 2.13 all the same)."""
    from coremltools import _deps

    return getattr(_deps, "_TORCH_MAX_VERSION", "unknown")


def to_mlprogram(
    ct: ModuleType, program: torch.export.ExportedProgram, src: Source, recipe: Recipe, kind: str
) -> tuple[Any, dict[str, Any] | None]:
    """Exported program -> MIL program -> (compressed) -> ML Program, with the classifier added last."""
    spec = PRECISIONS[recipe.precision]
    shape: Any = (recipe.batch, src.ckpt.config.in_chans, *recipe.hw)
    if recipe.dynamic_hw:
        shape = ct.EnumeratedShapes([(*shape[:2], *size) for size in enumerated_hw(recipe)], default=shape)
    if kind == "image":
        inp = ct.ImageType(
            name=INPUT_IMAGE,
            shape=shape,
            scale=1 / 255,
            bias=[-m for m in recipe.preprocess.mean],
            color_layout=ct.colorlayout.RGB,
        )
    else:
        inp = ct.TensorType(name=INPUT_TENSOR, shape=shape, dtype=np.float32)
    outputs = [ct.TensorType(name=name, dtype=np.float32) for name in output_names(src.ckpt.config)]
    if src.ckpt.labels:
        outputs.append(ct.TensorType(name="probabilities", dtype=np.float32))
    common = {
        "minimum_deployment_target": getattr(ct.target, recipe.deployment_target or spec["os"]),
        "compute_precision": ct.precision.FLOAT16 if spec["compute"] == "fp16" else ct.precision.FLOAT32,
    }
    with quiet():
        prog = ct.convert(
            program, inputs=[inp], outputs=outputs, convert_to="milinternal", pass_pipeline=passes(ct), **common
        )
        compression = compress(prog, recipe.precision) if spec["compress"] else None
        classifier = None
        if src.ckpt.labels:
            # With named outputs besides the probabilities, coremltools 9 fails to add the classifier
            # (IndexError in get_func_output); dropping the output types keeps the logits as a third
            # output, which parity needs (the probabilities lose small logits to FP16).
            prog.functions["main"].set_output_types(None)
            classifier = ct.ClassifierConfig(list(src.ckpt.labels), predicted_probabilities_output="probabilities")
        mlmodel = ct.convert(
            prog, classifier_config=classifier, convert_to="mlprogram", pass_pipeline=passes(ct), **common
        )
        return mlmodel, compression


def passes(ct: ModuleType) -> Any:
    """coremltools' default graph passes but one: a backbone's norm x * scale + shift stays a mul and an add."""
    # fuse_elementwise_to_batchnorm would turn each of norm0/2/4/6 (reparam.ChannelAffine) into a batch_norm op
    # whose new constants no longer carry the model's names: the batch_norm ban and the weight check would fail.
    pipeline = ct.PassPipeline.DEFAULT  # a new pipeline each time (ct.convert edits the one it is given)
    pipeline.remove_passes({"common::fuse_elementwise_to_batchnorm"})
    return pipeline


def compress(prog: Any, precision: str) -> dict[str, Any]:
    """Weight-only compression in place: coremltools.optimize.coreml's linear quantization or k-means palettes."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    method, options = PRECISIONS[precision]["compress"]
    if method == "linear":
        config = cto.OpLinearQuantizerConfig(weight_threshold=WEIGHT_THRESHOLD, **options)
    else:
        config = cto.OpPalettizerConfig(weight_threshold=WEIGHT_THRESHOLD, **options)
    # The graph pass behind cto.linear_quantize_weights / cto.palettize_weights, applied to the program
    # before the classifier exists: those functions round-trip a saved model, and that fails on a
    # classifier's label list (ValueError: Unknown map from SSA type list to Proto type).
    graph_pass = PASS_REGISTRY[f"compression::{'linear_quantize' if method == 'linear' else 'palettize'}_weights"]
    graph_pass.set_options(
        [PassOption("config", cto.OptimizationConfig(global_config=config)), PassOption("joint_compression", False)]
    )
    graph_pass(prog)  # __call__, not apply(): it opens the graph-pass scope the torch frontend requires
    return {"method": f"coremltools.optimize.coreml {method}", "weight_threshold": WEIGHT_THRESHOLD, **options}


def describe(mlmodel: Any, src: Source, recipe: Recipe, kind: str, details: dict[str, Any]) -> None:
    """Author, version, description, license and fnexport's metadata, so the package explains itself."""
    cfg, source = src.ckpt.config, src.ckpt.source()
    mlmodel.author = f"Converted by fnexport {__version__} from {Path(source['path']).name}"
    mlmodel.version = (source["sha256"] or source["layout"])[:12]
    mlmodel.license = "As the source checkpoint's license (fnexport does not record it)"
    h, w = recipe.hw
    sizes = f"{h}x{w}"
    if recipe.dynamic_hw:
        sizes = f"{sizes} or any of " + ", ".join(f"{a}x{b}" for a, b in enumerated_hw(recipe))
    maps = ", ".join(f"{o['name']}: {o['channels']} channels, stride {o['stride']}" for o in cfg.outputs())
    what = f"backbone (feature maps {maps}" if cfg.features else f"image classifier ({cfg.num_classes} classes"
    mlmodel.short_description = (
        f"FasterNet {cfg.variant} {what}; {sizes} RGB, height x width), {recipe.precision} weights. "
        f"Checkpoint sha256 {source['sha256'] or 'none (random init)'}."
    )
    p = recipe.pre()
    resized = (
        f"resized with resize={p.resize!r} (letterbox: fit inside keeping the aspect, top-left, zero padding after "
        "normalisation)"
        if cfg.features
        else f"resized and center-cropped (crop {p.crop_pct}, {p.interpolation})"
    )
    if kind == "image":
        mlmodel.input_description[INPUT_IMAGE] = (
            f"RGB image, {sizes} (height x width), {resized}; normalisation with mean {list(p.mean)} and std "
            f"{list(p.std)} is built in"
        )
    else:
        mlmodel.input_description[INPUT_TENSOR] = (
            f"float32 NCHW RGB, (pixel/255 - {list(p.mean)}) / {list(p.std)}, {resized}"
        )
    if cfg.features:
        for o in cfg.outputs():
            mlmodel.output_description[o["name"]] = (
                f"feature map, {o['channels']} channels, 1/{o['stride']} of the input's height and width"
            )
    else:
        mlmodel.output_description[OUTPUT_NAME] = "raw class scores (before softmax)"
    meta = mlmodel.user_defined_metadata
    for key, value in onnx_metadata(src.ckpt, recipe).items():
        meta[key] = value
    meta["fnexport.recipe"] = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    meta["fnexport.conversion"] = details["conversion"]


class CoremlRunner:
    """Core ML prediction (macOS only): normalised NCHW in, logits (a backbone: its outputs in manifest order) out;
    images go back to pixels first."""

    def __init__(self, artifact: Path, manifest: dict) -> None:
        if platform.system() != "Darwin":
            raise BackendUnavailable(
                "Core ML prediction needs macOS; on Linux the package is converted and validated "
                "(spec, ops, weights: see details.validation in manifest.json) but not run"
            )
        ct = load_coremltools()
        details = manifest.get("details", {})
        precision = manifest.get("precision", "fp16")
        # GPU and Neural Engine compute in FP16: FP32 parity has to mean the CPU.
        units = ct.ComputeUnit.CPU_ONLY if precision == "fp32" else ct.ComputeUnit.ALL
        self.model = ct.models.MLModel(str(artifact), compute_units=units)
        self.image = details.get("input", "image") == "image"
        self.outputs = [o["name"] for o in mf.outputs(manifest)]
        self.backbone = manifest.get("kind") == "backbone"
        self.mean = np.array(manifest["input"]["mean"], np.float32)[:, None, None]
        self.std = np.array(manifest["input"]["std"], np.float32)[:, None, None]
        shape = manifest["input"]["shape"]
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.info = {"runtime": f"Core ML via coremltools {ct.__version__}", "compute_units": units.name}

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        from PIL import Image

        if not self.image:
            out = self.model.predict({INPUT_TENSOR: x.astype(np.float32)})
            arrays = [np.asarray(out[n], np.float32) for n in self.outputs]
        else:
            preds = []
            for img in x:
                # Parity images are 8-bit pictures normalised by fnexport, so this recovers their pixels exactly
                # (a letterbox's padding, the mean colour, to the nearest 8-bit value).
                pixels = np.clip(np.rint((img * self.std + self.mean) * 255), 0, 255).astype(np.uint8)
                preds.append(self.model.predict({INPUT_IMAGE: Image.fromarray(pixels.transpose(1, 2, 0))}))
            arrays = [np.concatenate([self._one(p[n]) for p in preds]) for n in self.outputs]
        return arrays if self.backbone else arrays[0]

    def _one(self, value: Any) -> np.ndarray:
        """One image's output as a batch of one: logits (1, classes), a feature map (1, C, h, w)."""
        out = np.asarray(value, np.float32)
        return out.reshape(1, *out.shape[-3:]) if self.backbone else out.reshape(1, -1)

    def close(self) -> None:
        del self.model
