"""timm's `forward_intermediates` on models whose later blocks hold fewer tokens (slim plans, drop_tokens).

timm reshapes every requested block output to an (H, W) grid for output_fmt="NCHW", which only a block that
still holds every patch can fill; with dropped tokens it fails deep inside with a reshape error. The models
vitslim makes carry a checked `forward_intermediates`: "NLC" works for every block (each output is
(B, its own token count, C)), and "NCHW" works for blocks that still hold every patch; asking for a block
that dropped tokens raises an error saying which blocks can and what else works.
"""
from __future__ import annotations

import functools
import inspect

from timm.models._features import feature_take_indices
from torch import nn


def patches_out(block: nn.Module, num_patches: int) -> int:
    """How many patch tokens `block` outputs (SlimBlock, SearchableBlock; timm's Block keeps them all)."""
    alive = getattr(block, "token_alive", None)
    if alive is not None:
        return int(alive.sum())
    return int(getattr(block, "num_patches_out", num_patches))


def _requested(model: nn.Module, bound: inspect.BoundArguments) -> tuple[list[int], str]:
    args = bound.arguments
    indices, _ = feature_take_indices(len(model.blocks), args.get("indices"))
    return list(indices), args.get("output_fmt", "NCHW")


def checked_forward_intermediates(model: nn.Module, *args, **kwargs):
    """timm's VisionTransformer.forward_intermediates, after checking NCHW is possible (see module doc)."""
    method = type(model).forward_intermediates
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    bound.apply_defaults()
    indices, output_fmt = _requested(model, bound)
    if output_fmt == "NCHW":
        grid = model.patch_embed.num_patches
        short = {i: patches_out(model.blocks[i], grid) for i in indices}
        short = {i: n for i, n in short.items() if n != grid}
        if short:
            full = [i for i in range(len(model.blocks)) if patches_out(model.blocks[i], grid) == grid]
            raise ValueError(
                f"forward_intermediates(output_fmt='NCHW') needs all {grid} patches of the image grid, but "
                f"block(s) {sorted(short)} of this model keep only {[short[i] for i in sorted(short)]} (tokens "
                f"dropped by the plan); use output_fmt='NLC' (each block's kept tokens, in order) or indices "
                f"among the blocks that keep every patch: {full}")
    return method(model, *args, **kwargs)


def install_checked_forward_intermediates(model: nn.Module) -> None:
    """Give `model` (a timm ViT) the checked forward_intermediates; a no-op on timm without the method."""
    if hasattr(type(model), "forward_intermediates"):
        # A partial, not a bound method: it pickles and deep-copies with the model.
        model.forward_intermediates = functools.partial(checked_forward_intermediates, model)
