"""The embedded default data (scikit-learn's bundled digits: real images, no download) and its tiny ViT and Swin.

`vitslim_digits_vit` and `vitslim_digits_swin` are registered with timm, so `--model vitslim_digits_vit` works like
any timm name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

DIGITS_CLASSES = 10
DIGITS_IMG_SIZE = 16
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3189  # of the 16x16 resized digits, to standardise them


def _digits_cfg(model: torch.nn.Module, architecture: str, size: tuple[int, int]) -> None:
    """timm's data config of the embedded data (what timm.data.resolve_data_config reads, for dense and slim models)."""
    model.pretrained_cfg = model.default_cfg = dict(
        architecture=architecture, num_classes=model.num_classes, input_size=(3, *size),
        interpolation="bilinear", mean=(DIGITS_MEAN,) * 3, std=(DIGITS_STD,) * 3, crop_pct=1.0, crop_mode="center")


def _no_pretrained(name: str, pretrained: bool, kwargs: dict) -> None:
    if pretrained:
        raise RuntimeError(f"{name} has no pretrained weights: vitslim.search trains it first")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's registry bookkeeping
        kwargs.pop(key, None)


@register_model
def vitslim_digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A tiny ViT for 16x16 digits: 16 patches of 4x4, 4 blocks, 4 heads of width 16."""
    _no_pretrained("vitslim_digits_vit", pretrained, kwargs)
    args = dict(img_size=DIGITS_IMG_SIZE, patch_size=4, in_chans=3, num_classes=DIGITS_CLASSES, embed_dim=64,
                depth=4, num_heads=4, mlp_ratio=4.0)
    model = VisionTransformer(**{**args, **kwargs})
    _digits_cfg(model, "vitslim_digits_vit", model.patch_embed.img_size)
    return model


@register_model
def vitslim_digits_swin(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """A tiny Swin for 16x16 digits: 2x2 patches, windows of 4, stage 1 on the 8x8 grid (2x2 windows, shifted in
    every other block), stage 2 on 4x4 (one window); 2 + 2 blocks, heads 2 and 4 of width 16."""
    _no_pretrained("vitslim_digits_swin", pretrained, kwargs)
    args = dict(img_size=DIGITS_IMG_SIZE, patch_size=2, in_chans=3, num_classes=DIGITS_CLASSES, embed_dim=32,
                depths=(2, 2), num_heads=(2, 4), window_size=4, mlp_ratio=4.0)
    model = SwinTransformer(**{**args, **kwargs})
    _digits_cfg(model, "vitslim_digits_swin", model.patch_embed.img_size)
    return model


def digits_split(img_size: int = DIGITS_IMG_SIZE, val_fraction: float = 0.2, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits of scikit-learn as (train_x, train_y, val_x, val_y).

    Images are resized to img_size (bilinear), replicated to 3 channels and standardised:
    x: (n, 3, img_size, img_size) float32, y: (n,) int64. The split is fixed by `seed`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0      # (n, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]
