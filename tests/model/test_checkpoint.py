import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fnexport.errors import BadInput
from fnexport.model.checkpoint import load_checkpoint


def functional_forward(sd: dict, act: str, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """FasterNet written from the paper straight onto an official state dict, independent of fnexport's modules."""
    a = F.gelu if act == "gelu" else F.relu

    def bn(y, p):
        return F.batch_norm(
            y, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False, 0.0, eps
        )

    y = bn(F.conv2d(x, sd["patch_embed.proj.weight"], stride=4), "patch_embed.norm.")
    stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
    for s in stages:
        if s % 2:  # merging layer
            y = bn(F.conv2d(y, sd[f"stages.{s}.reduction.weight"], stride=2), f"stages.{s}.norm.")
            continue
        blocks = sorted({int(m[1]) for k in sd if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k))})
        for b in blocks:
            p = f"stages.{s}.blocks.{b}."
            w3 = sd[p + "spatial_mixing.partial_conv3.weight"]
            c = w3.shape[0]
            mixed = torch.cat([F.conv2d(y[:, :c], w3, padding=1), y[:, c:]], 1)
            h = a(bn(F.conv2d(mixed, sd[p + "mlp.0.weight"]), p + "mlp.1."))
            y = y + F.conv2d(h, sd[p + "mlp.3.weight"])
    y = a(F.conv2d(y.mean((2, 3), keepdim=True), sd["avgpool_pre_head.1.weight"])).flatten(1)
    return F.linear(y, sd["head.weight"], sd["head.bias"])


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", ["official", "lightning", "timm", "ddp", "ema"])
def test_every_layout_loads_and_matches_the_paper_forward(layouts, t0_model, layout):
    ckpt = load_checkpoint(layouts[layout])
    assert ckpt.config.variant == "fasternet_t0" and ckpt.config.act == "gelu"
    assert ckpt.layout.startswith({"lightning": "lightning", "timm": "timm"}.get(layout, "official"))
    with torch.no_grad():
        ref = functional_forward(t0_model.state_dict(), "gelu", X)
        out = ckpt.model(X)
    assert ref.abs().max() > 0.5
    assert (out - ref).abs().max() < 1e-5


def test_custom_width_needs_act_and_then_matches(custom_model, tmp_path):
    path = tmp_path / "custom.pth"
    torch.save(custom_model.state_dict(), path)
    with pytest.raises(BadInput, match="--act"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, act="relu")
    cfg = ckpt.config
    assert (cfg.embed_dim, cfg.depths, cfg.num_classes, cfg.feature_dim, cfg.n_div) == (48, (1, 1, 2, 1), 7, 256, 4)
    with torch.no_grad():
        assert (ckpt.model(X) - functional_forward(custom_model.state_dict(), "relu", X)).abs().max() < 1e-5
    # the wrong activation is loud, not subtle: parity would catch it
    wrong = load_checkpoint(path, act="gelu")
    with torch.no_grad():
        assert (wrong.model(X) - ckpt.model(X)).abs().max() > 1e-2


def test_variant_name_builds_random_model():
    ckpt = load_checkpoint("fasternet_t1")
    assert ckpt.config.variant == "fasternet_t1" and ckpt.sha256 is None and ckpt.layout == "random-init"


def test_pickled_module_needs_unsafe_load(layouts):
    with pytest.raises(BadInput, match="--unsafe-load"):
        load_checkpoint(layouts["module"])
    assert load_checkpoint(layouts["module"], unsafe_load=True).config.variant == "fasternet_t0"


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/fnexport-pwned-marker",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    import os

    marker = "/tmp/fnexport-pwned-marker"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Boom()}, path)
    with pytest.raises(BadInput, match="evil.pth.*--unsafe-load"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    # a raw pickle (not a torch zip) is refused too
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(BadInput):
        load_checkpoint(raw)
    assert not os.path.exists(marker)


def test_truncated_empty_and_foreign_files(layouts, tmp_path):
    data = layouts["official"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="cut.pth: truncated"):
        load_checkpoint(cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        load_checkpoint(empty)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, foreign)
    with pytest.raises(BadInput, match="resnet.pth: no FasterNet weights"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(BadInput, match="notes.pth"):
        load_checkpoint(text)
    with pytest.raises(BadInput, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")


def test_mismatched_checkpoint_is_summarised(t0_model, tmp_path):
    sd = dict(t0_model.state_dict())
    del sd["stages.4.blocks.3.mlp.3.weight"]
    sd["stages.4.blocks.3.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(
        BadInput, match=r"broken.pth: .*1 missing keys \(stages.4.blocks.3.mlp.3.weight\); 1 unexpected keys"
    ):
        load_checkpoint(path)
    sd = dict(t0_model.state_dict())
    sd["head.bias"] = torch.zeros(3)
    torch.save(sd, path)
    with pytest.raises(BadInput, match="size mismatch"):
        load_checkpoint(path)


def test_labels_are_read_from_the_checkpoint(t0_model, tmp_path):
    path = tmp_path / "labelled.pth"
    labels = [f"class{i}" for i in range(1000)]
    torch.save({"model": t0_model.state_dict(), "labels": labels}, path)
    assert load_checkpoint(path).labels == labels
    assert np.isfinite(load_checkpoint(path).model(X).detach().numpy()).all()
