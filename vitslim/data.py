"""Training and validation data: ImageFolder folders (train/, val/) with the DeiT augmentation of timm,
or the embedded digits; a resumable, distributed, deterministic sampler."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from .cli import Distributed, UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BAD_IMAGES = ("skip", "stop")  # --bad-images: what a file that cannot be decoded does to the run


def add_loader_arg(group) -> None:
    """--loader, shared by python -m vitslim.search and retrain."""
    from .gpu_loader import LOADERS
    group.add_argument("--loader", choices=LOADERS, default="cpu",
                       help="where training images are decoded and augmented: cpu (default: the loader workers, "
                            "Pillow), gpu (workers read files and draw the augmentation; the GPU decodes with "
                            "nvJPEG and augments, batched) or dali (the same with NVIDIA DALI's decoder, an "
                            "optional install); the same recipe and draws either way")


def add_bad_images_arg(group) -> None:
    """--bad-images, shared by python -m vitslim.search and retrain."""
    group.add_argument("--bad-images", choices=BAD_IMAGES, default="skip",
                       help="an image that cannot be decoded: skip (default; a warning naming it, a training "
                            "image replaced by the next readable one, a validation image left out of the "
                            "accuracy) or stop (the run stops naming it)")


@dataclass(frozen=True)
class Augment:
    """The DeiT recipe's augmentation (timm.data); mixup and cutmix are applied per batch by the trainer."""

    rand_augment: str = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    remode: str = "pixel"  # DeiT's --remode: erased pixels drawn from N(0, 1) in normalised space
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


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


def posterize_any_pillow(img, bits_to_keep: int, **_):
    """timm's RandAugment posterize, as it behaved before Pillow 13: 0 bits kept gives a black image.

    timm's increasing posterize maps magnitude 10 to 0 bits (`rand-m9-mstd0.5` draws it for about 0.17% of
    images); Pillow 13's ImageOps.posterize refuses 0 ("bits must be between or equal to 1 and 8") in a loader
    worker, and the run dies. Older Pillow masked every channel value with ~(2**8 - 1), i.e. to 0: that is what
    the DeiT recipe was trained with, so it is kept here; 1-7 bits go to Pillow unchanged.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _mend_posterize(transform) -> int:
    """Swap posterize_any_pillow into every timm posterize op inside `transform`; returns how many."""
    from timm.data import auto_augment

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
    from timm.data import create_transform

    transform = create_transform(img_size, is_training=True, no_aug=no_aug, auto_augment=augment.rand_augment,
                                 color_jitter=augment.color_jitter, re_prob=augment.reprob, re_mode=augment.remode,
                                 interpolation=augment.interpolation, mean=mean, std=std, use_prefetcher=on_device)
    _mend_posterize(transform)
    return transform


def draw_erasing(probability: float, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of timm's RandomErasing (one box, area 2-33%, aspect 0.3-3.3), (0, 0, 0, 0) for none.

    The same Python `random` draws, in the same order, as timm.data.RandomErasing._erase makes (it draws nothing
    else from `random`), so a sample seeded alike gets the same box; only the fill is drawn on the device."""
    import math
    import random

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
        from .augment_ops import to_device
        erased = to_device(torch.nonzero(boxes[:, 2] > 0).flatten(), torch.int64, device)  # noise: these only
        boxes = boxes.to(device, non_blocking=True)
        H, W = x.shape[-2:]
        rows = torch.arange(H, device=device).view(1, H, 1)
        cols = torch.arange(W, device=device).view(1, 1, W)
        top, left, h, w = (boxes[:, i].view(-1, 1, 1) for i in range(4))
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # (B, H, W)
        if self.remode == "const":
            return x.masked_fill_(inside.unsqueeze(1), 0.0)
        import numpy as np
        state = np.random.SeedSequence(list(seed)).generate_state(2)
        g = torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))
        fill = torch.randn((erased.numel(), *x.shape[1:]), generator=g, device=device)
        x[erased] = torch.where(inside[erased].unsqueeze(1), fill, x[erased])
        return x


