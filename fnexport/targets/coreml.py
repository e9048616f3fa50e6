"""Core ML: an ML Program (.mlpackage) with preprocessing and labels built in; validated on Linux, run on macOS."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fnexport import __version__
from fnexport.console import log, require
from fnexport.data import load_images
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.parity import compare, labels_for, reference, tolerance_for
from fnexport.targets.onnx import metadata

if TYPE_CHECKING:
    from types import ModuleType

    from fnexport.model.fasternet import FasterNet
    from fnexport.recipes import Recipe
    from fnexport.targets import Exported, Source

INPUT_IMAGE, INPUT_TENSOR, OUTPUT_NAME = "image", "input", "logits"
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
# coremltools leaves tensors this small uncompressed (its default); the stem conv of T0 (1,920) is one.
WEIGHT_THRESHOLD = 2048
# Largest error allowed between a package weight and the model's, by how the package stores it, relative
# to the tensor's largest |w|. FP16 rounds to 2^-11 and symmetric linear n-bit to half a step,
# 1/(2(2^(n-1)-1)), plus FP16 rounding of scale and result: bounds on the max error. A k-means palette
# has no max bound (an outlier can share a far centroid: 0.53 measured for 4 bits on the digits T0),
# but its RMS error is at most a uniform 2^n-level grid's half step, 1/(2^n-1).
WEIGHT_TOLERANCE = {
    "fp32": ("max", 1e-7),
    "fp16": ("max", 2**-11),
    "int8": ("max", 1 / 254 + 2**-10),
    "int4": ("max", 1 / 14 + 2**-10),
    "lut8": ("rms", 1 / 255),
    "lut4": ("rms", 1 / 15),
}
COMPRESSED_STORAGE = {"int8": "int8", "int4": "int4", "palettize8": "lut8", "palettize4": "lut4"}
FORBIDDEN_OPS = ("batch_norm", "scatter", "scatter_nd", "scatter_along_axis", "slice_update")


def coremltools() -> ModuleType:
    """Import coremltools without its import-time log noise (no native runtime off macOS, untested torch)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return require("coremltools", "coreml")


class _Classifier(torch.nn.Module):
    """Logits and softmax: ClassifierConfig turns the probabilities into classLabel and a label -> p dict."""

    def __init__(self, model: FasterNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits, dim=1)


def input_kind(recipe: Recipe) -> str:
    return recipe.input or "image"


def fold_std(model: FasterNet, std: tuple[float, float, float]) -> FasterNet:
    """Divide the stem conv's input channels by std, so the model takes (pixel/255 - mean) unscaled."""
    # Core ML images have one scale for all channels and a per-channel bias: scale 1/255 and bias
    # -mean give pixel/255 - mean, and conv(u / std) == conv with weights / std per input channel (the
    # stem has no padding, and zero padding would be unchanged by a pure scale anyway).
    with torch.no_grad():
        model.patch_embed.proj.weight.div_(torch.tensor(std, dtype=torch.float32)[None, :, None, None])
    return model


