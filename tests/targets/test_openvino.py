import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from fnexport import manifest as mf
from fnexport.comparison import reference
from fnexport.conversion import convert
from fnexport.data import load_images
from fnexport.errors import BadInput, CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe
from fnexport.targets import get_target
from fnexport.targets.base import Source

ov = pytest.importorskip("openvino")

# The digits fixture is trained at 64x64 on whole, upsampled glyphs (see fnexport.demo.DIGITS_PRE).
DIGITS = {"imgsz": 64, "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear"}}
HELD_OUT = 400  # more than the 360 held-out images: parity runs on all of them


def _recipe(digits_dirs, **kw) -> Recipe:
    return Recipe(**{"target": "openvino", **DIGITS, "parity_data": str(digits_dirs[1]), **kw})


def _convert(digits_ckpt, digits_dirs, out, **kw) -> dict:
    recipe = _recipe(digits_dirs, **{"parity_samples": HELD_OUT, "calib": str(digits_dirs[0]), **kw})
    return convert(load_checkpoint(digits_ckpt), recipe, out)[1]


def _bf16_cpu() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def fp32(digits_ckpt, digits_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "fp32"
    return out, _convert(digits_ckpt, digits_dirs, out, precision="fp32")


@pytest.fixture(scope="module")
def int8(digits_ckpt, digits_dirs, tmp_path_factory):
    pytest.importorskip("nncf")
    out = tmp_path_factory.mktemp("ov") / "int8"
    return out, _convert(digits_ckpt, digits_dirs, out, precision="int8", calib_samples=300)


def test_fp32_ir_matches_pytorch_in_f32(fp32, digits_ckpt, digits_dirs):
    out, manifest = fp32
    parity, details = manifest["parity"], manifest["details"]
    assert parity["n"] == 360 and parity["passed"]
    assert parity["max_abs"] <= 1e-3 and parity["top1"] == 1.0
    assert parity["ran"]["precision"] == "f32" and details["inference_precision_hint"] == "f32"
    assert details["weights"] == "fp32" and details["performance_hint"] == "LATENCY"
    assert manifest["artifact"] == "openvino_model"
    assert sorted(p.name for p in (out / "openvino_model").iterdir()) == ["model.bin", "model.xml"]
    # The clean graph: BN folded into 44 convolutions, PConv as split/concat, no scatter.
    ops = details["ops"]
    assert ops["Convolution"] == 44 and ops["VariadicSplit"] == ops["Concat"] == 13
    assert not {"BatchNormInference", "ScatterNDUpdate", "FakeQuantize"} & set(ops)

    # Reopened from disk with one thread, it still runs f32 and matches the unfolded PyTorch model.
    loaded = mf.read(out)
    runner = get_target("openvino").runner(out / loaded["artifact"], loaded, threads=1)
    try:
        assert runner.info["threads"] == 1 and runner.info["precision"] == "f32"
        assert runner.batch == 1
        x = load_images(digits_dirs[1], _recipe(digits_dirs).pre(), 8).x
        ref = reference(load_checkpoint(digits_ckpt).model, x)
        got = np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])
        assert np.abs(got - ref).max() <= 1e-3
    finally:
        runner.close()


def test_modified_weights_are_detected(fp32, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(fp32[0], out)
    mf.read(out)
    weights = out / "openvino_model" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="differs from its manifest"):
        mf.read(out)


def test_int8_keeps_agreement_and_accuracy(int8, fp32):
    out, manifest = int8
    parity, details = manifest["parity"], manifest["details"]
    assert parity["n"] == 360 and parity["passed"]
    assert parity["top1"] >= 0.99
    assert abs(parity["accuracy"] - fp32[1]["parity"]["accuracy"]) <= 0.01
    assert parity["ran"]["precision"] == "f32"
    assert details["weights"] == "int8" and details["preset"] == "performance"
    assert details["subset_size"] == details["calibration"]["samples"] == 300
    assert details["ops"]["FakeQuantize"] > 40
    # INT8 weights: well under half the FP32 file.
    size = (out / "openvino_model" / "model.bin").stat().st_size
    assert size < 0.4 * (fp32[0] / "openvino_model" / "model.bin").stat().st_size


