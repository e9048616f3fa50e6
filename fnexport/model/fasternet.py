"""FasterNet with the official repository's module names, so official state_dicts load as they are."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

# The forms bench times in eager (both are measured to win on some sizes, see README "PConv form").
PCONV_FORMS = ("split_cat", "slicing")
# Export-only: split_cat's math as two slices (see Partial_conv3.forward). Eager runs the same views and
# cat (T0 224: 0.98-1.01x split_cat's time, batch 1 and 16, 1 and 2 threads), so bench does not time it.
EXPORT_FORMS = ("slice_cat",)
ACTS = ("gelu", "relu")


@dataclass(frozen=True)
class FasterNetConfig:
    """Everything needed to rebuild a FasterNet; what checkpoints cannot say has a default."""

    embed_dim: int = 40
    depths: tuple[int, ...] = (1, 2, 8, 2)
    act: str = "gelu"
    num_classes: int = 1000
    n_div: int = 4
    mlp_ratio: float = 2.0
    feature_dim: int = 1280
    layer_scale: bool = False
    in_chans: int = 3
    # The Paddle reimplementation puts an activation after the stem's and every merging layer's BN.
    post_norm_act: bool = False
    # A backbone: the four stage outputs (strides 4..32), no head (num_classes and feature_dim are 0).
    features: bool = False
    # The official `fork_feat=True` model's extra BatchNorms norm0/2/4/6 on those outputs (timm's
    # features_only and `--features` on a classifier have none).
    out_norms: bool = False

    def __post_init__(self) -> None:
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, not {self.act!r}")
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        if self.out_norms and not self.features:
            raise ValueError("out_norms needs features (a backbone)")

    @property
    def kind(self) -> str:
        return "backbone" if self.features else "classifier"

    @property
    def variant(self) -> str:
        """The paper's variant name when the shape matches one, else 'custom' (a backbone has no head to match)."""
        for name, ref in VARIANTS.items():
            if (
                (ref.embed_dim, ref.depths, ref.act) == (self.embed_dim, self.depths, self.act)
                and (self.n_div, self.mlp_ratio, self.layer_scale) == (4, 2.0, False)
                and (self.features or self.feature_dim == 1280)
            ):
                return name
        return "custom"

    def outputs(self) -> list[dict]:
        """A backbone's outputs in stride order: name, channels, stride."""
        return [
            {"name": f"feat_s{4 * 2**i}", "channels": self.embed_dim * 2**i, "stride": 4 * 2**i}
            for i in range(len(self.depths))
        ]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"depths": list(self.depths), "variant": self.variant}


VARIANTS: dict[str, FasterNetConfig] = {
    "fasternet_t0": FasterNetConfig(40, (1, 2, 8, 2), "gelu"),
    "fasternet_t1": FasterNetConfig(64, (1, 2, 8, 2), "gelu"),
    "fasternet_t2": FasterNetConfig(96, (1, 2, 8, 2), "relu"),
    "fasternet_s": FasterNetConfig(128, (1, 2, 13, 2), "relu"),
    "fasternet_m": FasterNetConfig(144, (3, 4, 18, 3), "relu"),
    "fasternet_l": FasterNetConfig(192, (3, 4, 18, 3), "relu"),
}


def default_act(embed_dim: int) -> str | None:
    """The activation the paper uses at this width (GELU for T0/T1, ReLU from T2 up), if standard."""
    acts = {cfg.embed_dim: cfg.act for cfg in VARIANTS.values()}
    return acts.get(embed_dim)


def make_act(act: str) -> nn.Module:
    return nn.GELU() if act == "gelu" else nn.ReLU()


