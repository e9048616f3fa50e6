"""What a saved .mlpackage holds, read back and checked on any OS: I/O, ops, weight storage, weights-only parity."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fnexport.comparison import compare, compare_features, feature_reference, tolerance_for
from fnexport.console import log, require
from fnexport.errors import CheckFailed
from fnexport.recipes import Recipe
from fnexport.targets.base import Source
from fnexport.targets.graph import output_names

INPUT_IMAGE, INPUT_TENSOR, OUTPUT_NAME = "image", "input", "logits"
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


def enumerated_hw(recipe: Recipe) -> list[tuple[int, int]]:
    """--dynamic-hw's (height, width) sizes: the exported one first (the package's default), then every pair of
    the profile's heights and widths (--profile-hw MIN,OPT,MAX, else a quarter, the size and twice it)."""
    heights, widths = recipe.hw_profile()
    grid = [(h, w) for h in sorted(set(heights)) for w in sorted(set(widths))]
    return list(dict.fromkeys([recipe.hw, *grid]))


def load_coremltools() -> ModuleType:
    """Import coremltools without its import-time log noise (no native runtime off macOS, untested torch)."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return require("coremltools", "coreml")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """coremltools draws progress bars on stderr for every pass; keep them for --verbose only."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        yield
    lines = [ln.strip() for ln in buf.getvalue().replace("\r", "\n").splitlines()]
    for line in dict.fromkeys(ln for ln in lines if ln and "/s]" not in ln):
        log.debug("coremltools: %s", line)


def package_weights(ct: ModuleType, path: Path) -> tuple[Any, dict[str, tuple[str, Any]], Any]:
    """The saved package's spec, its weights by op name (storage dtype, op), and its MIL program."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    saved = ct.models.MLModel(str(path), skip_model_load=True)
    spec = saved.get_spec()
    with quiet():
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


def validate_package(
    ct: ModuleType, path: Path, module: torch.nn.Module, src: Source, recipe: Recipe, kind: str, pconv_form: str
) -> dict[str, Any]:
    """Everything checkable without Core ML's runtime: I/O, ops, weight storage and values, weights-only parity."""
    spec, ops, prog = package_weights(ct, path)
    report: dict[str, Any] = {"io": check_io(spec, prog, src, recipe, kind)}
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
    report["weights_only_parity"] = weights_only_parity(weights, pre, src, recipe, pconv_form)
    return report


