"""Targets and aligned widths on DeiT and Swin-T shapes: what plan_for finds and what alignment moves; Swin-T at the
budgets of the paper's Table 7; latency targets, predicted vs measured, on this machine. Writes
benchmarks/results/plan_targets.json.

  python -m benchmarks.plan_targets [--models deit_small deit_base swin_tiny] [--latency] [--results-dir DIR]

Random weights with gates shaped like a trained search's (run_slim_benchmarks.searchable_with_plan_like_gates), so
the numbers are about the planner, not about accuracy.
"""
from __future__ import annotations

import argparse
import time

import torch

import vitslim
import vitslim.families
import vitslim.planning
from vitslim.planning import Alignment, plan_for

from .common import write_results
from .run_slim_benchmarks import ModelConfig, searchable_with_plan_like_gates

MODELS = {"deit_small": ModelConfig("deit_small", "deit_small_patch16_224"),
          "deit_base": ModelConfig("deit_base", "deit_base_patch16_224"),
          "swin_tiny": ModelConfig("swin_tiny", "swin_tiny_patch4_window7_224")}
# The paper's Table 7 (Swin-T, searched like ViT-Slim_PS: head dims and MLP units): budget -> (params, GFLOPs).
TABLE7 = {0.8: (22.3e6, 3.8e9), 0.7: (19.4e6, 3.4e9)}
# (label, plan_for keyword arguments): the DeiT-S case first.
CASES = [
    ("flops 3.1G, align (8, 64)", dict(flops=3.1e9, align=Alignment(8, 64))),
    ("flops 3.1G, unaligned", dict(flops=3.1e9)),
    ("flops 0.67, mix 1,1,0, align (8, 64)", dict(flops=0.67, mix=(1, 1, 0), align=Alignment(8, 64))),
    ("params 0.6, align (8, 64)", dict(params=0.6, align=Alignment(8, 64))),
    ("params 12M, mix 1,1,0", dict(params=12e6, mix=(1, 1, 0))),
]


def row_for(name: str, label: str, model, plan: vitslim.SlimPlan, seconds: float) -> dict:
    slim = vitslim.slim(model, plan)
    t, a = plan.target, plan.alignment or {}
    return {"model": name, "case": label, "budgets": plan.budgets, "target": t["value"], "kind": t["kind"],
            "met": t["met"], "fraction_of_dense": t["fraction_of_dense"],
            "macs_counted": vitslim.count_flops(slim), "params_counted": vitslim.count_params(slim),
            "kept": plan.kept_fractions(), "attn_moved_fraction": a.get("attn_moved_fraction"),
            "mlp_moved_fraction": a.get("mlp_moved_fraction"), "head_widths": [list(b.head_dims) for b in plan.blocks],
            "mlp_widths": [len(b.mlp) for b in plan.blocks], "tokens": [len(b.tokens) for b in plan.blocks],
            "plan_seconds": seconds, **({k: t[k] for k in ("predicted_ms", "measured_ms", "dense_predicted_ms",
                                                           "device", "batch_size") if k in t})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["deit_small", "deit_base", "swin_tiny"])
    p.add_argument("--latency", action="store_true", help="also a latency target on this machine (DeiT-S, "
                   "batch 1; measures the latency table, about a minute on 2 CPU cores)")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        model = searchable_with_plan_like_gates(MODELS[name])
        for label, kwargs in CASES:
            start = time.perf_counter()
            plan = plan_for(model, **kwargs)
            rows.append(row_for(name, label, model, plan, time.perf_counter() - start))
            r = rows[-1]
            moved = (f", moved attn {r['attn_moved_fraction']:.2%} mlp {r['mlp_moved_fraction']:.2%}"
                     if r["attn_moved_fraction"] is not None else "")
            print(f"{name:>10} {label:<38} budgets " + "/".join(f"{v:.4f}" for v in r["budgets"].values())
                  + f" -> {r['kind']} {r['met']:.6g} ({r['fraction_of_dense']:.1%} of dense){moved}")
    if "swin_tiny" in args.models:  # Table 7's budgets through our threshold, beside the paper's counts
        model = searchable_with_plan_like_gates(MODELS["swin_tiny"])
        cost = vitslim.planning.PlanCost(model, vitslim.families.family_of(model).describe(model))
        for budget, (paper_params, paper_flops) in TABLE7.items():
            plan = vitslim.threshold(model, budget, budget)
            met = cost(plan)
            rows.append({"model": "swin_tiny", "case": f"Table 7: budgets {budget} (attn, mlp)", "budgets": plan.budgets,
                         "macs_counted": met["flops"], "params_counted": met["params"],
                         "paper_params": paper_params, "paper_gflops": paper_flops, "kept": plan.kept_fractions(),
                         "head_widths": [list(b.head_dims) for b in plan.blocks],
                         "mlp_widths": [len(b.mlp) for b in plan.blocks]})
            print(f"swin_tiny budgets {budget}: {met['params'] / 1e6:.2f}M params, {met['flops'] / 1e9:.2f} GMACs "
                  f"(paper: {paper_params / 1e6:.1f}M, {paper_flops / 1e9:.1f}G)")
    if args.latency:
        model = searchable_with_plan_like_gates(MODELS["deit_small"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        table = vitslim.latency.latency_table(model, device, 1)
        dense_ms = table.predict_ms(vitslim.threshold(model, 1.0, 1.0, 1.0))
        for fraction in (0.8, 0.6):
            start = time.perf_counter()
            plan = plan_for(model, latency_ms=fraction * dense_ms, device=device, batch_size=1,
                            align=Alignment(8, 64))
            rows.append(row_for("deit_small", f"latency {fraction:.0%} of dense, align (8, 64)", model.cpu(),
                                plan, time.perf_counter() - start))
            model.to(device)
            r = rows[-1]
            print(f"deit_small latency target {fraction * dense_ms:.2f} ms: predicted {r['predicted_ms']:.2f} ms, "
                  f"measured {r['measured_ms']:.2f} ms (dense predicted {dense_ms:.2f} ms, table fit error "
                  f"{table.max_fit_error:.1%}), {r['fraction_of_dense']:.1%}")
    path = write_results("plan_targets", rows, args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
