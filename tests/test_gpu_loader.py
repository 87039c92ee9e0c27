"""--loader gpu / dali (vitslim.data.device, vitslim.data.augment): the device half run on the CPU against Pillow and
against the CPU pipeline. Every RandAugment op against timm's Pillow op; each sample's draws against what the CPU
pipeline draws for it; whole batches against the CPU pipeline's; exact resume; bad files; the CLI."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import vitslim.digits  # noqa: F401 - registers vitslim_digits_vit with timm
from vitslim.cli import search
from vitslim.data import augment as augment_ops
from vitslim.data.device import EncodedFiles, TransformDraws, device_augment
from vitslim.data.images import Augment
from vitslim.data.loaders import image_folders, loaders
from vitslim.distributed import Distributed
from vitslim.errors import UserError

from .test_bad_images import BAD, _search, photos  # noqa: F401 - photos is a fixture
from .test_cli import run_cli

FILL = (124, 116, 104)  # timm's RandAugment fill for ImageNet's mean
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(seed: int, size=(224, 224)) -> Image.Image:
    """Smooth colour fields with noise: what a photo's histogram and edges look like to these ops."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (15, 15, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.BICUBIC).filter(ImageFilter.SMOOTH)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()[None]


def _timm_op(name: str):
    from timm.data import auto_augment

    from vitslim.data.images import posterize_any_pillow
    return posterize_any_pillow if name == "posterize" else getattr(auto_augment, name)


POINTWISE_CASES = [("auto_contrast", None), ("equalize", None), ("invert", None), ("posterize", 0),
                   ("posterize", 2), ("posterize", 4), ("posterize", 8), ("solarize", 0), ("solarize", 100),
                   ("solarize", 256), ("solarize_add", 50), ("color", 0.1), ("color", 1.9), ("contrast", 0.2),
                   ("contrast", 1.8), ("brightness", 0.4), ("brightness", 1.6), ("sharpness", 0.2),
                   ("sharpness", 1.9)]


@pytest.mark.parametrize("name,value", POINTWISE_CASES)
def test_pointwise_ops_equal_pillows_exactly(name, value):
    for seed in range(3):
        image = _photo(seed, (57, 41))
        expected = _timm_op(name)(image) if value is None else _timm_op(name)(image, value)
        args = () if value is None else (torch.tensor([float(value)]),)
        got = augment_ops.POINTWISE[name](_tensor(image), *args)
        assert torch.equal(got, _tensor(expected)), (name, value, (got - _tensor(expected)).abs().max())


def test_equalize_and_auto_contrast_leave_a_flat_image_alone():
    flat = Image.new("RGB", (9, 7), (37, 200, 3))
    for name in ("equalize", "auto_contrast"):
        assert torch.equal(augment_ops.POINTWISE[name](_tensor(flat)), _tensor(_timm_op(name)(flat)))


@pytest.mark.parametrize("name,value", [("rotate", 25.0), ("rotate", -13.0), ("shear_x", 0.25), ("shear_y", -0.2),
                                        ("translate_x_rel", 0.4), ("translate_y_rel", -0.33)])
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_geometric_ops_match_pillow(name, value, mode):
    """Same geometry and the same fill boundary as Pillow (0 <= u < W); the resampling kernels differ a little:
    bilinear by rounding (at most 1 level), bicubic by its coefficient (torch's grid_sample a = -0.75, Pillow's
    -0.5: at most a few levels, under a level on average); nearest picks Pillow's pixel."""
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    image = _photo(7)
    expected = _tensor(_timm_op(name)(image, value, fillcolor=FILL, resample=resample))
    matrix = torch.tensor([augment_ops.geometric_matrix(name, value, 224, 224)], dtype=torch.float64)
    diff = (augment_ops.affine(_tensor(image), matrix, FILL, mode=mode) - expected).abs()
    if mode == "nearest" and name != "rotate":
        assert diff.max() == 0
    elif mode == "nearest":  # Pillow rotates in its own fixed-point arithmetic: pixels exactly on a boundary
        assert (diff > 0).float().mean() < 2e-3
    else:
        assert diff.max() <= (1 if mode == "bilinear" else 6) and diff.mean() < 1.0, (diff.max(), diff.mean())


