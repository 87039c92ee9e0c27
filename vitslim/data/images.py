"""Per-image pieces of the DeiT recipe shared by every loader: the timm training transform (posterize mended for
Pillow 13), random-erasing boxes drawn as timm draws them, the on-device normalise-and-erase step, and what
Pillow raises for a file it cannot decode."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform

from ..errors import UserError
from .augment import to_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Augment:
    """The DeiT recipe's augmentation (timm.data); mixup and cutmix are applied per batch by the trainer."""

    rand_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"  # DeiT's --remode: erased pixels drawn from N(0, 1) in normalised space
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


def posterize_any_pillow(img, bits_to_keep: int, **_):
    """timm's RandAugment posterize, as it behaved before Pillow 13: 0 bits kept gives a black image.

    timm's increasing posterize maps magnitude 10 to 0 bits (`rand-m9-mstd0.5` draws it for about 0.17% of
    images); Pillow 13's ImageOps.posterize refuses 0 ("bits must be between or equal to 1 and 8") in a loader
    worker, and the run dies. Older Pillow masked every channel value with ~(2**8 - 1), i.e. to 0: that is what
    the DeiT recipe was trained with, so it is kept here; 1-7 bits go to Pillow unchanged.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _mend_posterize(transform) -> int:
    """Swap posterize_any_pillow into every timm posterize op inside `transform`; returns how many."""
    count = 0
    for op in getattr(transform, "ops", ()):  # timm's RandAugment / AutoAugment policies
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize_any_pillow
            count += 1
    for child in getattr(transform, "transforms", ()):  # Compose
        count += _mend_posterize(child)
    return count


def train_transform(img_size: int, mean, std, augment: Augment, no_aug: bool = False, on_device: bool = False):
    """The DeiT training transform of timm.data, with posterize working on every Pillow (posterize_any_pillow).

    on_device: the transform stops at a uint8 (3, H, W) tensor (timm's prefetcher transform); normalisation and
    random erasing then run on the device, per batch (DeviceInput), from erasing boxes drawn per sample here
    (draw_erasing), so they are what timm's RandomErasing would have drawn."""
    transform = create_transform(img_size, is_training=True, no_aug=no_aug, auto_augment=augment.rand_augment,
                                 color_jitter=augment.color_jitter, re_prob=augment.reprob, re_mode=augment.remode,
                                 interpolation=augment.interpolation, mean=mean, std=std, use_prefetcher=on_device)
    _mend_posterize(transform)
    return transform


def draw_erasing(probability: float, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of timm's RandomErasing (one box, area 2-33%, aspect 0.3-3.3), (0, 0, 0, 0) for none.

    The same Python `random` draws, in the same order, as timm.data.RandomErasing._erase makes (it draws nothing
    else from `random`), so a sample seeded alike gets the same box; only the fill is drawn on the device."""
    if random.random() > probability:
        return (0, 0, 0, 0)
    area = height * width
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target_area = random.uniform(0.02, 1 / 3) * area
        aspect = math.exp(random.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            return (random.randint(0, height - h), random.randint(0, width - w), h, w)
    return (0, 0, 0, 0)


class DeviceInput:
    """Turns a loader's uint8 batch (or with --loader gpu/dali, its EncodedBatch, through `decode`) into the
    network's input on the device: (x / 255 - mean) / std as timm's ToTensor + Normalize compute it, then random erasing of each sample's box with N(0, 1) pixels ("pixel" mode;
    "const": zeros) drawn from a generator seeded by (seed, epoch, batch), so a resumed run erases alike."""

    def __init__(self, mean, std, remode: str = "pixel", decode: Callable | None = None) -> None:
        if remode not in ("pixel", "const"):
            raise UserError(f"random erasing mode must be 'pixel' or 'const', got {remode!r}")
        self.mean, self.std, self.remode = tuple(mean), tuple(std), remode
        self.decode = decode  # --loader gpu/dali: EncodedBatch -> pixels 0..255 on the device (DeviceAugment)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # mean, std on each device

    def __call__(self, images: torch.Tensor, device: torch.device, boxes: torch.Tensor | None = None,
                 seed: tuple[int, ...] = ()) -> torch.Tensor:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                                   torch.tensor(self.std, device=device).view(1, -1, 1, 1))
        mean, std = self._stats[device]
        if not isinstance(images, torch.Tensor):  # an EncodedBatch: decoded and augmented on the device first
            images = self.decode(images, device)
        x = images.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
        if boxes is None or not bool(boxes[:, 2].any()):  # (boxes come from the loader, on the CPU: no sync)
            return x
        erased = to_device(torch.nonzero(boxes[:, 2] > 0).flatten(), torch.int64, device)  # noise: these only
        boxes = boxes.to(device, non_blocking=True)
        H, W = x.shape[-2:]
        rows = torch.arange(H, device=device).view(1, H, 1)
        cols = torch.arange(W, device=device).view(1, 1, W)
        top, left, h, w = (boxes[:, i].view(-1, 1, 1) for i in range(4))
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
        if self.remode == "const":
            return x.masked_fill_(inside.unsqueeze(1), 0.0)
        state = np.random.SeedSequence(list(seed)).generate_state(2)
        g = torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))
        fill = torch.randn((erased.numel(), *x.shape[1:]), generator=g, device=device)
        x[erased] = torch.where(inside[erased].unsqueeze(1), fill, x[erased])
        return x


def image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode: OSError (truncated, UnidentifiedImageError), SyntaxError
    and ValueError (malformed headers), DecompressionBombError (a pixel count beyond its limit)."""
    return OSError, SyntaxError, ValueError, Image.DecompressionBombError
