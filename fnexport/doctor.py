"""Which backends are installed and usable here, from the targets' own package lists."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

from fnexport.targets import TARGETS
from fnexport.targets.executorch import torch_mismatch
from fnexport.targets.tensorrt import engine_unavailable

# What every target needs before its own packages: the model and the graph every target starts from.
CORE = {"torch": "core", "onnx": "core"}
# Distributions whose module is not their name with "-" as "_".
MODULES = {"cuda-bindings": "cuda.bindings"}


def backends() -> dict[str, str]:
    """Distribution -> the pyproject extra that installs it, core first, then each target's in TARGETS order."""
    found = dict(CORE)
    for target in TARGETS:
        for package, extra in target.packages.items():
            found.setdefault(package, extra)
    return found


def doctor() -> list[dict]:
    """Each backend: installed, version, and why it cannot run here when it cannot."""
    rows = []
    for package, extra in backends().items():
        module = MODULES.get(package, package.replace("-", "_"))
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted module whose parent package is missing
            found = False
        row: dict = {"backend": package, "extra": extra, "installed": found}
        try:
            row["version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            row["version"] = None
        row["usable"] = row["installed"]
        row["note"] = "" if row["installed"] else f"pip install 'fnexport[{extra}]'"
        if package == "tensorrt" and row["installed"]:
            why = engine_unavailable()  # cuda-bindings missing (with its pip line), no driver, no GPU
            # tensorrt-cu12/-cu13 wheels provide the module under another distribution name.
            row["version"] = row["version"] or getattr(sys.modules.get("tensorrt"), "__version__", None)
            if why is not None:
                row["usable"], row["note"] = False, why
        if package == "executorch" and row["installed"] and torch_mismatch():
            row["usable"], row["note"] = False, torch_mismatch()
        if package == "coremltools" and row["installed"] and platform.system() != "Darwin":
            row["note"] = "converts here; Core ML prediction needs macOS"
        rows.append(row)
    return rows
