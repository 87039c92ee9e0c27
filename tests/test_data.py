"""The DeiT training transform on real images: RandAugment's posterize works on every Pillow."""
import random

import PIL
import pytest
from PIL import Image, ImageOps
from timm.data import auto_augment

from vitslim.data import Augment, posterize_any_pillow, train_transform

PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def _photo(size=24, seed=0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))


def _posterize_ops(transform) -> list:
    found = []
    for op in getattr(transform, "ops", ()):
        if op.name.startswith("Posterize"):
            found.append(op)
    for child in getattr(transform, "transforms", ()):
        found += _posterize_ops(child)
    return found


def test_zero_bits_is_a_black_image_as_before_pillow_13():
    img = _photo()
    black = posterize_any_pillow(img, 0)
    assert black.mode == img.mode and black.size == img.size
    assert black.getextrema() == ((0, 0),) * 3
    # 1..7 bits: Pillow's own posterize, unchanged; 8: the image itself.
    for bits in range(1, 8):
        assert posterize_any_pillow(img, bits).tobytes() == ImageOps.posterize(img, bits).tobytes()
    assert posterize_any_pillow(img, 8) is img


@pytest.mark.skipif(PILLOW_MAJOR < 13, reason="older Pillow accepts 0 bits")
def test_timms_own_posterize_fails_at_zero_bits_on_this_pillow():
    # Guards the fix: on Pillow >= 13, timm's op is what crashed the loader workers.
    with pytest.raises(ValueError, match="bits must be between"):
        auto_augment.posterize(_photo(), 0)


def test_the_default_recipe_survives_magnitude_10_posterize():
    transform = train_transform(24, (0.5,) * 3, (0.5,) * 3, Augment())
    ops = _posterize_ops(transform)
    assert ops and all(op.aug_fn is posterize_any_pillow for op in ops)
    op = ops[0]
    assert op.name == "PosterizeIncreasing" and op.level_fn(10, op.hparams) == (0,)  # magnitude 10 -> 0 bits
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    assert op(_photo()).getextrema() == ((0, 0),) * 3


def test_many_draws_of_the_default_transform_run_through():
    # rand-m9-mstd0.5 reaches magnitude 10 for ~0.17% of images; 3000 draws make a crash near certain unmended.
    random.seed(0)
    import torch
    torch.manual_seed(0)
    transform = train_transform(16, (0.5,) * 3, (0.5,) * 3, Augment())
    img = _photo(16)
    for _ in range(3000):
        assert transform(img).shape == (3, 16, 16)
