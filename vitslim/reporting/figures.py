"""PNG figures: a search's gate histograms, the structure a plan keeps, the trade-off of a plan sweep (matplotlib,
no display)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..gates import gates
from ..plan import SlimPlan, has_token_gates


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
        if v.numel() == 0:  # a model without token gates (Swin)
            ax.set_title(f"{name}: no such gates")
            ax.axis("off")
            continue
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
    dense = plan.block_widths
    most = max(w.num_heads for w in dense)
    widths = torch.full((plan.depth, most), float("nan"))  # (L, H); blocks with fewer heads (Swin's stages): NaN
    for i, b in enumerate(plan.blocks):
        widths[i, :len(b.heads)] = torch.tensor(b.head_dims, dtype=torch.float32)
    blocks = range(plan.depth)
    steps = [i - 0.5 for i in blocks] + [plan.depth - 0.5]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    head_dim = max(w.head_dim for w in dense)
    im = axes[0].imshow(widths.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=head_dim)
    axes[0].set_xlabel("block")
    axes[0].set_ylabel("head")
    axes[0].set_title(f"kept head width (of {plan.head_dim or head_dim})")
    fig.colorbar(im, ax=axes[0])
    bars = {"MLP width": ([len(b.mlp) for b in plan.blocks], [w.mlp_hidden for w in dense], "#3b6ea8"),
            "patch tokens": ([plan.tokens_in(i) - dense[i].num_prefix_tokens for i in blocks],
                             [w.num_patches for w in dense], "#a8603b")}
    for ax, (name, (kept, full, color)) in zip(axes[1:], bars.items()):
        ax.bar(blocks, kept, color=color)
        ax.stairs(full, steps, color="gray", lw=0.8)  # each block's dense width
        shared = set(full)
        ax.set_title(f"{name} (of {shared.pop()})" if len(shared) == 1 else f"{name} (of each block's: gray)")
    if not has_token_gates(dense):
        axes[2].set_title("patch tokens (no token gates: all kept)")
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
