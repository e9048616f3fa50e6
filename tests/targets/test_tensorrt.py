"""TensorRT target: the prepared ONNX everywhere (Q/DQ rules, FP16, parser ops, hand-off), engines on a GPU."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from packaging.requirements import Requirement

from fnexport.bench import Plan
from fnexport.comparison import compare, reference, run, tolerance_for
from fnexport.conversion import convert
from fnexport.data import load_images
from fnexport.demo import DIGITS_PRE
from fnexport.doctor import doctor
from fnexport.engine import build_engine_dir
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed, FnexportError
from fnexport.manifest import sha256_artifact
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe
from fnexport.targets import tensorrt as tensorrt_target
from fnexport.targets import tensorrt_cuda, tensorrt_plan
from fnexport.targets.base import Source, parity_images
from fnexport.targets.onnx import OrtRunner
from fnexport.targets.tensorrt import (
    ENGINE,
    REFERENCE,
    EngineOptions,
    TensorRtRunner,
    TensorRtTarget,
    build_engine,
    engine_unavailable,
    handoff,
    prepare_int8,
)
from fnexport.targets.tensorrt_cuda import CUDA_BINDINGS, query_gpu
from fnexport.targets.tensorrt_plan import default_timing_cache, engine_mismatch, summarize_layers
from fnexport.targets.tensorrt_qdq import (
    conv_float_reason,
    fp16_safe_scales,
    gemm_float_reason,
    residual_adds,
    unsupported_ops,
    verify_qdq,
)
from tests.targets.tensorrt_standin import (
    INSPECTOR_10,
    INSPECTOR_11,
    MAGIC,
    CudaError,
    fake_features,
    fake_logits,
    make_cuda_utils,
    make_cudart,
    make_tensorrt,
)
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parents[2]


def _tensorrt_gpu() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'fnexport[tensorrt]' on a GPU host)"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU visible"


NO_GPU = _tensorrt_gpu()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"TensorRT engine tests need TensorRT and a GPU: {NO_GPU}")
no_engine_here = pytest.mark.skipif(NO_GPU is None, reason="TensorRT and a GPU are here: convert builds the engine")


def digits_recipe(digits_dirs, precision: str, **kw) -> Recipe:
    train, test = digits_dirs
    return Recipe(
        target="tensorrt",
        precision=precision,
        imgsz=DIGITS_PRE.size,
        preprocess={"crop_pct": 1.0, "interpolation": "bilinear"},
        calib=str(train),
        calib_samples=200,
        parity_data=str(test),
        parity_samples=32,
        **kw,
    )


def prepare_dir(digits_ckpt, recipe: Recipe, out):
    """Convert; without TensorRT it writes the prepared directory and then raises BackendUnavailable."""
    if NO_GPU is None:
        return convert(load_checkpoint(digits_ckpt), recipe, out)[0]
    with pytest.raises(BackendUnavailable, match=f"fnexport build-engine {out}"):
        convert(load_checkpoint(digits_ckpt), recipe, out)
    return out


@pytest.fixture(scope="module")
def held_out(digits_ckpt, digits_dirs):
    """300 held-out digits and the FP32 PyTorch logits on them."""
    x = load_images(digits_dirs[1], DIGITS_PRE, 300, seed=2).x
    return x, reference(load_checkpoint(digits_ckpt).model, x)


@pytest.fixture(scope="module")
def int8_dir(digits_ckpt, digits_dirs, tmp_path_factory):
    recipe = digits_recipe(digits_dirs, "int8", dynamic=True)
    return prepare_dir(digits_ckpt, recipe, tmp_path_factory.mktemp("trt") / "int8")


def test_int8_graph_has_modelopts_placement_on_t0(int8_dir):
    """The counts NVIDIA ModelOpt 0.47's ONNX INT8 quantizer gave on T0 (CONTEXT.md), checked one by one."""
    model = onnx.load(str(int8_dir / "model.onnx"))
    assert verify_qdq(model) == []
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = {t: [n for n in g.node if t in n.input] for n in g.node for t in n.output}

    def fake_quantized(t):
        return t in producer and producer[t].op_type == "DequantizeLinear" and producer[t].input[0] not in inits

    convs = [n for n in g.node if n.op_type == "Conv"]
    quantized = [n for n in convs if fake_quantized(n.input[0])]
    assert (len(convs), len(quantized)) == (44, 43)
    (small,) = [n for n in convs if n not in quantized]  # the stage-0 PConv, 10 of T0's 40 channels
    assert inits[small.input[1]].shape[:2] == (10, 10) and inits[small.input[1]].dtype == np.float16
    for n in quantized:
        w_dq = producer[n.input[1]]
        w, scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],) and scale.dtype == np.float16  # per channel
        assert len(n.input) == 2 or inits[n.input[2]].dtype == np.float16  # bias (none on PConv): not quantized
    (gemm,) = [n for n in g.node if n.op_type == "Gemm"]  # the 10-class head: a GEMV, stays FP16
    assert not fake_quantized(gemm.input[0]) and inits[gemm.input[1]].dtype == np.float16
    # Residual Adds: the shortcut quantized (also where a Conv made it: the stem and the 3 merging convs),
    # the branch straight from the block's last Conv, which TensorRT fuses the Add into.
    adds = residual_adds(model)
    assert len(adds) == 13 == sum(n.op_type == "Add" for n in g.node)
    shortcut_sources = Counter()
    for n in g.node:
        if n.name in adds:
            shortcut, branch = (n.input[k] for k in adds[n.name])
            assert fake_quantized(shortcut) and producer[branch].op_type == "Conv"
            shortcut_sources[producer[producer[producer[shortcut].input[0]].input[0]].op_type] += 1
    assert shortcut_sources == {"Add": 9, "Conv": 4}
    # Each block's Split reads the shortcut's shared pair; nothing else gets Q/DQ.
    splits = [n for n in g.node if n.op_type == "Split"]
    assert len(splits) == 13 and all(fake_quantized(n.input[0]) for n in splits)
    for op in ("Concat", "Gelu", "ReduceMean", "Flatten", "Gemm"):
        assert not any(fake_quantized(t) for n in g.node if n.op_type == op for t in n.input), op
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 43 + 13  # one per quantized Conv input, one per shortcut
    assert all(inits[n.input[1]].size == 1 and inits[n.input[1]].dtype == np.float16 for n in qs)  # per tensor
    assert all(not inits[n.input[2]].any() and inits[n.input[2]].dtype == np.int8 for n in qs)  # symmetric
    assert not [q for q in qs if len(consumers[q.output[0]]) != 1]
    # The float part is FP16 behind FP32 input and output: one Cast each, no FP32 initializer.
    assert [i.type.tensor_type.elem_type for i in [*g.input, *g.output]] == [TensorProto.FLOAT] * 2
    assert sum(n.op_type == "Cast" for n in g.node) == 2
    assert not [i.name for i in g.initializer if i.data_type == TensorProto.FLOAT]
    assert next(o.version for o in model.opset_import if o.domain == "") >= 19


