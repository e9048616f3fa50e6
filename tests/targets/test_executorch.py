"""executorch: .pte programs with the XNNPACK delegate, run by this machine's ExecuTorch runtime (XNNPACK kernels)."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import numpy as np
import pytest
import torch

from fnexport import manifest as mf
from fnexport.conversion import convert
from fnexport.errors import BackendUnavailable, CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.model.reparam import reparameterize
from fnexport.recipes import Recipe
from fnexport.targets import executorch as et
from tests.conftest import functional_backbone
from tests.test_cli import cli

pytest.importorskip("executorch")

DIGITS = {"imgsz": 64, "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear"}}
HELD_OUT = 400  # more than the 360 held-out digits: parity runs on all of them


def digits_recipe(digits_dirs, precision: str, **kw) -> Recipe:
    return Recipe(
        target="executorch",
        precision=precision,
        **DIGITS,
        calib=str(digits_dirs[0]),
        calib_samples=128,
        parity_data=str(digits_dirs[1]),
        parity_samples=HELD_OUT,
        **kw,
    )


@pytest.fixture(scope="module")
def exported(digits_ckpt, digits_dirs, tmp_path_factory) -> dict:
    ckpt = load_checkpoint(digits_ckpt)
    out = tmp_path_factory.mktemp("executorch")
    return {p: convert(ckpt, digits_recipe(digits_dirs, p), out / p) for p in ("fp32", "int8")}


def test_fp32_pte_matches_pytorch_in_one_xnnpack_partition(exported):
    out, manifest = exported["fp32"]
    pte = out / "model.pte"
    assert manifest["artifact"] == "model.pte" and pte.read_bytes()[4:8] == b"ET12"  # flatbuffer file id
    parity, details = manifest["parity"], manifest["details"]
    assert parity["n"] == 360 and parity["passed"]
    assert parity["max_abs"] <= 1e-4 and parity["top1"] == 1.0
    assert parity["ran"]["runtime"].startswith("executorch 1.5") and "XnnpackBackend" in parity["ran"]["runtime"]
    # slice_cat: the whole graph in one XNNPACK delegate, nothing left on portable kernels.
    assert details["pconv_form"] == "slice_cat" and details["delegate"] == "XnnpackBackend"
    assert details["partitions"] == 1 and details["ops_outside_delegate"] == {}
    assert details["convs_outside_delegate"] == 0 and details["input_shape"] == [1, 3, 64, 64]
    assert {"executorch", "torchao", "torch"} <= set(manifest["versions"])


def test_int8_pte_keeps_top1_and_shrinks(exported):
    out, manifest = exported["int8"]
    parity, details = manifest["parity"], manifest["details"]
    assert parity["passed"] and parity["top1"] >= 0.98 and parity["cosine"] >= 0.98
    assert parity["accuracy"] >= parity["ref_accuracy"] - 0.02 and parity["ref_accuracy"] > 0.9
    quant = details["quantization"]
    assert "per_channel_symmetric" in quant["weights"] and "int8" in quant["activations"]
    assert quant["calibration"]["samples"] == 128
    assert details["partitions"] == 1 and details["convs_outside_delegate"] == 0
    fp32_size = (exported["fp32"][0] / "model.pte").stat().st_size
    assert (out / "model.pte").stat().st_size < 0.35 * fp32_size  # int8 weights (measured 0.26 on T0 at 224)


def lowered_partitions(model, form: str, partitioner=None) -> dict:
    folded = reparameterize(model, form)
    program = torch.export.export(folded, (torch.zeros(1, 3, 64, 64),))
    return et.lower(program, partitioner)[1]


def test_pconv_form_is_the_one_xnnpack_takes_whole(custom_model):
    """The measurement behind pconv_form: split_cat cuts the delegate at every block's split, slicing does not lower."""
    blocks = sum(custom_model.cfg.depths)
    assert lowered_partitions(custom_model, "slice_cat")["partitions"] == 1
    split = lowered_partitions(custom_model, "split_cat")
    assert split["partitions"] == blocks + 1
    assert split["ops_outside_delegate"] == {"aten_split_with_sizes_copy_default": blocks}
    with pytest.raises(RuntimeError, match="already in the inputs"):
        lowered_partitions(custom_model, "slicing")


