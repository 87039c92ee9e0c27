"""Transfer as timm users expect (the paper's Table 9), through the commands: a searched model retrained on a new
dataset with a new classifier (--new-head), a saved slim model fine-tuned (--slim, with resume and its report),
and --img-size for search and retrain where the plan allows it."""
import json
import os
import signal

import pytest
import timm
import torch

import vitslim
from vitslim.cli import retrain, search
from vitslim.engine.checkpoints import read_checkpoint
from vitslim.engine.trainer import Trainer

from .test_cli import FAST, run_cli, searched  # noqa: F401 - the module's short search on the embedded data
from .test_interrupts import photos  # noqa: F401 - 3 classes of 40x30 JPEGs


def test_retrain_on_a_new_dataset_needs_and_takes_a_new_head(searched, photos, tmp_path, capsys):  # noqa: F811
    argv = ["--searched", str(searched), "--data-path", str(photos), "--epochs", "1", "--batch-size", "4",
            "--budget-tokens", "1.0", *FAST]
    code, _, err = run_cli(retrain.main, argv + ["--output-dir", str(tmp_path / "refused")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: the data has 3 classes, the model 10: for another dataset add --new-head (a new classifier, "
        "initialised afresh)")
    out = tmp_path / "new_head"
    code, stdout, err = run_cli(retrain.main, argv + ["--output-dir", str(out), "--new-head"], capsys)
    assert code == 0, err
    assert f"new head: the classifier is initialised afresh for the 3 classes of {photos}" in err
    loaded = vitslim.load_slim(out / "slim")
    assert loaded.num_classes == 3 and loaded.head.out_features == 3
    data_cfg = timm.data.resolve_data_config(model=loaded)  # the new data's evaluation transform
    assert data_cfg["input_size"] == (3, 16, 16) and data_cfg["interpolation"] == "bicubic"
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["top1"] is None and report["ratios"]["top1_change"] is None  # another head: not measured
    assert report["slim"]["top1"] is not None and report["new_head"] is True
    assert "not measured on this data" in stdout


def test_a_saved_slim_model_is_fine_tuned_resumed_and_reported(searched, photos, tmp_path, capsys,  # noqa: F811
                                                                monkeypatch):
    first = tmp_path / "retrain"
    assert run_cli(retrain.main, ["--searched", str(searched), "--output-dir", str(first), "--epochs", "1",
                                  *FAST], capsys)[0] == 0
    argv = ["--slim", str(first / "slim"), "--data-path", str(photos), "--new-head", "--batch-size", "4",
            "--epochs", "2", "--log-interval", "1", *FAST]
    out = tmp_path / "finetune"
    steps = {"n": 0}
    original = Trainer.check_finite

    def sigterm_in_step_12(self, loss, epoch, step):  # 9 steps an epoch: in the second epoch
        steps["n"] += 1
        if steps["n"] == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, loss, epoch, step)
    monkeypatch.setattr(Trainer, "check_finite", sigterm_in_step_12)
    code, stdout, err = run_cli(retrain.main, argv + ["--output-dir", str(out)], capsys)
    assert code == 143, err
    assert "fine-tuning the slim model" in err and "lr 3.90625e-07" in err  # 5e-5 x 4 / 512: the fine-tune recipe
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["start_batch"]) == (1, 3) and ckpt["finetuned_from"] == str((first / "slim").resolve())
    monkeypatch.undo()
    code, _, err = run_cli(retrain.main, argv + ["--output-dir", str(out), "--resume"], capsys)
    assert code == 0 and read_checkpoint(out / "checkpoint.pt")["epoch"] == 2, err
    report = json.loads((out / "report.json").read_text())
    assert report["dense"] is None and report["ratios"] is None and report["slim"]["top1"] is not None
    tuned = vitslim.load_slim(out / "slim")
    assert tuned.slim_plan == vitslim.load_slim(first / "slim").slim_plan and tuned.num_classes == 3
    code, _, err = run_cli(retrain.main, argv + ["--output-dir", str(tmp_path / "x"), "--budget-attn", "0.5"],
                           capsys)
    assert code == 2 and "--slim fine-tunes a slim model as it is (its plan is fixed): --budget-*" in err


def test_img_size_for_search_and_for_a_retrain_whose_plan_keeps_every_token(searched, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "search24"
    code, _, err = run_cli(search.main, ["--output-dir", str(out), "--epochs", "1", "--dense-epochs", "0",
                                         "--batch-size", "900", "--img-size", "24", *FAST], capsys)
    assert code == 0, err
    assert tuple(read_checkpoint(out / "checkpoint.pt")["arch"]["img_size"]) == (24, 24)
    # The module's search dropped tokens (--drop-tokens-below): its plans are tied to the 16x16 grid.
    code, _, err = run_cli(retrain.main, ["--searched", str(searched), "--epochs", "1", "--img-size", "24",
                                          "--output-dir", str(tmp_path / "dropped"), *FAST], capsys)
    assert code == 2 and "error: --img-size 24: the plan is for 16x16 images and it drops tokens" in err
    code, _, err = run_cli(retrain.main, ["--searched", str(out), "--epochs", "1", "--img-size", "32",
                                          "--budget-tokens", "1.0", "--output-dir", str(tmp_path / "r32"), *FAST],
                           capsys)
    assert code == 0, err
    loaded = vitslim.load_slim(tmp_path / "r32" / "slim")
    assert loaded.slim_arch.img_size == (32, 32) and loaded.slim_plan.num_patches == 64
    assert timm.data.resolve_data_config(model=loaded)["input_size"] == (3, 32, 32)
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("flag", ["--img-size", "--new-head"])
def test_the_new_flags_are_in_the_help(flag, capsys):
    with pytest.raises(SystemExit):
        retrain.build_parser().parse_args(["--help"])
    assert flag in capsys.readouterr().out
