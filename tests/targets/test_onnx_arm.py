"""onnx-arm: .ort files and reduced-build operator lists, checked on x86 and (opt-in) on ARM kernels under qemu."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fnexport.comparison import reference
from fnexport.conversion import convert
from fnexport.data import load_images
from fnexport.demo import DIGITS_PRE
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe
from fnexport.targets.onnx import OrtRunner

pytest.importorskip("onnxruntime")

ARM_ROOT = Path(os.environ.get("FNEXPORT_ARM_ROOT", Path.home() / ".cache/fnexport/arm"))
RUN_ORT = Path(__file__).parents[1] / "arm" / "run_ort.py"


def digits_recipe(precision: str, digits_dirs) -> Recipe:
    return Recipe(
        target="onnx-arm",
        precision=precision,
        imgsz=DIGITS_PRE.size,
        preprocess={"crop_pct": DIGITS_PRE.crop_pct, "interpolation": DIGITS_PRE.interpolation},
        calib=str(digits_dirs[0]),
        calib_samples=300,
        parity_data=str(digits_dirs[1]),
        parity_samples=200,
    )


@pytest.fixture(scope="module")
def exported(digits_ckpt, digits_dirs, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    ckpt = load_checkpoint(digits_ckpt)
    out = tmp_path_factory.mktemp("onnx_arm")
    return {p: convert(ckpt, digits_recipe(p, digits_dirs), out / p) for p in ("fp32", "int8")}


def test_fp32_ort_matches_pytorch(exported):
    out, manifest = exported["fp32"]
    ort_file = out / "model.ort"
    # ORT format files are flatbuffers with the file identifier "ORTM" at bytes 4..8.
    assert ort_file.read_bytes()[4:8] == b"ORTM"
    assert manifest["artifact"] == "model.ort"
    parity = manifest["parity"]
    assert parity["passed"] and parity["max_abs"] <= 1e-3 and parity["top1"] == 1.0
    assert parity["n"] == 200


def test_required_operators_config_lists_what_the_model_uses(exported):
    out, manifest = exported["fp32"]
    config = (out / manifest["details"]["required_operators"]).read_text()
    lines = [ln for ln in config.splitlines() if ln and not ln.startswith("#")]
    ops = {op for ln in lines for op in ln.split(";")[2].split(",")}
    assert {"Conv", "Concat", "Split"} <= ops
    assert "BatchNormalization" not in ops and "ScatterND" not in ops
    assert "/tmp" not in config  # the header names the shipped file, not a temp path


def test_int8_ort_keeps_top1(exported):
    out, manifest = exported["int8"]
    parity = manifest["parity"]
    assert parity["passed"] and parity["top1"] >= 0.98
    assert parity["accuracy"] >= parity["ref_accuracy"] - 0.02
    quant = manifest["details"]["quantization"]
    assert quant["format"] == "QDQ" and "per-channel" in quant["weights"] and "symmetric" in quant["activations"]
    config_ops = manifest["details"]["ops"]
    assert any("QLinearConv" in names for names in config_ops.values())
    # int8 weights: the .ort shrinks to well under half of the FP32 one.
    fp32_size = (exported["fp32"][0] / "model.ort").stat().st_size
    assert (out / "model.ort").stat().st_size < 0.4 * fp32_size


def test_image_input_is_refused():
    from fnexport.errors import BadInput
    from fnexport.recipes import build_recipe

    with pytest.raises(BadInput, match="image"):
        build_recipe({"target": "onnx-arm", "input": "image"})


def _qemu_python() -> list[str]:
    return [
        "qemu-aarch64-static",
        "-L",
        str(ARM_ROOT / "rootfs"),
        str(ARM_ROOT / "rootfs/usr/bin/python3.11"),
    ]


@pytest.mark.arm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_arm_kernels_match_x86(request, precision, exported, digits_ckpt, digits_dirs, tmp_path):
    """The .ort on ONNX Runtime's aarch64 build (qemu-user) gives x86's answers."""
    if "arm" not in (request.config.option.markexpr or ""):
        pytest.skip("opt-in, slow (emulated): run `pytest -m arm` after tests/arm/setup.sh")
    if not shutil.which("qemu-aarch64-static") or not (ARM_ROOT / "site/onnxruntime").is_dir():
        pytest.skip(f"no aarch64 ONNX Runtime under {ARM_ROOT}: run tests/arm/setup.sh (see its header)")
    out, _ = exported[precision]
    x = load_images(digits_dirs[1], DIGITS_PRE, 64, seed=1).x
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ARM_ROOT / "site"), "PYTHONNOUSERSITE": "1"}
    cmd = [*_qemu_python(), str(RUN_ORT), str(out / "model.ort"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-2000:]
    machine, version = done.stdout.split()[-2:]
    assert machine == "aarch64"
    arm = np.load(tmp_path / "y.npy")
    runner = OrtRunner(out / "model.ort")
    x86 = np.concatenate([runner(x[i : i + 1]) for i in range(len(x))])
    ref = reference(load_checkpoint(digits_ckpt).model, x)
    print(f"onnxruntime {version} aarch64 vs x86: max abs {np.abs(arm - x86).max():.2e}")
    if precision == "fp32":
        # Measured 9.5e-7: same math, different SIMD kernels (NEON vs AVX) and summation order.
        assert np.abs(arm - x86).max() <= 1e-4
        assert np.abs(arm - ref).max() <= 1e-3
    else:
        # ARM's int8 kernels requantize differently (max abs 0.05 on logits of ~5); the class must not move.
        assert np.mean(arm.argmax(1) == x86.argmax(1)) >= 0.98
        assert np.mean(arm.argmax(1) == ref.argmax(1)) >= 0.98
