"""Backbones end to end (issue 16): official fork_feat and mmdetection checkpoints through the CLI into ONE
dynamic-H x W artifact per target, every output compared at two non-square sizes with the independent forward."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import functional_backbone
from test_cli import cli

NAMES = ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
# Two non-square sizes other than the exported 64x96, batch 2 and 1.
SIZES = [(2, 96, 64), (1, 128, 96)]


def _inputs() -> list[np.ndarray]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(b, 3, h, w, generator=gen).numpy() for b, h, w in SIZES]


def _assert_matches(run, sd: dict) -> None:
    """`run(x)` (a list of four arrays) against the independent forward, per output, 1e-4 of its range."""
    for x in _inputs():
        with torch.no_grad():
            ref = [r.numpy() for r in functional_backbone(sd, "gelu", torch.from_numpy(x))]
        outs = run(x)
        assert len(outs) == 4
        for name, r, o in zip(NAMES, ref, outs, strict=True):
            assert o.shape == r.shape, name
            assert np.abs(o - r).max() / np.abs(r).max() < 1e-4, name


def _convert(ckpt, out, *extra) -> tuple[int, dict | None, str]:
    code, _, stderr = cli(
        "convert", str(ckpt), "--imgsz", "64,96", "--dynamic", "--dynamic-hw", "--out", str(out), "--json", *extra
    )
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    return code, manifest, stderr


@pytest.fixture(scope="module")
def onnx_dir(backbone_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bb") / "onnx"
    code, manifest, stderr = _convert(backbone_files["mmdet"], out)
    assert code == 0, stderr
    return out, manifest


def _ort(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})


def test_mmdet_checkpoint_to_one_dynamic_onnx(onnx_dir, fork_feat_sd):
    out, manifest = onnx_dir
    graph = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"BatchNormalization", "ScatterND"}
    assert [o.name for o in graph.graph.output] == NAMES
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    _assert_matches(_ort(out / "model.onnx"), fork_feat_sd)
    # The manifest records what the artifact is and the per-output parity convert ran.
    assert manifest["kind"] == "backbone" and manifest["source"]["layout"].startswith("mmdet")
    assert manifest["input"]["shape"] == ["batch", 3, "height", "width"] and manifest["input"]["size"] == [64, 96]
    assert manifest["input"]["resize"] == "letterbox"
    assert [(o["name"], o["channels"], o["stride"]) for o in manifest["outputs"]] == list(
        zip(NAMES, [40, 80, 160, 320], [4, 8, 16, 32], strict=True)
    )
    parity = manifest["parity"]
    assert parity["passed"] and [o["name"] for o in parity["outputs"]] == NAMES
    assert all(o["max_rel"] < 1e-5 and o["cosine"] > 0.99999 for o in parity["outputs"])
    assert "top1" not in parity and "accuracy" not in parity  # classifier-only figures omitted


@pytest.fixture(scope="module")
def ov_dir(backbone_files, tmp_path_factory):
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("bb") / "ov"
    code, manifest, stderr = _convert(backbone_files["plain"], out, "--target", "openvino")
    assert code == 0, stderr
    return out, manifest


def test_official_fork_feat_to_one_dynamic_openvino_ir(ov_dir, fork_feat_sd):
    import openvino as ov

    out, manifest = ov_dir
    core = ov.Core()
    model = core.read_model(str(out / "openvino_model" / "model.xml"))
    assert [o.get_any_name() for o in model.outputs] == NAMES
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    _assert_matches(lambda x: [compiled(x)[i] for i in range(4)], fork_feat_sd)
    assert manifest["parity"]["passed"]


def test_tensorrt_ready_onnx_has_an_hw_profile(backbone_files, fork_feat_sd, tmp_path):
    out = tmp_path / "trt"
    code, manifest, stderr = _convert(backbone_files["mmdet"], out, "--target", "tensorrt", "--profile-hw", "64,96,256")
    assert code == 3, stderr  # no TensorRT/GPU here: the prepared ONNX is written and the hand-off printed
    assert "--minShapes=input:1x3x64x64 --optShapes=input:16x3x96x96 --maxShapes=input:64x3x256x256" in stderr
    assert manifest["details"]["prepared_check"]["passed"]
    assert manifest["details"]["profile_hw"] == {"height": [64, 96, 256], "width": [64, 96, 256]}
    assert f"fnexport build-engine {out}" in stderr  # builds, checks every output, updates the manifest
    _assert_matches(_ort(out / "model.onnx"), fork_feat_sd)
    code, _, stderr = cli("build-engine", str(out))
    assert code == 3 and f"cannot build the engine of {out} here" in stderr


def test_classifier_exported_as_backbone_with_features(layouts, t0_model, tmp_path):
    code, stdout, stderr = cli(
        "convert", str(layouts["official"]), "--features", "--imgsz", "64,96", "--out", str(tmp_path / "f"), "--json"
    )
    assert code == 0, stderr
    manifest = json.loads(stdout)
    assert manifest["kind"] == "backbone" and manifest["input"]["shape"] == [1, 3, 64, 96]
    sd = {k: v for k, v in t0_model.state_dict().items() if not k.startswith(("head.", "avgpool_pre_head."))}
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    outs = _ort(tmp_path / "f" / "model.onnx")(x.numpy())
    with torch.no_grad():
        for r, o in zip(functional_backbone(sd, "gelu", x), outs, strict=True):
            assert np.abs(o - r.numpy()).max() / r.abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "executorch", "--dynamic-hw"], "--dynamic-hw: --target executorch takes a fixed input size"),
        (["--target", "ncnn", "--dynamic-hw"], "--dynamic-hw: --target ncnn takes a fixed input size"),
        (["--target", "coreml", "--dynamic-hw", "--dynamic"], "--dynamic: a Core ML package takes a fixed batch"),
        (["--profile-hw", "64,96,128", "--dynamic-hw"], "--profile-hw: applies only to --target tensorrt or coreml"),
        (
            ["--target", "tensorrt", "--dynamic-hw", "--imgsz", "64,96", "--profile-hw", "128,160,256"],
            "--profile-hw: (128, 160, 256) does not cover --imgsz 64,96, where parity is checked",
        ),
        (["--imgsz", "64,90"], "--imgsz: 90 is not a multiple of 32"),
        (["--imgsz", "64,96,128"], "--imgsz '64,96,128': give one size"),
        (["--resize", "squash"], "--resize"),
    ],
)
def test_backbone_refusals_are_one_line_exit_2(backbone_files, tmp_path, args, message):
    code, _, stderr = cli("convert", str(backbone_files["plain"]), "--out", str(tmp_path / "x"), *args)
    assert code == 2, stderr
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [["--imgsz", "64,96"], ["--dynamic-hw"], ["--resize", "letterbox"]])
def test_classifiers_refuse_backbone_settings(layouts, tmp_path, args):
    code, _, stderr = cli("convert", str(layouts["official"]), "--out", str(tmp_path / "x"), *args)
    assert code == 2 and "for backbones only" in stderr and "--features" in stderr


def test_inspect_cli_kind(backbone_files):
    code, stdout, _ = cli("inspect", str(backbone_files["mmdet"]), "--imgsz", "64,96", "--json")
    info = json.loads(stdout)
    assert code == 0 and info["kind"] == "backbone" and len(info["outputs"]) == 4
    code, stdout, _ = cli("inspect", str(backbone_files["mmdet"]), "--imgsz", "64,96")
    assert "fasternet_t0 backbone" in stdout and "output feat_s32: 320 channels, stride 32" in stdout


def test_bench_times_a_backbone_at_its_exported_size(onnx_dir):
    out, manifest = onnx_dir
    code, stdout, stderr = cli("bench", str(out), "--batch", "1", "--iters", "2", "--warmup", "1", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    artifact = next(r for r in rows if r["kind"] == "artifact")
    assert artifact["imgsz"] == [64, 96] and artifact["macs"] == manifest["model"]["macs"]
    assert artifact["latency_ms_p50"] > 0 and artifact["throughput_ips"] > 0 and artifact["gflops"] > 0
    assert any(r["kind"] == "eager" and r["imgsz"] == [64, 96] for r in rows)  # the PyTorch baseline, same size


def _perturb(src, dst, rehash: bool) -> None:
    """A copy of an ONNX artifact with one conv's weights scaled 1.5x (and its manifest re-hashed, or not)."""
    import shutil

    from onnx import numpy_helper

    from fnexport.manifest import sha256_artifact

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name == "stages.4.blocks.3.mlp.0.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(dst / "model.onnx"))
    if rehash:
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["sha256"] = sha256_artifact(dst / "model.onnx")
        (dst / "manifest.json").write_text(json.dumps(manifest))


