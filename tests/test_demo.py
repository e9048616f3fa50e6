"""The README's first command: `fnexport demo` trains, converts to every installed target and passes parity."""

import importlib.util
import json

import pytest

from tests.test_cli import cli


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    code, stdout, stderr = cli("demo", "--out", str(tmp_path / "demo"), "--json")
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    done = {(r["target"], r["precision"]): r for r in result["results"]}
    # onnx is a core dependency; the dev install brings openvino, coremltools, executorch and ncnn as well
    assert {("onnx", "fp32"), ("onnx", "int8"), ("onnx-arm", "int8")} <= set(done)
    for key in (("executorch", "int8"), ("ncnn", "fp16")):
        if importlib.util.find_spec(key[0]):  # phone runtimes that run here: real parity, never NOT RUN
            assert done[key]["parity"]["n"] == 360 and done[key]["parity"]["top1"] >= 0.98
    assert all(r["passed"] for r in done.values())
    for key in (("onnx", "fp32"), ("onnx", "int8")):
        parity = done[key]["parity"]
        assert parity["accuracy"] == pytest.approx(parity["ref_accuracy"], abs=0.01)
        assert parity["ref_accuracy"] > 0.9  # the model really learned the digits
