"""Inference form: every BatchNorm folded into its conv, layer scale into the last MLP conv, PConv form chosen."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fnexport.model.fasternet import FasterNet, MLPBlock, PatchEmbed, PatchMerging


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a conv with bias that computes bn(conv(x)) in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


class ChannelAffine(nn.Module):
    """x * scale + shift per channel: an eval-mode BatchNorm that no conv can absorb."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", (bn.bias - bn.running_mean * scale).reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@torch.no_grad()
def reparameterize(model: FasterNet, pconv_form: str = "split_cat") -> FasterNet:
    """A folded, eval-mode deep copy of `model`; the original is left untouched."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, (PatchEmbed, PatchMerging)):
            conv_name = "proj" if isinstance(m, PatchEmbed) else "reduction"
            setattr(m, conv_name, fold_bn(getattr(m, conv_name), m.norm))
            m.norm = nn.Identity()
        elif isinstance(m, MLPBlock):
            m.mlp[0] = fold_bn(m.mlp[0], m.mlp[1])
            m.mlp[1] = nn.Identity()
            if m.layer_scale is not None:
                # layer_scale * conv(x) is a conv with its output channels scaled (it has no bias).
                m.mlp[3].weight.mul_(m.layer_scale[:, None, None, None])
                m.layer_scale = None
    # A backbone's norm0/2/4/6 act on a stage output, which is a residual sum (x + mlp(x)) that also feeds
    # the next stage un-normed: no conv produces it alone, so folding is never exact here and each norm
    # becomes a per-channel scale and shift (Mul + Add in ONNX; runtimes fuse it into the next op).
    for i in model.out_indices if model.cfg.out_norms else ():
        setattr(model, f"norm{i}", ChannelAffine(getattr(model, f"norm{i}")))
    model.set_pconv_form(pconv_form)
    return model
