"""Images that cannot be decoded (a truncated JPEG, a text file named .jpg, an empty file): a training image is
replaced by the next readable one, the same every epoch and on resume; a validation image is left out of the
accuracy; each file is named once in a warning; --bad-images stop ends the run with one line naming it. Never a
worker traceback."""
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import vitslim.digits  # noqa: F401 - registers vitslim_digits_vit with timm
from vitslim.cli import search
from vitslim.data.images import Augment
from vitslim.data.loaders import ImageFiles, image_folders, loaders
from vitslim.distributed import Distributed
from vitslim.engine.trainer import evaluate
from vitslim.errors import UserError

from .test_cli import run_cli

BAD = {"truncated.jpg", "text.jpg", "empty.jpg"}


def _spoil(folder: Path, good: Path) -> None:
    """Three undecodable files in `folder`, next to copies of a good JPEG `good`."""
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Readable JPEGs of 40x30 random pixels, 8 + 9 for training and 3 + 3 for validation in 2 classes; train/class0
    and val/class1 hold the three bad files too (20 training files: batches of 4 see every one)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("bad_photos")
    g = torch.Generator().manual_seed(0)
    for split, counts in (("train", (8, 9)), ("val", (3, 3))):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    _spoil(root / "train" / "class0", root / "train" / "class0" / "0.jpg")
    _spoil(root / "val" / "class1", root / "val" / "class1" / "0.jpg")
    return root


def _data(root: Path, no_aug: bool = True):
    return image_folders(str(root), 16, (0.5,) * 3, (0.5,) * 3, Augment(), no_aug=no_aug)


def _cpu() -> Distributed:
    return Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_a_bad_training_image_is_replaced_by_the_next_readable_one(photos):
    data = _data(photos)
    train: ImageFiles = data.train
    names = [Path(p).name for p, _ in train.samples]
    for i, (path, _) in enumerate(train.samples):
        image, got_label, bad = train[i]
        if Path(path).name in BAD and Path(path).parent.name == "class0":
            assert bad.startswith(path + " (") and bad.endswith(")"), bad
            follower = next(j for j in range(i + 1, len(names)) if names[j] not in BAD)  # ImageFolder's order
            assert torch.equal(image, train[follower][0]) and got_label == train[follower][1]
        else:
            assert bad == "" and image.shape == (3, 16, 16)


def test_a_bad_validation_image_is_left_out_of_the_accuracy(photos):
    data = _data(photos)
    labels = [data.val[i][1] for i in range(len(data.val))]
    assert labels.count(-1) == 3 and labels.count(0) == 3 and labels.count(1) == 3

    class AlwaysZero(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)

    warnings: list[str] = []
    _, val, _ = loaders(data, 2, _cpu(), 0, 0, say=warnings.append)
    assert evaluate(AlwaysZero(), val, _cpu())["top1"] == 50.0  # 3 of the 6 readable images, not 3 of 9
    assert len(warnings) == 3 and all("validation image" in w and "left out of the accuracy" in w for w in warnings)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_file_is_named_once_and_batches_keep_their_size(photos, workers):
    data = _data(photos, no_aug=False)  # the full DeiT augmentation
    warnings: list[str] = []
    train, _, sampler = loaders(data, 4, _cpu(), 0, workers, say=warnings.append)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([(images, labels) for images, labels in train])
        assert all(images.shape == (4, 3, 16, 16) and (labels >= 0).all() for images, labels in epochs[-1])
    assert len(epochs[0]) == len(data.train) // 4
    named = sorted(Path(w.split("train image ")[1].split(" (")[0]).name for w in warnings)
    assert named == sorted(BAD), warnings  # once each over two epochs, whichever worker met it
    assert "3 skipped so far in train" in warnings[-1] and "--bad-images stop" in warnings[-1]
    sampler.set_epoch(1)  # the same samples again: replacements are deterministic
    again = [(images, labels) for images, labels in train]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, epochs[1]))


def test_bad_images_stop_raises_one_line_naming_the_file(photos):
    train, _, sampler = loaders(_data(photos), 4, _cpu(), 0, 2, bad_images="stop")
    with pytest.raises(UserError, match=r"^train image .*class0/(truncated|text|empty)\.jpg \(.*\) cannot be read; "
                                        r"remove or replace it, or pass --bad-images skip$"):
        for _ in train:
            pass


def test_a_train_folder_with_no_readable_image_is_one_line(tmp_path, photos):
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        _spoil(tmp_path / split / "a", photos / "train" / "class0" / "0.jpg")
    train, _, _ = loaders(_data(tmp_path), 1, _cpu(), 0, 0, say=lambda _: None)
    with pytest.raises(UserError, match="no train image can be read"):
        next(iter(train))


def _search(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-path", str(photos), "--model", "vitslim_digits_vit", "--batch-size", "4", "--epochs", "1",
            "--workers", "2", "--output-dir", str(out), "--no-progress", *extra]


def test_search_on_bad_images_warns_and_finishes(photos, tmp_path, capsys):
    code, _, err = run_cli(search.main, _search(photos, tmp_path), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 6, err  # 3 train + 3 validation, once each
    assert "Traceback" not in err


def test_search_with_bad_images_stop_exits_2_with_one_line(photos, tmp_path, capsys):
    code, _, err = run_cli(search.main, _search(photos, tmp_path, "--bad-images", "stop"), capsys)
    last = err.strip().splitlines()[-1]
    # The dense model's evaluation comes first: it meets a bad validation image.
    assert code == 2 and last.startswith("error: validation image ") and "cannot be read" in last, err
    assert "Traceback" not in err


def test_a_clean_folder_warns_nothing(photos, tmp_path, capsys):
    clean = tmp_path / "clean"
    shutil.copytree(photos, clean, ignore=lambda _, names: [n for n in names if n in BAD])
    warnings: list[str] = []
    train, val, _ = loaders(_data(clean), 4, _cpu(), 0, 0, say=warnings.append)
    assert sum(1 for _ in train) == 4 and sum(1 for _ in val) == 2 and warnings == []
