"""The release gate: catches broken artifacts, judges INT8 by agreement, never passes what it did not run."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from fnexport.comparison import ParityStats, compare, tolerance_for
from fnexport.conversion import convert
from fnexport.gate import all_passed, gate
from fnexport.manifest import sha256_artifact
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance
from tests.conftest import randomize_bn
from tests.test_cli import cli


def _digits_recipe(digits_dirs, **kw):
    train, test = digits_dirs
    return Recipe(**{
        "target": "onnx", "imgsz": 64, "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear"},
        "calib": str(train), "calib_samples": 200, "parity_data": str(test), "parity_samples": 360, **kw,
    })  # fmt: skip


@pytest.fixture(scope="module")
def digits_artifacts(digits_ckpt, digits_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    ckpt = load_checkpoint(digits_ckpt)
    return {p: convert(ckpt, _digits_recipe(digits_dirs, precision=p), root / p)[0] for p in ("fp32", "fp16", "int8")}


def test_fp32_fp16_int8_pass_with_accuracy_side_by_side(digits_ckpt, digits_dirs, digits_artifacts, tmp_path):
    report_json, report_md = tmp_path / "r.json", tmp_path / "r.md"
    dirs = [str(digits_artifacts[p]) for p in ("fp32", "fp16", "int8")]
    code, stdout, stderr = cli("parity", str(digits_ckpt), *dirs, "--data", str(digits_dirs[1]), "--samples", "360",
                               "--report", str(report_json), "--report", str(report_md), "--json")  # fmt: skip
    assert code == 0, stderr
    rows = {r["precision"]: r for r in json.loads(stdout)}
    assert json.loads(report_json.read_text()) == json.loads(stdout)
    assert "| int8 |" in report_md.read_text()
    fp32, fp16, int8 = (rows[p]["report"] for p in ("fp32", "fp16", "int8"))
    assert fp32["max_abs"] < 1e-3 and fp32["accuracy"] > 0.9
    assert fp16["top1"] >= 0.99 and fp16["cosine"] > 0.999
    # INT8 is judged by agreement and cosine; its max error is far above FP32's atol and that is fine
    assert int8["tolerance"]["atol"] is None and int8["max_abs"] > 1e-3
    assert int8["top1"] >= 0.98 and abs(int8["accuracy"] - fp32["accuracy"]) < 0.02
    assert fp32["n"] == int8["n"] == 360


def _perturb(src_dir, dst_dir, rehash: bool):
    import shutil

    shutil.copytree(src_dir, dst_dir)
    model = onnx.load(str(dst_dir / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name == "stages.4.blocks.3.mlp.0.weight")
    w = numpy_helper.to_array(init).copy()
    w *= 1.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst_dir / "model.onnx"))
    if rehash:
        manifest = json.loads((dst_dir / "manifest.json").read_text())
        manifest["sha256"] = sha256_artifact(dst_dir / "model.onnx")
        (dst_dir / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_artifact_fails_before_anything_runs(digits_ckpt, digits_artifacts, tmp_path):
    _perturb(digits_artifacts["fp32"], tmp_path / "tampered", rehash=False)
    code, _stdout, stderr = cli("parity", str(digits_ckpt), str(digits_artifacts["fp32"]), str(tmp_path / "tampered"))
    assert code == 1
    assert "tampered/model.onnx" in stderr and "sha256" in stderr and "nothing was run" in stderr
    assert "Running onnx" not in stderr


def test_perturbed_weight_fails_and_is_localized(digits_ckpt, digits_dirs, digits_artifacts, tmp_path):
    _perturb(digits_artifacts["fp32"], tmp_path / "drift", rehash=True)
    code, _, stderr = cli("parity", str(digits_ckpt), str(tmp_path / "drift"), "--data", str(digits_dirs[1]),
                          "--samples", "50", "--localize", "--report", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 1 and "drift" in stderr and "parity gate failed" in stderr
    result = json.loads((tmp_path / "r.json").read_text())[0]
    assert result["status"] == "FAIL"
    assert result["localized"]["first_divergent"]["module"] == "stages.4.blocks.3.mlp.0"
    # every layer before it agreed
    layers = [row["module"] for row in result["localized"]["layers"]]
    before = result["localized"]["layers"][: layers.index("stages.4.blocks.3.mlp.0")]
    assert before and all(row["rel_error"] < 1e-3 for row in before)


def test_not_run_fails_the_gate_unless_allowed(digits_ckpt, digits_artifacts, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(digits_artifacts["fp32"], tmp_path / "gone")
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # the runtime is missing here
    ckpt = load_checkpoint(digits_ckpt)
    results = gate(ckpt, [tmp_path / "gone"], samples=8)
    assert results[0].status == "NOT RUN" and "onnxruntime" in results[0].reason
    assert not all_passed(results) and all_passed(results, allow_not_run=True)


def test_missing_manifest_is_bad_input(digits_ckpt, tmp_path):
    code, _, stderr = cli("parity", str(digits_ckpt), str(tmp_path))
    assert code == 2 and "manifest.json" in stderr


def test_compare_verdicts():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 10)).astype(np.float32)
    assert compare(ref, ref + 1e-5, Tolerance(atol=1e-3)).passed
    assert not compare(ref, ref + 1e-2, Tolerance(atol=1e-3)).passed
    noisy = compare(ref, -ref, Tolerance(min_cosine=0.9, min_top1=0.9))
    assert not noisy.passed and len(noisy.failures) == 2 and noisy.top1 == 0
    assert not compare(ref, ref[:, :5], Tolerance(atol=1)).passed
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert "non-finite outputs" in compare(ref, nan, Tolerance(min_top1=0.0)).failures


def _whole_array(ref, out, labels):
    """The figures as compare() computed them on whole arrays before the gate streamed (kept as the oracle)."""
    diff = np.abs(out.astype(np.float64) - ref)
    cos = np.sum(out * ref, axis=1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    top1_ref = ref.argmax(1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float((diff / (np.abs(ref).max(axis=1, keepdims=True) + 1e-12)).max()),
        "cosine": float(cos.min()),
        "top1": float(np.mean(out.argmax(1) == top1_ref)),
        "top5": float(np.mean(np.any(np.argsort(-out, axis=1)[:, :5] == top1_ref[:, None], axis=1))),
        "ref_accuracy": float(np.mean(top1_ref == labels)),
        "accuracy": float(np.mean(out.argmax(1) == labels)),
        "max_abs_rms": float(diff.max()) / float(np.sqrt(np.mean(np.square(ref, dtype=np.float64)))),
    }


@pytest.mark.parametrize("classes", [1, 3, 10])
def test_streamed_figures_equal_the_whole_array_ones(classes):
    """ParityStats fed in uneven batches gives the figures of one whole-array computation: extremes and
    counts exactly, sums to float64 rounding; the 1-class and <=5-class n/a rules hold."""
    rng = np.random.default_rng(classes)
    ref = rng.normal(size=(203, classes)).astype(np.float32) * 3
    out = (ref + rng.normal(size=ref.shape) * 0.3).astype(np.float32)
    labels = rng.integers(0, classes, 203)
    stats = ParityStats()
    for lo, hi in ((0, 32), (32, 33), (33, 150), (150, 203)):
        stats.add(ref[lo:hi], out[lo:hi], labels[lo:hi])
    report, whole = stats.report(tolerance_for("int8")), _whole_array(ref, out, labels)
    assert report.n == 203
    for key in ("max_abs", "max_rel", "cosine", "ref_accuracy", "accuracy"):
        assert getattr(report, key) == whole[key], key
    for key in ("mean_abs", "max_abs_rms"):
        assert getattr(report, key) == pytest.approx(whole[key], rel=1e-12), key
    assert report.top1 == (None if classes == 1 else whole["top1"])
    assert report.top5 == (None if classes <= 5 else whole["top5"])
    assert report == compare(ref, out, tolerance_for("int8"), labels)
    assert (classes == 1) == ("top-1 agreement (1 class)" in report.not_applicable)
    # a NaN in a late batch still fails the run, and a batch of the wrong width is named with the totals
    out[180, 0] = np.nan
    stats = ParityStats()
    for lo, hi in ((0, 100), (100, 203)):
        stats.add(ref[lo:hi], out[lo:hi])
    assert "non-finite outputs" in stats.report(tolerance_for("fp32")).failures
    stats = ParityStats()
    stats.add(ref[:100], out[:100])
    stats.add(ref[100:], np.zeros((103, classes + 1), np.float32))
    assert stats.report(tolerance_for("fp32")).failures == [
        f"output shape (203, {classes + 1}) != reference (203, {classes})"
    ]


PEAK_RSS = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
    "print(done.stdout, done.stderr[-3000:], file=sys.stderr)"
)


def peak_rss(*args: str) -> tuple[int, int, str]:
    """Exit code and peak RSS (bytes) of `python -m fnexport ARGS` in a fresh process, and its output."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "fnexport", *args]
    # One torch thread: on a busy 2-core machine two OpenMP threads run the tiny model ~15x slower.
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    code, peak = map(int, done.stdout.split())
    return code, peak, done.stderr


