"""Data: the embedded default data set (scikit-learn's bundled digits: real images, no download)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIGITS_CLASSES = 10


def digits_split(img_size: int = 32, val_fraction: float = 0.2, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits of scikit-learn as (train_x, train_y, val_x, val_y).

    Images are resized to img_size (bilinear), replicated to 3 channels and standardised:
    x: (n, 3, img_size, img_size) float32, y: (n,) int64. The split is fixed by `seed`.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the embedded default data needs scikit-learn: pip install scikit-learn") from e
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0      # (n, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]