def test_one_batched_call_applies_each_images_own_parameter():
    images = [_photo(s, (33, 20)) for s in range(4)]
    factors = [0.1, 0.7, 1.3, 1.9]
    got = augment_ops.color(torch.cat([_tensor(i) for i in images]), torch.tensor(factors))
    for k, (image, factor) in enumerate(zip(images, factors)):
        assert torch.equal(got[k:k + 1], _tensor(_timm_op("color")(image, factor)))


# --- the draws and the whole pipeline, against the CPU pipeline -------------------------------------------------

@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """16 training JPEGs of ImageNet's usual sizes, a PNG among them, in 2 classes; 2 validation JPEGs."""
    root = tmp_path_factory.mktemp("gpu_loader_jpegs")
    sizes = ((500, 375), (375, 500), (333, 500), (400, 300))
    for split, count in (("train", 16), ("val", 2)):
        for i in range(count):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            image = _photo(100 + i, sizes[i % len(sizes)])
            if split == "train" and i == 5:
                image.save(folder / f"{i:03d}.png")  # not a JPEG: decoded by Pillow in the worker
            else:
                image.save(folder / f"{i:03d}.jpg", quality=90)
    return root


def _cpu() -> Distributed:
    return Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _epoch(data, workers: int, epoch: int = 0, start_batch: int = 0, batch: int = 4, say=None):
    train, _, sampler = loaders(data, batch, _cpu(), 3, workers, say=say or (lambda _: None))
    sampler.set_epoch(epoch, start_batch)
    return [(images, labels) for images, labels in train]


def test_each_sample_draws_what_the_cpu_pipeline_draws(jpegs, monkeypatch):
    """The recorded crop and RandAugment ops of every sample equal the ones timm's transform applies to it on the
    CPU path, for the same (seed, epoch, index): same ops, same order, same level arguments."""
    from vitslim.data.loaders import SeededSamples

    cpu = image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True)
    gpu = image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True, loader="gpu")
    applied: list = []
    stages = cpu.train.transform.transforms
    crop_params = stages[0].get_params

    def spy_crop(image, scale, ratio):
        params = crop_params(image, scale, ratio)
        applied.append(("crop", tuple(params)))
        return params

    monkeypatch.setattr(stages[0], "get_params", spy_crop)
    for op in stages[2].ops:
        def spy(image, *args, _fn=op.aug_fn, **kwargs):
            applied.append((_fn.__name__.replace("posterize_any_pillow", "posterize"), tuple(map(float, args))))
            return _fn(image, *args, **kwargs)
        monkeypatch.setattr(op, "aug_fn", spy)
    cpu_samples, gpu_samples = SeededSamples(cpu.train, 3), SeededSamples(gpu.train, 3)
    ops_seen = set()
    for epoch in range(3):
        for index in range(len(cpu.train)):
            applied.clear()
            cpu_samples[(epoch, index)]
            draw = gpu_samples[(epoch, index)][3]
            assert applied == [("crop", draw.crop), *((name, args) for name, args, _ in draw.ops)]
            ops_seen.update(name for name, _, _ in draw.ops)
    assert len(ops_seen) >= 8  # the test met most of the policy's ops


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_pipeline_on_the_cpu_matches_the_cpu_pipeline(jpegs, workers):
    """Same decode (libjpeg-turbo both), the same draws, Pillow-exact point ops: what is left is the resize's and
    the geometric ops' rounding. Wrong draws would differ by tens of levels."""
    cpu = _epoch(image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True), workers)
    gpu = _epoch(image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True, loader="gpu"), workers)
    assert len(cpu) == len(gpu) == 4
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for (a, la), (b, lb) in zip(cpu, gpu):
        assert b.shape == (4, 3, 224, 224) and b.dtype == torch.float32 and torch.equal(la, lb)
        levels = ((a - b).abs() * std * 255).flatten(1).mean(1)  # per image, in 0..255 pixel levels
        assert levels.max() < 1.5, levels


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_gets_the_same_batches(jpegs, workers):
    data = image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True, loader="gpu")
    full = _epoch(data, workers, epoch=1)
    resumed = _epoch(data, workers, epoch=1, start_batch=2)
    assert len(resumed) == 2
    for (a, la), (b, lb) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_two_ranks_shard_the_same_global_batches(jpegs):
    """Under DDP each rank decodes its half of every global batch: the two ranks' samples, interleaved as
    EpochSampler deals them, are the one process's (no erasing: its N(0, 1) fill is drawn per rank's batch)."""
    data = image_folders(str(jpegs), 224, MEAN, STD, Augment(reprob=0.0), on_device=True, loader="gpu")
    one = _epoch(data, 0, batch=4)
    ranks = []
    for rank in range(2):
        dist = Distributed(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        train, _, sampler = loaders(data, 2, dist, 3, 0, say=lambda _: None)
        sampler.set_epoch(0)
        ranks.append([images for images, _ in train])
    for k, (images, _) in enumerate(one):
        assert torch.equal(images[0::2], ranks[0][k]) and torch.equal(images[1::2], ranks[1][k])


def test_files_the_device_decoder_cannot_take_are_decoded_by_pillow(jpegs):
    data = image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True, loader="gpu")
    files = {Path(path).suffix: data.train[i][0] for i, (path, _) in enumerate(data.train.samples)}
    assert files[".jpg"].dim() == 1 and files[".jpg"].dtype == torch.uint8  # the JPEG's bytes
    assert files[".png"].shape == (3, 500, 375)  # pixels (the 375 x 500 PNG)


