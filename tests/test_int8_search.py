"""INT8 that ships: on a model whose plain MinMax INT8 fails the gate."""

from __future__ import annotations

import pytest

from fnexport.conversion import convert
from fnexport.errors import CheckFailed
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe


def _recipe(target: str, **kw) -> Recipe:
    return Recipe(
        **{"target": target, "precision": "int8", "imgsz": 64, "calib": "embedded:natural", "calib_samples": 64, **kw}
    )


def test_hard_model_fails_plain_minmax(hard_ckpt, tmp_path):
    """The fixture is really hard: today's single MinMax calibration misses the default gate."""
    with pytest.raises(CheckFailed, match="parity failed"):
        convert(load_checkpoint(hard_ckpt), _recipe("onnx"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
