import json

import numpy as np
import onnx
import pytest

from fnexport.conversion import convert
from fnexport.errors import CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance
from fnexport.targets.graph import op_counts
from fnexport.targets.onnx import OrtRunner


def _recipe(**kw):
    return Recipe(**{"target": "onnx", "imgsz": 64, "parity_samples": 8, **kw})


@pytest.mark.parametrize("layout", ["official", "lightning", "timm"])
def test_convert_layouts_to_clean_verified_onnx(layouts, layout, tmp_path):
    out, manifest = convert(load_checkpoint(layouts[layout]), _recipe(dynamic=True), tmp_path / layout)
    path = out / "model.onnx"
    ops = op_counts(path)
    assert "BatchNormalization" not in ops and "ScatterND" not in ops
    assert ops["Split"] == ops["Concat"] == 13  # one per block of T0
    # Opset 20 exports GELU as one op (ONNX Runtime's GeluFusion misses torch's opset-18 Erf chain)
    assert ops["Gelu"] == 14 and "Erf" not in ops  # 13 blocks + the head
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]  # no external data
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["fnexport.preprocess"])["crop_pct"] == 0.9
    assert json.loads(meta["fnexport.model"])["variant"] == "fasternet_t0"
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs"] < 1e-3
    assert manifest["parity"]["reparam_max_abs"] < 1e-4
    assert manifest["source"]["layout"].startswith(layout if layout != "official" else "official")
    # dynamic batch really is dynamic
    runner = OrtRunner(path)
    assert runner.batch is None
    assert runner(np.zeros((5, 3, 64, 64), np.float32)).shape == (5, 1000)


def test_custom_width_converts_with_act(custom_model, tmp_path):
    import torch

    path = tmp_path / "custom.pth"
    torch.save({"state_dict": custom_model.state_dict()}, path)
    _out, manifest = convert(load_checkpoint(path, act="relu"), _recipe(batch=2), tmp_path / "out")
    assert manifest["model"]["embed_dim"] == 48 and manifest["model"]["act"] == "relu"
    assert manifest["input"]["shape"] == [2, 3, 64, 64]
    assert manifest["parity"]["passed"]


def test_parity_failure_leaves_nothing_behind(layouts, tmp_path):
    with pytest.raises(CheckFailed, match="parity failed"):
        convert(load_checkpoint(layouts["official"]), _recipe(tolerance=Tolerance(atol=1e-12)), tmp_path / "fail")
    assert not (tmp_path / "fail").exists()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_export_is_reproducible(layouts, tmp_path):
    ckpt = load_checkpoint(layouts["official"])
    _, a = convert(ckpt, _recipe(), tmp_path / "a")
    _, b = convert(ckpt, _recipe(), tmp_path / "b")
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
