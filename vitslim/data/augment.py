"""timm's RandAugment ops as batched tensor ops, for --loader gpu: each op takes images (n, 3, H, W) as float32
holding the integers 0..255 (what Pillow's uint8 RGB images hold) and one parameter per image, and returns the same.

Each op computes what Pillow computes for timm's op (timm.data.auto_augment), with Pillow's rounding where Pillow
defines it (LUT ops: exact; blends: truncation; the 3x3 smoothing filter: rounded), so an image gets the same
augmentation on the GPU as in a loader worker. Where Pillow's resampling is not reproduced bit for bit (bicubic
rotate, shear and translate: torch's grid_sample has a = -0.75, Pillow a = -0.5) the geometry, the fill and the
in-bounds test are Pillow's; tests/test_gpu_loader.py bounds each op's difference from Pillow's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Pillow's ITU-R 601-2 luma, in its fixed-point form: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16
_LUMA = (19595, 38470, 7471)


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list or tensor on `device` without a device sync: a blocking host-to-device copy (what
    torch.tensor(..., device="cuda") does) waits for every kernel queued before it, the training step's included,
    so the host could no longer run ahead of the GPU. Pinned memory and non_blocking copy instead."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _clip_trunc(x: torch.Tensor) -> torch.Tensor:
    """Pillow's blend rounding: clip to [0, 255], then truncate."""
    return x.clamp_(0, 255).trunc_()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W): Pillow's convert("L") of integer-valued RGB."""
    r, g, b = x.double().split(1, dim=1)  # (scalar weights: no host-to-device copy)
    return torch.floor((r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) / 65536).to(x.dtype)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend(degenerate, x, factor), which ImageEnhance.enhance is."""
    return _clip_trunc(degenerate + _per_image(factor).to(x.dtype) * (x - degenerate))


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """lut (n, 3, 256): a table per image and channel, as Pillow's point() applies it."""
    n, c, h, w = x.shape
    return lut.gather(2, x.reshape(n, c, h * w).long()).view(n, c, h, w).to(x.dtype)


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, 256) counts per image and channel."""
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1).long()
    counts = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    return counts.view(n, c, 256)


def auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): each channel stretched to 0..255, int(v * scale + offset)."""
    present = _histograms(x) > 0
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lo = torch.where(present, levels, 256.0).amin(-1, keepdim=True)
    hi = torch.where(present, levels, -1.0).amax(-1, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    lut = (levels * scale - lo * scale).trunc().clamp(0, 255)
    lut = torch.where(hi > lo, lut, levels)
    return _apply_lut(x, lut)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel, lut[i] = (step // 2 + pixels below i) // step with
    step = (pixels - pixels of the last used level) // 255; unchanged when step is 0 or one level is used."""
    counts = _histograms(x)
    levels = torch.arange(256, device=x.device)
    last = torch.where(counts > 0, levels, -1).amax(-1, keepdim=True)
    step = (counts.sum(-1, keepdim=True) - counts.gather(-1, last.clamp(min=0))) // 255
    below = counts.cumsum(-1) - counts
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    used = (counts > 0).sum(-1, keepdim=True)
    lut = torch.where((step > 0) & (used > 1), lut, levels)
    return _apply_lut(x, lut)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits (0 bits: black, as posterize_any_pillow; >= 8: unchanged)."""
    quantum = torch.pow(2.0, (8 - bits.clamp(0, 8)).to(x.dtype))
    return torch.floor(x / _per_image(quantum)) * _per_image(quantum)


def solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _per_image(thresh).to(x.dtype), 255 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, thresh: float = 128) -> torch.Tensor:
    return torch.where(x < thresh, (x + _per_image(add).to(x.dtype)).clamp(max=255), x)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_luma(x).expand_as(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a grey image at int(mean luma + 0.5) (ImageEnhance.Contrast)."""
    mean = torch.floor(_luma(x).double().mean((1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
    return _blend(mean.expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with ImageFilter.SMOOTH ((1 1 1, 1 5 1, 1 1 1) / 13, rounded; border pixels left as they are)."""
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = torch.floor(F.conv2d(x, kernel, groups=3) / 13 + 0.5)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def affine(x: torch.Tensor, matrices: torch.Tensor, fill: tuple[float, float, float],
           mode: str = "bicubic") -> torch.Tensor:
    """Pillow's Image.transform(size, AFFINE, (a, b, c, d, e, f), resample, fillcolor=fill) per image:
    output pixel (x, y) samples the input at (a(x+.5) + b(y+.5) + c, d(x+.5) + e(y+.5) + f); samples outside
    the image get `fill`. matrices (n, 6) in float64."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing="ij")
    m = to_device(matrices, torch.float64, x.device).view(n, 6, 1, 1)
    u = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # (n, H, W), pixel units
    v = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    if mode == "nearest":  # Pillow takes pixel floor(u), floor(v); grid_sample would round half to even
        flat = (v.floor().clamp(0, h - 1) * w + u.floor().clamp(0, w - 1)).long().view(n, 1, h * w)
        sampled = x.reshape(n, 3, h * w).gather(2, flat.expand(n, 3, h * w)).view(n, 3, h, w)
    else:
        grid = torch.stack((2 * u / w - 1, 2 * v / h - 1), dim=-1).to(x.dtype)
        sampled = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    outside = (u < 0) | (u >= w) | (v < 0) | (v >= h)  # Pillow fills outside [0, W) x [0, H)
    out = sampled.round().clamp_(0, 255)
    for c in range(3):
        out[:, c].masked_fill_(outside, fill[c])
    return out


def rotation_matrix(degrees: float, width: int, height: int) -> tuple[float, ...]:
    """The inverse affine matrix Pillow's Image.rotate(degrees) (about the centre, no expand) samples with."""
    angle = -math.radians(degrees)
    a, b, d, e = (round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15),
                  round(math.cos(angle), 15))
    cx, cy = width / 2.0, height / 2.0
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


def geometric_matrix(op: str, value: float, width: int, height: int) -> tuple[float, ...]:
    """The affine matrix of timm's rotate / shear_x / shear_y / translate_* op with its level argument."""
    if op == "rotate":
        return rotation_matrix(value, width, height)
    return {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
            "translate_x_rel": (1, 0, value * width, 0, 1, 0), "translate_y_rel": (1, 0, 0, 0, 1, value * height),
            "translate_x_abs": (1, 0, value, 0, 1, 0), "translate_y_abs": (1, 0, 0, 0, 1, value)}[op]


POINTWISE = {"auto_contrast": auto_contrast, "equalize": equalize, "invert": invert, "posterize": posterize,
             "solarize": solarize, "solarize_add": solarize_add, "color": color, "contrast": contrast,
             "brightness": brightness, "sharpness": sharpness}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs",
             "translate_y_abs")