class CoremlTarget:
    name: ClassVar[str] = "coreml"
    precisions: ClassVar[tuple[str, ...]] = tuple(PRECISIONS)
    # split_cat: it converts to one split + conv + concat per block; `slicing` gives slice_by_index
    # + scatter + 3 reshapes per block (T0: 40 reshapes, 13 scatters) for the same math.
    pconv_form: ClassVar[str] = "split_cat"
    packages: ClassVar[tuple[str, ...]] = ("coremltools",)

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        from fnexport.targets import Exported

        ct = coremltools()
        kind = input_kind(recipe)
        if recipe.dynamic or (recipe.batch != 1 and (kind == "image" or src.ckpt.labels)):
            raise BadInput(
                "--target coreml: image inputs and classifiers take one image per prediction "
                "(batch with predict([...]) / MLBatchProvider); use --batch 1 without --dynamic"
            )
        spec = PRECISIONS[recipe.precision]
        model = src.module(self.pconv_form)
        if kind == "image":
            model = fold_std(model, recipe.preprocess.std)
        module: torch.nn.Module = _Classifier(model).eval() if src.ckpt.labels else model
        x = torch.zeros(recipe.batch, src.ckpt.config.in_chans, recipe.imgsz, recipe.imgsz)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's own deprecation notices, not the user's concern
            program = torch.export.export(module, (x,)).run_decompositions({})
        mlmodel, compression = convert(ct, program, src, recipe, kind)
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
        if compression:
            details["compression"] = compression
        describe(mlmodel, src, recipe, kind, details)
        path = out_dir / "model.mlpackage"
        mlmodel.save(str(path))
        details["validation"] = validate(ct, path, module, src, recipe, kind)
        return Exported(path, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None) -> CoremlRunner:
        return CoremlRunner(artifact, manifest)


def _tested_torch() -> str:
    """The newest torch coremltools says it was tested with (it converts FasterNet from 2.13 all the same)."""
    from coremltools import _deps

    return getattr(_deps, "_TORCH_MAX_VERSION", "unknown")


@contextlib.contextmanager
def _quiet() -> Any:
    """coremltools draws progress bars on stderr for every pass; keep them for --verbose only."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        yield
    lines = [ln.strip() for ln in buf.getvalue().replace("\r", "\n").splitlines()]
    for line in dict.fromkeys(ln for ln in lines if ln and "/s]" not in ln):
        log.debug("coremltools: %s", line)


def convert(
    ct: ModuleType, program: torch.export.ExportedProgram, src: Source, recipe: Recipe, kind: str
) -> tuple[Any, dict[str, Any] | None]:
    """Exported program -> MIL program -> (compressed) -> ML Program, with the classifier added last."""
    spec = PRECISIONS[recipe.precision]
    shape = (recipe.batch, src.ckpt.config.in_chans, recipe.imgsz, recipe.imgsz)
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
    outputs = [ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)]
    if src.ckpt.labels:
        outputs.append(ct.TensorType(name="probabilities", dtype=np.float32))
    common = {
        "minimum_deployment_target": getattr(ct.target, recipe.deployment_target or spec["os"]),
        "compute_precision": ct.precision.FLOAT16 if spec["compute"] == "fp16" else ct.precision.FLOAT32,
    }
    with _quiet():
        prog = ct.convert(program, inputs=[inp], outputs=outputs, convert_to="milinternal", **common)
        compression = compress(prog, recipe.precision) if spec["compress"] else None
        classifier = None
        if src.ckpt.labels:
            # With named outputs besides the probabilities, coremltools 9 fails to add the classifier
            # (IndexError in get_func_output); dropping the output types keeps the logits as a third
            # output, which parity needs (the probabilities lose small logits to FP16).
            prog.functions["main"].set_output_types(None)
            classifier = ct.ClassifierConfig(list(src.ckpt.labels), predicted_probabilities_output="probabilities")
        return ct.convert(prog, classifier_config=classifier, convert_to="mlprogram", **common), compression


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
    mlmodel.short_description = (
        f"FasterNet {cfg.variant} image classifier ({cfg.num_classes} classes, {recipe.imgsz}x{recipe.imgsz} RGB), "
        f"{recipe.precision} weights. Checkpoint sha256 {source['sha256'] or 'none (random init)'}."
    )
    p = recipe.preprocess
    if kind == "image":
        mlmodel.input_description[INPUT_IMAGE] = (
            f"RGB image, {recipe.imgsz}x{recipe.imgsz}, resized and center-cropped (crop {p.crop_pct}, "
            f"{p.interpolation}); normalisation with mean {list(p.mean)} and std {list(p.std)} is built in"
        )
    else:
        mlmodel.input_description[INPUT_TENSOR] = (
            f"float32 NCHW RGB, (pixel/255 - {list(p.mean)}) / {list(p.std)}, after resize and center crop"
        )
    mlmodel.output_description[OUTPUT_NAME] = "raw class scores (before softmax)"
    meta = mlmodel.user_defined_metadata
    for key, value in metadata(src).items():
        meta[key] = value
    meta["fnexport.recipe"] = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    meta["fnexport.conversion"] = details["conversion"]


def package_weights(ct: ModuleType, path: Path) -> tuple[Any, dict[str, tuple[str, Any]], Any]:
    """The saved package's spec, its weights by op name (storage dtype, op), and its MIL program."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    saved = ct.models.MLModel(str(path), skip_model_load=True)
    spec = saved.get_spec()
    with _quiet():
        prog = milproto_load(spec, spec.specificationVersion, file_weights_dir=saved.weights_dir)
    ops = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "const" and types.is_tensor(op.outputs[0].sym_type):
            ops[op.name] = (types.builtin_to_string(op.outputs[0].dtype), op)
        elif op.op_type == "constexpr_lut_to_dense":
            # iOS16 packs the indices into bytes and keeps a flat LUT; iOS18's LUT is [..., entries, 1].
            lut = op.lut.val
            entries = lut.shape[0] if lut.ndim == 1 else lut.shape[-2]
            ops[op.name] = (f"lut{int(entries).bit_length() - 1}", op)
        elif op.op_type in ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize"):
            data = op.data if op.op_type == "constexpr_blockwise_shift_scale" else op.quantized_data
            ops[op.name] = (types.builtin_to_string(data.dtype), op)
    return spec, ops, prog


