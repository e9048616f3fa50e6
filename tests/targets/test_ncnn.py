"""ncnn: .ncnn.param/.bin from pnnx, run by ncnn's Python Net with the options the manifest records."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from fnexport import manifest as mf
from fnexport.conversion import convert
from fnexport.errors import CheckFailed, FnexportError
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe
from fnexport.targets import ncnn as target
from tests.conftest import functional_backbone
from tests.test_cli import cli

ncnn = pytest.importorskip("ncnn")
pnnx = pytest.importorskip("pnnx")

DIGITS = {"imgsz": 64, "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear"}}


@pytest.fixture(scope="module")
def exported(digits_ckpt, digits_dirs, tmp_path_factory) -> dict:
    ckpt = load_checkpoint(digits_ckpt)
    out = tmp_path_factory.mktemp("ncnn")
    recipes = {
        p: Recipe(target="ncnn", precision=p, **DIGITS, parity_data=str(digits_dirs[1]), parity_samples=400)
        for p in ("fp32", "fp16")
    }
    return {p: convert(ckpt, r, out / p) for p, r in recipes.items()}


def test_fp32_matches_pytorch(exported):
    out, manifest = exported["fp32"]
    parity, details = manifest["parity"], manifest["details"]
    assert parity["n"] == 360 and parity["passed"]
    assert parity["max_abs"] <= 1e-4 and parity["top1"] == 1.0
    assert manifest["artifact"] == "ncnn_model"
    files = {p.name: p.stat().st_size for p in (out / "ncnn_model").iterdir()}
    assert set(files) == {"model.ncnn.param", "model.ncnn.bin"}
    # fp32 weights (pnnx fp16=0): 4 bytes a parameter, less the BatchNorm affine terms folded away.
    assert files["model.ncnn.bin"] > 3.9 * manifest["model"]["params"]
    assert "fp16=0" in details["pnnx_options"] and details["weights"] == "fp32"
    assert not any(v for k, v in details["runner_options"].items() if k.startswith("use_fp16"))
    assert (details["input_blob"], details["output_blobs"]) == ("in0", ["out0"])
    assert details["layers"]["Convolution"] == 43 and "BatchNorm" not in details["layers"]
    assert parity["ran"]["fp16_storage"] is False


def test_fp16_storage_as_on_arm(exported):
    out, manifest = exported["fp16"]
    parity, details = manifest["parity"], manifest["details"]
    assert parity["passed"] and parity["top1"] >= 0.99 and parity["cosine"] >= 0.999
    assert "fp16=1" in details["pnnx_options"] and details["weights"] == "fp16"
    assert all(v for k, v in details["runner_options"].items() if k.startswith("use_fp16"))
    assert parity["ran"]["fp16_storage"] is True
    # ncnn's fp16 arithmetic is ARM-only (ARMv8.2 asimdhp); on x86 it stays fp32 and says so.
    assert parity["ran"]["fp16_arithmetic"] == bool(ncnn.cpu_support_arm_asimdhp())
    fp32_bin = (exported["fp32"][0] / "ncnn_model/model.ncnn.bin").stat().st_size
    assert (out / "ncnn_model/model.ncnn.bin").stat().st_size < 0.55 * fp32_bin


def test_int8_is_refused_with_what_to_do(layouts):
    for extra in ([], ["--calib", "embedded:natural"]):
        code, stdout, stderr = cli("convert", str(layouts["official"]), "-t", "ncnn", "-p", "int8", *extra)
        assert code == 2 and stdout == "" and "Traceback" not in stderr
        assert "ncnn2table" in stderr and "not in the ncnn or pnnx wheels" in stderr and "executorch" in stderr


def test_batch_is_refused(layouts, tmp_path):
    code, _, stderr = cli("convert", str(layouts["official"]), "-t", "ncnn", "--batch", "2", "-o", str(tmp_path / "o"))
    assert code == 2 and "one image per extractor" in stderr


def trace(module: torch.nn.Module, work, shape=(1, 3, 8, 8)):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation: pnnx reads TorchScript
        torch.jit.trace(module.eval(), torch.zeros(shape)).save(str(work / "model.pt"))
    return target.pnnx_command(pnnx.EXEC_PATH, work / "model.pt", work, list(shape), fp16=False)


def test_graph_ncnn_cannot_load_fails_even_though_pnnx_exits_0(tmp_path):
    """pnnx exits 0 and writes ops ncnn lacks (here torch.sort) as layers of their own: the check names them."""

    class Sorts(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=1)[0].cumsum(1)

    cmd = trace(Sorts(), tmp_path)
    pnnx_log = target.run_pnnx(cmd)  # exit 0
    assert (tmp_path / target.PARAM).exists()
    with pytest.raises(CheckFailed, match="ncnn does not have: .*(aten::sort|pnnx.Expression)"):
        target.check_loadable(ncnn, tmp_path / target.PARAM, tmp_path / target.BIN, pnnx_log)


def test_pnnx_failure_names_its_exit_code(tmp_path):
    (tmp_path / "model.pt").write_text("not a TorchScript file\n")
    cmd = target.pnnx_command(pnnx.EXEC_PATH, tmp_path / "model.pt", tmp_path, [1, 3, 8, 8], fp16=False)
    with pytest.raises(FnexportError, match=r"pnnx exited \d+"):
        target.run_pnnx(cmd)


def test_missing_ncnn_exits_3(monkeypatch, layouts, tmp_path):
    monkeypatch.setitem(sys.modules, "pnnx", None)
    code, stdout, stderr = cli("convert", str(layouts["official"]), "-t", "ncnn", "-o", str(tmp_path / "a"))
    assert code == 3 and stdout == "" and "pip install 'fnexport[ncnn]'" in stderr


def test_param_and_bin_are_byte_identical_across_converts(custom_model, tmp_path):
    torch.save(custom_model.state_dict(), tmp_path / "custom.pth")
    ckpt = load_checkpoint(tmp_path / "custom.pth", act="relu")
    for precision in ("fp32", "fp16"):
        recipe = Recipe(target="ncnn", precision=precision, imgsz=64, parity_samples=4)
        for name in ("a", "b"):
            convert(ckpt, recipe, tmp_path / precision / name)
        a, b = (tmp_path / precision / n / "ncnn_model" for n in ("a", "b"))
        for f in (target.PARAM, target.BIN):
            assert (a / f).read_bytes() == (b / f).read_bytes()
        assert mf.read(a.parent)["sha256"] == mf.read(b.parent)["sha256"]


def test_parity_and_bench_run_ncnn(exported, digits_ckpt, digits_dirs):
    """`fnexport parity` and `bench` run both artifacts here (never NOT RUN), with --threads honoured."""
    dirs = [str(exported[p][0]) for p in ("fp32", "fp16")]
    args = ["--data", str(digits_dirs[1]), "--samples", "64", "--threads", "1", "--json"]
    code, stdout, stderr = cli("parity", str(digits_ckpt), *dirs, *args)
    assert code == 0, stderr[-2000:]
    results = json.loads(stdout)
    assert [r["status"] for r in results] == ["PASS", "PASS"]
    assert all(r["report"]["ran"]["threads"] == 1 for r in results)
    code, stdout, stderr = cli("bench", str(digits_ckpt), *dirs, "--batch", "1,16", "--iters", "3", "--json")
    assert code == 0, stderr[-2000:]
    rows = [r for r in json.loads(stdout)["rows"] if r["backend"] == "ncnn"]
    timed = [r for r in rows if r["skipped"] is None]
    assert len(timed) == 2 and all(r["batch"] == 1 and r["latency_ms_p50"] > 0 for r in timed)
    assert all("fixed batch of 1" in r["skipped"] for r in rows if r["batch"] == 16)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_backbone_every_output_matches_the_unfolded_model(backbone_files, fork_feat_sd, tmp_path, precision):
    """A fork_feat T0 at 64x96 (not square): four output blobs in stride order, each output passing the gate at
    convert; fp32 also within 1e-4 of each output's range against an independent functional forward."""
    recipe = Recipe(target="ncnn", precision=precision, imgsz=(64, 96), parity_samples=8)
    ckpt = load_checkpoint(backbone_files["plain"])
    out, manifest = convert(ckpt, recipe.fit(ckpt.config), tmp_path / "bb")
    assert manifest["kind"] == "backbone" and manifest["parity"]["passed"]
    names = [o["name"] for o in manifest["outputs"]]
    assert names == ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
    assert [o["name"] for o in manifest["parity"]["outputs"]] == names
    assert all(o["passed"] for o in manifest["parity"]["outputs"])
    details = manifest["details"]
    assert details["output_blobs"] == ["out0", "out1", "out2", "out3"] and details["input_shape"] == [3, 64, 96]
    if precision == "fp16":
        return
    assert all(o["max_rel"] < 1e-4 for o in manifest["parity"]["outputs"])
    runner = target.NcnnTarget().runner(out / manifest["artifact"], manifest)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    try:
        outs = runner(x.numpy())
    finally:
        runner.close()
    with torch.no_grad():
        refs = functional_backbone(fork_feat_sd, "gelu", x)
    assert [list(o.shape[1:]) for o in outs] == [o["shape"][1:] for o in manifest["outputs"]]
    for r, o in zip(refs, outs, strict=True):
        assert o.shape[0] == 2 and np.abs(o - r.numpy()).max() / r.abs().max().item() < 1e-4


def test_backbone_dynamic_hw_is_refused(backbone_files, tmp_path):
    code, _, stderr = cli(
        "convert", str(backbone_files["plain"]), "-t", "ncnn", "--dynamic-hw", "-o", str(tmp_path / "x")
    )
    assert code == 2 and "--dynamic-hw: --target ncnn takes a fixed input size" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "x").exists()
