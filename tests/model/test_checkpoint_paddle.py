"""`.pdparams` from the PaddlePaddle tutorial: loaded without Paddle, matching Paddle's own logits."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fnexport.errors import BadInput
from fnexport.model.checkpoint import load_checkpoint
from fnexport.model.fasternet import FasterNet
from fnexport.model.reparam import reparameterize

# Written by tests/fixtures/make_pdparams.py with paddlepaddle 3.3.1: embed_dim 8 (not a paper width, so
# --act is needed), depths 1,2,1,1, GELU, head 64 -> 10, random BN statistics; logits of Paddle on `x`.
FIXTURES = Path(__file__).parents[1] / "fixtures"
PDPARAMS = FIXTURES / "paddle_tiny.pdparams"
ATOL = 1e-3


@pytest.fixture(scope="module")
def paddle_out() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "paddle_tiny.npz") as data:
        return {k: data[k] for k in data.files}


def fnexport_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fnexport", *args], capture_output=True, text=True, timeout=300)


def logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_fixture_is_paddles_and_sized_for_the_tolerance(paddle_out):
    assert str(paddle_out["act"]) == "gelu"
    # Logits of about 3, so a 1e-3 tolerance is a real check, not noise around zero.
    assert 1.0 < np.abs(paddle_out["logits"]).max() < 10.0


def test_loads_as_paddle_layout_with_post_norm_act(paddle_out):
    ckpt = load_checkpoint(PDPARAMS, act="gelu")
    cfg = ckpt.config
    assert ckpt.layout == "paddle" and ckpt.source()["layout"] == "paddle"
    assert cfg.post_norm_act
    assert (cfg.embed_dim, cfg.depths, cfg.num_classes, cfg.feature_dim, cfg.n_div) == (8, (1, 2, 1, 1), 10, 64, 4)


def test_matches_paddle_logits_eager_and_folded(paddle_out):
    model = load_checkpoint(PDPARAMS, act="gelu").model
    x, ref = paddle_out["x"], paddle_out["logits"]
    assert np.abs(logits(model, x) - ref).max() <= ATOL
    assert np.abs(logits(reparameterize(model), x) - ref).max() <= ATOL


def test_fixture_catches_a_missing_activation_or_the_wrong_one(paddle_out):
    """The same weights without the post-BN activations (the official architecture) or with ReLU are far off."""
    ckpt = load_checkpoint(PDPARAMS, act="gelu")
    x, ref = paddle_out["x"], paddle_out["logits"]
    official = FasterNet(dataclasses.replace(ckpt.config, post_norm_act=False))
    official.load_state_dict(ckpt.model.state_dict())
    assert np.abs(logits(official, x) - ref).max() > 100 * ATOL
    relu = load_checkpoint(PDPARAMS, act="relu").model
    assert np.abs(logits(relu, x) - ref).max() > 100 * ATOL


def test_custom_width_needs_act():
    with pytest.raises(BadInput, match="--act"):
        load_checkpoint(PDPARAMS)


def test_head_weight_is_transposed_from_paddles_in_out():
    raw = pickle.loads(PDPARAMS.read_bytes())  # the committed fixture is trusted
    head = load_checkpoint(PDPARAMS, act="gelu").model.head.weight.detach().numpy()
    assert raw["fc.weight"].shape == (64, 10) and head.shape == (10, 64)
    np.testing.assert_array_equal(head, raw["fc.weight"].T)


def test_inspect_cli():
    result = fnexport_cli("inspect", str(PDPARAMS), "--act", "gelu", "--imgsz", "32", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["source"]["layout"] == "paddle" and info["post_norm_act"] is True
    assert info["modules"]["before"]["BatchNorm2d"] == 9 and "BatchNorm2d" not in info["modules"]["after"]
    assert fnexport_cli("inspect", str(PDPARAMS)).returncode == 2  # custom width without --act


@pytest.mark.slow
def test_convert_to_onnx_matches_paddle(tmp_path, paddle_out):
    pytest.importorskip("onnxruntime")
    from fnexport.targets.onnx import OrtRunner

    out = tmp_path / "onnx"
    result = fnexport_cli(
        "convert", str(PDPARAMS), "--act", "gelu", "--imgsz", "32", "--dynamic", "-o", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source"]["layout"] == "paddle" and manifest["model"]["post_norm_act"] is True
    runner = OrtRunner(out / manifest["artifact"])
    try:
        assert np.abs(runner(paddle_out["x"]) - paddle_out["logits"]).max() <= ATOL
    finally:
        runner.close()


class _Payload:
    """Unpickling this runs `touch marker` (os.system); a real pdparams never names such a global."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("name, protocol", [("evil.pdparams", 4), ("evil.pdparams", 2), ("renamed.pth", 4)])
def test_malicious_pdparams_refused_and_nothing_runs(tmp_path, name, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / name
    state = {"fc.bias": _Payload(marker), "stem.0.weight": np.zeros((8, 3, 4, 4), np.float32)}
    evil.write_bytes(pickle.dumps(state, protocol=protocol))
    # The payload is live: plain pickle runs it.
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", evil], check=True)
    assert marker.exists()
    marker.unlink()

    result = fnexport_cli("inspect", str(evil), "--act", "gelu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to unpickle" in lines[0] and "system" in lines[0], result.stderr
    assert not marker.exists()
    with pytest.raises(BadInput, match="refused"):  # even with the unsafe opt-in: Paddle files never need it
        load_checkpoint(evil, act="gelu", unsafe_load=True)
    assert not marker.exists()


def test_truncated_or_wrong_pdparams_is_bad_input(tmp_path):
    truncated = tmp_path / "truncated.pdparams"
    truncated.write_bytes(PDPARAMS.read_bytes()[:50_000])
    with pytest.raises(BadInput, match="truncated"):
        load_checkpoint(truncated, act="gelu")
    ints = tmp_path / "ints.pdparams"
    ints.write_bytes(pickle.dumps({"stem.0.weight": np.zeros((8, 3, 4, 4), np.int64)}, protocol=4))
    with pytest.raises(BadInput, match="int64"):
        load_checkpoint(ints, act="gelu")
