"""Training and validation data: ImageFolder folders (train/, val/) with the DeiT augmentation of timm,
or the embedded digits; a resumable, distributed, deterministic sampler."""
from __future__ import annotations

import random
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torchvision.datasets import ImageFolder

from ..digits import DIGITS_CLASSES, DIGITS_IMG_SIZE, DIGITS_MEAN, DIGITS_STD, digits_split
from ..distributed import Distributed
from ..errors import UserError
from .device import EncodedFiles, collate_encoded, device_augment
from .images import IMAGE_SUFFIXES, Augment, DeviceInput, draw_erasing, image_errors, train_transform

BAD_IMAGES = ("skip", "stop")  # --bad-images: what a file that cannot be decoded does to the run


@dataclass
class Data:
    train: Dataset
    val: Dataset
    num_classes: int
    img_size: int
    embedded: bool
    description: str
    classes: tuple[str, ...] = ()  # the class names, in label order (ImageFolder: the sorted folder names)
    device_input: "DeviceInput | None" = None  # uint8 batches: normalised and erased on the device
    preprocess: dict = field(default_factory=dict)  # timm data-config entries of the evaluation transform

    def pretrained_cfg(self, base: dict | None) -> dict:
        """timm's pretrained_cfg of a model trained on this data: `base` (the model's own) with this data's input
        size, mean/std, interpolation and crop and its number of classes, so that
        timm.data.resolve_data_config(model=m) preprocesses as the training's evaluation did."""
        return {**(base or {}), **self.preprocess, "num_classes": self.num_classes}


def _preprocess(img_size: int, mean, std, interpolation: str, crop_pct: float) -> dict:
    return {"input_size": (3, img_size, img_size), "mean": tuple(mean), "std": tuple(std),
            "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": "center"}


class ImageFiles:
    """An ImageFolder whose samples are (image, label, bad): bad is "" or "PATH (the decoder's error)".

    A training image that cannot be decoded is replaced by the next readable one (index + 1, ...): the same
    replacement every epoch and on every resume, so batches keep their size and runs stay exact. A validation
    image that cannot be decoded comes back blank with label -1, which evaluate() leaves out of the accuracy.
    The loader (BadImageReporter) reports each bad file once, or stops the run.
    """

    def __init__(self, root: Path, transform, replace: bool, erasing: float | None = None) -> None:
        self.folder = ImageFolder(str(root))  # decodes only; the transform runs after the error handling
        self.classes, self.samples, self.replace = self.folder.classes, self.folder.samples, replace
        self.transform = transform
        self.erasing = erasing  # on_device transforms: the probability of the erasing box each sample draws

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int):
        path, label = self.samples[index]
        try:
            return self.folder.loader(path), label, ""
        except image_errors() as e:
            reason = "not an image Pillow can identify" if isinstance(e, UnidentifiedImageError) else str(e)
            return None, label, f"{path} ({reason})"

    def __getitem__(self, index: int):
        image, label, bad = self._decode(index)
        if image is None and self.replace:
            for step in range(1, len(self.samples)):
                image, label, _ = self._decode((index + step) % len(self.samples))
                if image is not None:
                    break
        if image is None:  # validation, or not one readable image in the folder
            image, label = Image.new("RGB", (32, 32)), -1
        image = self.transform(image)
        if not isinstance(image, torch.Tensor):  # timm's prefetcher transforms end in uint8 numpy on some versions
            image = torch.as_tensor(image)
        if self.erasing is None:
            return image, label, bad
        return image, label, bad, torch.tensor(draw_erasing(self.erasing, *image.shape[-2:]))


