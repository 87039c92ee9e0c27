"""The final comparison of a retrain: dense vs slim params, FLOPs, accuracy and measured throughput."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..counting import count_flops, count_params
from ..plan import has_token_gates


@torch.no_grad()
def compare_throughput(models: dict[str, nn.Module], img_size: tuple[int, int], batch_size: int,
                       device: torch.device, repeats: int = 7, window_s: float = 0.3, in_chans: int = 3
                       ) -> dict[str, dict]:
    """Images per second of eval-mode forward passes (bf16 autocast on CUDA), each model timed in `repeats`
    windows of at least window_s, the models taking turns (A B A B ...), so a machine that gets busier or
    idler during the measurement moves all of them alike. Per model: the median, min and max over the windows.
    Per model but the first: "speedup_vs_<first>", the ratio of the two medians (the img/s the report prints, so
    its lines agree: with an odd number of repeats it lies within the per-turn ratios), and
    "speedup_vs_<first>_range", the smallest and largest ratio within one turn (how noisy the machine was)."""
    x = torch.randn(batch_size, in_chans, *img_size, device=device)
    cuda = device.type == "cuda"

    def window(model: nn.Module) -> float:
        iters, start = 0, time.perf_counter()
        while True:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                model(x)
            iters += 1
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= window_s and iters >= 3:
                return iters * batch_size / elapsed

    for model in models.values():  # warm-up
        model.eval()
        for _ in range(3):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                model(x)
    if cuda:
        torch.cuda.synchronize(device)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            rates[name].append(window(model))
    first = next(iter(models))
    out = {}
    for name, values in rates.items():
        out[name] = {"img_per_s": statistics.median(values), "img_per_s_min": min(values),
                     "img_per_s_max": max(values), "repeats": repeats}
        if name != first:
            ratios = [v / f for v, f in zip(values, rates[first])]
            out[name].update({f"speedup_vs_{first}": statistics.median(values) / statistics.median(rates[first]),
                              f"speedup_vs_{first}_range": [min(ratios), max(ratios)]})
    return out


def model_row(model: nn.Module, accuracy: dict | None, throughput: dict) -> dict:
    """accuracy None: not measured on this data (top1 and top5 None)."""
    return {"params": count_params(model), "flops": count_flops(model), "top1": (accuracy or {}).get("top1"),
            "top5": (accuracy or {}).get("top5"), **throughput}


def kept_tokens(plan) -> dict | None:
    """The plan's kept patch tokens: per block (a fraction of the patches) and overall (of all block x patch
    slots, the fraction budget_tokens asks for; the plan's monotone rule keeps more in early blocks). None for a
    model without token gates (Swin): it keeps every token."""
    widths = plan.block_widths
    if not has_token_gates(widths):
        return None
    per_block = [(plan.tokens_in(i) - w.num_prefix_tokens) / w.num_patches for i, w in enumerate(widths)]
    return {"per_block": per_block, "overall": sum(per_block) / len(per_block)}


def write_report(path: Path, dense: dict | None, slim: dict, budgets: dict, extra: dict) -> dict:
    """report.json; dense None (a fine-tuned slim model: no dense model) gives no ratios, a dense row without
    accuracy (another head) no top-1 change."""
    ratios = None
    if dense is not None:
        ratios = {"params": slim["params"] / dense["params"], "flops": slim["flops"] / dense["flops"],
                  "speedup": slim["speedup_vs_dense"], "speedup_range": slim["speedup_vs_dense_range"],
                  "top1_change": None if dense["top1"] is None else slim["top1"] - dense["top1"]}
    report = {"dense": dense, "slim": slim, "budgets": budgets, "ratios": ratios, **extra}
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _pct(x: float | None, width: int) -> str:
    return f"{'-':>{width + 1}}" if x is None else f"{x:>{width}.2f}%"


def format_report(report: dict) -> str:
    d, s, r = report["dense"], report["slim"], report["ratios"]
    lines = [f"{'':>7} {'params':>10} {'GMACs':>9} {'top-1':>8} {'top-5':>8} {'img/s':>10}"]
    for name, row in (("dense", d), ("slim", s)):
        if row is not None:
            lines.append(f"{name:>7} {row['params'] / 1e6:>9.3f}M {row['flops'] / 1e9:>9.4f} {_pct(row['top1'], 7)} "
                         f"{_pct(row['top5'], 7)} {row['img_per_s']:>10.0f}")
    if r is not None:
        lo, hi = r["speedup_range"]
        change = f"{'-':>9}" if r["top1_change"] is None else f"{r['top1_change']:>+7.2f}pt"
        lines.append(f"{'slim':>7} {r['params']:>9.1%}  {r['flops']:>8.1%} {change} "
                     f"{'':>8} {r['speedup']:>9.2f}x (slim img/s / dense img/s; per-turn ratios {lo:.2f}-{hi:.2f}x)")
    if d is not None and d["top1"] is None:
        lines.append("(the dense model's accuracy is the search's, on another head: not measured on this data)")
    b = report["budgets"]
    lines.append(f"budgets: attn {b['attn']:.4g}, mlp {b['mlp']:.4g}, tokens {b['tokens']:.4g}; throughput: median "
                 f"of "
                 f"{s.get('repeats', '?')} alternating windows on {report.get('device', '?')} at batch "
                 f"{report.get('throughput_batch', '?')}")
    tokens = report.get("kept_tokens")
    if tokens:
        lines.append(f"kept tokens per block: {' '.join(f'{t:.0%}' for t in tokens['per_block'])} "
                     f"(overall {tokens['overall']:.1%} of the block x patch slots; budget {b['tokens']:.4g})")
    return "\n".join(lines)
