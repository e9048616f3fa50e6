"""Backbone checkpoints (issue 16): every layout recognised without flags and matching the independent forward."""

import logging

import pytest
import torch
from conftest import functional_backbone

from fnexport.errors import BadInput
from fnexport.inspection import inspect
from fnexport.model.checkpoint import load_checkpoint
from fnexport.model.reparam import reparameterize

X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", ["plain", "mmdet", "timm"])
def test_backbone_layouts_load_and_match_the_independent_forward(backbone_files, fork_feat_sd, layout):
    ckpt = load_checkpoint(backbone_files[layout])
    cfg = ckpt.config
    assert (cfg.kind, cfg.variant, cfg.act, cfg.features) == ("backbone", "fasternet_t0", "gelu", True)
    assert cfg.out_norms is (layout != "timm")  # timm's features_only has no output norms
    assert ckpt.layout.startswith({"plain": "official", "mmdet": "mmdet", "timm": "timm"}[layout])
    sd = fork_feat_sd if layout != "timm" else {k: v for k, v in fork_feat_sd.items() if not k.startswith("norm")}
    with torch.no_grad():
        ref = functional_backbone(sd, "gelu", X)
        outs = ckpt.model(X)
        folded = reparameterize(ckpt.model)(X)
    assert [tuple(o.shape) for o in outs] == [(2, 40, 16, 24), (2, 80, 8, 12), (2, 160, 4, 6), (2, 320, 2, 3)]
    for r, o, f in zip(ref, outs, folded, strict=True):
        scale = r.abs().max()
        assert scale > 0.1
        assert (o - r).abs().max() / scale < 1e-5
        assert (f - r).abs().max() / scale < 1e-5  # norms as scale/shift, every other BN folded


def test_mmdet_checkpoint_says_what_was_left_out(backbone_files, fork_feat_sd, caplog):
    with caplog.at_level(logging.INFO, logger="fnexport"):
        load_checkpoint(backbone_files["mmdet"])
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1
    assert f"({len(fork_feat_sd)} tensors); 5 other tensors (neck, heads) left out" in lines[0]


def test_output_norms_are_scale_shift_not_batchnorm(backbone_files):
    folded = reparameterize(load_checkpoint(backbone_files["plain"]).model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert type(folded.norm0).__name__ == "ChannelAffine"


def test_classifier_as_backbone_with_features(layouts, t0_model):
    ckpt = load_checkpoint(layouts["official"], features=True)
    assert (ckpt.config.kind, ckpt.config.out_norms, ckpt.labels) == ("backbone", False, None)
    assert not hasattr(ckpt.model, "head")
    sd = {k: v for k, v in t0_model.state_dict().items() if not k.startswith(("head.", "avgpool_pre_head."))}
    with torch.no_grad():
        for r, o in zip(functional_backbone(sd, "gelu", X), ckpt.model(X), strict=True):
            assert (o - r).abs().max() / r.abs().max() < 1e-5
    assert load_checkpoint(layouts["official"]).config.kind == "classifier"  # unchanged without the flag


def test_inspect_says_backbone_outputs_and_macs_at_the_size(backbone_files, layouts):
    info = inspect(load_checkpoint(backbone_files["mmdet"]), (64, 96))
    assert info["kind"] == "backbone" and info["imgsz"] == [64, 96]
    assert [(o["name"], o["channels"], o["stride"]) for o in info["outputs"]] == [
        ("feat_s4", 40, 4),
        ("feat_s8", 80, 8),
        ("feat_s16", 160, 16),
        ("feat_s32", 320, 32),
    ]
    assert info["outputs"][3]["shape"] == [1, 320, 2, 3]
    # MACs scale with the pixel count: 64x96 is 1.5x 64x64.
    square = inspect(load_checkpoint(backbone_files["mmdet"]), 64)["macs"]
    assert abs(info["macs"] / square - 1.5) < 0.01
    assert inspect(load_checkpoint(layouts["official"]), 64)["kind"] == "classifier"


def test_half_a_head_is_refused(fork_feat_sd, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({**fork_feat_sd, "head.weight": torch.zeros(10, 1280), "head.bias": torch.zeros(10)}, path)
    with pytest.raises(BadInput, match="avgpool_pre_head"):
        load_checkpoint(path)