def check_io(spec: Any, prog: Any, src: Source, recipe: Recipe, kind: str) -> dict[str, Any]:
    """The spec's inputs and outputs are what an app and the runner expect, and the program's outputs agree."""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    cfg, desc = src.ckpt.config, spec.description
    inputs = {f.name: f.type.WhichOneof("Type") for f in desc.input}
    outputs = {f.name: f.type.WhichOneof("Type") for f in desc.output}
    expected_in = {INPUT_IMAGE: "imageType"} if kind == "image" else {INPUT_TENSOR: "multiArrayType"}
    names = output_names(cfg)
    expected_out = dict.fromkeys(names, "multiArrayType")
    if src.ckpt.labels:
        expected_out |= {"classLabel": "stringType", "classLabel_probs": "dictionaryType"}
    problems = []
    if inputs != expected_in:
        problems.append(f"inputs {inputs} != {expected_in}")
    if outputs != expected_out:
        problems.append(f"outputs {outputs} != {expected_out}")
    (h, w), batch = recipe.hw, recipe.batch
    sizes = enumerated_hw(recipe) if recipe.dynamic_hw else []
    feature = desc.input[0].type
    if kind == "image":
        img = feature.imageType
        enumerated = [(s.height, s.width) for s in img.enumeratedSizes.sizes]
        if (img.height, img.width) != (h, w) or img.colorSpace != img.RGB:
            problems.append(f"image input {img.height}x{img.width} (HxW) colour space {img.colorSpace}, not RGB")
    else:
        array = feature.multiArrayType
        shapes = [list(s.shape) for s in array.enumeratedShapes.shapes]
        enumerated = [tuple(s[2:]) for s in shapes if s[:2] == [batch, cfg.in_chans]]
        if list(array.shape) != [batch, cfg.in_chans, h, w] or len(enumerated) != len(shapes):
            problems.append(f"tensor input shape {list(array.shape)}, enumerated {shapes}")
    if enumerated != sizes:
        problems.append(f"enumerated sizes {enumerated} != {sizes}")
    # A fixed package states each output's shape; an enumerated one leaves them to the runtime, so the program
    # must keep height and width symbolic (a size baked in would break the other enumerated sizes).
    program = {v.name: list(v.shape) for v in prog.functions["main"].outputs}
    if cfg.features:
        if [f.name for f in desc.output] != names:
            problems.append(f"output order {[f.name for f in desc.output]} != {names}")
        for o in cfg.outputs():
            want: list = [batch, o["channels"], h // o["stride"], w // o["stride"]]
            got = [("symbolic" if is_symbolic(d) else d) for d in program.get(o["name"], [])]
            stated = next((list(f.type.multiArrayType.shape) for f in desc.output if f.name == o["name"]), None)
            if recipe.dynamic_hw:
                want = want[:2] + ["symbolic"] * 2
            if got != want or stated != ([] if recipe.dynamic_hw else want):
                problems.append(f"{o['name']}: program shape {got}, spec shape {stated}, expected {want}")
    else:
        logits = next(f for f in desc.output if f.name == OUTPUT_NAME).type.multiArrayType
        if list(logits.shape) != [batch, cfg.num_classes] or logits.dataType != logits.FLOAT32:
            problems.append(f"logits shape {list(logits.shape)} dtype {logits.dataType}, not float32")
    if src.ckpt.labels and desc.predictedFeatureName != "classLabel":
        problems.append(f"predictedFeatureName {desc.predictedFeatureName!r}")
    if problems:
        raise CheckFailed("Core ML spec: " + "; ".join(problems))
    shapes_out = {n: [("symbolic" if is_symbolic(d) else d) for d in program[n]] for n in names}
    return {"inputs": inputs, "outputs": outputs, "program_output_shapes": shapes_out}


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
        base = name.replace(".", "_")  # torch.export names parameters p_<path>, buffers (norm scales) b_<path>
        names = [f"{p}_{base}{s}{c}" for p in "pb" for s in ("", "_to_fp16") for c in ("", "_quantized", "_palettized")]
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
    weights: dict[str, np.ndarray], pre: tuple[float, list[float]] | None, src: Source, recipe: Recipe, pconv_form: str
) -> dict[str, Any]:
    """The original model vs PyTorch running the package's weights and image scale/bias: what conversion costs."""
    data = src.parity_inputs()
    model = copy.deepcopy(src.module(pconv_form))
    model.load_state_dict({k.removeprefix("model."): torch.from_numpy(v) for k, v in weights.items()})
    x = data.x
    if pre is not None:
        mean, std = (
            np.array(v, np.float32)[None, :, None, None] for v in (recipe.preprocess.mean, recipe.preprocess.std)
        )
        pixels = (x * std + mean) * 255
        x = (pixels * pre[0] + np.array(pre[1], np.float32)[None, :, None, None]).astype(np.float32)
    cfg = src.ckpt.config
    tol = tolerance_for(recipe.precision, recipe.tolerance, backbone=cfg.features)
    outs = feature_reference(model, x)  # the model's outputs (a backbone's four), each over every image
    if cfg.features:
        report = compare_features(src.reference(), outs, tol, output_names(cfg))
    else:
        report = compare(src.reference(), outs[0], tol, src.labels())
    if not report.passed:
        raise CheckFailed(
            f"coreml {recipe.precision}: PyTorch with the package's weights already fails parity: "
            + "; ".join(report.failures)
        )
    return {"note": "PyTorch FP32 compute with the package's weights, not Core ML's runtime"} | report.to_dict()
