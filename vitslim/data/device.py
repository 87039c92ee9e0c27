"""--loader gpu and --loader dali: the training images are decoded and augmented on the GPU, batch by batch.

The loader workers only read each file and draw its augmentation: they run timm's own DeiT transform objects
(RandomResizedCropAndInterpolation.get_params, RandomHorizontalFlip's draw, RandAugment with every op's image
function swapped for a recorder) on the image's header, so every sample draws exactly what the CPU pipeline
draws for it, from the same (seed, epoch, index) seeds: same sampler, same exact resume, same DDP sharding. The
main process then decodes the batch on the device (torchvision's nvJPEG decode, batched; or DALI's decoder, which
also uses the hardware JPEG engines of A100/H100/H200), crops and resizes each image (bicubic, antialiased:
torch's is made to match Pillow's), flips, and applies the recorded RandAugment ops as batched tensor ops
(vitslim.data.augment), grouped by op; normalisation and random erasing follow in DeviceInput as on the default
path. We use plain torch ops rather than torchvision.transforms.v2 or kornia: both take one magnitude per call,
where RandAugment draws one per image, and neither reproduces Pillow's rounding, which the tests hold us to.

Files a GPU decoder cannot take (not JPEG, CMYK, a JPEG without its end marker: likely truncated) are decoded by
Pillow in the worker instead, with the CPU pipeline's bad-image rules; the validation set keeps the CPU path
(its transform is a resize and a centre crop, a fraction of the training transform's work).
"""
from __future__ import annotations

import copy
import io
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import auto_augment
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import PILToTensor, RandomHorizontalFlip

from ..errors import UserError
from . import augment as augment_ops
from .images import draw_erasing, image_errors, posterize_any_pillow

LOADERS = ("cpu", "gpu", "dali")  # --loader
DALI_INSTALL = ("pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120 (pick the build "
                "matching your CUDA major version)")


@dataclass(frozen=True)
class SampleDraw:
    """One training sample's augmentation, as timm's transform drew it, and what to decode."""

    path: str
    crop: tuple[int, int, int, int]  # (top, left, height, width) in the decoded image
    interpolation: str  # the RandomResizedCrop's resampling: "bicubic", "bilinear" or "nearest"
    flip: bool
    ops: tuple[tuple[str, tuple, str], ...]  # RandAugment's applied ops in order: (op, level args, resampling)
    fill: tuple[int, int, int]  # RandAugment's fill colour for the geometric ops (timm: the mean in 0..255)
    size: tuple[int, int]  # the output (height, width)


@dataclass
class EncodedBatch:
    """A batch as the workers deliver it for the device: files (1-D uint8 JPEG bytes, or (3, H, W) uint8 pixels
    Pillow decoded in the worker) and their draws."""

    files: list[torch.Tensor]
    draws: list[SampleDraw]
    size: tuple[int, int]  # the output (height, width)
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = (len(self.files), 3, *self.size)

    def pin_memory(self) -> "EncodedBatch":  # DataLoader(pin_memory=True) calls this
        return self  # the decoders read the bytes on the host themselves: pinning them would only add a copy


