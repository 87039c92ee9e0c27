"""Token dropping during the search (issue 4: `--drop-tokens-below EPS`, off by default).

A patch whose token gate has become negligible is removed from its block and every later block, as the
slim model removes it (docs/design.md section 4): it is neither a query, a key nor a value any more, and the
blocks compute on shorter sequences. What is dropped is kept in each block's `token_alive` buffer (saved
with the model); `vitslim.threshold` never keeps a dropped token.
"""
from __future__ import annotations

from numbers import Real

import torch
from torch import nn

from .errors import UserError
from .searchable import searchable_blocks, sync_token_inputs


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (0.0 <= float(eps) < 1.0):
        raise ValueError(f"eps must be in [0, 1), got {eps!r}")
    return float(eps)


@torch.no_grad()
def drop_tokens(model: nn.Module, eps: float) -> int:
    """Drop every patch whose |tanh(token gate)| is below `eps` in a block where it is still alive.

    The patch is dropped from that block and from every later block (kept sets shrink with depth; a
    dropped token never returns). Prefix tokens are never dropped. eps = 0 drops nothing.
    Returns the number of (block, patch) slots newly dropped. Changes the model in place.
    """
    eps = check_eps(eps)
    blocks = searchable_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not searchable: call vitslim.make_searchable(model) first")
    if not all(hasattr(block, "token_alive") for block in blocks):
        raise UserError(f"drop_tokens: {type(model).__name__} has no token gates (Swin: windows and patch merging "
                         "need the whole grid); nothing can be dropped")
    dropped = 0
    gone = None  # (P,) bool: dropped in some earlier block, hence in this one too
    for block in blocks:
        alive = block.token_alive
        # Compared in float64, as threshold ranks the same values.
        small = block.gates.tokens.detach().to(torch.float64).tanh().abs() < eps
        present = alive if gone is None else alive & ~gone  # in this block's input after earlier drops
        gone = ~present | small.to(alive.device)
        if block.num_prefix_tokens == 0 and gone.all() and present.any():
            # No class token: keep the strongest present patch so the sequence is never empty.
            strongest = block.gates.tokens.detach().abs().masked_fill(~present, -1.0).argmax()
            gone[strongest] = False
        dropped += int((alive & gone).sum())
        alive.copy_(~gone)
    sync_token_inputs(model)
    return dropped


def alive_tokens(model: nn.Module) -> list[list[int]]:
    """Per block, the sorted patch indices still present (all of them until something is dropped)."""
    return [torch.nonzero(b.token_alive).flatten().tolist() for b in searchable_blocks(model)]
