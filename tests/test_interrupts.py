"""Runs that survive interrupts: SIGINT and SIGTERM at any point (mid-step, mid-epoch, during the evaluation,
during a checkpoint write) save a consistent state or say that the last checkpoint stands, and --resume then
gives the weights of an uninterrupted run bit for bit, with the full DeiT augmentation (RandAugment, random
erasing, mixup, cutmix, drop path, EMA) on real JPEGs, with 0 and 2 loader workers. The log never repeats or
loses an epoch; temporaries of a killed write are removed; --resume refuses a different recipe in one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vitslim.digits  # noqa: F401 - registers vitslim_digits_vit with timm
from vitslim.cli import search
from vitslim.gates import SparsityWeights
from vitslim.engine.checkpoints import read_checkpoint
from vitslim.engine.trainer import Trainer

from .test_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 2


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of 3 classes: 36 train and 12 val JPEGs of 40x30 random pixels."""
    from PIL import Image
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def flags(photos: Path, out: Path, workers: int, epochs: int = EPOCHS) -> list[str]:
    # Real-data defaults: RandAugment m9, mixup 0.8, cutmix 1.0, smoothing, random erasing, drop path 0.1, EMA.
    return ["--data-path", str(photos), "--model", "vitslim_digits_vit", "--batch-size", "4", "--epochs",
            str(epochs), "--workers", str(workers), "--output-dir", str(out), "--no-progress", "--log-interval", "1"]


@pytest.fixture(scope="module")
def straight(photos, tmp_path_factory) -> dict:
    """The uninterrupted run's final checkpoint and log (workers 0; the augmentation does not depend on them)."""
    out = tmp_path_factory.mktemp("straight")
    from vitslim.cli import common as cli
    with pytest.raises(SystemExit) as exit_info:
        cli.run(search.main, flags(photos, out, 0))
    assert exit_info.value.code == 0
    return {"ckpt": read_checkpoint(out / "checkpoint.pt"), "log": read_log(out)}


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, straight: dict) -> None:
    ckpt = read_checkpoint(out / "checkpoint.pt")
    for part in ("model", "ema"):
        for k, v in straight["ckpt"][part].items():
            assert torch.equal(v, ckpt[part][k]), f"{part}.{k} differs from the uninterrupted run"
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS + 1))
    for a, b in zip(log, straight["log"]):
        assert (a["loss"], a["top1"], a["ema_top1"]) == (b["loss"], b["top1"], b["ema_top1"])


def signal_at_step(monkeypatch, step: int, sig: int = signal.SIGINT) -> None:
    """Send `sig` to this process in the middle of the `step`-th training step (inside its forward)."""
    calls = {"n": 0}
    original = SparsityWeights.penalty

    def penalty(self, model):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
        return original(self, model)
    monkeypatch.setattr(SparsityWeights, "penalty", penalty)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigint_mid_step_saves_that_step_and_resume_is_exact(photos, straight, tmp_path, capsys, monkeypatch,
                                                              workers):
    signal_at_step(monkeypatch, 5)  # epoch 1 has 9 steps
    code, _, err = run_cli(search.main, flags(photos, tmp_path, workers), capsys)
    assert code == 130 and "interrupted (Ctrl-C); state saved" in err and "epoch 1, after step 5 of 9" in err, err
    assert read_checkpoint(tmp_path / "checkpoint.pt")["start_batch"] == 5
    monkeypatch.undo()
    assert run_cli(search.main, flags(photos, tmp_path, workers) + ["--resume"], capsys)[0] == 0
    assert_same_run(tmp_path, straight)