def test_fp16_weights_run_in_f32(digits_ckpt, digits_dirs, fp32, tmp_path):
    manifest = _convert(digits_ckpt, digits_dirs, tmp_path / "fp16", precision="fp16", parity_samples=64)
    assert manifest["parity"]["passed"] and manifest["parity"]["ran"]["precision"] == "f32"
    assert manifest["details"]["weights"] == "fp16"
    size = (tmp_path / "fp16" / "openvino_model" / "model.bin").stat().st_size
    assert size < 0.55 * (fp32[0] / "openvino_model" / "model.bin").stat().st_size


def test_bf16_is_reported_as_bf16(digits_ckpt, digits_dirs, fp32, tmp_path):
    if not _bf16_cpu():
        with pytest.raises(BadInput, match="cannot run bf16"):
            _convert(digits_ckpt, digits_dirs, tmp_path / "bf16", precision="bf16")
        return
    manifest = _convert(digits_ckpt, digits_dirs, tmp_path / "bf16", precision="bf16", parity_samples=64)
    parity = manifest["parity"]
    assert manifest["details"]["inference_precision_hint"] == "bf16"
    assert parity["passed"] and parity["ran"]["precision"] == "bf16"
    # bf16 keeps 8 mantissa bits: if this error were f32-sized, bf16 would not really have run.
    assert parity["max_abs"] > 20 * fp32[1]["parity"]["max_abs"]


def test_static_batch_int8_and_dynamic_batch(digits_ckpt, digits_dirs, tmp_path):
    pytest.importorskip("nncf")
    ckpt = load_checkpoint(digits_ckpt)
    recipe = _recipe(digits_dirs, precision="int8", batch=4, calib=str(digits_dirs[0]), calib_samples=64)
    out, manifest = convert(ckpt, recipe, tmp_path / "b4")
    assert manifest["input"]["shape"] == [4, 3, 64, 64] and manifest["parity"]["passed"]
    runner = get_target("openvino").runner(out / manifest["artifact"], manifest)
    try:
        # A static batch is one request, which THROUGHPUT would confine to one stream's threads.
        assert runner.batch == 4 and runner.info["performance_hint"] == "LATENCY"
    finally:
        runner.close()

    recipe = _recipe(digits_dirs, dynamic=True, batch=4, parity_samples=8)
    out, manifest = convert(ckpt, recipe, tmp_path / "dyn")
    assert manifest["parity"]["passed"]
    runner = get_target("openvino").runner(out / manifest["artifact"], manifest)
    try:
        assert runner.batch is None and runner.info["performance_hint"] == "THROUGHPUT"
        x = load_images(digits_dirs[1], recipe.pre(), 7).x
        # Split over the parallel requests and joined back: same rows, same order as one at a time.
        one_by_one = np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])
        assert np.abs(runner(x) - one_by_one).max() < 1e-4
    finally:
        runner.close()


@pytest.mark.slow
def test_max_drop_uses_accuracy_control(digits_ckpt, digits_dirs, tmp_path):
    pytest.importorskip("nncf")
    manifest = _convert(
        digits_ckpt, digits_dirs, tmp_path / "ac", precision="int8", calib_samples=60, parity_samples=32, max_drop=0.01
    )
    control = manifest["details"]["accuracy_control"]
    assert manifest["details"]["quantizer"].startswith("nncf.quantize_with_accuracy_control")
    assert control["max_drop"] == 0.01
    assert control["accuracy_int8"] >= control["accuracy_fp32"] - 0.01
    assert manifest["parity"]["passed"]


def test_max_drop_needs_labelled_calibration(digits_ckpt, digits_dirs):
    from fnexport.targets.openvino import labelled_items

    recipe = _recipe(digits_dirs, precision="int8", calib="embedded:natural", calib_samples=4, max_drop=0.01)
    src = Source(load_checkpoint(digits_ckpt), recipe)
    with pytest.raises(BadInput, match="labelled calibration folder"):
        labelled_items(src, src.calibration())
    shutil.rmtree(src.workdir)


@pytest.mark.parametrize(
    ("target", "precision"), [("openvino", "fp32"), ("openvino", "bf16"), ("tensorrt", "int8"), ("onnx", "fp32")]
)
def test_max_drop_only_for_int8_on_searching_targets(target, precision):
    with pytest.raises(ValidationError, match="max_drop"):
        Recipe(target=target, precision=precision, max_drop=0.01)
    assert Recipe(target="openvino", precision="int8", calib="embedded:digits", max_drop=0.01).max_drop == 0.01
