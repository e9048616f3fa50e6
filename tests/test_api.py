"""The Python API: convert an nn.Module in memory, load the artifact, predict; typed errors, never an exit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fnexport
from fnexport.errors import BadInput, CheckFailed
from fnexport.model.fasternet import VARIANTS, FasterNet
from tests.conftest import _to_timm, randomize_bn


# The official repository's FasterNet (models/fasternet.py), written out again here, independent of fnexport's
# modules: the `slicing` PConv (with its clone), the stage list with merging layers, the pre-head.
class Partial_conv3(nn.Module):  # noqa: N801 - the official name
    def __init__(self, dim: int, n_div: int) -> None:
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, : self.dim_conv3] = self.partial_conv3(x[:, : self.dim_conv3])
        return x


class MLPBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.spatial_mixing = Partial_conv3(dim, 4)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 1, bias=False),
            nn.BatchNorm2d(2 * dim),
            nn.GELU(),
            nn.Conv2d(2 * dim, dim, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.spatial_mixing(x))


class BasicStage(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MLPBlock(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class OfficialFasterNet(nn.Module):
    def __init__(self, num_classes: int = 10, embed_dim: int = 40, depths=(1, 2, 8, 2)) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, 4, 4, bias=False)
        self.patch_embed.norm = nn.BatchNorm2d(embed_dim)
        stages: list[nn.Module] = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2**i
            stages.append(BasicStage(dim, depth))
            if i < len(depths) - 1:
                merging = nn.Module()
                merging.reduction = nn.Conv2d(dim, 2 * dim, 2, 2, bias=False)
                merging.norm = nn.BatchNorm2d(2 * dim)
                stages.append(merging)
        self.stages = nn.Sequential(*stages)
        self.avgpool_pre_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(embed_dim * 2 ** (len(depths) - 1), 1280, 1, bias=False), nn.GELU()
        )
        self.head = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.norm(self.patch_embed.proj(x))
        for stage in self.stages:
            x = stage(x) if isinstance(stage, BasicStage) else stage.norm(stage.reduction(x))
        return self.head(torch.flatten(self.avgpool_pre_head(x), 1))


def timm_like(model: nn.Module) -> nn.Module:
    """A module whose state_dict() carries timm's FasterNet names (what timm's model gives), same tensors."""
    root = nn.Module()
    for key, value in model.state_dict().items():
        *path, leaf = _to_timm(key).split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_buffer(leaf, value.clone())
    return root


@pytest.fixture(scope="module")
def official_model() -> OfficialFasterNet:
    torch.manual_seed(3)
    return randomize_bn(OfficialFasterNet())


@pytest.fixture(scope="module")
def official_artifact(official_model, tmp_path_factory):
    labels = [f"c{i}" for i in range(10)]
    out = fnexport.convert(official_model, out=tmp_path_factory.mktemp("api") / "o", imgsz=64, labels=labels)
    return out


def test_official_module_converts_in_memory_and_predicts_its_logits(official_model, official_artifact):
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = official_model(torch.from_numpy(x)).numpy()
    assert np.abs(ref).max() > 0.5
    with fnexport.load(official_artifact) as art:
        assert art.manifest["labels"][3] == "c3" and art.batch == 1
        assert art.manifest["source"]["path"] == "nn.Module OfficialFasterNet"
        out = art.predict(x)  # five calls of the batch-1 graph
    assert out.shape == (5, 10)
    assert np.abs(out - ref).max() < 1e-4


def test_predict_from_images_and_paths_matches_preprocess(official_artifact, tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (80 + 9 * i, 70, 3), dtype=np.uint8)) for i in range(3)]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    with fnexport.load(official_artifact / "model.onnx") as art:  # the artifact file works as well as its folder
        x = art.preprocess(images)
        assert x.shape == (3, 3, 64, 64) and x.dtype == np.float32
        by_array, by_pil, by_path = art.predict(x), art.predict(images), art.predict([str(p) for p in paths])
        single = art.predict(paths[0])
    assert np.array_equal(by_array, by_pil) and np.array_equal(by_pil, by_path)
    assert np.array_equal(single, by_array[:1])


@pytest.mark.parametrize("wrap", ["fnexport", "timm"])
def test_fnexport_and_timm_modules_convert(t0_model, tmp_path, wrap):
    model = t0_model if wrap == "fnexport" else timm_like(t0_model)
    out = fnexport.convert(model, "onnx", "fp32", tmp_path / wrap, imgsz=64, dynamic=True)
    x = np.random.default_rng(2).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = t0_model(torch.from_numpy(x)).numpy()
    with fnexport.load(out, batch=2) as art:
        assert art.runner.batch is None and art.batch == 2
        assert np.abs(art.predict(x) - ref).max() < 1e-4
        layout = art.manifest["source"]["layout"]
    assert layout.startswith("timm" if wrap == "timm" else "official")


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="imgszz"):
        fnexport.convert("fasternet_t0", imgszz=64)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"imgsz": 100}, "multiple of 32"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"target": "tflite"}, "unknown target"),
        ({"labels": ["a", "b"]}, "2 names for 1000 classes"),
    ],
)
def test_bad_options_raise_bad_input(tmp_path, kwargs, message):
    with pytest.raises(BadInput, match=message):
        fnexport.convert("fasternet_t0", out=tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_not_a_fasternet_module_is_bad_input():
    with pytest.raises(BadInput, match="nn.Module Linear"):
        fnexport.convert(nn.Linear(3, 3))


def test_parity_failure_is_raised_not_exited(official_model, tmp_path):
    with pytest.raises(CheckFailed, match="parity failed"):
        fnexport.convert(official_model, out=tmp_path / "o", imgsz=64, atol=1e-12)


def test_parity_returns_results(official_model, official_artifact):
    (result,) = fnexport.parity(official_model, official_artifact, samples=4)
    assert result.status == "PASS" and result.report.n == 4 and result.report.max_abs < 1e-3
    with pytest.raises(BadInput, match="--samples 0"):
        fnexport.parity(official_model, [official_artifact], samples=0)


def test_load_checks_hash_and_input(official_artifact, tmp_path):
    with fnexport.load(official_artifact) as art:
        with pytest.raises(BadInput, match=r"\[N, 3, 64, 64\]"):
            art.predict(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(BadInput, match="not a readable image"):
            art.predict(tmp_path / "missing.png")
        with pytest.raises(BadInput, match="fixed batch of 1"):
            fnexport.load(official_artifact, batch=4)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in official_artifact.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckFailed, match="sha256"):
        fnexport.load(copy)


def test_variant_module_names_its_default_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    out = fnexport.convert(randomize_bn(FasterNet(VARIANTS["fasternet_t0"])), imgsz=32)
    assert out == tmp_path.joinpath("exports", "fasternet_t0-onnx-fp32").relative_to(tmp_path)
    assert (tmp_path / out / "manifest.json").is_file()


# --- val: accuracy from the artifact alone ---


@pytest.fixture(scope="module")
def digits_artifacts(digits_ckpt, tmp_path_factory):
    """The digits T0 converted twice: from its file (labels "0".."9" in the manifest) and from memory (none)."""
    from fnexport.model.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("val")
    pre = dict(imgsz=64, crop_pct=1.0, interpolation="bilinear", data="embedded:digits")
    labelled = fnexport.convert(digits_ckpt, out=root / "labelled", batch=8, **pre)
    model = load_checkpoint(digits_ckpt).model
    unlabelled = fnexport.convert(model, out=root / "unlabelled", dynamic=True, **pre)
    return labelled, unlabelled, model


def torch_accuracy(model, folder) -> tuple[float, float, int]:
    from fnexport.data import Preprocess, load_images

    images = load_images(folder, Preprocess(64, crop_pct=1.0, interpolation="bilinear"))
    with torch.no_grad():
        logits = model(torch.from_numpy(images.x)).numpy()
    top5 = np.argsort(-logits, 1)[:, :5]
    return (
        float((logits.argmax(1) == images.labels).mean()),
        float((top5 == images.labels[:, None]).any(1).mean()),
        len(images.labels),
    )


def test_val_equals_pytorch_accuracy(digits_artifacts, digits_dirs, tmp_path):
    from tests.test_cli import cli

    labelled, unlabelled, model = digits_artifacts
    top1, top5, n = torch_accuracy(model, digits_dirs[1])
    assert top1 > 0.8  # a real, trained model
    report = tmp_path / "val.md"
    rc, stdout, stderr = cli("val", str(labelled), "--data", str(digits_dirs[1]), "--json", "--report", str(report))
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == n and result["artifact"] == str(labelled)
    assert abs(result["top1"] - top1) <= 1 / n and abs(result["top5"] - top5) <= 1 / n
    assert "manifest labels (by name)" in " ".join(stderr.split())
    assert report.read_text().startswith("Validation accuracy") and str(labelled) in report.read_text()
    # Several artifacts: a list, each naming its artifact; without labels the sorted folder order is used.
    rc, stdout, stderr = cli(
        "val", str(labelled), str(unlabelled), "--data", str(digits_dirs[1]), "--json", "--batch", "8",
        "--report", str(report),
    )  # fmt: skip
    assert rc == 0, stderr
    both = json.loads(stdout)
    assert [r["artifact"] for r in both] == [str(labelled), str(unlabelled)]
    assert both[0]["batch"] == both[1]["batch"] == 8  # the fixed batch as given; --batch sets the dynamic one's
    assert abs(both[1]["top1"] - top1) <= 1 / n and "sorted folder order" in both[1]["mapping"]
    assert "sorted folder order" in " ".join(stderr.split())


def test_val_samples_and_api(digits_artifacts, digits_dirs):
    labelled, _, _ = digits_artifacts
    (result,) = fnexport.api.val(labelled, digits_dirs[1], samples=40)
    assert result["n"] == 40 and 0 <= result["top1"] <= result["top5"] <= 1


def test_val_bad_input(digits_artifacts, digits_dirs, tmp_path):
    from tests.test_cli import cli

    labelled, _, _ = digits_artifacts
    odd = tmp_path / "odd"
    for name in ("3", "cat", "dog"):
        (odd / name).mkdir(parents=True)
        src = next((digits_dirs[1] / "3").iterdir())
        (odd / name / src.name).write_bytes(src.read_bytes())
    rc, stdout, stderr = cli("val", str(labelled), "--data", str(odd))
    assert rc == 2 and stdout == "" and "cat, dog" in stderr and "Traceback" not in stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(src.read_bytes())
    rc, _, stderr = cli("val", str(labelled), "--data", str(flat))
    assert rc == 2 and "not a labelled ImageFolder" in stderr
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    rc, _, stderr = cli("val", str(labelled), "--data", str(digits_dirs[1]), "--report", str(notes))
    assert rc == 2 and "not an fnexport val report" in stderr and notes.read_text() == "my notes"
    rc, _, stderr = cli("val", str(labelled), "--data", str(digits_dirs[1]), "--batch", "4")
    assert rc == 2 and "fixed batch of 8" in stderr
    rc, _, stderr = cli("val", str(labelled), "--data", str(digits_dirs[1]), "--samples", "0")
    assert rc == 2 and "--samples 0" in stderr


def test_val_top5_is_null_with_five_classes_or_fewer(digits_dirs, tmp_path):
    import dataclasses

    from tests.test_cli import cli

    torch.manual_seed(0)
    model = randomize_bn(FasterNet(dataclasses.replace(VARIANTS["fasternet_t0"], num_classes=3)))
    out = fnexport.convert(model, out=tmp_path / "three", imgsz=32, dynamic=True)
    data = tmp_path / "three-classes"
    for name in ("0", "1", "2"):
        (data / name).mkdir(parents=True)
        for src in sorted((digits_dirs[1] / name).iterdir())[:3]:
            (data / name / src.name).write_bytes(src.read_bytes())
    rc, stdout, stderr = cli("val", str(out), "--data", str(data), "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == 9 and result["top5"] is None and "n/a" not in stdout


def test_backbone_predict_reports_each_output(t0_model, digits_dirs, tmp_path):
    from tests.test_cli import cli

    out = fnexport.convert(t0_model, out=tmp_path / "bb", features=True, imgsz=(64, 96))
    image = next((digits_dirs[1] / "7").iterdir())
    with fnexport.load(out) as art:
        assert not art.is_classifier and art.input_hw == (64, 96)
        feats = art.predict([image])
    assert [f.shape for f in feats] == [(1, 40, 16, 24), (1, 80, 8, 12), (1, 160, 4, 6), (1, 320, 2, 3)]
    rc, stdout, stderr = cli("predict", str(out), str(image), "--json")
    assert rc == 0, stderr
    (pred,) = json.loads(stdout)["predictions"]
    assert [o["name"] for o in pred["outputs"]] == ["feat_s4", "feat_s8", "feat_s16", "feat_s32"]
    for o, f in zip(pred["outputs"], feats, strict=True):
        assert o["shape"] == list(f.shape[1:]) and abs(o["mean"] - f.mean()) < 1e-6 and abs(o["max"] - f.max()) < 1e-6
    rc, _, stderr = cli("val", str(out), "--data", str(digits_dirs[1]))
    assert rc == 2 and "backbone" in stderr