def _image_folder(root: Path, transform, replace: bool, erasing: float | None = None) -> ImageFiles:
    if not root.is_dir():
        raise UserError(f"{root} does not exist; --data-path needs train/ and val/ folders of class folders")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file()):
        raise UserError(f"{root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    try:
        return ImageFiles(root, transform, replace, erasing)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{root}: {e}") from None


def input_on_device(device: torch.device) -> bool:
    """Whether the training device normalises and erases (a GPU); on a CPU the loader workers do, in parallel."""
    return device.type == "cuda"


def image_folders(data_path: str, img_size: int, mean, std, augment: Augment, no_aug: bool = False,
                  on_device: bool = True, loader: str = "cpu") -> Data:
    """train/ and val/ class folders. The workers decode and augment to uint8 (3, H, W); normalisation and random
    erasing run on the training device (Data.device_input), as in timm's prefetcher: a quarter of the bytes
    cross the worker boundary and the host-to-device copy, and the per-pixel work leaves the CPU.
    on_device=False: all of timm's transform in the workers, float32 batches (what benchmarks.loader compares).
    loader "gpu" / "dali": the training images are decoded and augmented on the device (vitslim.data.device)."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"--data-path {data_path} does not exist")
    train_tf = train_transform(img_size, mean, std, augment, no_aug, on_device=on_device)
    val_tf = create_transform(img_size, is_training=False, interpolation=augment.interpolation,
                              crop_pct=augment.crop_pct, mean=mean, std=std, use_prefetcher=on_device)
    erasing = augment.reprob if augment.reprob > 0 and not no_aug and on_device else None
    train = _image_folder(root / "train", train_tf, replace=True, erasing=erasing)
    val = _image_folder(root / "val", val_tf, replace=False)
    if train.classes != val.classes:
        raise UserError(f"{root}/train and {root}/val have different class folders")
    decode = None
    if loader != "cpu":
        if not on_device:
            raise UserError(f"--loader {loader} augments on the device; it cannot also normalise in the workers")
        decode = device_augment(loader)
        train = EncodedFiles(train, erasing)
    return Data(train, val, len(train.classes), img_size, embedded=False,
                description=f"{root}: {len(train)} train / {len(val)} val images, {len(train.classes)} classes",
                classes=tuple(train.classes),
                device_input=DeviceInput(mean, std, augment.remode, decode) if on_device else None,
                preprocess=_preprocess(img_size, mean, std, augment.interpolation, augment.crop_pct))


def embedded_digits(img_size: int | None = None) -> Data:
    """scikit-learn's digits resized to img_size (default 16)."""
    size = img_size or DIGITS_IMG_SIZE
    tx, ty, vx, vy = digits_split(size)
    return Data(TensorDataset(tx, ty), TensorDataset(vx, vy), DIGITS_CLASSES, size, embedded=True,
                description=f"embedded digits (scikit-learn): {len(ty)} train / {len(vy)} val images, {size}x{size}",
                classes=tuple(str(d) for d in range(DIGITS_CLASSES)),
                preprocess=_preprocess(size, (DIGITS_MEAN,) * 3, (DIGITS_STD,) * 3, "bilinear", 1.0))


class EpochSampler(Sampler[int]):
    """This rank's share of a per-epoch permutation, resumable mid-epoch.

    The permutation depends on (seed, epoch) only, so 1 process with batch B and N processes with batch B/N
    see the same global batches. The tail that does not fill a global batch is dropped.
    """

    def __init__(self, size: int, batch_size: int, dist: Distributed, seed: int) -> None:
        self.size, self.batch_size, self.dist, self.seed = size, batch_size, dist, seed
        global_batch = batch_size * dist.world_size
        self.batches = size // global_batch
        if self.batches == 0:
            raise UserError(f"the training set has {size} images, fewer than one global batch of {global_batch}")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(epoch, index) pairs: SeededSamples draws each sample's augmentation from them."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.batches * self.batch_size * self.dist.world_size]
        mine = order[self.dist.rank::self.dist.world_size]
        return iter((self.epoch, i) for i in mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size


class SeededSamples(Dataset):
    """A training set whose every sample draws its random augmentation from (seed, epoch, index) alone.

    Whichever worker loads a sample, and whenever (a run resumed in mid-epoch starts new workers at another
    batch), it gets the same crop, RandAugment ops and erasing: the Python, NumPy and torch CPU generators are
    seeded for the sample. In the main process (workers=0) their states are put back afterwards, so the
    trainer's own draws (mixup, drop path) do not depend on the data. Keys are EpochSampler's (epoch, index).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        sample_seed = int(state[0]) << 32 | int(state[1])
        in_main = torch.utils.data.get_worker_info() is None
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if in_main else None
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2 ** 32)
        torch.default_generator.manual_seed(sample_seed)  # the CPU generator only: CUDA's stays the trainer's
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the main process, which stops at a step boundary and shuts
    them down itself (a worker dying of Ctrl-C under a batch in flight would crash the loader instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """(images, labels, the bad files among them, erasing boxes or None): ImageFiles' samples carry the bad
    entry third and, with on-device augmentation, an erasing box fourth; others are (image, label)."""

    images, labels = default_collate([sample[:2] for sample in samples])
    bad = [sample[2] for sample in samples if len(sample) > 2 and sample[2]]
    boxes = torch.stack([sample[3] for sample in samples]) if len(samples[0]) > 3 else None
    return images, labels, bad, boxes


class BadImageReporter:
    """Iterates a loader of _collate batches as (images, labels) on the device; says once per file which images
    could not be decoded (bad_images "skip") or stops the run with one line naming the first (bad_images "stop").
    uint8 batches go through device_input (normalisation; training: random erasing seeded by (seed, epoch, batch)).
    """

    def __init__(self, loader: DataLoader, split: str, bad_images: str, say: Callable[[str], None],
                 device: torch.device | None = None, device_input: DeviceInput | None = None,
                 sampler: EpochSampler | None = None, seed: int = 0) -> None:
        if bad_images not in BAD_IMAGES:
            raise UserError(f"--bad-images must be one of {', '.join(BAD_IMAGES)}, got {bad_images!r}")
        self.loader, self.split, self.bad_images, self.say = loader, split, bad_images, say
        self.device, self.device_input, self.sampler, self.seed = device, device_input, sampler, seed
        self.bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch = self.sampler.start_batch if self.sampler is not None else 0
        for images, labels, bad, boxes in self.loader:
            for entry in bad:
                self._report(entry)
            if bad and self.split == "train" and bool((labels < 0).any()):
                raise UserError(f"no train image can be read (the first: {bad[0]})")
            if self.device_input is not None:
                epoch = self.sampler.epoch if self.sampler is not None else 0
                images = self.device_input(images, self.device, boxes, (self.seed, epoch, batch))
            batch += 1
            yield images, labels

    def _report(self, entry: str) -> None:
        if self.bad_images == "stop":
            raise UserError(f"{self.split} image {entry} cannot be read; remove or replace it, or pass "
                            f"--bad-images skip")
        if entry not in self.bad:
            self.bad.add(entry)
            what = ("replaced by the next readable image" if self.split == "train"
                    else "left out of the accuracy")
            self.say(f"warning: skipped {self.split} image {entry}, {what} ({len(self.bad)} skipped so far "
                     f"in {self.split}; --bad-images stop to stop instead)")


def loaders(data: Data, batch_size: int, dist: Distributed, seed: int, workers: int, bad_images: str = "skip",
            say: Callable[[str], None] | None = None) -> tuple[BadImageReporter, BadImageReporter, EpochSampler]:
    """Training loader (this rank's batches of `batch_size`) and validation loader (this rank's shard), each
    yielding (images, labels) and reporting images that cannot be decoded (BadImageReporter).

    Each loader has its own generator, so starting one (a new epoch, a resumed run) draws nothing from the
    global generators the training step uses: with SeededSamples, a run resumed anywhere is exact. say: where
    the warnings go (default: stderr, every rank its own, "[rank R]" first under torchrun)."""
    if say is None:
        prefix = f"[rank {dist.rank}] " if dist.world_size > 1 else ""
        say = lambda message: print(prefix + message, file=sys.stderr)  # noqa: E731
    sampler = EpochSampler(len(data.train), batch_size, dist, seed)
    pin = dist.device.type == "cuda"
    collate = _collate
    if data.device_input is not None and data.device_input.decode is not None:
        collate = collate_encoded
    train = DataLoader(SeededSamples(data.train, seed), batch_size=batch_size, sampler=sampler, num_workers=workers,
                       pin_memory=pin, drop_last=True, persistent_workers=False, collate_fn=collate,
                       generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_stop_signals)
    shard = list(range(dist.rank, len(data.val), dist.world_size))
    val = DataLoader(torch.utils.data.Subset(data.val, shard), batch_size=batch_size, shuffle=False,
                     num_workers=workers, pin_memory=pin, collate_fn=_collate,
                     generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_stop_signals)
    device_input = data.device_input
    return (BadImageReporter(train, "train", bad_images, say, dist.device, device_input, sampler, seed),
            BadImageReporter(val, "validation", bad_images, say, dist.device, device_input), sampler)
