"""The DeiT training transform on real images: RandAugment's posterize works on every Pillow."""
import random

import PIL
import pytest
from PIL import Image, ImageOps
from timm.data import auto_augment

from vitslim.data.images import Augment, posterize_any_pillow, train_transform

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


def seed_all(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_on_device_normalisation_and_erasing_are_timms():
    """The uint8 worker transform + draw_erasing + DeviceInput against timm's whole worker-side transform
    (ToTensor, Normalize, RandomErasing in DeiT's pixel mode), sample by sample from the same seeds: every pixel
    outside the erased box is timm's, bit for bit, and timm erased exactly the box drawn here."""
    import torch

    from vitslim.data.images import DeviceInput, draw_erasing

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    augment = Augment(reprob=0.5)
    full = train_transform(32, mean, std, augment)
    lean = train_transform(32, mean, std, augment, on_device=True)
    device_input, cpu = DeviceInput(mean, std, "pixel"), torch.device("cpu")
    erased = 0
    for i in range(80):
        img = _photo(48, seed=i)
        seed_all(i)  # (RandAugment picks its ops with NumPy)
        reference = full(img)
        seed_all(i)
        pixels = lean(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        box = draw_erasing(0.5, 32, 32)
        ours = device_input(pixels[None], cpu, torch.tensor([box]), (0, 0, i))[0]
        plain = device_input(pixels[None], cpu)[0]
        top, left, h, w = box
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.equal(ours[:, ~inside], reference[:, ~inside]) and torch.equal(plain[:, ~inside],
                                                                                   reference[:, ~inside])
        if h:
            erased += 1
            assert not torch.equal(reference[:, inside], plain[:, inside])  # timm filled the same box
            assert not torch.equal(ours[:, inside], plain[:, inside])
        else:
            assert torch.equal(reference, plain)
    assert 20 < erased < 60  # probability 0.5


def test_on_device_erasing_is_seeded_by_the_batch():
    import torch

    from vitslim.data.images import DeviceInput

    device_input, cpu = DeviceInput((0.5,) * 3, (0.25,) * 3), torch.device("cpu")
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 8, 8], [2, 3, 5, 7], [0, 0, 0, 0], [1, 1, 14, 14]])
    a = device_input(pixels, cpu, boxes, (0, 1, 5))
    assert torch.equal(a, device_input(pixels, cpu, boxes, (0, 1, 5)))      # a resumed run erases alike
    assert not torch.equal(a, device_input(pixels, cpu, boxes, (0, 1, 6)))  # another batch, other noise
    assert torch.equal(a[2], device_input(pixels, cpu)[2])                  # no box, nothing erased
    const = DeviceInput((0.5,) * 3, (0.25,) * 3, "const")(pixels, cpu, boxes, (0, 1, 5))
    assert torch.equal(const[0, :, :8, :8], torch.zeros(3, 8, 8))