def _value(op: Any) -> np.ndarray:
    value = op.materialized_val_inference() if op.op_type.startswith("constexpr") else op.outputs[0].val
    return np.asarray(value, dtype=np.float32)


def validate(
    ct: ModuleType, path: Path, module: torch.nn.Module, src: Source, recipe: Recipe, kind: str
) -> dict[str, Any]:
    """Everything checkable without Core ML's runtime: I/O, ops, weight storage and values, weights-only parity."""
    spec, ops, prog = package_weights(ct, path)
    report: dict[str, Any] = {"io": check_io(spec, src, recipe, kind)}
    histogram = Counter(op.op_type for op in prog.functions["main"].operations)
    report["ops"] = dict(histogram.most_common())
    bad = {op: histogram[op] for op in FORBIDDEN_OPS if histogram[op]}
    if bad:
        raise CheckFailed(f"Core ML program still holds {bad}; reparameterization or the PConv form leaked")
    weights = check_weights(ops, module, recipe.precision)
    report["weights"] = weights.pop("summary")
    pre = None
    if kind == "image":
        pre = image_preprocessing(prog)
        report["image_preprocessing"] = {"scale": pre[0], "bias": pre[1], "std_folded_into": "patch_embed.proj"}
    report["weights_only_parity"] = weights_only_parity(weights, pre, src, recipe)
    return report