def test_a_conv_outside_xnnpack_fails_the_convert(custom_model, layouts, monkeypatch, tmp_path):
    """XNNPACK's own partitioner without its convolution config leaves every conv on portable kernels."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import ConvolutionConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    no_conv = [c for c in ALL_PARTITIONER_CONFIGS if c is not ConvolutionConfig]
    monkeypatch.setattr(et, "xnnpack_partitioner", lambda: XnnpackPartitioner(configs=no_conv))
    recipe = Recipe(target="executorch", imgsz=64, parity_samples=4)
    with pytest.raises(CheckFailed, match=r"convolution\(s\) would run outside XNNPACK"):
        convert(load_checkpoint(layouts["official"]), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_backbone_pte_every_output_matches_the_unfolded_model(backbone_files, fork_feat_sd, tmp_path):
    """A fork_feat T0 at 64x96 (not square): four outputs in stride order, one XNNPACK partition, each output
    within the fp32 gate at convert and within 1e-4 of its range against an independent functional forward."""
    recipe = Recipe(target="executorch", imgsz=(64, 96), parity_samples=8)
    ckpt = load_checkpoint(backbone_files["plain"])
    out, manifest = convert(ckpt, recipe.fit(ckpt.config), tmp_path / "bb")
    assert manifest["kind"] == "backbone" and manifest["parity"]["passed"]
    names = [o["name"] for o in manifest["outputs"]]
    assert names == ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
    assert [o["name"] for o in manifest["parity"]["outputs"]] == names
    assert all(o["passed"] and o["max_rel"] < 1e-4 for o in manifest["parity"]["outputs"])
    details = manifest["details"]
    assert details["input_shape"] == [1, 3, 64, 96] and details["partitions"] == 1
    assert details["ops_outside_delegate"] == {}
    runner = et.ExecutorchTarget().runner(out / manifest["artifact"], manifest)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    try:
        outs = runner(x.numpy())
    finally:
        runner.close()
    with torch.no_grad():
        refs = functional_backbone(fork_feat_sd, "gelu", x)
    assert [list(o.shape) for o in outs] == [o["shape"] for o in manifest["outputs"]]
    for r, o in zip(refs, outs, strict=True):
        assert np.abs(o - r.numpy()).max() / r.abs().max().item() < 1e-4


def test_backbone_dynamic_hw_is_refused(backbone_files, tmp_path):
    code, _, stderr = cli(
        "convert", str(backbone_files["plain"]), "-t", "executorch", "--dynamic-hw", "-o", str(tmp_path / "x")
    )
    assert code == 2 and "--dynamic-hw: --target executorch takes a fixed input size" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "x").exists()


def test_torch_pairing_is_checked_before_import(monkeypatch, layouts, tmp_path):
    """The wheel names no torch, so pip never stops a mismatch: fnexport refuses with exit 3 and the pip line."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.6.0" if name == "executorch" else real(name))
    assert "not a release fnexport has checked" in et.torch_mismatch()
    code, stdout, stderr = cli("convert", str(layouts["official"]), "-t", "executorch", "-o", str(tmp_path / "a"))
    assert code == 3 and stdout == "" and "pip install 'executorch==1.5.1'" in stderr
    code, stdout, _ = cli("doctor", "--json")
    row = next(r for r in json.loads(stdout) if r["backend"] == "executorch")
    assert row["installed"] and not row["usable"] and "1.5.1" in row["note"]
    monkeypatch.setattr(importlib.metadata, "version", real)
    assert et.torch_mismatch() is None
    monkeypatch.setattr(torch, "__version__", "2.14.0+cpu")
    assert "built against torch 2.13, but torch 2.14.0+cpu" in et.torch_mismatch()
    with pytest.raises(BackendUnavailable, match="'torch==2.13.0' 'executorch==1.5.1'"):
        et.ExecutorchTarget().runner(tmp_path / "model.pte", {})


def test_missing_executorch_exits_3(monkeypatch, layouts, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # what an environment without the wheel raises
    code, stdout, stderr = cli("convert", str(layouts["official"]), "-t", "executorch", "-o", str(tmp_path / "a"))
    assert code == 3 and stdout == "" and "pip install 'fnexport[executorch]'" in stderr


def test_dynamic_batch_is_refused(layouts, tmp_path):
    code, _, stderr = cli("convert", str(layouts["official"]), "-t", "executorch", "--dynamic", "-o", str(tmp_path))
    assert code == 2 and "static --batch" in stderr


def test_pte_is_byte_identical_across_converts(custom_model, tmp_path):
    """INT8 included: calibration is deterministic. (Across processes too: measured, see README.)"""
    torch.save(custom_model.state_dict(), tmp_path / "custom.pth")
    recipe = Recipe(target="executorch", precision="int8", imgsz=64, calib="embedded:natural", calib_samples=40,
                    parity_samples=4, tolerance={"min_cosine": -1.0, "min_top1": 0.0})  # fmt: skip
    ckpt = load_checkpoint(tmp_path / "custom.pth", act="relu")
    for name in ("a", "b"):
        convert(ckpt, recipe, tmp_path / name)
    assert (tmp_path / "a/model.pte").read_bytes() == (tmp_path / "b/model.pte").read_bytes()
    assert mf.read(tmp_path / "a")["sha256"] == mf.read(tmp_path / "b")["sha256"]


def test_parity_and_bench_run_the_pte(exported, digits_ckpt, digits_dirs):
    """`fnexport parity` and `bench` run both artifacts here (never NOT RUN), with --threads honoured."""
    dirs = [str(exported[p][0]) for p in ("fp32", "int8")]
    args = ["--data", str(digits_dirs[1]), "--samples", "64", "--threads", "1", "--json"]
    code, stdout, stderr = cli("parity", str(digits_ckpt), *dirs, *args)
    assert code == 0, stderr[-2000:]
    results = json.loads(stdout)
    assert [r["status"] for r in results] == ["PASS", "PASS"]
    assert all(r["report"]["ran"]["threads"] == 1 for r in results)
    code, stdout, stderr = cli("bench", str(digits_ckpt), *dirs, "--batch", "1", "--iters", "3", "--json")
    assert code == 0, stderr[-2000:]
    rows = [r for r in json.loads(stdout)["rows"] if r["backend"] == "executorch"]
    assert len(rows) == 2 and all(r["skipped"] is None and r["latency_ms_p50"] > 0 for r in rows)
    assert {r["pconv_form"] for r in rows} == {"slice_cat"}