def test_placement_rules_match_modelopt():
    """ModelOpt's INT8 exclusions (find_nodes_from_convs_to_exclude, _exclude_matmuls_by_shape_inference)."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])
    assert conv_float_reason(conv, (10, 10, 3, 3), False)  # T0's stage-0 PConv
    assert conv_float_reason(conv, (20, 20, 3, 3), False) is None  # T1's (16 and up)
    assert conv_float_reason(conv, (40, 3, 4, 4), True) is None  # the stem: 3 input channels, 40 = 5 x 8 outputs
    assert conv_float_reason(conv, (8, 12, 3, 3), False)  # a multiple of 8 but nothing reaches 16
    assert conv_float_reason(conv, (8, 12, 3, 3), True) is None  # ... unless it reads the graph input
    rect = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 3])
    assert conv_float_reason(rect, (8, 24, 1, 3), False)  # small and not square
    grouped = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], group=8)
    assert conv_float_reason(grouped, (8, 1, 3, 3), False) is None
    assert conv_float_reason(grouped, (12, 1, 3, 3), False)
    assert "GEMV" in gemm_float_reason(1, 1280, 1000)  # batch 1 (or dynamic)
    assert gemm_float_reason(16, 1280, 10)  # 10 classes: N under 16
    assert gemm_float_reason(16, 1280, 1000) is None


def test_verify_qdq_reports_broken_placements(int8_dir):
    good = onnx.load(str(int8_dir / "model.onnx"))

    def copy():
        m = onnx.ModelProto.FromString(good.SerializeToString())
        return m, m.graph, {o: n for n in m.graph.node for o in n.output}

    bad_zero_point, g, _ = copy()
    q = next(n for n in g.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in g.initializer if i.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    assert any("zero point" in p for p in verify_qdq(bad_zero_point))

    unquantized_conv, g, producer = copy()
    conv = next(n for n in g.node if n.op_type == "Conv" and producer[n.input[0]].op_type == "DequantizeLinear")
    conv.input[0] = producer[producer[conv.input[0]].input[0]].input[0]  # skip its Q/DQ
    assert any("input is not quantized" in p for p in verify_qdq(unquantized_conv))

    # The shortcut left float, then the branch quantized instead: both are TensorRT's residual rule broken.
    adds = residual_adds(good)
    float_shortcut, g, producer = copy()
    add = next(n for n in g.node if n.name in adds)
    k_short = adds[add.name][0]
    add.input[k_short] = producer[producer[add.input[k_short]].input[0]].input[0]
    assert any("shortcut" in p and "not quantized" in p for p in verify_qdq(float_shortcut))

    quantized_branch, g, producer = copy()
    add = next(n for n in g.node if n.name in adds)
    branch = add.input[adds[add.name][1]]
    shortcut_dq = producer[add.input[adds[add.name][0]]]
    g.node.extend(
        [
            helper.make_node("QuantizeLinear", [branch, shortcut_dq.input[1], shortcut_dq.input[2]], ["qb"], name="qb"),
            helper.make_node(
                "DequantizeLinear", ["qb", shortcut_dq.input[1], shortcut_dq.input[2]], ["dqb"], name="dqb"
            ),
        ]
    )
    add.input[adds[add.name][1]] = "dqb"
    assert any("branch input" in p for p in verify_qdq(quantized_branch))

    # Q/DQ before a Concat (an op TensorRT runs on whatever type it is given) is not ModelOpt's placement.
    quantized_concat, g, producer = copy()
    concat = next(n for n in g.node if n.op_type == "Concat")
    conv_out = next(t for t in concat.input if producer[t].op_type == "Conv")
    scale = next(i.name for i in g.initializer if i.data_type == TensorProto.FLOAT16 and not i.dims)
    zero = next(n.input[2] for n in g.node if n.op_type == "QuantizeLinear")
    g.node.extend(
        [
            helper.make_node("QuantizeLinear", [conv_out, scale, zero], ["qc"], name="qc"),
            helper.make_node("DequantizeLinear", ["qc", scale, zero], ["dqc"], name="dqc"),
        ]
    )
    concat.input[list(concat.input).index(conv_out)] = "dqc"
    assert any(p.startswith("dqc: feeds ['Concat']") for p in verify_qdq(quantized_concat))

    # An FP32 tensor inside the FP16 part (a bias left FP32).
    fp32_inside, g, _ = copy()
    conv = next(n for n in g.node if n.op_type == "Conv")
    bias = next(i for i in g.initializer if i.name == conv.input[2])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).astype(np.float32), bias.name))
    assert any(f"{bias.name} is FLOAT inside the FP16 part" in p for p in verify_qdq(fp32_inside))


def test_int8_keeps_requested_layers_float(digits_ckpt, digits_dirs, tmp_path):
    """What an INT8 search needs: another method, and named Convs kept float with ModelOpt's rules elsewhere."""
    recipe = Recipe(
        target="tensorrt", precision="int8", imgsz=DIGITS_PRE.size, calib=str(digits_dirs[0]), calib_samples=32
    )
    out = tmp_path / "model.onnx"
    with Source(load_checkpoint(digits_ckpt), recipe) as src:
        fp32 = onnx.load(str(src.onnx())).graph
        producer = {o: n for n in fp32.node for o in n.output}
        head = next(n.name for n in fp32.node if getattr(producer.get(n.input[0]), "op_type", "") == "ReduceMean")
        details = prepare_int8(src, recipe, src.onnx(), out, method="percentile", exclude=[head])
    assert details["calibration_method"] == "percentile" and details["kept_float"][head] == "kept float on request"
    model = onnx.load(str(out))
    assert verify_qdq(model, also_float=[head]) == []
    assert any(p.startswith(f"{head}: Conv input is not quantized") for p in verify_qdq(model))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 56 - 1


