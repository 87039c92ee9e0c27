"""Analytic parameter and FLOP counts for dense, searchable and slim models.

FLOPs are multiply-accumulates of the matrix products (patch embedding, qkv, q @ k^T, attn @ v, proj,
fc1, fc2, classifier heads), the convention of the paper's tables; norms, softmax and activations are
not counted. A block's count is the one cost formula of vitslim.families.base (block_macs); what lies outside the
blocks is its family's (count_macs).
"""
from __future__ import annotations

from torch import nn

from .errors import UnsupportedModelError
from .families import family_of
from .gates import BlockGates


def count_params(model: nn.Module) -> int:
    """Number of parameters, not counting search gates (they are not part of a deployable model)."""
    gate_params = {id(p) for m in model.modules() if isinstance(m, BlockGates) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_params)


def count_flops(model: nn.Module, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass of `batch_size` images."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        family = family_of(model)
    except UnsupportedModelError as e:
        raise ValueError(f"count_flops needs a model of a supported family, dense, searchable or slim: {e}") from None
    return family.count_macs(model) * batch_size