def check_io(spec: Any, src: Source, recipe: Recipe, kind: str) -> dict[str, Any]:
    """The spec's inputs and outputs are what an app and the runner expect."""
    desc = spec.description
    inputs = {f.name: f.type.WhichOneof("Type") for f in desc.input}
    outputs = {f.name: f.type.WhichOneof("Type") for f in desc.output}
    expected_in = {INPUT_IMAGE: "imageType"} if kind == "image" else {INPUT_TENSOR: "multiArrayType"}
    expected_out = {OUTPUT_NAME: "multiArrayType"}
    if src.ckpt.labels:
        expected_out |= {"classLabel": "stringType", "classLabel_probs": "dictionaryType"}
    problems = []
    if inputs != expected_in:
        problems.append(f"inputs {inputs} != {expected_in}")
    if outputs != expected_out:
        problems.append(f"outputs {outputs} != {expected_out}")
    feature = desc.input[0].type
    if kind == "image":
        img = feature.imageType
        if (img.width, img.height) != (recipe.imgsz, recipe.imgsz) or img.colorSpace != img.RGB:
            problems.append(f"image input {img.width}x{img.height} colour space {img.colorSpace}, not RGB")
    elif list(feature.multiArrayType.shape) != [recipe.batch, src.ckpt.config.in_chans, recipe.imgsz, recipe.imgsz]:
        problems.append(f"tensor input shape {list(feature.multiArrayType.shape)}")
    logits = next(f for f in desc.output if f.name == OUTPUT_NAME).type.multiArrayType
    if list(logits.shape) != [recipe.batch, src.ckpt.config.num_classes] or logits.dataType != logits.FLOAT32:
        problems.append(f"logits shape {list(logits.shape)} dtype {logits.dataType}, not float32")
    if src.ckpt.labels and desc.predictedFeatureName != "classLabel":
        problems.append(f"predictedFeatureName {desc.predictedFeatureName!r}")
    if problems:
        raise CheckFailed("Core ML spec: " + "; ".join(problems))
    return {"inputs": inputs, "outputs": outputs}


def check_weights(ops: dict[str, tuple[str, Any]], module: torch.nn.Module, precision: str) -> dict[str, Any]:
    """Every parameter of the exported model is in the package once, stored as `precision` says, with equal values."""
    compressed = COMPRESSED_STORAGE.get(precision)
    allowed = {precision} if compressed is None else {compressed, "fp16"}
    values: dict[str, np.ndarray] = {}
    storage: Counter[str] = Counter()
    errors: dict[str, float] = {}
    stored: dict[str, str] = {}
    kept, problems = [], []
    for name, param in module.state_dict().items():
        base = "p_" + name.replace(".", "_")  # torch.export names parameters p_<path>
        names = [base + s + c for s in ("", "_to_fp16") for c in ("", "_quantized", "_palettized")]
        matches = [n for n in names if n in ops]
        if len(matches) != 1:
            problems.append(f"{name}: {len(matches)} matching weights in the package")
            continue
        dtype, op = ops[matches[0]]
        want, got = param.detach().numpy(), _value(op)
        if got.shape != want.shape:
            problems.append(f"{name}: shape {got.shape} != {want.shape}")
            continue
        storage[dtype] += 1
        stored[name] = dtype
        if dtype not in allowed:
            problems.append(f"{name}: stored as {dtype}, expected {' or '.join(sorted(allowed))}")
        elif compressed and dtype == "fp16" and want.size > WEIGHT_THRESHOLD and not name.endswith("bias"):
            kept.append(name)  # coremltools skips a tensor whose shape its grouping does not divide
        kind, tol = WEIGHT_TOLERANCE[dtype]
        diff = got.astype(np.float64) - want
        err = np.abs(diff).max() if kind == "max" else np.sqrt(np.mean(diff**2))
        errors[name] = float(err / (np.abs(want).max() + 1e-12))
        if errors[name] > tol:
            problems.append(f"{name} ({dtype}): {kind} error {errors[name]:.3g} of its largest |w| (> {tol:.3g})")
        values[name] = got
    if problems:
        raise CheckFailed("Core ML package weights differ from the model: " + "; ".join(problems[:5]))
    worst = {}
    for dtype in storage:
        name = max((n for n in errors if stored[n] == dtype), key=errors.__getitem__)
        kind, tol = WEIGHT_TOLERANCE[dtype]
        worst[dtype] = {"error": kind, "worst": errors[name], "tensor": name, "tolerance": tol}
    summary = {"tensors": len(values), "storage": dict(storage), "left_uncompressed": kept, "relative_errors": worst}
    return {"summary": summary, **values}


