"""Core ML: what can be checked on Linux (spec, ops, weights, metadata), and prediction parity on macOS."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from fnexport.conversion import convert
from fnexport.data import IMAGENET_STD
from fnexport.demo import DIGITS_PRE, LABELS
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.model.reparam import reparameterize
from fnexport.recipes import Recipe
from fnexport.targets.coreml import PRECISIONS, CoremlTarget, fold_std
from fnexport.targets.coreml_package import check_weights, load_coremltools, package_weights
from tests.test_cli import cli

pytest.importorskip("coremltools")
ON_MAC = platform.system() == "Darwin"


def recipe(precision: str, **fields) -> Recipe:
    # A random-weights model's logits barely differ between classes, so its top-1 flips with any
    # compression; the digits model below checks agreement, this one the package's structure.
    return Recipe(
        target="coreml", precision=precision, imgsz=64, parity_samples=8, tolerance={"min_top1": 0.0}, **fields
    )


@pytest.fixture(scope="module")
def custom_ckpt(custom_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("coreml_ckpt") / "custom.pth"
    torch.save(custom_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def packages(custom_ckpt, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """The non-paper-width model (7 classes, no labels) at every precision, image input."""
    ckpt = load_checkpoint(custom_ckpt, act="relu")
    out = tmp_path_factory.mktemp("coreml")
    return {p: convert(ckpt, recipe(p), out / p) for p in PRECISIONS}


def weight_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in (package / "Data/com.apple.CoreML/weights").iterdir())


def test_fold_std_turns_pixels_minus_mean_into_the_normalised_input(custom_model):
    """Core ML images get one scale for all channels: 1/std has to live in the stem conv instead."""
    std = (0.229, 0.224, 0.225)
    x = torch.randn(2, 3, 64, 64)
    folded = fold_std(reparameterize(custom_model), std)
    unscaled = x * torch.tensor(std)[None, :, None, None]  # pixel/255 - mean
    with torch.no_grad():
        ref = custom_model(x)
        assert (folded(unscaled) - ref).abs().max() < 1e-5
        # Without the fold the same input is off by orders of magnitude more (this random model's
        # logits are ~0.2, so that is still small in absolute terms).
        assert (reparameterize(custom_model)(unscaled) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_package_validates_on_linux(packages, precision, custom_model):
    out, manifest = packages[precision]
    package = out / manifest["artifact"]
    assert manifest["artifact"] == "model.mlpackage" and (package / "Manifest.json").is_file()
    details = manifest["details"]
    assert details["format"] == "mlprogram" and details["conversion"].startswith("torch.export")
    val = details["validation"]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in custom_model.modules())
    assert val["ops"]["conv"] == convs and "batch_norm" not in val["ops"]
    assert val["io"]["inputs"] == {"image": "imageType"}
    assert val["image_preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert val["image_preprocessing"]["bias"] == pytest.approx([-m for m in manifest["input"]["mean"]])
    params = len(reparameterize(custom_model).state_dict())
    assert val["weights"]["tensors"] == params
    weights_parity = val["weights_only_parity"]
    assert weights_parity["passed"]
    if precision == "fp32":
        # The std fold and the image scale/bias reproduce the normalised input: FP32 error only.
        assert weights_parity["max_abs"] < 1e-4
    if not ON_MAC:
        assert manifest["parity"]["ran"] is False and "macOS" in manifest["parity"]["reason"]


def test_weight_storage_per_precision(packages):
    """Compression shows in the bytes on disk, measured against the FP16 package."""
    fp16 = weight_bytes(packages["fp16"][0] / "model.mlpackage")
    size = {p: weight_bytes(out / "model.mlpackage") / fp16 for p, (out, _) in packages.items()}
    assert size["fp32"] == pytest.approx(2.0, rel=0.02)
    assert 0.45 < size["int8"] < 0.6 and 0.45 < size["palettize8"] < 0.6
    assert 0.2 < size["int4"] < 0.35 and 0.2 < size["palettize4"] < 0.35
    for precision, storage in [("int8", "int8"), ("int4", "int4"), ("palettize8", "lut8"), ("palettize4", "lut4")]:
        weights = packages[precision][1]["details"]["validation"]["weights"]
        assert weights["storage"][storage] > 0 and weights["left_uncompressed"] == []


def test_weight_check_catches_a_changed_weight(packages, custom_ckpt):
    ct = load_coremltools()
    _, ops, _ = package_weights(ct, packages["int8"][0] / "model.mlpackage")
    model = fold_std(reparameterize(load_checkpoint(custom_ckpt, act="relu").model), IMAGENET_STD)
    check_weights(ops, model, "int8")
    with torch.no_grad():
        model.stages[2].blocks[0].mlp[0].weight[0, 0] += 0.05
    with pytest.raises(CheckFailed, match=r"stages\.2\.blocks\.0\.mlp\.0\.weight"):
        check_weights(ops, model, "int8")


def test_classifier_labels_and_metadata(digits_ckpt, digits_dirs, tmp_path):
    pre = {"crop_pct": DIGITS_PRE.crop_pct, "interpolation": DIGITS_PRE.interpolation}
    r = Recipe(
        target="coreml", precision="fp16", imgsz=64, preprocess=pre, parity_data=str(digits_dirs[1]), parity_samples=200
    )
    out, manifest = convert(load_checkpoint(digits_ckpt), r, tmp_path / "digits")
    ct = load_coremltools()
    spec = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True).get_spec()
    desc = spec.description
    assert desc.predictedFeatureName == "classLabel" and desc.predictedProbabilitiesName == "classLabel_probs"
    assert [o.name for o in desc.output] == ["classLabel", "classLabel_probs", "logits"]
    assert (desc.input[0].type.imageType.width, desc.input[0].type.imageType.height) == (64, 64)
    ops = spec.mlProgram.functions["main"].block_specializations.values()
    classify = [op for block in ops for op in block.operations if op.type == "classify"]
    assert len(classify) == 1
    meta = desc.metadata
    assert manifest["source"]["sha256"][:12] == meta.versionString
    assert "fnexport" in meta.author and meta.license and "FasterNet" in meta.shortDescription
    preprocess = json.loads(meta.userDefined["fnexport.preprocess"])
    assert preprocess["mean"] == list(r.preprocess.mean) and preprocess["std"] == list(r.preprocess.std)
    assert json.loads(meta.userDefined["fnexport.labels"]) == LABELS
    weights_parity = manifest["details"]["validation"]["weights_only_parity"]
    assert weights_parity["n"] == 200 and weights_parity["top1"] >= 0.98


def test_cli_tensor_input_and_labels_file(custom_ckpt, tmp_path):
    names = [f"class {i}" for i in range(7)]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    args = ["convert", str(custom_ckpt), "--act", "relu", "-t", "coreml", "-p", "fp16", "--imgsz", "64"]
    code, stdout, stderr = cli(
        *args, "--input", "tensor", "--labels", str(tmp_path / "labels.txt"), "-o", str(tmp_path / "t"), "--json"
    )
    assert code == 0, stderr
    manifest = json.loads(stdout)
    assert manifest["labels"] == names and manifest["details"]["input"] == "tensor"
    io = manifest["details"]["validation"]["io"]
    assert io["inputs"] == {"input": "multiArrayType"} and "classLabel" in io["outputs"]
    (tmp_path / "six.txt").write_text("\n".join(names[:6]))
    code, stdout, stderr = cli(*args, "--labels", str(tmp_path / "six.txt"), "-o", str(tmp_path / "u"))
    assert code == 2 and "7 classes" in stderr and stdout == ""


def test_image_input_needs_batch_one(custom_ckpt, tmp_path):
    with pytest.raises(BadInput, match="--batch 1"):
        convert(load_checkpoint(custom_ckpt, act="relu"), recipe("fp16", batch=4), tmp_path / "b")


@pytest.mark.skipif(ON_MAC, reason="Core ML prediction works on macOS")
def test_runner_is_unavailable_off_macos(packages):
    out, manifest = packages["fp16"]
    with pytest.raises(BackendUnavailable, match="macOS"):
        CoremlTarget().runner(out / manifest["artifact"], manifest)


@pytest.mark.macos
@pytest.mark.skipif(not ON_MAC, reason="Core ML prediction needs macOS; coremltools on Linux converts but cannot run")
@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8"])
def test_prediction_parity_on_macos(digits_ckpt, digits_dirs, precision, tmp_path):
    pre = {"crop_pct": DIGITS_PRE.crop_pct, "interpolation": DIGITS_PRE.interpolation}
    r = Recipe(
        target="coreml",
        precision=precision,
        imgsz=64,
        preprocess=pre,
        parity_data=str(digits_dirs[1]),
        parity_samples=200,
    )
    _, manifest = convert(load_checkpoint(digits_ckpt), r, tmp_path / precision)
    parity = manifest["parity"]
    assert parity["passed"] and parity["top1"] >= 0.98
    assert np.isfinite(parity["max_abs"])


NAMES = ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
CHANNELS = [40, 80, 160, 320]  # the fork_feat T0 of tests/conftest.py
STRIDES = [4, 8, 16, 32]


@pytest.fixture(scope="module")
def backbone_packages(backbone_files, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """The fork_feat T0 at 64x96 (not square): fp32 (tensor input, the backbone default) and fp16 image input."""
    ckpt = load_checkpoint(backbone_files["plain"])
    out = tmp_path_factory.mktemp("coreml_backbone")
    recipes = {
        "fp32": Recipe(target="coreml", precision="fp32", imgsz=(64, 96), parity_samples=8),
        "fp16": Recipe(target="coreml", precision="fp16", imgsz=(64, 96), parity_samples=8, input="image"),
    }
    return {p: convert(ckpt, r.fit(ckpt.config), out / p) for p, r in recipes.items()}


def spec_of(package: Path):
    return load_coremltools().models.MLModel(str(package), skip_model_load=True).get_spec()


def test_backbone_package_has_the_four_outputs_in_stride_order(backbone_packages):
    out, manifest = backbone_packages["fp32"]
    assert manifest["kind"] == "backbone" and manifest["labels"] is None
    assert [o["name"] for o in manifest["outputs"]] == NAMES
    assert [o["shape"] for o in manifest["outputs"]] == [
        [1, c, 64 // s, 96 // s] for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]
    spec = spec_of(out / manifest["artifact"])
    assert spec.WhichOneof("Type") == "mlProgram"
    desc = spec.description
    assert [f.name for f in desc.input] == ["input"]
    array = desc.input[0].type.multiArrayType
    assert list(array.shape) == [1, 3, 64, 96] and array.WhichOneof("ShapeFlexibility") is None
    assert [f.name for f in desc.output] == NAMES
    for f, c, s in zip(desc.output, CHANNELS, STRIDES, strict=True):
        assert list(f.type.multiArrayType.shape) == [1, c, 64 // s, 96 // s]
        assert f.type.multiArrayType.dataType == f.type.multiArrayType.FLOAT32
    # No classifier config: no predicted feature, no classify op anywhere in the program.
    assert desc.predictedFeatureName == "" and desc.predictedProbabilitiesName == ""
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    ops = [op.type for block in blocks for op in block.operations]
    assert "classify" not in ops and "batch_norm" not in ops and "softmax" not in ops
    meta = desc.metadata
    assert "backbone" in meta.shortDescription and "classifier" not in meta.shortDescription
    assert "feat_s4: 40 channels, stride 4" in meta.shortDescription and "64x96" in meta.shortDescription
    # The MIL program read back from the package states the same four shapes.
    _, _, prog = package_weights(load_coremltools(), out / manifest["artifact"])
    program = {v.name: list(v.shape) for v in prog.functions["main"].outputs}
    assert program == {o["name"]: o["shape"] for o in manifest["outputs"]}


def test_backbone_weights_and_norms_are_in_the_package(backbone_packages, backbone_files):
    """Every weight, the norms' per-channel scale and shift included (as mul + add), and per-output
    weights-only parity; Core ML itself did not run (Linux)."""
    _, manifest = backbone_packages["fp32"]
    val = manifest["details"]["validation"]
    assert val["ops"]["mul"] >= 4 and val["ops"]["add"] >= 4 and "batch_norm" not in val["ops"]
    folded = reparameterize(load_checkpoint(backbone_files["plain"]).model).state_dict()
    assert sum(k.startswith("norm") for k in folded) == 8  # norm0/2/4/6 as scale and shift
    assert (
        val["weights"]["storage"] == {"fp32": len(folded)} and val["weights"]["relative_errors"]["fp32"]["worst"] == 0
    )
    wop = val["weights_only_parity"]
    assert [o["name"] for o in wop["outputs"]] == NAMES
    assert all(o["passed"] and o["max_rel"] < 1e-5 for o in wop["outputs"])
    assert "top1" not in wop
    if not ON_MAC:
        assert manifest["parity"]["ran"] is False and "macOS" in manifest["parity"]["reason"]


def test_backbone_image_input_is_non_square(backbone_packages):
    out, manifest = backbone_packages["fp16"]
    img = spec_of(out / manifest["artifact"]).description.input[0].type.imageType
    assert (img.height, img.width) == (64, 96) and img.WhichOneof("SizeFlexibility") is None
    val = manifest["details"]["validation"]
    assert val["io"]["inputs"] == {"image": "imageType"}
    assert val["image_preprocessing"]["bias"] == pytest.approx([-m for m in manifest["input"]["mean"]])
    assert all(o["passed"] for o in val["weights_only_parity"]["outputs"])


def test_backbone_dynamic_hw_enumerates_sizes_int8(backbone_files, tmp_path):
    """--dynamic-hw on Core ML: the 3x3 grid of --profile-hw's sizes, the exported size first (the default)."""
    code, stdout, stderr = cli(
        "convert", str(backbone_files["mmdet"]), "-t", "coreml", "-p", "int8", "--imgsz", "64,96", "--dynamic-hw",
        "--profile-hw", "64,96,128", "-o", str(tmp_path / "d"), "--json",
    )  # fmt: skip
    assert code == 0, stderr
    manifest = json.loads(stdout)
    sizes = [[64, 96], [64, 64], [64, 128], [96, 64], [96, 96], [96, 128], [128, 64], [128, 96], [128, 128]]
    assert manifest["details"]["enumerated_hw"] == sizes
    assert manifest["input"]["shape"] == [1, 3, "height", "width"] and manifest["input"]["dynamic_hw"] is True
    assert manifest["outputs"][0]["shape"] == [1, 40, "height/4", "width/4"]
    desc = spec_of(tmp_path / "d" / manifest["artifact"]).description
    array = desc.input[0].type.multiArrayType
    assert list(array.shape) == [1, 3, 64, 96]  # the default
    assert [list(s.shape) for s in array.enumeratedShapes.shapes] == [[1, 3, h, w] for h, w in sizes]
    assert [f.name for f in desc.output] == NAMES
    val = manifest["details"]["validation"]
    # Nothing in the program is specialised to 64x96: height and width of every output stay symbolic.
    shapes = val["io"]["program_output_shapes"]
    assert [shapes[n] for n in NAMES] == [[1, c, "symbolic", "symbolic"] for c in CHANNELS]
    assert val["weights"]["storage"]["int8"] > 0 and all(o["passed"] for o in val["weights_only_parity"]["outputs"])
    # The gate checks other sizes of a --dynamic-hw artifact, but a Core ML one only at the sizes it enumerates.
    code, _, stderr = cli("parity", str(backbone_files["mmdet"]), str(tmp_path / "d"), "--imgsz", "128,32")
    assert code == 2 and "takes only the sizes it enumerates; choose one of 64,96 64,64" in stderr
    if not ON_MAC:
        code, stdout, stderr = cli("parity", str(backbone_files["mmdet"]), str(tmp_path / "d"), "--imgsz", "96,128")
        assert code == 1 and "NOT RUN" in stdout and "macOS" in stderr


@pytest.mark.skipif(ON_MAC, reason="Core ML prediction works on macOS")
def test_backbone_runner_is_unavailable_off_macos(backbone_packages):
    out, manifest = backbone_packages["fp32"]
    with pytest.raises(BackendUnavailable, match="macOS"):
        CoremlTarget().runner(out / manifest["artifact"], manifest)
