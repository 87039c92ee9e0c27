"""The search model: every block of a supported model with gates on its head dims, MLP units and patch tokens.

`make_searchable` asks the model's family (vitslim.families) to replace each block, in place, by its searchable
block: the block's own submodules under their own state-dict names, plus `gates` (a BlockGates). Three
implementations compute the function of docs/design.md section 2 (vitslim.implementations):

- "eager": the paper's way. Gates multiply the activations, attention is an explicit softmax. This is the
  "unfused masks" baseline of the benchmarks.
- "folded" (default): the attention gate is folded into the qkv rows and bias, the MLP gate into the fc2
  columns (exact: a gate scales a row/column of a linear map), then `F.scaled_dot_product_attention`.
  Gate gradients come from the weight gradients through autograd at O(C^2) cost.
- "fused": the Triton kernels of vitslim_kernels where available (else "folded", with a warning saying why).

Token dropping (vitslim.drop_tokens): `token_alive` marks the patches still present in a block. As in the
slim model (docs/design.md section 4), a block first gathers its kept tokens from its input (`gather_index`,
derived from its own and the previous block's `token_alive` by `sync_token_inputs`); dropped tokens are
gone, and the token gate scales only the surviving patches.
"""
from __future__ import annotations

from torch import nn

from .families import family_of
from .gates import BlockGates
from .implementations import SEARCHABLE as IMPLEMENTATIONS
from .implementations import chosen
from .plan import check_search_mode


def searchable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that carry gates, in forward order (none for a model that is not searchable)."""
    return [m for m in model.modules() if isinstance(getattr(m, "gates", None), BlockGates)]


def is_searchable(model: nn.Module) -> bool:
    return len(searchable_blocks(model)) > 0


def sync_token_inputs(model: nn.Module) -> None:
    """Re-derive every block's token gather from the blocks' token_alive (after dropping or loading)."""
    previous = None
    for block in searchable_blocks(model):
        if hasattr(block, "token_alive"):
            block.set_token_input(previous)
            previous = block.token_alive


def _sync_token_inputs_after_load(model: nn.Module, incompatible_keys) -> None:
    sync_token_inputs(model)  # gather_index is not saved (like SlimBlock's): derive it from token_alive


def make_searchable(model: nn.Module, search: str = "dims", fused: bool = False, *,
                    implementation: str | None = None) -> nn.Module:
    """Put gates on every block of a supported timm model, in place; returns the model.

    search: "dims" (one gate per head dim, the paper's default), "heads" (one per head) or "uniform"
    (one per dim, shared by all heads of a block). implementation: "eager", "folded" (default) or "fused" (the
    fused kernels where available; fused=True says the same), see vitslim.implementations.
    """
    check_search_mode(search)
    implementation = chosen(implementation, fused, IMPLEMENTATIONS, "folded")
    if is_searchable(model):
        raise ValueError("model is already searchable (it has gates); build it from a plain timm model")
    family = family_of(model)
    family.make_searchable(model, family.describe(model), search, implementation)
    model.register_load_state_dict_post_hook(_sync_token_inputs_after_load)
    return model


def set_implementation(model: nn.Module, implementation: str) -> nn.Module:
    """Choose how a searchable model computes its blocks: "eager", "folded" or "fused"."""
    blocks = searchable_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not searchable: call vitslim.make_searchable(model) first")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
                         f"got {implementation!r}")
    for block in blocks:  # the block itself (ViT) or its gated layers (Swin) hold the setting
        for module in block.modules():
            if hasattr(module, "implementation"):
                module.implementation = implementation
    return model


def search_mode(model: nn.Module) -> str:
    blocks = searchable_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not searchable: call vitslim.make_searchable(model) first")
    return blocks[0].gates.search


def describe_searchable(model: nn.Module):
    """The model's arch, from its family (vitslim.families): dense or searchable blocks alike."""
    return family_of(model).describe(model)
