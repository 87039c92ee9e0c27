"""The final comparison of a retrain: dense vs slim params, FLOPs, accuracy and measured throughput."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .counting import count_flops, count_params


@torch.no_grad()
def measure_throughput(model: nn.Module, img_size: tuple[int, int], batch_size: int, device: torch.device,
                       min_seconds: float = 1.0, in_chans: int = 3) -> float:
    """Images per second of eval-mode forward passes (bf16 autocast on CUDA), after warm-up."""
    model.eval()
    x = torch.randn(batch_size, in_chans, *img_size, device=device)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            model(x)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    iters, start = 0, time.perf_counter()
    while True:
        step()
        iters += 1
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and iters >= 5:
            return iters * batch_size / elapsed


def model_row(model: nn.Module, accuracy: dict, img_size, batch_size: int, device: torch.device) -> dict:
    return {"params": count_params(model), "flops": count_flops(model), "top1": accuracy["top1"],
            "top5": accuracy["top5"], "img_per_s": measure_throughput(model, img_size, batch_size, device)}


def write_report(path: Path, dense: dict, slim: dict, budgets: dict, extra: dict) -> dict:
    report = {"dense": dense, "slim": slim, "budgets": budgets,
              "ratios": {"params": slim["params"] / dense["params"], "flops": slim["flops"] / dense["flops"],
                         "speedup": slim["img_per_s"] / dense["img_per_s"],
                         "top1_change": slim["top1"] - dense["top1"]},
              **extra}
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_report(report: dict) -> str:
    d, s, r = report["dense"], report["slim"], report["ratios"]
    lines = [f"{'':>7} {'params':>10} {'GMACs':>9} {'top-1':>8} {'top-5':>8} {'img/s':>10}"]
    for name, row in (("dense", d), ("slim", s)):
        lines.append(f"{name:>7} {row['params'] / 1e6:>9.3f}M {row['flops'] / 1e9:>9.4f} {row['top1']:>7.2f}% "
                     f"{row['top5']:>7.2f}% {row['img_per_s']:>10.0f}")
    lines.append(f"{'slim':>7} {r['params']:>9.1%}  {r['flops']:>8.1%} {r['top1_change']:>+7.2f}pt "
                 f"{'':>8} {r['speedup']:>9.2f}x")
    b = report["budgets"]
    lines.append(f"budgets: attn {b['attn']}, mlp {b['mlp']}, tokens {b['tokens']}; throughput measured on "
                 f"{report.get('device', '?')} at batch {report.get('throughput_batch', '?')}")
    return "\n".join(lines)
