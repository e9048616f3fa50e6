import pytest
import torch

from fnexport.model.fasternet import VARIANTS, FasterNet, FasterNetConfig, count

# Counted on the official implementation at 224 with 1000 classes (../shared/CONTEXT.md).
PAPER = {
    "fasternet_t0": (3.905e6, 0.3354e9),
    "fasternet_t1": (7.595e6, 0.8505e9),
    "fasternet_t2": (14.983e6, 1.9043e9),
    "fasternet_s": (31.181e6, 4.5497e9),
    "fasternet_m": (53.521e6, 8.7219e9),
    "fasternet_l": (93.465e6, 15.4944e9),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_macs_match_paper(name):
    params, macs = count(FasterNet(VARIANTS[name]))
    ref_params, ref_macs = PAPER[name]
    assert abs(params - ref_params) < 0.1e6
    assert abs(macs - ref_macs) < 0.01e9
    assert VARIANTS[name].variant == name


def test_custom_config_builds_and_is_named_custom():
    cfg = FasterNetConfig(
        embed_dim=48,
        depths=(1, 1, 3, 1),
        act="relu",
        num_classes=5,
        n_div=2,
        mlp_ratio=3,
        feature_dim=320,
        layer_scale=True,
    )
    model = FasterNet(cfg).eval()
    assert cfg.variant == "custom"
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    assert model.stages[0].blocks[0].spatial_mixing.dim_conv3 == 24
    assert model.stages[0].blocks[0].mlp[0].out_channels == 144


def test_bad_activation_is_rejected():
    with pytest.raises(ValueError, match="act must be"):
        FasterNetConfig(act="swish")