def image_preprocessing(prog: Any) -> tuple[float, list[float]]:
    """The scale and per-channel bias the program applies to the image input (its first mul and add)."""
    op = prog.functions["main"].inputs[INPUT_IMAGE].child_ops[0]
    found = {}
    for op_type in ("mul", "add"):
        if op.op_type != op_type or op.y.val is None:
            raise CheckFailed(f"Core ML image input: expected a constant {op_type} next, found {op.op_type}")
        found[op_type] = np.asarray(op.y.val, np.float64).ravel()
        op = op.outputs[0].child_ops[0]
    return float(found["mul"][0]), found["add"].tolist()


def weights_only_parity(
    weights: dict[str, np.ndarray], pre: tuple[float, list[float]] | None, src: Source, recipe: Recipe
) -> dict[str, Any]:
    """The original model vs PyTorch running the package's weights and image scale/bias: what conversion costs."""
    from fnexport.targets import DEFAULT_DATA

    data = load_images(recipe.parity_data or DEFAULT_DATA, recipe.pre(), recipe.parity_samples, seed=1)
    model = src.module(CoremlTarget.pconv_form)
    model.load_state_dict({k.removeprefix("model."): torch.from_numpy(v) for k, v in weights.items()})
    x = data.x
    if pre is not None:
        mean, std = (
            np.array(v, np.float32)[None, :, None, None] for v in (recipe.preprocess.mean, recipe.preprocess.std)
        )
        pixels = (x * std + mean) * 255
        x = (pixels * pre[0] + np.array(pre[1], np.float32)[None, :, None, None]).astype(np.float32)
    report = compare(
        reference(src.ckpt.model, data.x),
        reference(model, x),
        tolerance_for(recipe.precision, recipe.tolerance),
        labels_for(src.ckpt.labels, src.ckpt.config.num_classes, data),
    )
    if not report.passed:
        raise CheckFailed(
            f"coreml {recipe.precision}: PyTorch with the package's weights already fails parity: "
            + "; ".join(report.failures)
        )
    return {"note": "PyTorch FP32 compute with the package's weights, not Core ML's runtime"} | report.to_dict()


class CoremlRunner:
    """Core ML prediction (macOS only): normalised NCHW in, logits out; images go back to pixels first."""

    def __init__(self, artifact: Path, manifest: dict) -> None:
        if platform.system() != "Darwin":
            raise BackendUnavailable(
                "Core ML prediction needs macOS; on Linux the package is converted and validated "
                "(spec, ops, weights: see details.validation in manifest.json) but not run"
            )
        ct = coremltools()
        details = manifest.get("details", {})
        precision = manifest.get("precision", "fp16")
        # GPU and Neural Engine compute in FP16: FP32 parity has to mean the CPU.
        units = ct.ComputeUnit.CPU_ONLY if precision == "fp32" else ct.ComputeUnit.ALL
        self.model = ct.models.MLModel(str(artifact), compute_units=units)
        self.image = details.get("input", "image") == "image"
        self.mean = np.array(manifest["input"]["mean"], np.float32)[:, None, None]
        self.std = np.array(manifest["input"]["std"], np.float32)[:, None, None]
        shape = manifest["input"]["shape"]
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.info = {"runtime": f"Core ML via coremltools {ct.__version__}", "compute_units": units.name}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image

        if not self.image:
            return np.asarray(self.model.predict({INPUT_TENSOR: x.astype(np.float32)})[OUTPUT_NAME], np.float32)
        outs = []
        for img in x:
            # Parity images are 8-bit pictures normalised by fnexport, so this recovers their pixels exactly.
            pixels = np.clip(np.rint((img * self.std + self.mean) * 255), 0, 255).astype(np.uint8)
            out = self.model.predict({INPUT_IMAGE: Image.fromarray(pixels.transpose(1, 2, 0))})[OUTPUT_NAME]
            outs.append(np.asarray(out, np.float32).reshape(-1))
        return np.stack(outs)

    def close(self) -> None:
        del self.model
