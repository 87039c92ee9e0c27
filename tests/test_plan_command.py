"""python -m vitslim.plan and the target flags of python -m vitslim.retrain, on the embedded data."""
import json

import pytest

import vitslim
from vitslim.cli import retrain
from vitslim.cli import plan as command
from vitslim.families import VIT
from vitslim.engine.checkpoints import load_search

from .test_cli import FAST, run_cli, searched  # noqa: F401 - the module's search fixture


def test_a_flops_target_with_aligned_widths_writes_the_plan(searched, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, stdout, err = run_cli(command.main, ["--searched", str(searched / "checkpoint.pt"), "--target-flops",
                                               "0.25", "--align-heads", "4", "--align-mlp", "16", "-o", str(out)],
                                capsys)
    assert code == 0, err
    plan = vitslim.SlimPlan.from_json(out.read_text())
    model, arch, _ = load_search(searched / "checkpoint.pt")
    # The fraction is of the dense model the search started from; the search dropped tokens (31% of its MACs
    # are left), so 0.25 prunes further.
    dense = vitslim.count_flops(VIT.build_meta(arch))
    slim = vitslim.slim(model, plan)
    assert 0.24 * dense < vitslim.count_flops(slim) <= 0.25 * dense < vitslim.count_flops(model)
    assert plan.target["met"] == vitslim.count_flops(slim)
    assert all(w % 4 == 0 for b in plan.blocks for w in b.head_dims)
    assert all(len(b.mlp) % 16 == 0 for b in plan.blocks)
    assert "gate magnitude moved by the rounding" in stdout and f"wrote {out}" in stdout


def test_the_sweep_prints_the_table_with_the_accuracy_proxy_and_draws_the_curve(searched, tmp_path, capsys):
    figure = tmp_path / "curve.png"
    code, stdout, err = run_cli(command.main, ["--searched", str(searched / "checkpoint.pt"), "--target-flops",
                                               "0.3", "0.2", "0.12", "--sweep", "--figure", str(figure),
                                               "--workers", "0"], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].split()[-1] == "top-1" and lines[1].split()[0] == "unpruned"
    # (the search dropped tokens: 31% of the dense MACs are left before any threshold)
    rows = [line.split() for line in lines if line.split() and line.split()[0] in ("0.3", "0.2", "0.12")]
    assert len(rows) == 3 and all(r[-1].endswith("%") for r in rows)
    macs = [float(r[5]) for r in rows]
    assert macs[0] > macs[1] > macs[2]
    assert sum("widths per block" in line for line in lines) == 3
    assert figure.stat().st_size > 1000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The proxy is the top-1 of the slim model with folded gates: checked for one row by hand.
    model, _, _ = load_search(searched / "checkpoint.pt")
    plan = vitslim.plan_for(model, flops=0.2)
    from vitslim.data.loaders import embedded_digits, loaders
    from vitslim.distributed import Distributed
    from vitslim.engine.trainer import evaluate
    import torch
    dist = Distributed(0, 1, 0, torch.device("cpu"))
    _, val, _ = loaders(embedded_digits(), 64, dist, 0, 0)
    top1 = evaluate(vitslim.slim(model, plan, fold_gates=True), val, dist)["top1"]
    assert rows[1][-1] == f"{top1:.2f}%"


def test_budgets_sweep_and_one_line_errors(searched, capsys):
    ckpt = str(searched / "checkpoint.pt")
    code, stdout, _ = run_cli(command.main, ["--searched", ckpt, "--budgets", "0.9", "0.5,0.6,0.9", "--sweep",
                                             "--workers", "0", "--figure", str(searched / "b.png")], capsys)
    assert code == 0 and stdout.splitlines()[0].split()[0] == "budgets"
    for argv, message in [
        (["--target-flops", "0.5", "--target-params", "0.5"], "give one target, got --target-flops and "
                                                              "--target-params"),
        (["--target-flops", "0.5", "--budgets", "0.7"], "give a target or --budgets, not both"),
        (["--target-flops", "0.5", "0.6"], "2 values need --sweep"),
        (["--target-flops", "1e-9"], "below the smallest plan of this mix"),
        (["--target-flops", "1"], "not below the dense model"),
        (["--target-params", "1G"], "not below the dense model"),
        (["--target-flops", "0.5", "--align-heads", "3"], "--align-heads 3 does not divide the head width 16"),
        (["--target-flops", "0.5", "--align-mlp", "100"], "--align-mlp 100 does not divide the MLP width 256"),
        (["--target-flops", "x"], "--target-flops must be a number"),
        (["--mix", "1,1", "--target-flops", "0.5"], "--mix must be 'attn,mlp,tokens'"),
        (["--align-heads", "0"], "--align-heads must be a positive integer"),
    ]:
        code, _, err = run_cli(command.main, ["--searched", ckpt, *argv], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)


def test_retrain_takes_a_target_and_records_it(searched, tmp_path, capsys):
    code, _, err = run_cli(retrain.main, ["--searched", str(searched / "checkpoint.pt"), "--output-dir",
                                          str(tmp_path), "--epochs", "1", "--target-params", "0.7", "--mix",
                                          "1,1,0", "--align-heads", "4", *FAST], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["target"]["kind"] == "params" and plan["alignment"]["head"] == 4
    assert plan["budgets"]["tokens"] == 1.0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ratios"]["params"] <= 0.7
    code, _, err = run_cli(retrain.main, ["--searched", str(searched / "checkpoint.pt"), "--output-dir",
                                          str(tmp_path / "x"), "--target-flops", "0.5", "--budget-attn", "0.5",
                                          *FAST], capsys)
    assert code == 2 and "give one of --plan, a --target-*, or --budget-* flags" in err


@pytest.mark.parametrize("value,expected", [("3.1G", 3.1e9), ("12M", 12e6), ("0.67", 0.67), ("2e9", 2e9),
                                            ("500k", 5e5)])
def test_target_values_parse(value, expected):
    assert command.target_value("--target-flops")(value) == pytest.approx(expected)


def test_a_latency_target_on_the_command_line(searched, tmp_path, capsys, monkeypatch):
    from vitslim import latency
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "GRID", (0.5, 1.0))
    ckpt = str(searched / "checkpoint.pt")
    code, _, err = run_cli(command.main, ["--searched", ckpt, "--target-latency-ms", "5", "--no-measure"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no latency table for cpu" in err, err
    monkeypatch.setattr(latency, "time_forward_ms",  # a stand-in timer: 1 ms per million MACs
                        lambda net, batch_size, device, **_: vitslim.count_flops(net, batch_size) * 1e-6)
    code, stdout, err = run_cli(command.main, ["--searched", ckpt, "--target-latency-ms", "0.3"], capsys)
    assert code == 0, err
    assert "latency at batch 1 on cpu" in stdout and "predicted" in stdout and "measured" in stdout
    assert len(list((tmp_path / "latency").iterdir())) == 1
