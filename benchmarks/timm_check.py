"""timm's own FasterNet (classifier and features_only) through fnexport, compared with timm's forward.

    pip install --no-deps --target /tmp/timm-pkg timm    # timm's model code only; its torchvision is not needed
    PYTHONPATH=/tmp/timm-pkg python -m benchmarks.timm_check [--workdir DIR]

timm is not a dependency: PyPI's torchvision does not load beside our torch 2.13 build, and timm imports it at
module level (data transforms, FrozenBatchNorm2d isinstance checks). This script therefore installs a stand-in
`torchvision` module before importing timm; nothing of it is ever called by timm's FasterNet. Random weights with
randomized BatchNorm statistics; the checkpoints are timm state_dicts saved with torch.save, converted by the CLI
(`fnexport convert CKPT ...` in a fresh process) and run with ONNX Runtime; the last check converts the timm
nn.Module in memory through `fnexport.convert` and runs it with `fnexport.load(...).predict`.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch


class _Any(type):
    """A class whose every attribute is another distinct class (InterpolationMode.BILINEAR != .BICUBIC)."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        made = _Any(name, (cls,), {})
        setattr(cls, name, made)
        return made


def _attribute(name: str) -> type:
    if name.startswith("__"):  # __file__, __spec__ ...: what inspect and importlib look for
        raise AttributeError(name)
    return _Any(name, (), {})


class _StandInTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _attribute  # type: ignore[method-assign]
        return module

    def exec_module(self, module):
        pass


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
    return model.eval()


def max_rel(got: list[np.ndarray], ref: list[np.ndarray]) -> list[float]:
    assert [g.shape for g in got] == [r.shape for r in ref], ([g.shape for g in got], [r.shape for r in ref])
    return [float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.mkdtemp(prefix="fnexport-timm-")))
    args = ap.parse_args()
    sys.meta_path.insert(0, _StandInTorchvision())
    import onnxruntime as ort
    import timm

    import fnexport

    results: dict = {"timm": timm.__version__}
    cases = {
        "features_only": ({"features_only": True}, "64,96", ["--dynamic-hw"], [(2, 96, 64), (1, 128, 96)]),
        "classifier": ({}, "64", [], [(3, 64, 64)]),
    }
    for name, (kwargs, imgsz, extra, sizes) in cases.items():
        model = randomized(timm.create_model("fasternet_t0", pretrained=False, **kwargs))
        ckpt, out = args.workdir / f"timm_{name}.pth", args.workdir / name
        torch.save(model.state_dict(), ckpt)
        cmd = [sys.executable, "-m", "fnexport", "convert", str(ckpt), "--imgsz", imgsz, "--dynamic", *extra]
        done = subprocess.run([*cmd, "-o", str(out), "--json"], capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-2000:]}")
        manifest = json.loads(done.stdout)
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        errors = {}
        for b, h, w in sizes:
            x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(h * w))
            with torch.no_grad():
                ref = model(x)
            ref = [t.numpy() for t in (ref if isinstance(ref, list) else [ref])]
            errors[f"{b}x3x{h}x{w}"] = max_rel(session.run(None, {"input": x.numpy()}), ref)
        results[name] = {
            "layout": manifest["source"]["layout"],
            "kind": manifest["kind"],
            "convert_parity": manifest["parity"]["passed"],
            "max_rel_per_output": errors,
        }
    model = randomized(timm.create_model("fasternet_t0", pretrained=False))
    path = fnexport.convert(model, target="onnx", out=args.workdir / "api", imgsz=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with fnexport.load(path) as art, torch.no_grad():
        results["api_nn_module"] = max_rel([art.predict(x.numpy())], [model(x).numpy()])[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
