"""Analytic parameter and FLOP counts for dense, searchable and slim ViTs.

FLOPs are multiply-accumulates of the matrix products (patch embedding, qkv, q @ k^T, attn @ v, proj,
fc1, fc2, classifier heads), the convention of the paper's tables; norms, softmax and activations are
not counted.
"""
from __future__ import annotations

from torch import nn

from .gates import BlockGates


def count_params(model: nn.Module) -> int:
    """Number of parameters, not counting search gates (they are not part of a deployable model)."""
    gate_params = {id(p) for m in model.modules() if isinstance(m, BlockGates) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_params)


def _check_vit(model: nn.Module) -> None:
    needed = ("patch_embed", "blocks", "num_prefix_tokens", "head")
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ValueError(f"count_flops needs a timm VisionTransformer (dense, searchable or slim); "
                         f"{type(model).__name__} has no {', '.join(missing)}")


def block_terms(attn_width: int, mlp_width: int, tokens: int) -> tuple[int, int, int, int]:
    """The terms the cost of a block is made of, for attention width W (summed over heads), M MLP units and T
    tokens: (T, T*W, T*M, T^2*W). Its MACs are block_macs; vitslim.latency fits one time per term."""
    return tokens, tokens * attn_width, tokens * mlp_width, tokens * tokens * attn_width


def block_macs(embed_dim: int, attn_width: int, mlp_width: int, tokens: int) -> int:
    """MACs of one block of embedding width C: qkv (3WC), proj (WC), fc1 and fc2 (2MC) per token, and q @ k^T and
    attn @ v (2 T W per token): T * (4WC + 2MC) + 2 T^2 W. The one cost formula: count_flops, planning.PlanCost and
    the latency model's terms (block_terms) all use it."""
    _, tw, tm, ttw = block_terms(attn_width, mlp_width, tokens)
    return embed_dim * (4 * tw + 2 * tm) + 2 * ttw


def block_flops(block: nn.Module, tokens: int) -> int:
    """MACs of one block (dense, searchable or slim) on a sequence of `tokens` tokens."""
    qkv, fc1 = block.attn.qkv, block.mlp.fc1
    return block_macs(qkv.in_features, qkv.out_features // 3, fc1.out_features, tokens)


def count_flops(model: nn.Module, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass of `batch_size` images."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_vit(model)
    conv = model.patch_embed.proj
    patches = model.patch_embed.num_patches
    macs = patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    tokens = model.num_prefix_tokens + patches
    for block in model.blocks:
        gather = getattr(block, "gather_index", None)
        if gather is not None:
            tokens = gather.numel()
        macs += block_flops(block, tokens)
    for head in (model.head, getattr(model, "head_dist", None)):
        if isinstance(head, nn.Linear):
            macs += head.in_features * head.out_features
    return macs * batch_size