def test_bad_files_are_replaced_and_named_once(photos):  # noqa: F811 - the fixture
    """The same replacement as the CPU path (the next readable file in ImageFolder's order), each bad file named
    once over two epochs, batches of full size."""
    data = image_folders(str(photos), 16, (0.5,) * 3, (0.5,) * 3, Augment(), on_device=True, loader="gpu")
    names = [Path(p).name for p, _ in data.train.samples]
    for i, (path, _) in enumerate(data.train.samples):
        file, label, bad, draw, _ = data.train[i]
        follower = next(j for j in range(i, len(names)) if names[j] not in BAD)
        assert draw.path == data.train.samples[follower][0] and label == data.train.samples[follower][1]
        assert torch.equal(file, torch.frombuffer(bytearray(Path(draw.path).read_bytes()), dtype=torch.uint8))
        assert bad.startswith(path + " (") if names[i] in BAD else bad == ""
    warnings: list[str] = []
    train, _, sampler = loaders(data, 4, _cpu(), 0, 2, say=warnings.append)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert all(images.shape == (4, 3, 16, 16) for images, _ in train)
    named = sorted(Path(w.split("train image ")[1].split(" (")[0]).name for w in warnings)
    assert named == sorted(BAD), warnings


def test_a_train_folder_with_no_readable_image_is_one_line(tmp_path, photos):  # noqa: F811
    from .test_bad_images import _spoil
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        _spoil(tmp_path / split / "a", photos / "train" / "class0" / "0.jpg")
    data = image_folders(str(tmp_path), 16, (0.5,) * 3, (0.5,) * 3, Augment(), on_device=True, loader="gpu")
    for workers in (0, 2):  # raised in the main process, not wrapped in a worker's traceback
        train, _, _ = loaders(data, 1, _cpu(), 0, workers, say=lambda _: None)
        with pytest.raises(UserError, match=r"^no train image can be read \(the first: .*\.jpg \(.*\)\)$"):
            next(iter(train))


