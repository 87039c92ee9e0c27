"""The learnable gates of the search (docs/design.md section 2) and their l1 penalty."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .plan import check_search_mode

TOKEN_GATE_INIT = 3.0  # tanh(3) = 0.995: token gates start almost fully open


class BlockGates(nn.Module):
    """The raw gates of one block.

    attn: (H, d) for search="dims", (H, 1) for "heads", (1, d) for "uniform"; effective value = raw.
    mlp: (M,); effective value = raw.
    tokens: (P,) patch tokens only; effective value = tanh(raw).
    """

    def __init__(self, search: str, num_heads: int, head_dim: int, mlp_hidden: int, num_patches: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.search = check_search_mode(search)
        attn_shape = {"dims": (num_heads, head_dim), "heads": (num_heads, 1), "uniform": (1, head_dim)}[search]
        dd = dict(device=device, dtype=dtype)
        self.attn = nn.Parameter(torch.ones(attn_shape, **dd))
        self.mlp = nn.Parameter(torch.ones(mlp_hidden, **dd))
        self.tokens = nn.Parameter(torch.full((num_patches,), TOKEN_GATE_INIT, **dd))
        self.num_heads, self.head_dim = num_heads, head_dim

    def attn_per_dim(self) -> torch.Tensor:
        """The attention gate broadcast to one value per (head, dim): (H, d)."""
        return self.attn.expand(self.num_heads, self.head_dim)

    def token_scale(self) -> torch.Tensor:
        """tanh(raw token gates): (P,)."""
        return torch.tanh(self.tokens)

    def extra_repr(self) -> str:
        return (f"search={self.search!r}, attn={tuple(self.attn.shape)}, mlp={tuple(self.mlp.shape)}, "
                f"tokens={tuple(self.tokens.shape)}")


def gates(model: nn.Module) -> list[BlockGates]:
    """The gates of a searchable model, one BlockGates per block, in block order."""
    found = [m for m in model.modules() if isinstance(m, BlockGates)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no gates: call vitslim.make_searchable(model) first")
    return found


def sparsity_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unweighted l1 sums over all blocks: (sum|attn|, sum|mlp|, sum|tanh(tokens)|)."""
    all_gates = gates(model)
    attn_l1 = sum(g.attn.abs().sum() for g in all_gates)
    mlp_l1 = sum(g.mlp.abs().sum() for g in all_gates)
    tok_l1 = sum(g.token_scale().abs().sum() for g in all_gates)
    return attn_l1, mlp_l1, tok_l1


@dataclass(frozen=True)
class SparsityWeights:
    """w1, w2, w3 of the search loss. Not divided by the number of processes (docs/design.md section 2)."""

    attn: float = 2e-4
    mlp: float = 5e-5
    tokens: float = 1e-4

    def penalty(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{"penalty": w1*attn_l1 + w2*mlp_l1 + w3*tok_l1, and the three sums}."""
        attn_l1, mlp_l1, tok_l1 = sparsity_losses(model)
        total = self.attn * attn_l1 + self.mlp * mlp_l1 + self.tokens * tok_l1
        return {"penalty": total, "attn_l1": attn_l1, "mlp_l1": mlp_l1, "tok_l1": tok_l1}