def test_int8_backbone_outputs_stay_float(digits_ckpt, digits_dirs, tmp_path):
    """A stage output that the next merging conv quantizes is still handed out in float (ORT renames it into
    the DequantizeLinear's output), and the FP16 converter can cast it to FP32."""
    recipe = Recipe(
        target="tensorrt", precision="int8", imgsz=DIGITS_PRE.size, calib=str(digits_dirs[0]), calib_samples=32
    )
    with Source(load_checkpoint(digits_ckpt, features=True), recipe) as src:
        prepare_int8(src, recipe, src.onnx(), tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert verify_qdq(model) == []
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
    for name in outputs:  # Cast(FP32) <- Identity <- the stage's last Add, never a DequantizeLinear
        cast = producer[name]
        assert cast.op_type == "Cast" and producer[cast.input[0]].op_type in ("Identity", "Add")
        chain = producer[cast.input[0]]
        assert (producer[chain.input[0]] if chain.op_type == "Identity" else chain).op_type == "Add"
    # feat_s4..s16 also feed a merging conv, which reads them quantized
    assert sum(n.op_type == "Identity" for n in model.graph.node) == 3


def test_int8_below_opset_19_is_refused_before_any_work(digits_ckpt, digits_dirs, tmp_path):
    out = tmp_path / "o"
    code, stdout, stderr = cli(
        "convert", str(digits_ckpt), "-t", "tensorrt", "-p", "int8", "--opset", "18", "--calib", str(digits_dirs[0]),
        "-o", str(out),
    )  # fmt: skip
    assert code == 2 and stdout == "" and not out.exists()
    assert stderr.strip().splitlines()[-1].startswith("error: --opset 18: --target tensorrt --precision int8 needs")


def test_fp16_scales_never_underflow():
    """A near-zero weight channel's scale is raised to FP16's smallest normal and its INT8 values re-rounded."""
    w = np.array([[[[100]]], [[[-127]]]], np.int8)
    scale = np.array([1e-7, 0.01], np.float32)
    zero = np.zeros(2, np.int8)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["y"], axis=0)],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 1, 1])],
            [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (scale, "s"), (zero, "z"))],
        )
    )
    assert fp16_safe_scales(model) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["s"].tolist() == [np.float32(2.0**-14), np.float32(0.01)]
    assert inits["w"].ravel().tolist() == [0, -127]  # 100 x 1e-7 is 0.16 of a 6.1e-5 step: rounds to 0
    assert np.float16(inits["s"][0]) > 0


def test_int8_keeps_top1_on_held_out_digits(int8_dir, held_out):
    x, ref = held_out
    runner = OrtRunner(int8_dir / "model.onnx")
    report = compare(ref, runner(x), tolerance_for("int8"))
    assert report.top1 >= 0.98, report.summary()
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    details = manifest["details"]
    assert details["calibration_method"] == "minmax" and details["calibration_samples"] == 200
    assert (
        details["prepared_check"]["passed"] and details["prepared_check"]["ran"]["provider"] == "CPUExecutionProvider"
    )
    assert details["parser_check"]["passed"]
    # What stayed float and why, by node name; the FP16 part recorded with its FP32 I/O.
    kept = list(details["kept_float"].values())
    assert len(kept) == 2 and "10->10 channels" in kept[0] and "GEMV" in kept[1]  # stage-0 PConv, head Gemm
    assert details["float_part"]["io"] == "float32" and details["float_part"]["qdq_scales"] == "float16"
    assert details["qdq_ops"] == 56 and details["residual_adds"] == 13
    assert details["prepared_check"]["ran"]["fp32_activation_absmax"] < 65504 / 2


@pytest.fixture(scope="module")
def fp16_cli(digits_ckpt, digits_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "fp16"
    test = digits_dirs[1]
    args = ["--imgsz", "64", "--crop-pct", "1.0", "--interpolation", "bilinear", "--data", str(test), "-o", str(out)]
    return out, cli("convert", str(digits_ckpt), "-t", "tensorrt", "-p", "fp16", *args)


@no_engine_here
def test_convert_without_tensorrt_writes_phase1_and_exits_3(fp16_cli):
    out, (code, stdout, stderr) = fp16_cli
    assert code == 3 and stdout == ""
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert f"fnexport build-engine {out}" in error[0]
    assert f"trtexec --onnx={out}/model.onnx --saveEngine={out}/{ENGINE}" in error[0]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "reference.npz"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact"] == "model.onnx" and manifest["parity"]["ran"] is False
    with pytest.raises(BackendUnavailable, match="build-engine"):
        TensorRtTarget().runner(out / "model.onnx", manifest)  # `fnexport parity` reports NOT RUN
    code, _, stderr = cli("build-engine", str(out))
    assert code == 3 and "tensorrt" in stderr


def test_fp16_prepared_onnx_matches_pytorch(fp16_cli, held_out):
    out = fp16_cli[0]
    model = onnx.load(str(out / "model.onnx"))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [f32, f32]
    convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {i.data_type for i in model.graph.initializer if i.name in convs} == {f16}
    x, ref = held_out
    report = compare(ref, run(OrtRunner(out / "model.onnx"), x), tolerance_for("fp16"))
    assert report.passed, report.summary()
    assert report.max_abs < 1e-2 * np.abs(ref).max()
    check = json.loads((out / "manifest.json").read_text())["details"]["prepared_check"]
    assert check["passed"] and check["ran"]["fp32_activation_absmax"] < 65504 / 2


def test_parser_check_flags_unknown_ops_and_opsets():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])
    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "g", [x], [y])
    problems = unsupported_ops(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)]))
    assert any("Det" in p for p in problems) and any("opset 22" in p for p in problems)
    ok = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    assert unsupported_ops(helper.make_model(ok, opset_imports=[helper.make_opsetid("", 18)])) == []


