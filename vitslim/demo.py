"""`python -m vitslim.demo`: search -> threshold -> slim on a tiny ViT and the embedded digits data.

A short, CPU-sized run of the whole core: train a tiny dense ViT briefly, search with l1-penalised gates,
threshold at 70/70/70, build the physically smaller model, and report what it keeps and what it costs.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from . import count_flops, count_params, make_searchable, slim, sparsity_losses, threshold
from .data import DIGITS_CLASSES, digits_split


def tiny_vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=16, patch_size=2, num_classes=DIGITS_CLASSES, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=4.0)


def _train(model, x, y, epochs, lr, batch, penalty=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def _accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    tx, ty, vx, vy = digits_split(img_size=16)
    model = tiny_vit()
    _train(model, tx, ty, args.dense_epochs, lr=1e-3, batch=64)
    dense_acc = _accuracy(model, vx, vy)
    print(f"dense tiny ViT: top-1 {dense_acc:.1%} on {len(vy)} held-out digits")

    make_searchable(model)
    w = (2e-4, 5e-5, 1e-4)  # the paper's w1, w2, w3, raised 10x so a short search moves the gates
    _train(model, tx, ty, args.search_epochs, lr=5e-4, batch=64,
           penalty=lambda m: sum(10 * wi * li for wi, li in zip(w, sparsity_losses(m))))
    plan = threshold(model, args.budget, args.budget, args.budget)
    print(plan.summary())
    small = slim(model, plan, fold_gates=True)
    print(f"search model top-1 {_accuracy(model, vx, vy):.1%}; slim model (no retraining) "
          f"top-1 {_accuracy(small, vx, vy):.1%}")
    for name, m in (("dense", model), ("slim", small)):
        print(f"{name:>5}: {count_params(m) / 1e6:.3f}M params, {count_flops(m) / 1e6:.1f}M MACs per image")
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