class _Recorder:
    """Stands in for one timm RandAugment image function: records the call instead of changing an image.

    The geometric ops resolve their resampling through timm's _check_args_tf, which draws from `random` when the
    policy's interpolation is random, so the recorder calls it too and the draws stay in step with the CPU path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, draw: list, *level_args, **kwargs) -> list:
        resample = ""
        if self.name in augment_ops.GEOMETRIC:
            kwargs = dict(kwargs)
            auto_augment._check_args_tf(kwargs)
            resample = _mode_name(kwargs["resample"])
        draw.append((self.name, tuple(float(a) for a in level_args), resample))
        return draw


def _mode_name(interpolation) -> str:
    """'bicubic' / 'bilinear' / 'nearest' from a Pillow resampling code or a torchvision InterpolationMode."""
    name = getattr(interpolation, "value", None)
    if isinstance(name, str):  # InterpolationMode
        return name
    names = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear",
             Image.Resampling.NEAREST: "nearest"}
    if interpolation not in names:
        raise UserError(f"--loader gpu resamples with bicubic, bilinear or nearest, got {interpolation!r}")
    return names[interpolation]


def _op_names() -> dict:
    names = {getattr(auto_augment, name): name
             for name in (*augment_ops.POINTWISE, *augment_ops.GEOMETRIC) if hasattr(auto_augment, name)}
    names[posterize_any_pillow] = "posterize"
    return names


class TransformDraws:
    """Draws a sample's augmentation from a timm DeiT training transform, without touching pixels.

    Accepted: the Compose that timm.data.create_transform builds for training with RandAugment / AutoAugment
    (RandomResizedCropAndInterpolation, RandomHorizontalFlip, RandAugment, MaybePILToTensor). Anything else is
    refused with its name (--loader cpu runs every transform)."""

    def __init__(self, transform) -> None:
        self.crop = self.flip = self.augment = None
        names = _op_names()
        for t in getattr(transform, "transforms", [transform]):
            if isinstance(t, RandomResizedCropAndInterpolation):
                self.crop = t
            elif isinstance(t, RandomHorizontalFlip):
                self.flip = t
            elif isinstance(t, (RandAugment, AutoAugment)):
                self.augment = copy.deepcopy(t)
                ops = self.augment.ops if isinstance(t, RandAugment) else [o for sub in t.policy for o in sub]
                for op in ops:
                    if op.aug_fn not in names:
                        raise UserError(f"--loader gpu implements timm's RandAugment ops "
                                        f"{', '.join(sorted(set(names.values())))}; this policy uses {op.name}")
                    op.aug_fn = _Recorder(names[op.aug_fn])
            elif not isinstance(t, (MaybePILToTensor, PILToTensor)):  # (the pixels become a tensor anyway)
                raise UserError(f"--loader gpu runs the DeiT training transform (RandomResizedCrop, flip, "
                                f"RandAugment); this one also has {type(t).__name__}: use --loader cpu")
        if self.crop is None:
            raise UserError("--loader gpu needs a RandomResizedCrop in the training transform; use --loader cpu")
        self.size = tuple(self.crop.size) if isinstance(self.crop.size, Sequence) else (self.crop.size,) * 2
        self.fill = (124, 116, 104)
        if self.augment is not None:
            first = (self.augment.ops if hasattr(self.augment, "ops") else self.augment.policy[0])[0]
            self.fill = tuple(int(c) for c in first.kwargs.get("fillcolor", self.fill))

    def __call__(self, path: str, image) -> SampleDraw:
        """image: the file opened by Pillow; only its header (the size) is read."""
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        flip = bool(torch.rand(1) < self.flip.p) if self.flip is not None else False
        ops = tuple(self.augment([])) if self.augment is not None else ()
        return SampleDraw(path, (top, left, height, width), _mode_name(interpolation), flip, ops, self.fill,
                          self.size)


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG's end-of-image marker is near its end (a truncated file lacks it)."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) >= 0


class EncodedFiles:
    """The training ImageFolder for --loader gpu/dali: samples are (file, label, bad, draw, erasing box).

    file: the JPEG's bytes (1-D uint8) when the device decoder can take it, else the (3, H, W) uint8 pixels Pillow
    decoded here. A file that cannot be read is replaced by the next readable one, as ImageFiles does."""

    def __init__(self, images, erasing: float | None) -> None:
        self.images, self.erasing = images, erasing  # images: vitslim.data.loaders.ImageFiles (paths, classes, transform)
        self.classes, self.samples, self.folder = images.classes, images.samples, images.folder
        self.draws = TransformDraws(images.transform)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int):


        path, label = self.samples[index]
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as header:
                fmt, mode = header.format, header.mode
                if fmt == "JPEG" and mode in ("RGB", "L") and _jpeg_complete(data):
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, "", header
                return _pillow_pixels(header), label, "", header
        except image_errors() as e:
            reason = "not an image Pillow can identify" if isinstance(e, UnidentifiedImageError) else str(e)
            return None, label, f"{path} ({reason})", None

    def __getitem__(self, index: int):

        file, label, bad, header = self._read(index)
        step = 0
        while file is None and step < len(self.samples) - 1:
            step += 1
            file, label, _, header = self._read((index + step) % len(self.samples))
        if file is None:  # not one readable image: label -1, which the loader reports in the main process
            header, label = Image.new("RGB", (32, 32)), -1
            file = torch.zeros(3, 32, 32, dtype=torch.uint8)
        draw = self.draws(self.samples[(index + step) % len(self.samples)][0], header)
        box = draw_erasing(self.erasing, *self.draws.size) if self.erasing is not None else (0, 0, 0, 0)
        return file, label, bad, draw, torch.tensor(box)


def collate_encoded(samples: list) -> tuple[EncodedBatch, torch.Tensor, list[str], torch.Tensor]:
    """DataLoader collate_fn for EncodedFiles: (EncodedBatch, labels, the bad files among them, erasing boxes)."""
    files, labels, bad, draws, boxes = zip(*samples)
    return (EncodedBatch(list(files), list(draws), draws[0].size), torch.tensor(labels), [b for b in bad if b],
            torch.stack(boxes))


def _pillow_pixels(image) -> torch.Tensor:
    """(3, H, W) uint8: a Pillow image decoded to RGB."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _decode_on_host(data: torch.Tensor, path: str) -> torch.Tensor:
    """(3, H, W) uint8 by Pillow: the fallback for a file the device decoder refused."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return _pillow_pixels(image)
    except image_errors() as e:
        raise UserError(f"train image {path} cannot be decoded ({e}); remove or replace it") from None


class TorchvisionJpegDecoder:
    """Batched JPEG decode with torchvision.io.decode_jpeg: nvJPEG on a CUDA device, libjpeg-turbo on the CPU."""

    name = "torchvision"

    def __call__(self, files: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore")
            try:
                return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:  # one file spoils the whole batch: decode them one by one
                decoded = []
                for data, path in zip(files, paths):
                    try:
                        decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        decoded.append(_decode_on_host(data, path).to(device))
                return decoded


class DaliJpegDecoder:
    """Batched JPEG decode with NVIDIA DALI's mixed decoder (nvJPEG plus the GPU's hardware JPEG engines, which
    torchvision does not use). Only the decode is DALI's: the draws, crop, RandAugment and erasing stay ours, so
    both GPU loaders train on the same recipe."""

    name = "dali"

    def __init__(self) -> None:
        try:
            import nvidia.dali  # noqa: F401 (optional: an extra install, only --loader dali needs it)
        except ImportError:
            raise UserError(f"--loader dali needs NVIDIA DALI, which is not installed: {DALI_INSTALL}; or use "
                            f"--loader gpu (torchvision's nvJPEG decode, no extra package)") from None
        self.pipelines: dict[torch.device, tuple[int, object]] = {}  # device: (its batch size, its pipeline)

    def _pipeline(self, device: torch.device, batch: int):
        from nvidia.dali import fn, pipeline_def, types  # optional: --loader dali only

        if self.pipelines.get(device, (0, None))[0] < batch:  # built for the largest batch seen (the first)
            @pipeline_def(batch_size=batch, num_threads=4, device_id=device.index or 0,
                          exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
            def decode():
                jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
                return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
            pipeline = decode()
            pipeline.build()
            self.pipelines[device] = (batch, pipeline)
        return self.pipelines[device][1]

    def __call__(self, files: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray  # optional: --loader dali only

        if device.type != "cuda":
            raise UserError(f"--loader dali decodes on a CUDA device; this run is on {device}")
        pipeline = self._pipeline(device, len(files))
        pipeline.feed_input("jpegs", [f.numpy() for f in files])
        (out,) = pipeline.run()
        decoded = []
        for i in range(len(files)):
            image = torch.empty(tuple(out[i].shape()), dtype=torch.uint8, device=device)  # (H, W, 3)
            feed_ndarray(out[i], image, cuda_stream=torch.cuda.current_stream(device))
            decoded.append(image.permute(2, 0, 1))
        return decoded


class DeviceAugment:
    """The device half of --loader gpu/dali: an EncodedBatch becomes (B, 3, H, W) float32 holding 0..255, decoded,
    cropped and resized, flipped and RandAugment-ed as each sample's draw says."""

    def __init__(self, decoder: Callable) -> None:
        self.decoder = decoder

    def __call__(self, batch: EncodedBatch, device: torch.device) -> torch.Tensor:
        images = self.decode(batch, device)
        out = torch.empty(batch.shape, dtype=torch.float32, device=device)
        for k, (image, draw) in enumerate(zip(images, batch.draws)):
            top, left, height, width = draw.crop
            region = image[:, top:top + height, left:left + width].unsqueeze(0).float()
            if draw.interpolation == "nearest":
                out[k] = F.interpolate(region, size=draw.size, mode="nearest-exact")[0]
            else:  # antialiased: torch's separable kernels are Pillow's (bicubic a = -0.5), up- and downscaling
                out[k] = F.interpolate(region, size=draw.size, mode=draw.interpolation, antialias=True,
                                       align_corners=False)[0]
        out.round_().clamp_(0, 255)
        flips = [k for k, draw in enumerate(batch.draws) if draw.flip]
        if flips:
            index = augment_ops.to_device(flips, torch.int64, device)
            out[index] = out[index].flip(-1)
        return apply_ops(out, batch.draws)

    def decode(self, batch: EncodedBatch, device: torch.device) -> list[torch.Tensor]:
        """Each file as (3, h, w) uint8 on `device`: JPEG bytes through the decoder, Pillow's pixels copied."""
        images: list[torch.Tensor | None] = [None] * len(batch.files)
        jpegs = []
        for k, file in enumerate(batch.files):
            if file.dim() == 1:
                jpegs.append(k)
            else:
                images[k] = file.to(device, non_blocking=True)
        if jpegs:
            decoded = self.decoder([batch.files[k] for k in jpegs], [batch.draws[k].path for k in jpegs], device)
            for k, image in zip(jpegs, decoded):
                images[k] = image
        return images