def test_engine_mismatch_says_what_differs():
    built = {
        "tensorrt": "10.7.0",
        "gpu": "NVIDIA A100",
        "compute_capability": "8.0",
        "version_compatible": False,
        "hardware_compat": "none",
    }
    a100 = {"gpu": "NVIDIA A100", "compute_capability": "8.0"}
    h100 = {"gpu": "NVIDIA H100", "compute_capability": "9.0"}
    t4 = {"gpu": "Tesla T4", "compute_capability": "7.5"}
    assert engine_mismatch(built, a100, "10.7.0") == []
    assert engine_mismatch(built, a100, "10.8.0") == ["TensorRT 10.7.0 built it but this machine has 10.8.0"]
    assert "compute capability 8.0" in engine_mismatch(built, h100, "10.7.0")[0]
    portable = built | {"version_compatible": True, "hardware_compat": "ampere+"}
    assert engine_mismatch(portable, h100, "10.8.0") == []
    assert len(engine_mismatch(portable, t4, "10.6.0")) == 2
    # TensorRT's support matrix: 10.x version-compatible engines run on 11.x (and 8.x ones on 10.x), no other
    # jump across majors, and never on an older runtime. Within those, TensorRT decides when it deserializes.
    assert engine_mismatch(portable, h100, "11.0.0.114") == []
    assert engine_mismatch(portable | {"tensorrt": "8.6.1"}, h100, "10.7.0") == []
    assert "8 -> 10 and 10 -> 11" in engine_mismatch(portable | {"tensorrt": "8.6.1"}, h100, "11.0.0")[0]
    assert "older" in engine_mismatch(portable | {"tensorrt": "11.1.0"}, h100, "11.0.0")[0]
    assert "older" in engine_mismatch(portable | {"tensorrt": "11.0.0"}, h100, "10.16.1")[0]
    assert engine_mismatch(built, a100, "11.0.0") == ["TensorRT 10.7.0 built it but this machine has 11.0.0"]
    same_cc = built | {"hardware_compat": "same-cc"}
    assert engine_mismatch(same_cc, {"gpu": "NVIDIA A30", "compute_capability": "8.0"}, "10.7.0") == []
    assert "compute capability 8.0" in engine_mismatch(same_cc, h100, "10.7.0")[0]


def test_engine_options_are_validated():
    with pytest.raises(BadInput, match="hardware-compat"):
        EngineOptions(hardware_compat="turing+")
    with pytest.raises(BadInput, match="opt-level"):
        EngineOptions(opt_level=7)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_builds_and_matches_pytorch(digits_ckpt, digits_dirs, tmp_path, precision):
    out, manifest = convert(
        load_checkpoint(digits_ckpt), digits_recipe(digits_dirs, precision, dynamic=True), tmp_path / "e"
    )
    assert manifest["artifact"] == ENGINE and manifest["parity"]["passed"]
    assert manifest["details"]["engine"]["compute_capability"]
    assert (out / "model.onnx").is_file()
    # build-engine rebuilds in place, reusing the timing cache written by the first build
    rebuilt = build_engine_dir(out, EngineOptions(profile=(1, 8, 32)))
    assert rebuilt["parity"]["passed"] and tuple(rebuilt["details"]["engine"]["profile"]) == (1, 8, 32)


# ------------------------------------------------------------------------------------------------------------
# fnexport's own control flow around TensorRT, against the stand-ins in tensorrt_standin.py. They return what
# TensorRT's and cuda-bindings' Python APIs return in the failure cases; they are never evidence that an engine
# builds or runs (none has: this machine has no GPU and no TensorRT).


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """Install a stand-in `tensorrt` and `cuda.bindings.runtime`; returns a function taking their switches."""

    def install(cuda: dict | None = None, **trt_switches):
        trt, rt = make_tensorrt(**trt_switches), make_cudart(**(cuda or {}))
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", make_cuda_utils())
        monkeypatch.setattr(tensorrt_plan, "_LOGGER", None)  # one logger per process: per test here
        monkeypatch.setenv("FNEXPORT_CACHE", str(tmp_path / "cache"))
        return trt, rt

    return install


def build(tmp_path, opts: EngineOptions | None = None, precision: str = "fp16", shape=None) -> tuple[Path, dict]:
    onnx_path, engine_path = tmp_path / "model.onnx", tmp_path / "model.engine"
    onnx_path.write_bytes(b"stand-in onnx")
    shape = shape or ["batch", 3, 64, 64]
    return engine_path, build_engine(onnx_path, engine_path, shape, precision, opts or EngineOptions())


def cache_calls(trt) -> list[tuple]:
    return [c for c in trt.calls if c[0] in ("create_timing_cache", "set_timing_cache")]


