"""The one tuple that registers every target; the interface they share is in targets/base.py."""

from __future__ import annotations

from fnexport.errors import BadInput
from fnexport.targets.base import Target
from fnexport.targets.coreml import CoremlTarget
from fnexport.targets.executorch import ExecutorchTarget
from fnexport.targets.ncnn import NcnnTarget
from fnexport.targets.onnx import OnnxTarget
from fnexport.targets.onnx_arm import OnnxArmTarget
from fnexport.targets.openvino import OpenVinoTarget
from fnexport.targets.tensorrt import TensorRtTarget

# Target modules import their backend inside export()/runner(), so importing them here is cheap.
TARGETS: tuple[Target, ...] = (
    OnnxTarget(),
    OpenVinoTarget(),
    TensorRtTarget(),
    CoremlTarget(),
    OnnxArmTarget(),
    ExecutorchTarget(),
    NcnnTarget(),
)


def get_target(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise BadInput(f"unknown target {name!r}; choose one of: {', '.join(t.name for t in TARGETS)}")