def test_parity_passes_per_output_and_fails_a_perturbed_copy(backbone_files, onnx_dir, ov_dir, tmp_path):
    report = tmp_path / "r.json"
    args = ["--samples", "8", "--report", str(report), "--report", str(tmp_path / "r.md")]
    # The plain fork_feat file holds the same weights as the mmdetection one the ONNX was made from.
    code, _, stderr = cli("parity", str(backbone_files["plain"]), str(onnx_dir[0]), str(ov_dir[0]), *args)
    assert code == 0, stderr
    results = json.loads(report.read_text())
    for r in results:
        assert r["status"] == "PASS" and r["report"]["kind"] == "backbone"
        assert [o["name"] for o in r["report"]["outputs"]] == NAMES
        assert all(o["passed"] and o["max_rel"] < 1e-5 and o["shape"][0] == 8 for o in r["report"]["outputs"])
        assert "top1" not in r["report"] and "accuracy" not in r["report"]
        # ORT runs beside the PyTorch reference and the decoding threads here: its idle threads must not spin
        assert r["target"] != "onnx" or r["report"]["ran"]["spinning"] is False
    table = (tmp_path / "r.md").read_text()
    assert all(f"{onnx_dir[0]} {name} | onnx | fp32 | PASS" in table for name in NAMES)
    # The same dynamic artifacts at a second, non-square size (exported at 64x96).
    code, _, stderr = cli(
        "parity", str(backbone_files["plain"]), str(onnx_dir[0]), str(ov_dir[0]), "--imgsz", "128,64", *args
    )
    assert code == 0, stderr
    for r in json.loads(report.read_text()):
        shapes = [o["shape"] for o in r["report"]["outputs"]]
        assert shapes == [[8, c, 128 // s, 64 // s] for c, s in zip([40, 80, 160, 320], [4, 8, 16, 32], strict=True)]
    code, _, stderr = cli("parity", str(backbone_files["plain"]), str(onnx_dir[0]), "--imgsz", "100,64")
    assert code == 2 and "--imgsz: 100 is not a multiple of 32 (FasterNet downsamples 32x); try 96" in stderr

    _perturb(onnx_dir[0], tmp_path / "drift", rehash=True)
    code, _, stderr = cli("parity", str(backbone_files["mmdet"]), str(tmp_path / "drift"), "--imgsz", "96,128", *args)
    assert code == 1 and "parity gate failed" in stderr
    code, _, stderr = cli("parity", str(backbone_files["mmdet"]), str(tmp_path / "drift"), "--localize", *args)
    assert code == 1 and "parity gate failed" in stderr
    result = json.loads(report.read_text())[0]
    assert result["status"] == "FAIL"
    failed = [o["name"] for o in result["report"]["outputs"] if not o["passed"]]
    assert failed == ["feat_s16", "feat_s32"]  # stage 4 and what follows it; the earlier maps still match
    assert result["localized"]["first_divergent"]["module"] == "stages.4.blocks.3.mlp.0"

    _perturb(onnx_dir[0], tmp_path / "tampered", rehash=False)
    code, _, stderr = cli("parity", str(backbone_files["mmdet"]), str(tmp_path / "tampered"))
    assert code == 1 and "sha256" in stderr


def test_parity_of_a_features_artifact_uses_the_classifier_stages(layouts, tmp_path):
    out = tmp_path / "f"
    code, _, stderr = cli("convert", str(layouts["official"]), "--features", "--imgsz", "64", "--out", str(out))
    assert code == 0, stderr
    code, _, stderr = cli("parity", str(layouts["official"]), str(out), "--samples", "4")
    assert code == 0, stderr
    code, _, stderr = cli("parity", str(layouts["official"]), str(out), "--imgsz", "64,96")
    assert code == 2 and "takes only the size it was exported at" in stderr and "Traceback" not in stderr