def test_timing_cache_is_keyed_by_tensorrt_version_and_gpu(standin, tmp_path):
    standin()
    _, info = build(tmp_path)
    path = Path(info["timing_cache"]["path"])
    assert path.name == "timing-trt10.7.0.23-sm80-nvidia-a100-sxm4-80gb-00010203.cache"
    assert info["gpu_uuid"] == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert info["timing_cache"] == {"path": str(path), "loaded": "fresh", "saved": True} and path.is_file()
    _, again = build(tmp_path)
    assert again["timing_cache"]["loaded"] == "reused"
    a100 = {"gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "gpu_uuid": "GPU-00010203-0405"}
    other_a100 = a100 | {"gpu_uuid": "GPU-ffffffff-0405"}
    assert default_timing_cache("10.7.0.23", a100) == path
    assert default_timing_cache("10.7.0.23", other_a100) != path != default_timing_cache("10.8.0.43", a100)


def test_timing_cache_from_another_gpu_falls_back_to_a_fresh_one(standin, tmp_path, caplog):
    standin()
    _, first = build(tmp_path)
    path = Path(first["timing_cache"]["path"])
    trt, _ = standin(cache_accepted=False)  # set_timing_cache returns False: another GPU, driver or version
    engine, info = build(tmp_path)
    blob = path.read_bytes()
    assert cache_calls(trt) == [
        ("create_timing_cache", blob),
        ("set_timing_cache", blob, False, False),
        ("create_timing_cache", b""),
        ("set_timing_cache", b"", False, True),
    ]
    assert "from another GPU" in caplog.text
    assert engine.read_bytes().startswith(MAGIC) and info["timing_cache"] == {
        "path": str(path),
        "loaded": "fresh",
        "saved": True,
    }


def test_corrupt_timing_cache_starts_fresh(standin, tmp_path, caplog):
    trt, _ = standin(cache_readable=False)  # create_timing_cache returns None for a blob it cannot read
    path = tmp_path / "mine.cache"
    path.write_bytes(b"\x00garbage")
    _, info = build(tmp_path, EngineOptions(timing_cache=path))
    assert cache_calls(trt)[:3] == [
        ("create_timing_cache", b"\x00garbage"),
        ("create_timing_cache", b""),
        ("set_timing_cache", b"", False, True),
    ]
    assert "cannot read the timing cache" in caplog.text
    # The user's file was not one TensorRT accepted: it is theirs, so it is left alone.
    assert path.read_bytes() == b"\x00garbage" and info["timing_cache"]["saved"] is False


def test_engine_is_kept_when_no_timing_cache_can_be_set_or_saved(standin, tmp_path, caplog):
    standin(cache_accepted=False, fresh_cache_accepted=False)  # get_timing_cache() is then None
    engine, info = build(tmp_path)
    assert engine.read_bytes().startswith(MAGIC)
    assert info["timing_cache"]["loaded"] == "none" and info["timing_cache"]["saved"] is False
    standin()
    blocked = tmp_path / "is-a-directory.cache"
    blocked.mkdir()  # writing the cache fails with an OSError
    engine.unlink()
    engine, info = build(tmp_path, EngineOptions(timing_cache=blocked))
    assert engine.read_bytes().startswith(MAGIC) and info["timing_cache"]["saved"] is False
    assert "the engine is kept" in caplog.text and not list(tmp_path.glob(".is-a-directory*"))


def test_users_timing_cache_from_elsewhere_is_not_overwritten(standin, tmp_path, caplog):
    standin(cache_accepted=False)
    path = tmp_path / "shared.cache"
    path.write_bytes(b"cache of another GPU")
    _, info = build(tmp_path, EngineOptions(timing_cache=path))
    assert path.read_bytes() == b"cache of another GPU" and info["timing_cache"]["loaded"] == "fresh"
    assert "was not updated" in caplog.text


@pytest.mark.parametrize(("version", "bit"), [("10.7.0.23", 2), ("11.0.0.114", 1)])
def test_strongly_typed_flag_comes_from_the_enum(standin, tmp_path, version, bit):
    trt, _ = standin(version=version)  # STRONGLY_TYPED is 1 in 10.x and 0 in 11.x
    build(tmp_path)
    assert ("create_network", bit) in trt.calls


def test_fp32_clears_tf32_and_profile_follows_options(standin, tmp_path):
    trt, _ = standin()
    _, info = build(tmp_path, EngineOptions(profile=(2, 4, 8)), precision="fp32")
    assert ("clear_flag", "TF32") in trt.calls
    assert ("add_optimization_profile", ("input", (2, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))) in trt.calls
    assert info["profile"] == [2, 4, 8] and info["profile_shapes"]["max"] == (8, 3, 64, 64)
    trt, _ = standin()
    _, info = build(tmp_path, precision="fp16", shape=[4, 3, 64, 64])
    assert ("clear_flag", "TF32") not in trt.calls and info["profile"] is None
    assert not [c for c in trt.calls if c[0] == "add_optimization_profile"]


def test_same_cc_needs_tensorrt_10_9(standin, tmp_path):
    standin(version="10.7.0.23")
    with pytest.raises(BackendUnavailable, match=r"same-cc needs TensorRT >= 10\.9; this is 10\.7\.0\.23"):
        build(tmp_path, EngineOptions(hardware_compat="same-cc"))
    assert not (tmp_path / "model.engine").exists()
    trt, _ = standin(version="10.9.0.34")
    _, info = build(tmp_path, EngineOptions(hardware_compat="same-cc"))
    assert ("build_serialized_network", "SAME_COMPUTE_CAPABILITY") in trt.calls and info["hardware_compat"] == "same-cc"
    standin(cuda={"cc": (7, 5), "name": b"Tesla T4"})
    with pytest.raises(BackendUnavailable, match="ampere\\+ needs an Ampere or newer GPU"):
        build(tmp_path, EngineOptions(hardware_compat="ampere+"))


@pytest.mark.parametrize(("schema", "version"), [(INSPECTOR_10, "10.7.0.23"), (INSPECTOR_11, "11.0.0.114")])
def test_build_records_layer_precisions(standin, tmp_path, caplog, schema, version):
    standin(version=version, inspector_json=schema)
    caplog.set_level("INFO", logger="fnexport")
    _, info = build(tmp_path)
    layers = info["layer_precisions"]
    assert layers["available"] and layers["schema"] == version[:2] + ".x"
    assert layers["counts"]["INT8"] == 1 and layers["counts"]["FP16"] == 1
    assert [r["precision"] for r in layers["layers"]][:2] == ["INT8", "FP16"]
    assert layers["fp32_layers"] == (["head"] if schema is INSPECTOR_10 else [])  # Reformat/NoOp not counted
    assert "1 INT8" in caplog.text


def test_build_without_an_inspector_still_keeps_the_engine(standin, tmp_path):
    standin(inspector_json=None)
    engine, info = build(tmp_path)
    assert engine.is_file() and info["layer_precisions"]["available"] is False
    assert "create_engine_inspector" in info["layer_precisions"]["reason"]


def test_layer_precision_words():
    assert summarize_layers({"Layers": ["a", "b"]})["counts"] == {"unknown": 2}  # LAYER_NAMES_ONLY
    words = {
        "Row major linear FP32": "FP32",
        "Channel major FP16 format where channel % 8 == 0": "FP16",
        "Thirty-two wide channel vectorized row major Int8 format": "INT8",
        "BFloat16": "BF16",
        "Half": "FP16",
        "Float": "FP32",
    }
    assert {
        text: summarize_layers({"Layers": [{"Inputs": [{"DataType": text}]}]})["layers"][0]["precision"]
        for text in words
    } == words


def engine_dir(tmp_path, built: dict | None = None, **manifest) -> tuple[Path, dict]:
    """An engine file and the manifest fields the runner reads (a classifier's unless `manifest` says otherwise)."""
    path = tmp_path / "model.engine"
    path.write_bytes(MAGIC + b"{}")
    engine = {
        "tensorrt": "10.7.0.23",
        "gpu": "NVIDIA A100-SXM4-80GB",
        "compute_capability": "8.0",
        "version_compatible": False,
        "hardware_compat": "none",
    }
    return path, {"output": {"name": "logits"}, **manifest, "details": {"engine": engine | (built or {})}}


# A small backbone's outputs (name, channels, stride) in stride order, as a manifest lists them.
FEATURES = (("feat_s4", 8, 4), ("feat_s8", 16, 8), ("feat_s16", 32, 16), ("feat_s32", 64, 32))
NAMES = [name for name, _, _ in FEATURES]


def backbone_manifest(features=FEATURES) -> dict:
    return {"kind": "backbone", "outputs": [{"name": n, "channels": c, "stride": s} for n, c, s in features]}


def test_runner_returns_every_backbone_output_in_manifest_order(standin, tmp_path):
    """The engine lists its outputs in another order; height and width are dynamic; two non-square sizes, one
    batch above the profile's max (chunks) and one below its min (padding)."""
    engine_order = (FEATURES[2], FEATURES[0], FEATURES[3], FEATURES[1])
    trt, rt = standin(profile=(2, 4, 8), features=engine_order, profile_hw=((64, 96, 256), (64, 128, 256)))
    runner = TensorRtRunner(*engine_dir(tmp_path, **backbone_manifest()))
    assert runner.info["profile"] == {"min": [2, 3, 64, 64], "opt": [4, 3, 96, 128], "max": [8, 3, 256, 256]}
    rng = np.random.default_rng(0)
    for n, h, w in ((11, 96, 160), (1, 192, 64)):
        x = rng.standard_normal((n, 3, h, w), dtype=np.float32)
        outs = runner(x)
        assert [o.shape for o in outs] == [(n, c, h // s, w // s) for _, c, s in FEATURES]
        for out, ref in zip(outs, fake_features(x, FEATURES), strict=True):
            np.testing.assert_allclose(out, ref, rtol=1e-6)
    shapes = [c[1] for c in trt.calls if c[0] == "set_input_shape"]
    assert shapes == [(8, 3, 96, 160), (3, 3, 96, 160), (2, 3, 192, 64)]
    runs = [c for c in trt.calls if c[0] == "execute_async_v3"]
    assert len(runs) == 3 and all(c[2] == sorted(["input", *NAMES]) for c in runs)  # every address set each run
    # One buffer per tensor, allocated for the first (largest) run and reused by the smaller ones.
    assert sum(c[0] == "cudaMalloc" for c in rt.calls) == 5
    runner.close()
    assert rt.memory == {}


def test_runner_refuses_a_size_outside_the_hw_profile(standin, tmp_path):
    trt, _ = standin(profile=(1, 16, 64), features=FEATURES, profile_hw=((64, 96, 256), (64, 96, 256)))
    runner = TensorRtRunner(*engine_dir(tmp_path, **backbone_manifest()))
    message = r"input 3x320x96 \(CxHxW\) is outside the engine's profile, 3x64x64 to 3x256x256: resize"
    with pytest.raises(BadInput, match=message):
        runner(np.zeros((1, 3, 320, 96), np.float32))
    with pytest.raises(BadInput, match="input 3x32x96 "):
        runner(np.zeros((2, 3, 32, 96), np.float32))
    assert not [c for c in trt.calls if c[0] == "set_input_shape"]  # refused before TensorRT is asked
    runner.close()


@pytest.mark.parametrize(
    ("features", "manifest"),
    [
        ((("out0", 8, 4), *FEATURES[1:]), backbone_manifest()),  # renamed
        (FEATURES[:3], backbone_manifest()),  # one missing
        (None, backbone_manifest()),  # a classifier's engine
        (FEATURES, {}),  # a backbone's engine beside a classifier's manifest
    ],
)
def test_runner_refuses_engine_outputs_other_than_the_manifests(standin, tmp_path, features, manifest):
    standin(features=features)
    path, fields = engine_dir(tmp_path, **manifest)
    with pytest.raises(FnexportError, match=r"the engine's outputs \[.*\] are not the manifest's") as err:
        TensorRtRunner(path, fields)
    assert type(err.value) is FnexportError and f"fnexport build-engine {tmp_path}" in str(err.value)


def test_runner_chunks_batches_inside_the_profile(standin, tmp_path):
    trt, rt = standin(profile=(2, 4, 8))
    runner = TensorRtRunner(*engine_dir(tmp_path))
    assert runner.batch is None and runner.info["profile"] == {
        "min": [2, 3, 64, 64],
        "opt": [4, 3, 64, 64],
        "max": [8, 3, 64, 64],
    }
    x = np.random.default_rng(0).standard_normal((19, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(runner(x), fake_logits(x, 10), rtol=1e-6)
    one = runner(x[:1])  # below the profile's min: padded to 2, the padding's output dropped
    np.testing.assert_allclose(one, fake_logits(x[:1], 10), rtol=1e-6)
    shapes = [c[1][0] for c in trt.calls if c[0] == "set_input_shape"]
    assert shapes == [8, 8, 3, 2] and all(c[2] for c in trt.calls if c[0] == "set_input_shape")
    runner.close()
    assert rt.memory == {} and ("cudaStreamDestroy", (0x5EED,)) in rt.calls


def test_bench_batch_above_the_profile_runs_in_chunks(standin, tmp_path, fp16_cli):
    """`fnexport bench --batch 128` on a default engine (max 64): bench's own path, two calls of 64."""
    trt, _ = standin(classes=10)
    out = tmp_path / "engine-dir"
    shutil.copytree(fp16_cli[0], out)
    path, manifest = engine_dir(out)
    stored = json.loads((out / "manifest.json").read_text())
    stored |= {"artifact": ENGINE, "sha256": sha256_artifact(path)}
    stored["details"]["engine"] = manifest["details"]["engine"]
    (out / "manifest.json").write_text(json.dumps(stored))
    plan = Plan()
    plan.add_artifact(out, (1, 128), 1)
    assert plan.skipped == [] and [c.row["batch"] for c in plan.configs if c.row["kind"] == "artifact"] == [1, 128]
    big = next(c for c in plan.configs if c.row["kind"] == "artifact" and c.row["batch"] == 128)
    assert big.call().shape == (128, 10)
    assert [c[1][0] for c in trt.calls if c[0] == "set_input_shape"] == [64, 64]
    assert big.row["runtime"]["profile"]["max"][0] == 64
    for runner in plan.runners:
        runner.close()


def test_runner_says_when_tensorrt_refuses_a_shape(standin, tmp_path):
    standin(refuse_shapes=True)  # set_input_shape returns False (and TensorRT logs why)
    runner = TensorRtRunner(*engine_dir(tmp_path))
    with pytest.raises(FnexportError, match=r"refused input shape \(4, 3, 64, 64\).*stand-in: shape"):
        runner(np.zeros((4, 3, 64, 64), np.float32))
    with pytest.raises(BadInput, match="outside the engine's profile"):
        runner(np.zeros((4, 3, 96, 96), np.float32))
    runner.close()


def test_runner_reports_tensorrts_own_load_error(standin, tmp_path):
    reason = "The engine plan file is not compatible with this version of TensorRT (stand-in text)"
    trt, _ = standin(version="11.0.0.114", load_error=reason)
    path, manifest = engine_dir(tmp_path, {"version_compatible": True})  # 10.x VC on 11.x: TensorRT decides
    with pytest.raises(BackendUnavailable, match=re.escape(reason)):
        TensorRtRunner(path, manifest)
    assert ("deserialize_cuda_engine", True) in trt.calls  # host code allowed for version-compatible plans
    standin(version="11.0.0.114")
    path, manifest = engine_dir(tmp_path)  # not version-compatible: certain, refused before loading
    with pytest.raises(BackendUnavailable, match="built it but this machine has 11.0.0.114"):
        TensorRtRunner(path, manifest)


def test_missing_cuda_bindings_names_the_pip_line(standin, monkeypatch):
    standin()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)  # import fails as if not installed
    reason = engine_unavailable()
    assert reason.startswith("cuda-bindings is not installed") and "pip install 'cuda-bindings>=12.9.2,<13'" in reason
    row = next(r for r in doctor() if r["backend"] == "tensorrt")
    assert row["usable"] is False and row["note"] == reason and row["version"] == "10.7.0.23"
    cu13 = {"tensorrt-cu13": "11.4.0.106"}  # the hint follows the installed TensorRT wheel's CUDA major
    real_version = tensorrt_cuda.importlib.metadata.version
    monkeypatch.setattr(tensorrt_cuda.importlib.metadata, "version", lambda name: cu13.get(name) or real_version(name))
    assert "pip install 'cuda-bindings>=13.0,<14' (matches tensorrt-cu13)" in engine_unavailable()
    standin(cuda={"count_error": CudaError.cudaErrorInsufficientDriver})
    assert "cudaErrorInsufficientDriver: no usable NVIDIA GPU" in engine_unavailable()
    standin(cuda={"devices": 0})
    assert engine_unavailable().startswith("no CUDA GPU visible")
    standin()
    assert engine_unavailable() is None


def test_real_cuda_bindings_without_a_driver_is_backend_unavailable():
    """The real package (dev extra), not a stand-in: on a machine without an NVIDIA driver, exit 3 and why."""
    rt = pytest.importorskip("cuda.bindings.runtime")
    if int(rt.cudaGetDeviceCount()[0]) == 0:
        pytest.skip("a CUDA driver and GPU are here")
    with pytest.raises(BackendUnavailable, match="no usable NVIDIA GPU and driver here"):
        query_gpu()


def test_handoff_line_uses_only_trtexec_10_and_11_flags():
    dynamic = ["batch", 3, 224, 224]
    fp32 = handoff("no GPU", dynamic, "fp32", EngineOptions())
    line = fp32.split("or `")[1].rstrip("`")
    assert line == (
        "trtexec --onnx={dir}/model.onnx --saveEngine={dir}/model.engine --stronglyTyped --noTF32"
        " --memPoolSize=workspace:4096M --builderOptimizationLevel=3 --minShapes=input:1x3x224x224"
        " --optShapes=input:16x3x224x224 --maxShapes=input:64x3x224x224"
    )
    fp16 = handoff(
        "no GPU", [8, 3, 224, 224], "fp16", EngineOptions(version_compatible=True, hardware_compat="same-cc")
    )
    assert "--noTF32" not in fp16 and "Shapes=" not in fp16
    assert "--versionCompatible --hardwareCompatibilityLevel=sameComputeCapability" in fp16
    # Flags both trtexec 10.x and 11.x parse (11.x removed --fp16/--int8/--best; precision lives in the ONNX).
    valid = {
        "--onnx", "--saveEngine", "--stronglyTyped", "--noTF32", "--memPoolSize", "--builderOptimizationLevel",
        "--minShapes", "--optShapes", "--maxShapes", "--versionCompatible", "--hardwareCompatibilityLevel",
    }  # fmt: skip
    for text in (fp32, fp16):
        flags = {w.split("=")[0] for w in text.split("`")[3].split() if w.startswith("--")}
        assert flags <= valid, flags - valid


@no_engine_here
def test_fp32_convert_without_tensorrt_hands_off_with_no_tf32(digits_ckpt, digits_dirs, tmp_path):
    out = tmp_path / "fp32"
    args = ["--imgsz", "64", "--crop-pct", "1.0", "--interpolation", "bilinear", "--data", str(digits_dirs[1])]
    code, stdout, stderr = cli("convert", str(digits_ckpt), "-t", "tensorrt", "-p", "fp32", *args, "-o", str(out))
    assert code == 3 and stdout == ""
    error = next(line for line in stderr.splitlines() if line.startswith("error:"))
    assert f"trtexec --onnx={out}/model.onnx" in error and "--stronglyTyped --noTF32" in error


def test_tensorrt_extra_is_a_cuda_specific_wheel_and_cuda_bindings():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = {Requirement(r).name: Requirement(r).specifier for r in extras["tensorrt"]}
    assert set(reqs) == {"tensorrt-cu12", "cuda-bindings"}  # not the `tensorrt` metapackage (-> cu13 from 10.13.3)
    assert all(v in reqs["tensorrt-cu12"] for v in ("10.7.0", "10.16.1.11", "11.4.0.106"))
    assert "12.0.0" not in reqs["tensorrt-cu12"] and "10.6.0" not in reqs["tensorrt-cu12"]
    assert str(reqs["cuda-bindings"]) == str(Requirement(CUDA_BINDINGS["12"]).specifier)
    # CI cannot install TensorRT (its -libs wheel comes from pypi.nvidia.com): never in all/dev.
    assert not any("tensorrt" in r for name in ("all", "dev") for r in extras[name])
    dev = {Requirement(r).name: str(Requirement(r).specifier) for r in extras["dev"]}
    assert dev["cuda-bindings"] == str(reqs["cuda-bindings"])


def test_gpu_check_script_dry_run_exits_3_with_one_line():
    if NO_GPU is None:
        pytest.skip("TensorRT and a GPU are here: the dry run would pass")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tensorrt_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensorrt_check: cannot run here:"), lines


def load_check_script():
    spec = importlib.util.spec_from_file_location("tensorrt_check", ROOT / "benchmarks" / "tensorrt_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_gpu_check_script_plans_fnexports_own_flags(standin, tmp_path, monkeypatch, capsys):
    """With the stand-ins (TensorRT and a GPU "present") and a trtexec path, the dry run lists its commands."""
    standin()
    monkeypatch.setenv("TRTEXEC", "/opt/x/trtexec")
    assert load_check_script().main(["--dry-run", "--out", str(tmp_path / "c"), "--batch", "1,8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    ckpt = tmp_path / "c" / "fasternet_t0_digits.pth"
    assert sum(f" convert {ckpt} -t tensorrt -p " in ln and "--dynamic" in ln for ln in lines) == 2
    builds = [ln for ln in lines if ln.startswith("/opt/x/trtexec --onnx=")]
    assert len(builds) == 2 and all("--stronglyTyped" in ln and "--skipInference" in ln for ln in builds)
    assert all("--noTF32" not in ln and "--minShapes=input:1x3x64x64" in ln for ln in builds)
    assert sum("--loadEngine=" in ln and "--shapes=input:8x3x64x64" in ln for ln in lines) == 2
    assert not (tmp_path / "c").exists()  # a dry run writes nothing


def test_gpu_check_script_reads_trtexec_summary():
    # The summary's format, from trtexec's sampleReporting.cpp (TensorRT 10.7 to 11.1).
    text = (
        "[12/01/2026-10:00:00] [I] === Performance summary ===\n"
        "[12/01/2026-10:00:00] [I] Throughput: 1234.5 qps\n"
        "[12/01/2026-10:00:00] [I] Latency: min = 0.7 ms, max = 1.2 ms, mean = 0.81 ms, median = 0.8 ms, "
        "percentile(90%) = 0.9 ms, percentile(95%) = 1 ms, percentile(99%) = 1.1 ms\n"
        "[12/01/2026-10:00:00] [I] GPU Compute Time: min = 0.5 ms, max = 0.9 ms, mean = 0.61 ms, median = 0.6 ms, "
        "percentile(90%) = 0.7 ms, percentile(95%) = 0.8 ms, percentile(99%) = 0.85 ms\n"
    )
    assert load_check_script().trtexec_numbers(text) == {"qps": 1234.5, "latency_ms": 0.8, "compute_ms": 0.6}


BACKBONE_ARGS = ["-t", "tensorrt", "--imgsz", "64,96", "--dynamic", "--dynamic-hw", "--profile-hw", "64,96,256"]
# What those arguments give TensorRT: batch 1/16/64 by height and width 64/96/256 each.
BACKBONE_PROFILE = ("input", (1, 3, 64, 64), (16, 3, 96, 96), (64, 3, 256, 256))


def backbone_features(manifest: dict) -> tuple[tuple[str, int, int], ...]:
    return tuple((o["name"], o["channels"], o["stride"]) for o in manifest["outputs"])


@pytest.fixture(scope="module")
def backbone_prepared(backbone_files, tmp_path_factory):
    """A dynamic T0 backbone converted for TensorRT where no engine can be built: the directory build-engine takes."""
    out = tmp_path_factory.mktemp("trt") / "backbone"
    with pytest.MonkeyPatch.context() as mp:  # a hand-off even on a GPU host
        mp.setattr(tensorrt_target, "engine_unavailable", lambda: "no engine in this test")
        code, _, stderr = cli("convert", str(backbone_files["mmdet"]), *BACKBONE_ARGS, "-o", str(out))
    assert code == 3 and f"fnexport build-engine {out}" in stderr, stderr
    return out


def test_build_engine_on_a_backbone_profiles_batch_and_hw_and_checks_every_output(standin, backbone_prepared, tmp_path):
    out = tmp_path / "backbone"
    shutil.copytree(backbone_prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    features = backbone_features(manifest)
    before = sorted(p.name for p in out.iterdir())
    trt, _ = standin(features=features, profile_hw=((64, 96, 256), (64, 96, 256)))
    # The stand-in's maps are not FasterNet's: every output fails against convert's reference, nothing is kept.
    with pytest.raises(CheckFailed, match="engine parity failed") as err:
        build_engine_dir(out, EngineOptions())
    assert all(f"{name}: " in str(err.value) for name, _, _ in features) and len(features) == 4
    assert ("add_optimization_profile", BACKBONE_PROFILE) in trt.calls
    assert {c[1][2:] for c in trt.calls if c[0] == "set_input_shape"} == {(64, 96)}  # parity at the exported size
    assert sorted(p.name for p in out.iterdir()) == before and ENGINE not in before
    # With the reference swapped for what the stand-in computes, the same directory passes: the engine is kept and
    # the manifest lists each output's parity (fnexport's bookkeeping only, not evidence about TensorRT).
    stored = dict(np.load(out / REFERENCE))
    x = parity_images(Recipe(**manifest["recipe"])).x
    stored |= dict(zip([f[0] for f in features], fake_features(x, features), strict=True))
    np.savez(out / REFERENCE, **stored)
    trt, _ = standin(features=features, profile_hw=((64, 96, 256), (64, 96, 256)))
    updated = build_engine_dir(out, EngineOptions(profile=(2, 8, 32)))
    assert updated["artifact"] == ENGINE and (out / ENGINE).is_file() and updated["parity"]["passed"]
    assert [o["name"] for o in updated["parity"]["outputs"]] == [f[0] for f in features]
    assert ("add_optimization_profile", ("input", (2, 3, 64, 64), (8, 3, 96, 96), (32, 3, 256, 256))) in trt.calls
    assert updated["details"]["engine"]["profile"] == [2, 8, 32]


def test_convert_with_tensorrt_here_builds_a_backbone_engine(standin, backbone_files, tmp_path):
    """Where TensorRT and a GPU are (stand-ins here), convert builds the backbone's engine and checks each output."""
    trt, _ = standin(features=backbone_features({"outputs": load_checkpoint(backbone_files["mmdet"]).config.outputs()}),
                     profile_hw=((64, 96, 256), (64, 96, 256)))  # fmt: skip
    out = tmp_path / "o"
    code, stdout, stderr = cli("convert", str(backbone_files["mmdet"]), *BACKBONE_ARGS, "-o", str(out))
    assert code == 1 and stdout == "" and not out.exists()  # the stand-in's maps fail parity: nothing written
    assert ("add_optimization_profile", BACKBONE_PROFILE) in trt.calls
    error = next(line for line in stderr.splitlines() if line.startswith("error:"))
    assert "tensorrt fp32 parity failed" in error and all(f"feat_s{s}: " in error for s in (4, 8, 16, 32))
