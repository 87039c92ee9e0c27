"""PNG figures: a search's gate histograms, the structure a plan keeps, the trade-off of a plan sweep (matplotlib,
no display)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..gates import gates
from ..plan import SlimPlan


def _pyplot():
    import matplotlib  # optional at import: only a figure needs it (and its backend is chosen here)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after the backend is chosen)
    return plt


def plot_gate_histograms(model: nn.Module, path: Path, title: str = "") -> None:
    """Histograms of |attn|, |mlp| and |tanh(tokens)| over all blocks."""
    plt = _pyplot()
    all_gates = gates(model)
    values = {
        "attention |gate|": torch.cat([g.attn.detach().abs().flatten().float().cpu() for g in all_gates]),
        "MLP |gate|": torch.cat([g.mlp.detach().abs().flatten().float().cpu() for g in all_gates]),
        "token |tanh(gate)|": torch.cat([g.token_scale().detach().abs().flatten().float().cpu() for g in all_gates]),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (name, v) in zip(axes, values.items()):
        lo, hi = float(v.min()), float(v.max())
        # Gates a step or two from their init span a few float32 ulps: 60 bins there do not exist (numpy refuses)
        spread = (lo - 1e-3, hi + 1e-3) if hi - lo < 1e-4 * max(1.0, abs(hi)) else None
        ax.hist(v.numpy(), bins=60, range=spread, color="#3b6ea8")
        ax.set_title(name)
        ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_structure(plan: SlimPlan, path: Path, title: str = "") -> None:
    """Kept width of every head in every block (heat map), MLP width and tokens per block (bars)."""
    plt = _pyplot()
    widths = torch.tensor([b.head_dims for b in plan.blocks], dtype=torch.float32)  # (L, H)
    blocks = range(plan.depth)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    im = axes[0].imshow(widths.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=plan.head_dim)
    axes[0].set_xlabel("block")
    axes[0].set_ylabel("head")
    axes[0].set_title(f"kept head width (of {plan.head_dim})")
    fig.colorbar(im, ax=axes[0])
    axes[1].bar(blocks, [len(b.mlp) for b in plan.blocks], color="#3b6ea8")
    axes[1].axhline(plan.mlp_hidden, color="gray", lw=0.8)
    axes[1].set_title(f"MLP width (of {plan.mlp_hidden})")
    axes[2].bar(blocks, [len(b.tokens) for b in plan.blocks], color="#a8603b")
    axes[2].axhline(plan.num_patches, color="gray", lw=0.8)
    axes[2].set_title(f"patch tokens (of {plan.num_patches})")
    for ax in axes[1:]:
        ax.set_xlabel("block")
    fig.suptitle(title or f"structure at budgets {plan.budgets}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_tradeoff(rows: list[dict], dense: dict, dense_top1, path: Path) -> None:
    """MACs per image against the accuracy proxy (when measured) and against the kept gate magnitude."""
    plt = _pyplot()
    unit, unit_name = (1e9, "GMACs") if dense["flops"] >= 1e8 else (1e6, "MMACs")
    macs = [dense["flops"] / unit] + [r["flops"] / unit for r in rows]
    panels = [("kept gate magnitude", "|gate| kept, attention + MLP", [1.0] + [r["kept_magnitude"] for r in rows])]
    if dense_top1 is not None:
        panels.insert(0, ("accuracy proxy: pruned entries removed, no retraining", "top-1 (%)",
                          [dense_top1] + [r["top1"] for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    order = sorted(range(len(macs)), key=macs.__getitem__)
    for ax, (title, ylabel, ys) in zip(axes[0], panels):
        ax.plot([macs[i] for i in order], [ys[i] for i in order], "o-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{unit_name} per image")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
