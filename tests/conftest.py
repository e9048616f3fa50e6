"""Fixtures are made here, never downloaded: a digits-trained T0 and a T0 in every checkpoint layout."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from fnexport.data import Preprocess, cache_dir, load_images
from fnexport.demo import LABELS, split_digits, train_digits
from fnexport.model.checkpoint import TIMM_TO_OFFICIAL
from fnexport.model.fasternet import VARIANTS, FasterNet, FasterNetConfig


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            elif isinstance(m, torch.nn.Linear):
                m.weight.mul_(10)  # logits of magnitude ~1, as in a trained model
    return model.eval()


@pytest.fixture(scope="session")
def t0_model() -> FasterNet:
    torch.manual_seed(0)
    return randomize_bn(FasterNet(VARIANTS["fasternet_t0"]))


def official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def write_layouts(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    """The model saved in every layout users bring (see CONTEXT.md)."""
    sd = official(model)
    folder.mkdir(parents=True, exist_ok=True)
    layouts = {
        "official.pth": sd,
        "lightning.ckpt": {
            "state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "teacher_model.head.weight": torch.zeros(3, 3)},
            "epoch": 3,
            "global_step": 100,
        },
        "timm.pth": {_to_timm(k): v for k, v in sd.items()},
        "ddp.pt": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 1},
        "ema.pt": {"ema": sd},
    }
    paths = {}
    for name, obj in layouts.items():
        torch.save(obj, folder / name)
        paths[name.split(".")[0]] = folder / name
    torch.save(model, folder / "module.pt")
    paths["module"] = folder / "module.pt"
    return paths


def _to_timm(key: str) -> str:
    for new, old in TIMM_TO_OFFICIAL:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@pytest.fixture(scope="session")
def layouts(t0_model, tmp_path_factory) -> dict[str, Path]:
    return write_layouts(t0_model, tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="session")
def custom_model() -> FasterNet:
    """A non-paper width (48) with ReLU: the activation cannot be read off the weights."""
    torch.manual_seed(1)
    cfg = FasterNetConfig(embed_dim=48, depths=(1, 1, 2, 1), act="relu", num_classes=7, feature_dim=256)
    return randomize_bn(FasterNet(cfg), seed=1)


@pytest.fixture(scope="session")
def digits_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Embedded digits split into train/ and held-out test/ ImageFolder trees."""
    return split_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_ckpt(digits_dirs, tmp_path_factory) -> Path:
    """A real FasterNet-T0 trained on digits at 64x64 (~97% held-out accuracy), as the demo makes it.

    Training takes ~30 s on 2 idle cores, so the result is cached, keyed by the code that makes it.
    """
    import hashlib

    import fnexport.demo
    import fnexport.model.fasternet

    sources = b"".join(Path(m.__file__).read_bytes() for m in (fnexport.demo, fnexport.model.fasternet))
    key = hashlib.sha256(sources + torch.__version__.encode()).hexdigest()[:16]
    cached = cache_dir() / f"test-digits-t0-{key}.pth"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        model = train_digits(digits_dirs[0], steps=120)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"state_dict": model.state_dict(), "labels": LABELS}, tmp)
        os.replace(tmp, cached)
    path = tmp_path_factory.mktemp("digits_ckpt") / "fasternet_t0_digits.pth"
    shutil.copyfile(cached, path)
    return path


def hard_int8_model(imgsz: int = 64, seed: int = 0) -> FasterNet:
    """A T0 as the official code leaves it before fine-tuning: default init, BatchNorm statistics from data
    (cumulative averages over the natural images), head not scaled. Its logits are small and its head is
    wide, so plain MinMax INT8 misses the default gate on every target (measured at 64: ONNX Runtime
    cosine 0.88 / top-1 84%, OpenVINO top-1 88%); entropy and percentile miss it too."""
    torch.manual_seed(seed)
    model = FasterNet(dataclasses.replace(VARIANTS["fasternet_t0"], num_classes=10))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of exactly these images
            m.reset_running_stats()
    x = torch.from_numpy(load_images("embedded:natural", Preprocess(imgsz)).x)
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="session")
def hard_ckpt(tmp_path_factory) -> Path:
    """hard_int8_model() saved as an official-layout checkpoint."""
    path = tmp_path_factory.mktemp("hard") / "fasternet_t0_hard.pth"
    torch.save(hard_int8_model().state_dict(), path)
    return path