class Partial_conv3(nn.Module):  # noqa: N801 - official name, part of the checkpoint format
    """PConv: a 3x3 conv over the first dim/n_div channels, the rest passed through."""

    def __init__(self, dim: int, n_div: int, form: str = "split_cat") -> None:
        super().__init__()
        self.dim_conv3 = dim // n_div
        self.dim_untouched = dim - self.dim_conv3
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, 1, 1, bias=False)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "slicing":
            # The clone is essential: the block's residual shortcut is this same tensor, and the
            # in-place write below would otherwise overwrite the shortcut's first channels too.
            x = x.clone()
            x[:, : self.dim_conv3] = self.partial_conv3(x[:, : self.dim_conv3])
            return x
        if self.form == "slice_cat":
            # Two slices instead of split_with_sizes: ExecuTorch's XNNPACK partitioner takes slice_copy
            # but not split, so T0 lowers to 1 delegate instead of 14 (13 splits left on portable kernels).
            return torch.cat((self.partial_conv3(x[:, : self.dim_conv3]), x[:, self.dim_conv3 :]), 1)
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, cfg: FasterNetConfig) -> None:
        super().__init__()
        hidden = int(dim * cfg.mlp_ratio)
        self.spatial_mixing = Partial_conv3(dim, cfg.n_div)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            make_act(cfg.act),
            nn.Conv2d(hidden, dim, 1, bias=False),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim)) if cfg.layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.spatial_mixing(x))
        if self.layer_scale is not None:
            y = self.layer_scale[:, None, None] * y
        return x + y


class BasicStage(nn.Module):
    def __init__(self, dim: int, depth: int, cfg: FasterNetConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(MLPBlock(dim, cfg) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: FasterNetConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, 4, 4, bias=False)
        self.norm = nn.BatchNorm2d(cfg.embed_dim)
        self.act = make_act(cfg.act) if cfg.post_norm_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, cfg: FasterNetConfig) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 2, 2, bias=False)
        self.norm = nn.BatchNorm2d(2 * dim)
        self.act = make_act(cfg.act) if cfg.post_norm_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.reduction(x)))


class FasterNet(nn.Module):
    """FasterNet: stem, stages with merging layers between them, then a pooled conv head (classifier) or
    the four stage outputs, each through its own BatchNorm in the official `fork_feat` model (backbone)."""

    def __init__(self, cfg: FasterNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        layers: list[nn.Module] = []
        for i, depth in enumerate(cfg.depths):
            dim = cfg.embed_dim * 2**i
            layers.append(BasicStage(dim, depth, cfg))
            if i < len(cfg.depths) - 1:
                layers.append(PatchMerging(dim, cfg))
        self.stages = nn.Sequential(*layers)
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        # Official names: stage outputs sit at `stages` indices 0, 2, 4, 6 (merging layers in between).
        self.out_indices = tuple(range(0, 2 * len(cfg.depths), 2))
        if cfg.features:
            for i in self.out_indices:
                norm = nn.BatchNorm2d(cfg.embed_dim * 2 ** (i // 2)) if cfg.out_norms else nn.Identity()
                self.add_module(f"norm{i}", norm)
        else:
            self.avgpool_pre_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(self.num_features, cfg.feature_dim, 1, bias=False),
                make_act(cfg.act),
            )
            self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.cfg.features:
            return self.forward_features(x)
        x = self.avgpool_pre_head(self.stages(self.patch_embed(x)))
        return self.head(torch.flatten(x, 1))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four stage outputs in stride order; the un-normed stage output feeds the next stage."""
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x))
        return tuple(outs)

    def set_pconv_form(self, form: str) -> None:
        """Pick the PConv forward form for every block ('split_cat', 'slicing' or 'slice_cat')."""
        if form not in PCONV_FORMS + EXPORT_FORMS:
            raise ValueError(f"pconv form must be one of {PCONV_FORMS + EXPORT_FORMS}, not {form!r}")
        for m in self.modules():
            if isinstance(m, Partial_conv3):
                m.form = form


def as_backbone(model: FasterNet) -> FasterNet:
    """A classifier's stem and stages as a backbone (`--features`): the four stage outputs, no head, no norms."""
    cfg = dataclasses.replace(model.cfg, features=True, out_norms=False, num_classes=0, feature_dim=0)
    backbone = FasterNet(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("avgpool_pre_head.", "head."))}
    backbone.load_state_dict(state)
    return backbone.eval()


def hw(imgsz: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an input size given as one number (square) or a pair."""
    return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))


def count(model: nn.Module, imgsz: int | tuple[int, int] = 224) -> tuple[int, int]:
    """Parameters and multiply-accumulates for one image, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, 3, *hw(imgsz))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    # torch counts 2 FLOPs per multiply-accumulate; the paper's "FLOPs" are MACs.
    return params, counter.get_total_flops() // 2
