"""Model families behind one seam (docs/design.md section 8): the registry.

`family_of(model)` finds the family of a timm model (dense, searchable or slim), `family_named(name)` the family a
plan or a saved model names. The seam itself (`Family`, `BlockWidths`, the cost formula) is in
vitslim.families.base; each family is one module: vitslim.families.vit and vitslim.families.swin.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Family, block_macs, block_terms
from .swin import SWIN
from .vit import VIT

FAMILIES: dict[str, Family] = {family.name: family for family in (VIT, SWIN)}

__all__ = ["FAMILIES", "Family", "block_macs", "block_terms", "family_named", "family_of"]


def family_of(model: nn.Module) -> Family:
    """The family of `model` (of the model a torch.compile wrapper holds); UnsupportedModelError naming what vitslim
    supports when none takes it."""
    model = getattr(model, "_orig_mod", model)
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    supported = "; ".join(family.supported for family in FAMILIES.values())
    raise UnsupportedModelError(f"vitslim supports {supported}; got {type(model).__name__}")


def family_named(name: str) -> Family:
    """The family called `name` (as a plan or a saved model records it)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; accepted: {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[name]
