"""TensorRT target: the prepared ONNX everywhere (Q/DQ rules, FP16, parser ops, hand-off), engines on a GPU."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fnexport.comparison import compare, reference, run, tolerance_for
from fnexport.conversion import convert
from fnexport.data import load_images
from fnexport.demo import DIGITS_PRE
from fnexport.engine import build_engine_dir
from fnexport.errors import BackendUnavailable, BadInput
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe
from fnexport.targets.onnx import OrtRunner
from fnexport.targets.tensorrt import ENGINE, EngineOptions, TensorRtTarget, engine_mismatch
from fnexport.targets.tensorrt_qdq import residual_adds, unsupported_ops, verify_qdq
from tests.test_cli import cli


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


def test_int8_graph_follows_tensorrt_qdq_rules(int8_dir):
    model = onnx.load(str(int8_dir / "model.onnx"))
    assert verify_qdq(model) == []
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert all(not inits[n.input[2]].any() and inits[n.input[2]].dtype == np.int8 for n in qs + dqs)
    weighted = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == 45  # T0: 44 convolutions and the classifier
    for n in weighted:
        assert producer[n.input[0]].op_type == "DequantizeLinear"
        w_dq = producer[n.input[1]]
        w, scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)  # per output channel
        if len(n.input) > 2:
            assert inits[n.input[2]].dtype == np.float32  # bias not quantized
    assert all(inits[n.input[1]].size == 1 for n in qs)  # activations per tensor
    # No Q/DQ after a Conv/Gemm; every residual Add gets its shortcut (not its Conv branch) quantized.
    assert not [
        q for q in qs if producer.get(q.input[0]) is not None and producer[q.input[0]].op_type in ("Conv", "Gemm")
    ]
    adds = residual_adds(model)
    assert len(adds) == 13
    for add in adds:
        kinds = sorted(producer[t].op_type for t in add.input)
        assert kinds in (["Conv", "DequantizeLinear"], ["Conv", "Conv"])  # Conv, Conv: shortcut is a merging conv
    assert len(qs) == 45 + sum(1 for a in adds if "DequantizeLinear" in [producer[t].op_type for t in a.input])


def test_verify_qdq_reports_broken_placements(int8_dir):
    good = onnx.load(str(int8_dir / "model.onnx"))

    bad_zero_point = onnx.ModelProto.FromString(good.SerializeToString())
    q = next(n for n in bad_zero_point.graph.node if n.op_type == "QuantizeLinear")
    zp = next(i for i in bad_zero_point.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zp.name))
    assert any("zero point" in p for p in verify_qdq(bad_zero_point))

    unquantized_conv = onnx.ModelProto.FromString(good.SerializeToString())
    g = unquantized_conv.graph
    producer = {o: n for n in g.node for o in n.output}
    conv = next(n for n in g.node if n.op_type == "Conv")
    conv.input[0] = producer[producer[conv.input[0]].input[0]].input[0]  # skip its Q/DQ
    assert any("input is not quantized" in p for p in verify_qdq(unquantized_conv))

    quantized_output = onnx.ModelProto.FromString(good.SerializeToString())
    g = quantized_output.graph
    conv = next(
        n for n in g.node if n.op_type == "Conv" and any(c.op_type == "Split" for c in g.node if n.output[0] in c.input)
    )
    split = next(c for c in g.node if conv.output[0] in c.input and c.op_type == "Split")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s_extra")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z_extra")
    g.initializer.extend([scale, zero])
    g.node.extend(
        [
            helper.make_node("QuantizeLinear", [conv.output[0], "s_extra", "z_extra"], ["q_extra"], name="q_extra"),
            helper.make_node("DequantizeLinear", ["q_extra", "s_extra", "z_extra"], ["dq_extra"], name="dq_extra"),
        ]
    )
    split.input[0] = "dq_extra"
    problems = verify_qdq(quantized_output)
    assert any("output of Conv" in p for p in problems) and any("dq_extra" in p for p in problems)


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
    assert engine_mismatch(portable, h100, "11.0.0")  # version compatibility stays within a major


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
