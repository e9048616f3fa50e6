"""The release gate: catches broken artifacts, judges INT8 by agreement, never passes what it did not run."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fnexport.comparison import compare
from fnexport.conversion import convert
from fnexport.gate import all_passed, gate
from fnexport.manifest import sha256_artifact
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance
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
