"""The two commands: outputs, exact resume, Ctrl-C, NaN stop, one-line errors with exit status 2."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import vitslim
from vitslim import pretrained
from vitslim.cli import common as cli, retrain, search
from vitslim.gates import SparsityWeights
import vitslim.digits  # noqa: F401 - registers vitslim_digits_vit with timm
from vitslim.engine.checkpoints import read_checkpoint

FAST = ["--workers", "0", "--no-progress"]


def run_cli(main, argv, capsys):
    """Run a command in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A short search on the embedded data: 2 dense epochs, 2 search epochs."""
    out = tmp_path_factory.mktemp("search")
    with pytest.raises(SystemExit) as e:
        cli.run(search.main, ["--output-dir", str(out), "--epochs", "2", "--dense-epochs", "2",
                              "--budgets", "0.7", "0.5,0.6,0.9", "--drop-tokens-below", "0.995", *FAST])
    assert e.value.code == 0
    return out


def test_threads_default_to_one_on_the_embedded_data_and_follow_the_flag(tmp_path, capsys):
    """A tiny model at a small batch only loses to more intra-op threads (the demo: 37 minutes at torch's default
    on a shared 2-core machine, 2.4 with one thread); --threads sets them; the caller's come back after."""
    before = torch.get_num_threads()
    for extra, threads in (([], 1), (["--threads", "2"], 2)):
        code, _, err = run_cli(search.main, ["--output-dir", str(tmp_path / f"t{threads}"), "--epochs", "1",
                                             "--dense-epochs", "0", "--batch-size", "900", *extra, *FAST], capsys)
        assert code == 0, err
        assert f"x batch 900 on cpu ({threads} thread{'s' if threads > 1 else ''})" in err, err
        assert torch.get_num_threads() == before


def test_fused_on_a_cpu_is_said_once_and_an_early_error_leaves_no_empty_folders(tmp_path, capsys):
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # (a command's warning is a raw line with its source)
        warnings.simplefilter("always")
        code, _, err = run_cli(search.main, ["--output-dir", str(tmp_path / "run"), "--epochs", "1",
                                             "--dense-epochs", "0", "--batch-size", "900", "--fused", *FAST], capsys)
    assert code == 0 and err.count("--fused") == 1, err
    assert not [w for w in caught if "fused" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "run" / "figures").is_dir()
    code, _, err = run_cli(search.main, ["--output-dir", str(tmp_path / "early"), "--data-path",
                                         str(tmp_path / "missing"), "--model", "vitslim_digits_vit", *FAST], capsys)
    assert code == 2 and not (tmp_path / "early" / "figures").exists()