def apply_ops(x: torch.Tensor, draws: Sequence[SampleDraw]) -> torch.Tensor:
    """Each sample's recorded RandAugment ops, in its order; one batched call per (layer, op, resampling)."""
    height, width = x.shape[-2:]
    for layer in range(max((len(d.ops) for d in draws), default=0)):
        groups: dict[tuple[str, str], list[tuple[int, tuple]]] = {}
        for k, draw in enumerate(draws):
            if layer < len(draw.ops):
                name, args, resample = draw.ops[layer]
                groups.setdefault((name, resample), []).append((k, args))
        for (name, resample), members in groups.items():
            index = augment_ops.to_device([k for k, _ in members], torch.int64, x.device)
            images = x[index]
            if name in augment_ops.GEOMETRIC:
                matrices = torch.tensor([augment_ops.geometric_matrix(name, args[0], width, height)
                                         for _, args in members], dtype=torch.float64)
                images = augment_ops.affine(images, matrices, draws[0].fill, mode=resample)
            elif members[0][1]:
                values = augment_ops.to_device([args[0] for _, args in members], torch.float32, x.device)
                images = augment_ops.POINTWISE[name](images, values)
            else:
                images = augment_ops.POINTWISE[name](images)
            x[index] = images
    return x


def device_augment(loader: str) -> DeviceAugment:
    """The DeviceAugment of --loader gpu or dali."""
    if loader == "gpu":
        return DeviceAugment(TorchvisionJpegDecoder())
    if loader == "dali":
        return DeviceAugment(DaliJpegDecoder())
    raise UserError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")
