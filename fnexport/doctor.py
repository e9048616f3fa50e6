"""Which backends are installed and usable here, from the targets' own package lists."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from fnexport.targets import TARGETS

# What every target needs before its own packages: the model and the graph every target starts from.
CORE = {"torch": "core", "onnx": "core"}


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
        module = package.replace("-", "_")
        row: dict = {"backend": package, "extra": extra, "installed": importlib.util.find_spec(module) is not None}
        try:
            row["version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            row["version"] = None
        row["usable"] = row["installed"]
        row["note"] = "" if row["installed"] else f"pip install 'fnexport[{extra}]'"
        if package == "tensorrt" and row["installed"] and not torch.cuda.is_available():
            row["usable"], row["note"] = False, "no CUDA GPU visible: engines cannot be built or run here"
        if package == "coremltools" and row["installed"] and platform.system() != "Darwin":
            row["note"] = "converts here; Core ML prediction needs macOS"
        rows.append(row)
    return rows