def _image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode: OSError (truncated, UnidentifiedImageError), SyntaxError
    and ValueError (malformed headers), DecompressionBombError (a pixel count beyond its limit)."""
    from PIL import Image
    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


class ImageFiles:
    """An ImageFolder whose samples are (image, label, bad): bad is "" or "PATH (the decoder's error)".

    A training image that cannot be decoded is replaced by the next readable one (index + 1, ...): the same
    replacement every epoch and on every resume, so batches keep their size and runs stay exact. A validation
    image that cannot be decoded comes back blank with label -1, which evaluate() leaves out of the accuracy.
    The loader (BadImageReporter) reports each bad file once, or stops the run.
    """

    def __init__(self, root: Path, transform, replace: bool, erasing: float | None = None) -> None:
        from torchvision.datasets import ImageFolder

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
        except _image_errors() as e:
            from PIL import UnidentifiedImageError
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
            from PIL import Image
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
    loader "gpu" / "dali": the training images are decoded and augmented on the device (vitslim.gpu_loader)."""
    from timm.data import create_transform

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
        from .gpu_loader import EncodedFiles, device_augment
        if not on_device:
            raise UserError(f"--loader {loader} augments on the device; it cannot also normalise in the workers")
        decode = device_augment(loader)
        train = EncodedFiles(train, erasing)
    return Data(train, val, len(train.classes), img_size, embedded=False,
                description=f"{root}: {len(train)} train / {len(val)} val images, {len(train.classes)} classes",
                classes=tuple(train.classes),
                device_input=DeviceInput(mean, std, augment.remode, decode) if on_device else None,
                preprocess=_preprocess(img_size, mean, std, augment.interpolation, augment.crop_pct))


def run_data(args, img_size: int, mean, std, device: torch.device, say: Callable[[str], None]) -> Data:
    """The data of a search or retrain run on `device`: the embedded digits without --data-path, else the image
    folders with --aa, --reprob and --loader."""
    if args.data_path is None:
        if args.loader != "cpu":
            say(f"warning: --loader {args.loader} ignored: it applies to --data-path image folders, and the "
                f"embedded digits are tensors already")
        return embedded_digits(img_size)
    if args.loader == "dali" and device.type != "cuda":
        raise UserError(f"--loader dali decodes on a CUDA device; this run is on {device}: use --loader cpu")
    if args.loader == "gpu" and device.type != "cuda":
        say(f"warning: --loader gpu on {device}: the main process decodes and augments every batch on the CPU, "
            f"one core; --loader cpu spreads that over the --workers")
    return image_folders(args.data_path, img_size, mean, std, Augment(rand_augment=args.aa, reprob=args.reprob),
                         on_device=input_on_device(device) or args.loader != "cpu", loader=args.loader)


def embedded_digits(img_size: int | None = None) -> Data:
    """scikit-learn's digits resized to img_size (default 16)."""
    from .digits import DIGITS_CLASSES, DIGITS_IMG_SIZE, DIGITS_MEAN, DIGITS_STD, digits_split

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
        import random

        import numpy as np

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
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]:
    """(images, labels, the bad files among them, erasing boxes or None): ImageFiles' samples carry the bad
    entry third and, with on-device augmentation, an erasing box fourth; others are (image, label)."""
    from torch.utils.data import default_collate

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
        import sys
        prefix = f"[rank {dist.rank}] " if dist.world_size > 1 else ""
        say = lambda message: print(prefix + message, file=sys.stderr)  # noqa: E731
    sampler = EpochSampler(len(data.train), batch_size, dist, seed)
    pin = dist.device.type == "cuda"
    collate = _collate
    if data.device_input is not None and data.device_input.decode is not None:
        from .gpu_loader import collate_encoded as collate
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