def test_sigterm_mid_epoch_exits_143_and_resume_is_exact(photos, straight, tmp_path, capsys, monkeypatch):
    signal_at_step(monkeypatch, 9 + 3, signal.SIGTERM)  # the 3rd step of epoch 2
    code, _, err = run_cli(search.main, flags(photos, tmp_path, 2), capsys)
    assert code == 143 and "terminated (SIGTERM); state saved" in err and "epoch 2, after step 3" in err, err
    monkeypatch.undo()
    assert run_cli(search.main, flags(photos, tmp_path, 2) + ["--resume"], capsys)[0] == 0
    assert_same_run(tmp_path, straight)


def test_sigint_during_the_evaluation_keeps_the_trained_epoch(photos, straight, tmp_path, capsys, monkeypatch):
    original = Trainer.evaluate_all

    def evaluate_all(self):
        os.kill(os.getpid(), signal.SIGINT)  # arrives as the evaluation of epoch 1 starts
        return original(self)
    monkeypatch.setattr(Trainer, "evaluate_all", evaluate_all)
    code, _, err = run_cli(search.main, flags(photos, tmp_path, 0), capsys)
    assert code == 130 and "epoch 1 trained, its evaluation runs first on --resume" in err, err
    saved = read_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["pending"] is not None and saved["history"] == []
    monkeypatch.undo()
    assert run_cli(search.main, flags(photos, tmp_path, 0) + ["--resume"], capsys)[0] == 0
    assert_same_run(tmp_path, straight)


def test_a_second_ctrl_c_before_the_first_checkpoint_offers_no_resume(photos, tmp_path, capsys, monkeypatch):
    original = SparsityWeights.penalty

    def penalty(self, model):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, model)
    monkeypatch.setattr(SparsityWeights, "penalty", penalty)
    code, _, err = run_cli(search.main, flags(photos, tmp_path, 0), capsys)
    assert code == 130 and err.strip().splitlines()[-1] == (
        "stopped: interrupted twice before the first checkpoint; nothing saved, nothing to resume: start the run "
        "again"), err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_second_ctrl_c_stops_at_once_and_says_the_last_checkpoint_stands(photos, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    original = SparsityWeights.penalty

    def penalty(self, model):
        calls["n"] += 1
        if calls["n"] == 9 + 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, model)
    monkeypatch.setattr(SparsityWeights, "penalty", penalty)
    code, _, err = run_cli(search.main, flags(photos, tmp_path, 0), capsys)
    assert code == 130 and "interrupted twice; nothing saved now" in err and "stands" in err, err
    assert read_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # epoch 1's checkpoint, untouched


