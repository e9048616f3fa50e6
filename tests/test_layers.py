"""Imports run one way, from the CLI down to the model: each module imports only from layers below its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fnexport"

# Top to bottom; README.md, "Layout", shows the same list. A module may import modules of lower layers
# only: never upwards, never sideways (targets never import each other, only targets.onnx below them).
LAYERS = (
    ("__main__",),
    ("cli",),
    ("fnexport",),  # the package root: the names `import fnexport` gives
    ("api",),  # the Python API the package root re-exports; the CLI's commands call it
    ("release", "demo"),
    ("conversion", "gate", "bench", "inspection", "doctor", "engine"),
    ("int8_search",),
    ("targets",),  # the registry, TARGETS
    (
        "targets.coreml",
        "targets.onnx_arm",
        "targets.openvino",
        "targets.tensorrt",
        "targets.executorch",
        "targets.ncnn",
    ),
    (
        "targets.onnx",
        "targets.coreml_package",
        "targets.tensorrt_qdq",
        "targets.tensorrt_cuda",
        "targets.tensorrt_plan",
    ),
    ("targets.base",),
    ("targets.graph",),
    ("comparison", "manifest"),
    ("recipes",),
    ("data",),
    ("model.checkpoint", "model.reparam"),
    ("model.fasternet",),
    ("model",),
    ("console",),
    ("errors", "version"),
)
RANK = {("fnexport." + name if name != "fnexport" else name): i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(fnexport module, line, inside a function) for every import statement, `from x import submodule` included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from fnexport import manifest` imports the submodule, not the package root.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno, id(node) in in_function))
    return found


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(RANK)) == [], "add the new module to LAYERS (and to README.md, Layout)"
    assert sorted(set(RANK) - set(MODULES)) == [], "LAYERS names a module that no longer exists"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name):
    wrong = [
        f"{MODULES[name].name}:{line} imports {target} (layer {RANK[target]}, not below {name}'s {RANK[name]})"
        for target, line, _ in imports(name, MODULES[name])
        if RANK[target] <= RANK[name]
    ]
    assert wrong == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_level_import_of_fnexport(name):
    """Imports inside functions are for optional backends only, never a way around the layering."""
    hidden = [f"{MODULES[name].name}:{line} imports {t}" for t, line, inner in imports(name, MODULES[name]) if inner]
    assert hidden == []


def test_a_new_upward_import_is_caught(tmp_path):
    """The check itself can fail: an upward import added to a copy of a leaf module is reported."""
    leaf = tmp_path / "data.py"
    leaf.write_text(MODULES["fnexport.data"].read_text() + "\nfrom fnexport.gate import gate\n")
    found = imports("fnexport.data", leaf)
    assert ("fnexport.gate", found[-1][1], False) in found and RANK["fnexport.gate"] < RANK["fnexport.data"]