def test_parity_memory_is_flat_in_the_number_of_images(tmp_path):
    """10x the images within 1.25x + 200 MB of the peak RSS: before streaming, 2,000 images at 128 px held
    ~0.8 GB of arrays (the whole set, twice while stacking), so this fails on an in-memory gate. The model
    is tiny (8 wide): memory is the images', and the test's time goes to decoding, not inference."""
    import torch

    from fnexport.model.fasternet import FasterNet, FasterNetConfig

    torch.manual_seed(0)
    tiny = FasterNet(FasterNetConfig(embed_dim=8, depths=(1, 1, 1, 1), act="relu", num_classes=7, feature_dim=16))
    ckpt = tmp_path / "tiny.pth"
    torch.save(randomize_bn(tiny).state_dict(), ckpt)
    art = tmp_path / "art"
    code, _, stderr = cli("convert", str(ckpt), "--act", "relu", "--imgsz", "128", "--batch", "32", "-o", str(art))
    assert code == 0, stderr
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2000):  # small files: decoding is cheap, the preprocessed 3x128x128 float32 is what weighs
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    peaks = {}
    for n in (200, 2000):
        args = ["parity", str(ckpt), str(art), "--act", "relu", "--data", str(images), "--threads", "1"]
        code, peaks[n], stderr = peak_rss(*args, "--samples", str(n), "--json")
        assert code == 0, stderr
        assert f'"n": {n}' in stderr  # the JSON result (echoed on stderr by the wrapper) covers every image
    assert peaks[2000] <= 1.25 * peaks[200] + 200e6, peaks