def test_search_writes_checkpoint_log_figures_and_plans(searched):
    names = {p.name for p in searched.iterdir()}
    assert {"checkpoint.pt", "log.jsonl", "dense.safetensors", "plan_0.7_0.7_0.7.json", "plan_0.5_0.6_0.9.json",
            "figures", "dense"} <= names
    lines = [json.loads(line) for line in (searched / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert {"loss", "task", "penalty", "attn_l1", "mlp_l1", "tok_l1", "top1", "top5", "img_per_s",
                "kept"} <= set(r)
        assert r["loss"] == pytest.approx(r["task"] + r["penalty"], rel=1e-5)
    figures = {p.name for p in (searched / "figures").iterdir()}
    assert {"gates_epoch002.png", "structure_epoch002.png"} <= figures
    ckpt = read_checkpoint(searched / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["name"] == "search" and ckpt["search"] == "dims"
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "rng", "dense_eval", "arch"} <= set(ckpt)
    # The plan written equals thresholding the saved search model.
    model, _, _ = retrain.load_search(searched / "checkpoint.pt")
    plan = vitslim.SlimPlan.from_json((searched / "plan_0.5_0.6_0.9.json").read_text())
    assert plan == vitslim.threshold(model, 0.5, 0.6, 0.9)
    # --drop-tokens-below 0.995 (tanh(3.0) = 0.99505 at init) dropped tokens; the plan keeps none of them.
    assert sum(r["dropped_token_slots"] for r in lines) > 0
    alive = vitslim.token_drop.alive_tokens(model)
    assert sum(map(len, alive)) < len(alive) * 16
    for block, kept in zip(plan.blocks, alive):
        assert set(block.tokens) <= set(kept)


def test_retrain_writes_slim_model_and_report(searched, tmp_path, capsys):
    out = tmp_path / "retrain"
    code, stdout, _ = run_cli(retrain.main, ["--searched", str(searched / "checkpoint.pt"), "--output-dir",
                                              str(out), "--epochs", "1", "--fold-gates", "--teacher", "dense",
                                              *FAST], capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    timing = {"img_per_s", "img_per_s_min", "img_per_s_max", "repeats"}
    assert set(report["dense"]) == {"params", "flops", "top1", "top5"} | timing
    assert set(report["slim"]) == set(report["dense"]) | {"speedup_vs_dense", "speedup_vs_dense_range"}
    for row in (report["dense"], report["slim"]):
        assert row["img_per_s_min"] <= row["img_per_s"] <= row["img_per_s_max"] and row["repeats"] == 7
    lo, hi = report["ratios"]["speedup_range"]
    assert lo <= report["ratios"]["speedup"] <= hi
    # One consistent figure: the speedup printed is the ratio of the img/s printed beside it.
    assert report["ratios"]["speedup"] == pytest.approx(report["slim"]["img_per_s"] / report["dense"]["img_per_s"])
    assert f"{report['ratios']['speedup']:.2f}x (slim img/s / dense img/s; per-turn ratios" in stdout
    plan = vitslim.SlimPlan.from_json((out / "plan.json").read_text())
    tokens = report["kept_tokens"]
    assert tokens["per_block"] == [len(b.tokens) / plan.num_patches for b in plan.blocks]
    assert tokens["overall"] == pytest.approx(sum(tokens["per_block"]) / plan.depth)
    assert "kept tokens per block: " in stdout
    assert report["budgets"] == {"attn": 0.7, "mlp": 0.7, "tokens": 0.7}
    assert report["slim"]["flops"] < 0.7 * report["dense"]["flops"]
    assert "dense" in stdout and "slim" in stdout  # the printed table
    loaded = vitslim.load_slim(out / "slim")
    assert vitslim.count_flops(loaded) == report["slim"]["flops"]
    assert loaded.slim_plan == vitslim.SlimPlan.from_json((out / "plan.json").read_text())
    # The preprocessing the model was trained with (16 px digits, their mean / std), not timm's 224 px ImageNet.
    from vitslim.digits import DIGITS_MEAN, DIGITS_STD
    data_cfg = timm.data.resolve_data_config(model=loaded)
    assert data_cfg["input_size"] == (3, 16, 16) and data_cfg["crop_pct"] == 1.0
    assert data_cfg["mean"] == (DIGITS_MEAN,) * 3 and data_cfg["std"] == (DIGITS_STD,) * 3
    for checkpoint in (searched / "checkpoint.pt", out / "checkpoint.pt"):
        assert tuple(read_checkpoint(checkpoint)["pretrained_cfg"]["input_size"]) == (3, 16, 16), checkpoint
    from safetensors import safe_open
    with safe_open(str(searched / "dense.safetensors"), "pt") as dense:
        assert json.loads(dense.metadata()["pretrained_cfg"])["input_size"] == [3, 16, 16]


def _state(path):
    return read_checkpoint(path)["model"]


def test_resume_continues_exactly(tmp_path, capsys):
    common = ["--epochs", "2", "--dense-epochs", "1", *FAST]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(search.main, ["--output-dir", str(straight), *common], capsys)[0] == 0
    assert run_cli(search.main, ["--output-dir", str(resumed), "--epochs", "1", "--dense-epochs", "1", *FAST],
                   capsys)[0] == 0
    assert run_cli(search.main, ["--output-dir", str(resumed), "--resume", *common], capsys)[0] == 0
    a, b = _state(straight / "checkpoint.pt"), _state(resumed / "checkpoint.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert log_a[1]["loss"] == log_b[1]["loss"]
    # A run already past --epochs is not "resumed" into rewriting its plans from later weights.
    plans_before = {p.name: p.read_text() for p in resumed.glob("plan_*.json")}
    code, _, err = run_cli(search.main, ["--output-dir", str(resumed), "--resume", "--epochs", "1",
                                         "--dense-epochs", "1", *FAST], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: --resume: the run in {resumed / 'checkpoint.pt'} has trained 2 epochs already, past --epochs 1; "
        f"give --epochs 2 or more to continue it (or another --output-dir)")
    assert {p.name: p.read_text() for p in resumed.glob("plan_*.json")} == plans_before


def test_resume_of_an_empty_folder_says_there_was_nothing_to_resume(tmp_path, capsys):
    # (a missing --data-path stops the run right after the note: the note is what is tested)
    code, _, err = run_cli(search.main, ["--output-dir", str(tmp_path / "new"), "--resume", "--data-path",
                                         str(tmp_path / "missing"), "--model", "vitslim_digits_vit", *FAST], capsys)
    assert code == 2 and f"note: --resume: {tmp_path / 'new'} holds no search run to resume; starting a new one" \
        in err


def test_ctrl_c_saves_and_resume_finishes_the_same_run(tmp_path, capsys, monkeypatch):
    common = ["--epochs", "1", "--dense-epochs", "1", *FAST]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(search.main, ["--output-dir", str(straight), *common], capsys)[0] == 0

    calls = {"n": 0}
    original = SparsityWeights.penalty

    def interrupting(self, model):  # Ctrl-C arrives in the middle of the 7th step's forward
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, model)

    monkeypatch.setattr(SparsityWeights, "penalty", interrupting)
    code, _, err = run_cli(search.main, ["--output-dir", str(stopped), *common], capsys)
    assert code == 130 and "interrupted (Ctrl-C)" in err and "after step 7 of" in err, err
    assert read_checkpoint(stopped / "checkpoint.pt")["start_batch"] == 7  # the step in flight was finished
    monkeypatch.setattr(SparsityWeights, "penalty", original)
    assert run_cli(search.main, ["--output-dir", str(stopped), "--resume", *common], capsys)[0] == 0
    a, b = _state(straight / "checkpoint.pt"), _state(stopped / "checkpoint.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}
    original = SparsityWeights.penalty
    steps_per_epoch = 1438 // 64

    def poisoned(self, model):
        calls["n"] += 1
        parts = original(self, model)
        if calls["n"] > steps_per_epoch + 3:  # during the second search epoch
            parts["penalty"] = parts["penalty"] * float("nan")
        return parts

    monkeypatch.setattr(SparsityWeights, "penalty", poisoned)
    code, _, err = run_cli(search.main, ["--output-dir", str(out), "--epochs", "3", "--dense-epochs", "1",
                                         *FAST], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: the loss became nan at epoch 2")
    assert "Traceback" not in err
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def _write_image_folders(root, classes=2, per_class=2, empty=False):
    from PIL import Image
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            if not empty:
                for i in range(per_class):
                    Image.new("RGB", (32, 32), color=(40 * c, 10 * i, 0)).save(d / f"{i}.png")


def _bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("vitslim_digits_vit", embed_dim=32, num_heads=2).state_dict(), other)
    empty = tmp_path / "empty"
    _write_image_folders(empty, empty=True)
    return [
        (search.main, ["--model", "no_such_model"], "unknown model 'no_such_model'"),
        (search.main, ["--model", "resnet18"], "supports timm VisionTransformer models"),
        (search.main, ["--data-path", str(tmp_path / "missing")], "does not exist"),
        (search.main, ["--data-path", str(empty), "--model", "vitslim_digits_vit"], "holds no images"),
        (search.main, ["--budgets", "1.5"], "budget_attn must be in (0, 1], got 1.5"),
        (search.main, ["--budgets", "0.7,0,0.7"], "budget_mlp must be in (0, 1], got 0.0"),
        (search.main, ["--w1", "-1"], "--w1 must be a finite number >= 0, got '-1'"),
        (search.main, ["--search", "blocks"], "invalid choice: 'blocks'"),
        (search.main, ["--checkpoint", str(garbage)], "cannot read checkpoint"),
        (search.main, ["--checkpoint", str(other)], "does not fit the model"),
        (search.main, ["--checkpoint", str(tmp_path / "nope.pth")], "does not exist"),
        (retrain.main, ["--searched", str(tmp_path / "nope.pt")], "does not exist"),
        (retrain.main, ["--searched", str(garbage)], "is not a vitslim checkpoint (corrupt, or another format)"),
        (retrain.main, ["--searched", str(other)], "not a vitslim training checkpoint"),
        (retrain.main, ["--searched", "x", "--budget-tokens", "2"], "--budget-tokens must be in (0, 1]"),
        (search.main, ["--output-dir", str(garbage)], "is a file, not a folder"),
        (search.main, ["--output-dir", str(garbage / "sub")], "a part of that path is a file"),
        # numeric flags, all refused before any work starts (issue 12)
        (search.main, ["--workers", "-1"], "--workers must be an integer >= 0, got '-1'"),
        (search.main, ["--seed", "-1"], "--seed must be an integer >= 0, got '-1'"),
        (search.main, ["--dense-epochs", "-1"], "--dense-epochs must be an integer >= 0, got '-1'"),
        (search.main, ["--dense-lr", "nan"], "--dense-lr must be a number > 0, got 'nan'"),
        (search.main, ["--lr", "nan"], "--lr must be a number > 0, got 'nan'"),
        (search.main, ["--lr", "0"], "--lr must be a number > 0, got '0'"),
        (search.main, ["--model-ema-decay", "1"], "--model-ema-decay must be in [0, 1), got '1'"),
        (retrain.main, ["--searched", "x", "--workers", "-1"], "--workers must be an integer >= 0"),
        (retrain.main, ["--searched", "x", "--seed", "-1"], "--seed must be an integer >= 0"),
        (retrain.main, ["--searched", "x", "--lr", "inf"], "--lr must be a number > 0, got 'inf'"),
        (retrain.main, ["--searched", "x", "--distillation-tau", "-1"], "--distillation-tau must be a number > 0"),
        (retrain.main, ["--searched", "x", "--distillation-tau", "0"], "--distillation-tau must be a number > 0"),
        (retrain.main, ["--searched", "x", "--distillation-alpha", "nan"], "--distillation-alpha must be in [0, 1]"),
        (retrain.main, ["--searched", "x", "--distillation-alpha", "1.5"], "--distillation-alpha must be in [0, 1]"),
    ]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    for main, argv, message in _bad_inputs(tmp_path):
        code, _, err = run_cli(main, [*FAST, "--output-dir", str(tmp_path / "out"), *argv], capsys)  # argv last: it wins
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)


def test_retrain_refuses_a_mismatched_plan(searched, tmp_path, capsys):
    plan = json.loads((searched / "plan_0.7_0.7_0.7.json").read_text())
    plan["num_heads"] = 8
    plan["blocks"] = [{**b, "heads": b["heads"] + [[]] * 4} for b in plan["blocks"]]
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(plan))
    code, _, err = run_cli(retrain.main, ["--searched", str(searched / "checkpoint.pt"), "--plan", str(bad),
                                          "--output-dir", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "num_heads=8 (model: 4)" in err


def test_files_of_the_wrong_kind_are_named_in_one_line(searched, tmp_path, capsys):
    from vitslim.cli import plan as plan_command
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    ckpt = str(searched / "checkpoint.pt")
    cases = [
        (plan_command.main, ["--searched", str(garbage)], f"{garbage} is not a vitslim checkpoint (corrupt, or "
                                                          "another format)"),
        (plan_command.main, ["--searched", str(tmp_path)], f"{tmp_path} is a folder without a checkpoint.pt"),
        (retrain.main, ["--searched", ckpt, "--plan", ckpt, "--output-dir", str(tmp_path / "r"), *FAST],
         f"--plan {ckpt} is not a plan JSON (a binary file"),
    ]
    for main, argv, message in cases:
        code, _, err = run_cli(main, argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    # A run folder stands for its checkpoint.pt.
    out = tmp_path / "plan.json"
    code, _, err = run_cli(plan_command.main, ["--searched", str(searched), "--budgets", "0.7", "-o", str(out)], capsys)
    assert code == 0 and vitslim.SlimPlan.from_json(out.read_text()), err


def test_a_slim_config_without_an_entry_names_it(tmp_path):
    model = vitslim.make_searchable(timm.create_model("vitslim_digits_vit"))
    slim_dir = vitslim.save_slim(vitslim.slim(model, vitslim.threshold(model, 0.7, 0.7, 0.7)), tmp_path / "slim")
    config = json.loads((slim_dir / "config.json").read_text())
    del config["arch"]
    (slim_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(vitslim.saving.SlimFileError, match="config.json has no 'arch' entry"):
        vitslim.load_slim(slim_dir)


def _retrain_with_teacher(searched, tmp_path, capsys, *teacher):
    out = tmp_path / "retrain"
    code, _, err = run_cli(retrain.main, ["--searched", str(searched / "checkpoint.pt"), "--output-dir", str(out),
                                          "--epochs", "1", *teacher, *FAST], capsys)
    assert not out.exists(), "refused after the run started"
    return code, err


def _weights(tmp_path, name, **kwargs):
    path = tmp_path / f"{name}.pth"
    torch.save(timm.create_model(name, **kwargs).state_dict(), path)
    return str(path)


def test_a_teacher_for_another_image_size_is_refused_before_training(searched, tmp_path, capsys):
    weights = _weights(tmp_path, "deit_tiny_patch16_224", num_classes=10)
    code, err = _retrain_with_teacher(searched, tmp_path, capsys, "--teacher", "deit_tiny_patch16_224",
                                      "--teacher-checkpoint", weights)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--teacher deit_tiny_patch16_224 cannot take the data's 16x16 images (it is made for 224x224" in err


def test_a_teacher_for_other_classes_is_refused_not_used_with_a_random_head(searched, tmp_path, capsys):
    weights = _weights(tmp_path, "vitslim_digits_vit", num_classes=7)
    code, err = _retrain_with_teacher(searched, tmp_path, capsys, "--teacher", "vitslim_digits_vit",
                                      "--teacher-checkpoint", weights)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--teacher vitslim_digits_vit predicts 7 classes, the data has 10" in err


def test_a_teacher_without_network_fails_at_once_naming_the_right_flag(searched, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout_s=3.0: False)
    code, err = _retrain_with_teacher(searched, tmp_path, capsys, "--teacher", "resnet18")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no network (huggingface.co unreachable)" in err and "use --teacher-checkpoint PATH" in err


def test_the_dense_teacher_of_a_moved_run_folder_is_found_beside_its_checkpoint(searched, tmp_path):
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(searched, moved)
    ckpt = read_checkpoint(moved / "checkpoint.pt")
    ckpt["dense_weights"] = str(tmp_path / "gone" / "dense.safetensors")  # where the search once wrote it
    torch.save(ckpt, moved / "checkpoint.pt")
    assert retrain.dense_weights(ckpt, moved / "checkpoint.pt") == moved / "dense.safetensors"
    args = retrain.build_parser().parse_args(["--searched", str(moved / "checkpoint.pt"), "--teacher", "dense"])
    arch = vitslim.ViTArch.from_dict(ckpt["arch"])
    teacher = retrain._teacher(args, arch, ckpt, 10, 16)
    from safetensors.torch import load_file
    dense = load_file(str(moved / "dense.safetensors"))
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in dense.items())


def test_entry_points_and_debug_traceback(tmp_path):
    cmd = [sys.executable, "-m", "vitslim.search", "--model", "no_such_model", "--output-dir", str(tmp_path)]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    helped = subprocess.run([sys.executable, "-m", "vitslim.retrain", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--searched" in helped.stdout and "--teacher" in helped.stdout


def test_an_output_dir_without_permission_is_one_line(tmp_path, monkeypatch):
    """(The suite runs as root here, where every folder is writable: the refusals are simulated.)"""
    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(cli.UserError, match=r"^--output-dir .*/new cannot be created: permission denied$"):
        cli.check_output_dir(tmp_path / "new")
    monkeypatch.undo()
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(cli.UserError, match=r"^--output-dir .*/existing is not writable$"):
        cli.check_output_dir(tmp_path / "existing")


def _numeric_actions():
    from vitslim.cli import export
    from vitslim.cli import plan as plan_command
    for parser in (search.build_parser(), retrain.build_parser(), plan_command.build_parser(), export.build_parser()):
        for action in parser._actions:
            if action.type is not None and action.type is not str:
                yield parser.prog, action


def test_every_numeric_flag_states_its_range_and_refuses_nan_and_infinity():
    import argparse
    actions = list(_numeric_actions())
    assert len(actions) > 40
    for prog, action in actions:
        assert getattr(action.type, "range", None), f"{prog} {action.option_strings}: no stated range"
        for bad in ("nan", "inf", "-inf", "-1", "abc"):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(bad)


@pytest.mark.parametrize("flag, value, what", [
    ("--smoothing", "1.5", "in [0, 1)"), ("--smoothing", "1", "in [0, 1)"), ("--reprob", "1.2", "in [0, 1]"),
    ("--drop-path", "1", "in [0, 1)"), ("--weight-decay", "inf", "a finite number >= 0"),
])
def test_out_of_range_flags_are_one_line_before_any_work(flag, value, what, tmp_path, capsys):
    for main in (search.main, retrain.main):
        argv = [flag, value, "--output-dir", str(tmp_path / "out")]
        code, _, err = run_cli(main, argv + (["--searched", "x.pt"] if main is retrain.main else []), capsys)
        assert code == 2 and f"{flag} must be {what}, got {value!r}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