def test_a_kill_between_checkpoint_and_log_neither_repeats_nor_loses_an_epoch(photos, straight, tmp_path, capsys):
    assert run_cli(search.main, flags(photos, tmp_path, 0, epochs=1), capsys)[0] == 0
    # What a SIGKILL leaves: the checkpoint of epoch 1 written, its log line not (or a line twice), and the
    # temporaries of writes killed midway.
    (tmp_path / "log.jsonl").write_text("")
    stale = [tmp_path / ".checkpoint.pt.tmp4242", tmp_path / ".dense.safetensors.tmpab12cd.safetensors"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert run_cli(search.main, flags(photos, tmp_path, 0) + ["--resume"], capsys)[0] == 0
    assert not any(path.exists() for path in stale)
    assert_same_run(tmp_path, straight)


@pytest.mark.parametrize("change, named", [
    (["--batch-size", "6"], "--batch-size (saved 4, now 6)"),
    (["--w1", "0.5"], "--w1 (saved 0.0002, now 0.5)"),
    (["--model", "vit_tiny_patch16_224"], "--model (saved 'vitslim_digits_vit', now 'vit_tiny_patch16_224')"),
])
def test_resume_refuses_a_different_recipe_in_one_line(photos, tmp_path, capsys, monkeypatch, change, named):
    signal_at_step(monkeypatch, 3)
    assert run_cli(search.main, flags(photos, tmp_path, 0), capsys)[0] == 130
    monkeypatch.undo()
    argv = flags(photos, tmp_path, 0) + ["--resume"]
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += change
    code, _, err = run_cli(search.main, argv, capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and named in line and "Traceback" not in err, err
    assert read_checkpoint(tmp_path / "checkpoint.pt")["start_batch"] == 3  # nothing was overwritten


def test_sigterm_from_outside_stops_a_cli_run_that_resumes_exactly(photos, tmp_path, capsys):
    """The path a cluster scheduler takes: SIGTERM to the process of `python -m vitslim.search`."""
    epochs = 6
    straight_dir, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(search.main, flags(photos, straight_dir, 2, epochs), capsys)[0] == 0
    proc = subprocess.Popen([sys.executable, "-m", "vitslim.search", *flags(photos, stopped, 2, epochs)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = stopped / "log.jsonl"
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "terminated (SIGTERM); state saved" in err, err[-2000:]
    assert run_cli(search.main, flags(photos, stopped, 2, epochs) + ["--resume"], capsys)[0] == 0
    a, b = read_checkpoint(straight_dir / "checkpoint.pt"), read_checkpoint(stopped / "checkpoint.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["epoch"] for r in read_log(stopped)] == list(range(1, epochs + 1))


def test_retrain_refuses_data_whose_class_folders_were_renamed(photos, tmp_path, capsys):
    import shutil

    from vitslim.cli import retrain
    searched = tmp_path / "search"
    assert run_cli(search.main, flags(photos, searched, 0, epochs=1), capsys)[0] == 0
    assert read_checkpoint(searched / "checkpoint.pt")["classes"] == ["class0", "class1", "class2"]
    renamed = tmp_path / "renamed"
    shutil.copytree(photos, renamed)
    for split in ("train", "val"):
        (renamed / split / "class0").rename(renamed / split / "class9")
    code, _, err = run_cli(retrain.main, ["--searched", str(searched / "checkpoint.pt"), "--data-path", str(renamed),
                                          "--output-dir", str(tmp_path / "retrain"), "--epochs", "1", "--batch-size",
                                          "4", "--workers", "0", "--no-progress"], capsys)
    assert code == 2 and "error: the class folders differ from the search's: label 0 is 'class1' here, " \
        "'class0' in the search" in err, err


def test_a_search_on_image_folders_records_the_data_config_it_trained_with(straight):
    """Real data: the model's size (16 px), the mean / std the run normalised with, the evaluation's bicubic
    resize and 0.875 crop; what load_search (and so every slim model of this search) carries."""
    from vitslim.digits import DIGITS_MEAN
    cfg = straight["ckpt"]["pretrained_cfg"]
    assert tuple(cfg["input_size"]) == (3, 16, 16) and cfg["num_classes"] == 3
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert tuple(cfg["mean"]) == (DIGITS_MEAN,) * 3


def test_resume_is_exact_with_normalisation_and_erasing_on_the_device(photos, tmp_path, capsys, monkeypatch):
    """The GPU's input path (uint8 batches, DeviceInput) forced on the CPU: a SIGTERM mid-epoch and --resume
    give the weights of an uninterrupted run of that path, bit for bit."""
    import vitslim.cli.common
    monkeypatch.setattr(vitslim.cli.common, "input_on_device", lambda device: True)
    straight_out = tmp_path / "straight"
    assert run_cli(search.main, flags(photos, straight_out, 2), capsys)[0] == 0
    reference = {"ckpt": read_checkpoint(straight_out / "checkpoint.pt"), "log": read_log(straight_out)}
    signal_at_step(monkeypatch, 9 + 4, signal.SIGTERM)
    out = tmp_path / "interrupted"
    assert run_cli(search.main, flags(photos, out, 2), capsys)[0] == 143
    monkeypatch.undo()
    monkeypatch.setattr(vitslim.cli.common, "input_on_device", lambda device: True)
    assert run_cli(search.main, flags(photos, out, 2) + ["--resume"], capsys)[0] == 0
    assert_same_run(out, reference)
