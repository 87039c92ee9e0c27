"""The commands on a Swin (issue 24): search, plan, retrain and export of the embedded tiny Swin
(vitslim_digits_swin), its refusals in one line, and Swin's own retrain recipe."""
from __future__ import annotations

import json

import pytest

import vitslim
import vitslim.digits  # noqa: F401 - registers vitslim_digits_swin with timm
from vitslim.cli import common as cli, export, plan, retrain, search
from vitslim.engine.checkpoints import read_checkpoint
from vitslim.families.swin import SWIN

from .test_cli import FAST, run_cli

MODEL = ["--model", "vitslim_digits_swin"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A short search of the tiny Swin on the embedded data: 1 dense epoch, 2 search epochs, two plans."""
    out = tmp_path_factory.mktemp("swin_search")
    with pytest.raises(SystemExit) as e:
        cli.run(search.main, ["--output-dir", str(out), *MODEL, "--epochs", "2", "--dense-epochs", "1",
                              "--budgets", "0.7", "0.5,0.6,1", *FAST])
    assert e.value.code == 0
    return out


def test_search_writes_swin_plans(searched):
    ckpt = read_checkpoint(searched / "checkpoint.pt")
    assert ckpt["family"] == "swin" and ckpt["epoch"] == 2
    for name, budgets in (("plan_0.7_0.7_1.json", (0.7, 0.7, 1.0)), ("plan_0.5_0.6_1.json", (0.5, 0.6, 1.0))):
        saved = vitslim.SlimPlan.from_json((searched / name).read_text())
        assert saved.family == "swin" and tuple(saved.budgets.values()) == budgets
        assert all(not b.tokens for b in saved.blocks)
    assert (searched / "figures" / "gates_epoch002.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--drop-tokens-below", "0.5"], "--drop-tokens-below: vitslim_digits_swin has no token gates"),
    (["--budgets", "0.5,0.5,0.5"], "--budgets 0.5,0.5,0.5: swin models have no token gates"),
])
def test_search_refuses_token_settings_in_one_line(argv, message, tmp_path, capsys):
    code, _, err = run_cli(search.main, ["--output-dir", str(tmp_path / "run"), *MODEL, "--epochs", "1",
                                         "--dense-epochs", "0", *argv, *FAST], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not any((tmp_path / "run").iterdir())  # nothing written


def test_plan_for_a_flops_target_with_aligned_widths(searched, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, stdout, err = run_cli(plan.main, ["--searched", str(searched), "--target-flops", "0.6", "--align-heads",
                                            "4", "--align-mlp", "32", "-o", str(out)], capsys)
    assert code == 0, err
    made = vitslim.SlimPlan.from_json(out.read_text())
    assert made.target["fraction_of_dense"] <= 0.6 and made.budgets["tokens"] == 1.0
    assert all(w % 4 == 0 for b in made.blocks for w in b.head_dims)
    code, _, err = run_cli(plan.main, ["--searched", str(searched), "--budgets", "0.5,0.5,0.5"], capsys)
    assert code == 2 and "swin models have no token gates" in err


def test_retrain_and_export_a_slim_swin(searched, tmp_path, capsys):
    out = tmp_path / "retrain"
    code, stdout, err = run_cli(retrain.main, ["--searched", str(searched), "--plan",
                                               str(searched / "plan_0.5_0.6_1.json"), "--output-dir", str(out),
                                               "--epochs", "1", *FAST], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["kept_tokens"] is None and report["slim"]["params"] < report["dense"]["params"]
    small = vitslim.load_slim(out / "slim")
    assert small.slim_plan.family == "swin" and SWIN.blocks(small)[0].attn.scale == 16 ** -0.5
    for fmt in ("onnx", "pt2"):
        code, stdout, err = run_cli(export.main, [str(out / "slim"), "--format", fmt, "--fused", "--dynamic-batch",
                                                  "-o", str(tmp_path / f"swin.{fmt}")], capsys)
        assert code == 0, err
        # one op per block, translated into standard ONNX ops (bias gathered, shift mask added) for onnx
        depth = len(SWIN.blocks(small))
        assert f"{depth} x vitslim::window_attention_fwd" in stdout and stdout.count(": ok") == 2, stdout


def test_swin_retrains_with_its_own_recipe_on_real_data():
    arch = SWIN.describe(vitslim.digits.vitslim_digits_swin())
    given = retrain.build_parser().parse_args(["--searched", "x", "--warmup-epochs", "3"])
    retrain.resolve_defaults(given, arch, embedded=False)
    assert (given.drop_path, given.warmup_epochs, given.clip_grad, given.weight_decay) == (0.2, 3, 5.0, 0.05)
    light = retrain.build_parser().parse_args(["--searched", "x"])
    retrain.resolve_defaults(light, arch, embedded=True)
    assert (light.drop_path, light.warmup_epochs, light.clip_grad) == (0.0, 2, None)