def test_a_truncated_jpeg_goes_to_pillow(tmp_path, jpegs):
    """A JPEG without its end marker is not handed to the device decoder (which would fail the whole batch)."""
    source = next((jpegs / "train" / "class0").glob("*.jpg")).read_bytes()
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "good.jpg").write_bytes(source)
    (tmp_path / "train" / "a" / "cut.jpg").write_bytes(source[: len(source) * 2 // 3])
    data = image_folders(str(tmp_path), 224, MEAN, STD, Augment(), on_device=True, loader="gpu")
    index = [Path(p).name for p, _ in data.train.samples].index("cut.jpg")
    file, _, bad, _, _ = data.train[index]
    assert "cut.jpg" in bad and file.dim() == 1  # replaced by the next readable file, good.jpg, as bytes


def test_transforms_beyond_the_deit_recipe_are_refused_by_name():
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms
    jittered = transforms.Compose([RandomResizedCropAndInterpolation(224), transforms.ColorJitter(0.4),
                                   MaybePILToTensor()])
    with pytest.raises(UserError, match=r"--loader gpu runs the DeiT training transform .* also has "
                                        r"ColorJitter: use --loader cpu"):
        TransformDraws(jittered)
    with pytest.raises(UserError, match="needs a RandomResizedCrop"):
        TransformDraws(transforms.Compose([MaybePILToTensor()]))


def test_encoded_files_wraps_the_training_folder(jpegs):
    data = image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True, loader="gpu")
    assert isinstance(data.train, EncodedFiles) and len(data.train) == 16
    assert data.train.classes == ["class0", "class1"] and data.classes == ("class0", "class1")


def test_dali_without_dali_is_one_line():
    pytest.importorskip("torch")  # (always there)
    try:
        import nvidia.dali  # noqa: F401
        pytest.skip("NVIDIA DALI is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"^--loader dali needs NVIDIA DALI, which is not installed: pip install "):
        device_augment("dali")


def test_search_with_loader_dali_on_the_cpu_exits_2(photos, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(search.main, _search(photos, tmp_path, "--loader", "dali"), capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: --loader dali decodes on a CUDA device; this run is on cpu: use --loader cpu"), err


def test_search_with_loader_gpu_runs_and_says_where(photos, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(search.main, _search(photos, tmp_path, "--loader", "gpu"), capsys)
    assert code == 0, err
    assert "warning: --loader gpu on cpu: the main process decodes and augments" in err
    assert "Traceback" not in err and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_pipeline_matches_the_cpu_pipeline(jpegs):
    """On the GPU: nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a level or two, on top of the
    resampling differences the CPU test bounds."""
    cuda = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    batches = {}
    for loader in ("cpu", "gpu"):
        data = image_folders(str(jpegs), 224, MEAN, STD, Augment(), on_device=True, loader=loader)
        train, _, sampler = loaders(data, 4, cuda, 3, 2, say=lambda _: None)
        sampler.set_epoch(0)
        batches[loader] = [images for images, _ in train]
    std = torch.tensor(STD, device="cuda").view(1, 3, 1, 1)
    for a, b in zip(batches["cpu"], batches["gpu"]):
        assert b.device.type == "cuda"
        assert ((a - b).abs() * std * 255).flatten(1).mean(1).max() < 3.0


def test_resume_may_switch_loaders(photos, tmp_path, capsys):  # noqa: F811
    """--loader is not a recipe flag: the draws are the same, so a run started with one loader resumes with another."""
    code, _, err = run_cli(search.main, _search(photos, tmp_path), capsys)
    assert code == 0, err
    argv = _search(photos, tmp_path, "--loader", "gpu", "--resume")
    argv[argv.index("--epochs") + 1] = "2"  # a constant-lr search may be extended
    code, _, err = run_cli(search.main, argv, capsys)
    assert code == 0, err
    log = [line for line in (tmp_path / "log.jsonl").read_text().splitlines() if line.strip()]
    assert len(log) == 2 and "Traceback" not in err
