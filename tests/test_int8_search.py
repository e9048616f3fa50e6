"""INT8 that ships (fnexport/int8_search.py): on a model whose plain MinMax INT8 fails the gate on every target."""

from __future__ import annotations

import contextlib
import json

import onnx
import pytest

import fnexport.int8_search as int8_search
from fnexport.conversion import convert
from fnexport.demo import DIGITS_PRE
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.gate import gate
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance
from fnexport.targets.graph import layer_nodes
from fnexport.targets.openvino import HEAD_AND_STEM, int8_plans
from fnexport.targets.tensorrt_qdq import verify_qdq
from tests.targets.test_tensorrt import NO_GPU
from tests.test_cli import cli


def _recipe(target: str, **kw) -> Recipe:
    return Recipe(
        **{"target": target, "precision": "int8", "imgsz": 64, "calib": "embedded:natural", "calib_samples": 84, **kw}
    )


@pytest.mark.parametrize(
    ("target", "failure"),
    [("onnx", "onnx int8 parity failed"), ("tensorrt", "tensorrt int8 prepared ONNX failed parity on ONNX Runtime")],
)
def test_search_off_keeps_todays_failure(hard_ckpt, target, failure, tmp_path):
    """The fixture is really hard: one MinMax calibration (today's behaviour, --int8-search off) fails the gate."""
    with pytest.raises(CheckFailed, match=failure):
        convert(load_checkpoint(hard_ckpt), _recipe(target, int8_search="off"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["onnx", "onnx-arm", "openvino"])
def test_search_finds_a_passing_artifact(hard_ckpt, target, tmp_path):
    ckpt = load_checkpoint(hard_ckpt)
    out, manifest = convert(ckpt, _recipe(target), tmp_path / target)
    search = manifest["int8"]
    assert manifest["parity"]["passed"] and search["chosen"]["passed"]
    assert search["search"] == "quick" and search["budget_s"] == int8_search.BUDGET_S["quick"]
    first = search["candidates"][0]
    assert not first["passed"] and first["failures"]  # the default setting failed, something later passed
    assert [c["passed"] for c in search["candidates"]].count(True) == 1  # quick stops at the first pass
    assert all(c["seconds"] > 0 and "cosine" in c for c in search["candidates"])
    assert search["float_layers"] == search["chosen"]["float_layers"]
    if target == "openvino":  # NNCF's default fails; MIXED with histogram ranges and head + stem in float passes
        assert search["chosen"]["options"] == {"preset": "mixed", "bias_correction": "fast", "range": "histogram"}
        assert search["float_layers"] == list(HEAD_AND_STEM) == manifest["details"]["float_layers"]
    if target != "onnx-arm":  # an ARM artifact is not timed on the x86 that converts it
        assert search["speed"]["fp32_ms"] > 0 and search["speed"]["int8_ms"] > 0
    # `fnexport parity` on its own (larger) image sample passes the artifact again.
    [result] = gate(ckpt, [out])
    assert result.status == "PASS", result.reason


def test_tensorrt_search_hands_off_a_passing_prepared_onnx(hard_ckpt, tmp_path):
    """TensorRT's candidates are prepared ONNX files (ModelOpt's Q/DQ placement) judged on ONNX Runtime CPU;
    the chosen one passes convert's prepared check, then (no GPU here) convert exits 3 with the hand-off."""
    out = tmp_path / "trt"
    code, _, err = cli(
        "convert", str(hard_ckpt), "-t", "tensorrt", "-p", "int8", "--imgsz", "64", "--calib", "embedded:natural",
        "-o", str(out),
    )  # fmt: skip
    assert code == (3 if NO_GPU else 0), err
    if NO_GPU:
        assert "fnexport build-engine" in err
    manifest = json.loads((out / "manifest.json").read_text())
    details, search = manifest["details"], manifest["int8"]
    assert details["prepared_check"]["passed"] and search["chosen"]["passed"]
    assert not search["candidates"][0]["passed"]  # plain MinMax fails on TensorRT's placement too
    assert [c["options"]["method"] for c in search["candidates"][:3]] == ["minmax", "percentile", "entropy"]
    # The float layers the search chose (module names) are the Conv/Gemm nodes the prepared ONNX keeps float.
    assert search["float_layers"] == details["float_layers"] == search["chosen"]["float_layers"]
    assert search["float_layers"] and "head" not in search["float_layers"]  # a GEMV head is FP16 anyway
    nodes = layer_nodes(out / "model.onnx")
    assert all(details["kept_float"][nodes[m]] == "kept float on request" for m in search["float_layers"])
    assert verify_qdq(onnx.load(str(out / "model.onnx")), also_float=[nodes[m] for m in search["float_layers"]]) == []
    assert sorted(manifest["files"]) == ["model.onnx", "reference.npz"]  # no candidate folders left behind


def test_tensorrt_takes_exclusions_by_hand(hard_ckpt, tmp_path):
    loose = Tolerance(min_cosine=0.0, min_top1=0.0, max_abs_rms=100.0)  # this test is about the graph
    recipe = _recipe("tensorrt", int8_search="off", int8_exclude=("patch_embed.proj",), tolerance=loose)
    with pytest.raises(BackendUnavailable) if NO_GPU else contextlib.nullcontext():
        convert(load_checkpoint(hard_ckpt), recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "int8" not in manifest and manifest["details"]["float_layers"] == ["patch_embed.proj"]
    stem = layer_nodes(tmp_path / "out" / "model.onnx")["patch_embed.proj"]
    assert manifest["details"]["kept_float"][stem] == "kept float on request"
    assert manifest["details"]["calibration_method"] == "minmax"


def test_search_out_of_budget_names_the_best_candidate(hard_ckpt, tmp_path, monkeypatch):
    """OpenVINO's default setting fails on the fixture; with no budget left after it, exit 1 with its figures."""
    monkeypatch.setitem(int8_search.BUDGET_S, "quick", 0.001)  # the first candidate always runs
    with pytest.raises(CheckFailed, match=r"none of 1 INT8 candidates .* best: performance fast minmax: cos 0\.9"):
        convert(load_checkpoint(hard_ckpt), _recipe("openvino"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exclusions_by_hand_are_kept_in_float_and_recorded(hard_ckpt, tmp_path):
    loose = Tolerance(min_cosine=0.0, min_top1=0.0, max_abs_rms=100.0)  # this test is about the graph
    recipe = _recipe("onnx", int8_search="off", int8_exclude=("head", "avgpool_pre_head.1"), tolerance=loose)
    out, manifest = convert(load_checkpoint(hard_ckpt), recipe, tmp_path / "out")
    assert manifest["details"]["float_layers"] == ["head", "avgpool_pre_head.1"]
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = {n.input[1]: n.op_type for n in graph.node if n.op_type in ("Conv", "Gemm")}
    assert "head.weight" in weights and "avgpool_pre_head.1.weight" in weights  # float weights, no DequantizeLinear
    assert "patch_embed.proj.weight" not in weights  # the stem stays quantized


def test_unknown_exclusion_is_refused_before_any_work(hard_ckpt, tmp_path):
    with pytest.raises(BadInput, match=r"--int8-exclude nope: .*valid names: patch_embed.proj, "):
        convert(load_checkpoint(hard_ckpt), _recipe("onnx", int8_exclude=("nope",)), tmp_path / "out")
    code, _, err = cli(
        "convert", str(hard_ckpt), "-p", "int8", "--calib", "embedded:natural", "--int8-exclude", "head,nope"
    )
    assert code == 2 and "--int8-exclude nope" in err


def test_exclusions_need_an_int8_target_that_takes_them():
    with pytest.raises(ValueError, match="int8_exclude"):
        Recipe(target="onnx", precision="fp32", int8_exclude=("head",))
    with pytest.raises(ValueError, match="int8_exclude"):
        Recipe(target="executorch", precision="int8", calib="embedded:natural", int8_exclude=("head",))


def _digits(digits_dirs, target: str = "onnx", **kw) -> Recipe:
    return Recipe(
        target=target,
        precision="int8",
        imgsz=DIGITS_PRE.size,
        preprocess={"crop_pct": DIGITS_PRE.crop_pct, "interpolation": DIGITS_PRE.interpolation},
        calib=str(digits_dirs[0]),
        parity_data=str(digits_dirs[1]),
        parity_samples=64,
        **kw,
    )


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_max_drop_holds_out_labelled_images(digits_ckpt, digits_dirs, target, tmp_path):
    recipe = _digits(digits_dirs, target, calib_samples=120, max_drop=0.02)
    # tensorrt without a GPU: the prepared ONNX and its manifest are written, then exit 3
    with pytest.raises(BackendUnavailable) if target == "tensorrt" and NO_GPU else contextlib.nullcontext():
        convert(load_checkpoint(digits_ckpt), recipe, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    control = manifest["int8"]["max_drop"]
    assert control["images"] == 30 and manifest["calibration"]["images"] == 90  # every fourth held out
    assert control["fp32_accuracy"] > 0.8
    chosen = manifest["int8"]["chosen"]
    assert chosen["passed"] and chosen["accuracy_drop"] <= 0.02


def test_max_drop_needs_a_labelled_calibration_folder(digits_ckpt, tmp_path):
    recipe = _recipe("onnx", max_drop=0.01)  # the embedded photos have no class folders
    with pytest.raises(BadInput, match="--max-drop needs a labelled --calib folder"):
        convert(load_checkpoint(digits_ckpt), recipe, tmp_path / "out")


def test_openvino_order_and_by_hand_exclusions():
    """quick: the default first, then MIXED with histogram ranges, then head and stem float on top of
    --int8-exclude; a candidate identical to an earlier one is not repeated."""

    def order(recipe, full):
        return [
            (p.kwargs["preset"], p.kwargs["range"], p.kwargs["bias_correction"], p.exclude)
            for p in int8_plans(recipe, full)
        ]

    quick = order(_recipe("openvino"), False)
    assert quick == [
        ("performance", "minmax", "fast", ()),
        ("mixed", "histogram", "fast", ()),
        ("mixed", "histogram", "fast", HEAD_AND_STEM),
    ]
    full = order(_recipe("openvino"), True)
    assert len(full) == 10 and full[:2] == quick[:2] and full[4] == quick[2]
    assert {c[2] for c in full[5:]} == {"full"}
    mine = order(_recipe("openvino", int8_exclude=("stages.1.reduction", "head")), False)
    assert mine[2][3] == ("stages.1.reduction", "head", "patch_embed.proj", "avgpool_pre_head.1")
    every = order(_recipe("openvino", int8_exclude=HEAD_AND_STEM), False)
    assert len(every) == 2 and all(c[3] == HEAD_AND_STEM for c in every)
