import numpy as np
import pytest
import torch

from fnexport.model.fasternet import FasterNet, FasterNetConfig
from fnexport.model.reparam import reparameterize
from tests.conftest import randomize_bn


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.mark.parametrize("form", ["split_cat", "slicing", "slice_cat"])
def test_folded_matches_original(t0_model, form):
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    ref = _logits(t0_model, x)
    folded = reparameterize(t0_model, form)
    assert np.abs(ref).max() > 0.5  # logits of size ~1, so 1e-5 is a real bound
    assert np.abs(_logits(folded, x) - ref).max() < 1e-5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # the original is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in t0_model.modules())


def test_layer_scale_is_folded():
    cfg = FasterNetConfig(
        embed_dim=32, depths=(1, 1, 1, 1), act="relu", num_classes=10, layer_scale=True, feature_dim=64
    )
    model = randomize_bn(FasterNet(cfg))
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "layer_scale", None) is not None:
                m.layer_scale.uniform_(0.1, 2.0)
    x = torch.randn(2, 3, 64, 64)
    folded = reparameterize(model)
    assert all(getattr(m, "layer_scale", None) is None for m in folded.modules())
    assert np.abs(_logits(folded, x) - _logits(model, x)).max() < 1e-5


def test_slicing_keeps_the_shortcut_intact(t0_model):
    """Without the clone, the in-place write corrupts the residual: slicing must equal split_cat exactly."""
    x = torch.randn(2, 3, 64, 64)
    a = _logits(reparameterize(t0_model, "slicing"), x)
    b = _logits(reparameterize(t0_model, "split_cat"), x)
    assert np.abs(a - b).max() < 1e-5


def test_slice_cat_is_split_cat_and_changes_no_checkpoint_key(t0_model):
    """slice_cat (ExecuTorch's form) computes split_cat exactly; a form is forward-only, never a state_dict change."""
    x = torch.randn(2, 3, 64, 64)
    a, b = reparameterize(t0_model, "slice_cat"), reparameterize(t0_model, "split_cat")
    assert np.array_equal(_logits(a, x), _logits(b, x))
    assert a.state_dict().keys() == b.state_dict().keys()
    with pytest.raises(ValueError, match="slice_cat"):
        a.set_pconv_form("slice-cat")
