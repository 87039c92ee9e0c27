"""The physically smaller model built from a SlimPlan (docs/design.md section 4).

`slim` asks the model's family (vitslim.families) for the slim model of a plan, its blocks built from the layers of
vitslim.layers (ragged heads, each its own width at the original scale; narrower MLPs) and, where the family gates
tokens, a static gather of the kept tokens at the start of a block. No mask remains: every removed weight is gone.
"""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from .cuda_graphs import use_cuda_graphs
from .families import family_of
from .families.base import set_pretrained_cfg
from .implementations import SLIM as SLIM_IMPLEMENTATIONS
from .implementations import chosen
from .layers import SlimAttention
from .plan import SlimPlan
from .searchable import searchable_blocks

__all__ = ["resize_refusal", "set_drop_path", "set_fused", "set_pretrained_cfg", "slim"]


def slim(model: nn.Module, plan: SlimPlan, fold_gates: bool = False, fused: bool = False,
         cuda_graphs: bool = False, *, implementation: str | None = None) -> nn.Module:
    """Build the physically smaller model that `plan` describes, from a searchable (or plain) timm model.

    fold_gates=False: kept gates become 1 (the paper). fold_gates=True: kept attention and MLP gate values
    are multiplied into the weights and kept token scales stay as a per-position scale, so the slim model
    computes what the search model computes with pruned entries zeroed and pruned tokens removed.
    implementation: "fused" (or fused=True): dispatch picks the fastest ragged-attention implementation for the
    device (kernels where available); under torch.export the graph then holds vitslim::ragged_attention_fwd itself
    (see vitslim.deploy.export). "reference" (default) keeps the plain PyTorch reference, in exported graphs too.
    cuda_graphs: replay inference on CUDA inputs (eval, autograd off) from CUDA graphs, one per input shape,
    for small-batch latency (see vitslim.cuda_graphs; call model.forward.reset() after changing weights).
    The search model is left unchanged; the slim model is on its device and dtype, in its train/eval mode,
    and carries its timm pretrained_cfg (so timm.data.resolve_data_config gives the same preprocessing).
    """
    implementation = chosen(implementation, fused, SLIM_IMPLEMENTATIONS, "reference")
    if not isinstance(plan, SlimPlan):
        raise TypeError(f"plan must be a SlimPlan (see vitslim.threshold or SlimPlan.from_dict), "
                        f"got {type(plan).__name__}")
    gates = [block.gates for block in searchable_blocks(model)] or None
    if fold_gates and gates is None:
        raise ValueError("fold_gates=True needs a searchable model (with gates); this model has none")
    family = family_of(model)
    arch = family.describe(model)
    param = next(model.parameters())
    # Cast before loading: loading float64 weights into the float32 skeleton would round them.
    slim_model = family.build_slim(arch, plan, token_scale=fold_gates).to(device=param.device, dtype=param.dtype)
    slim_model.load_state_dict(family.slim_state_dict(model, plan, gates, fold_gates), strict=True)
    set_pretrained_cfg(slim_model, getattr(model, "pretrained_cfg", None))
    slim_model.train(model.training)
    set_fused(slim_model, implementation == "fused")
    return use_cuda_graphs(slim_model) if cuda_graphs else slim_model



def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """fused=True: dispatch picks the ragged-attention kernel per device; False: the PyTorch reference."""
    for module in model.modules():
        if isinstance(module, SlimAttention):
            module.implementation = None if fused else "reference"
    return model


def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth with DeiT's schedule: 0 at the first block, `rate` at the last."""
    blocks = family_of(model).blocks(model)
    for block, r in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


def resize_refusal(model: nn.Module) -> str | None:
    """Why a slim model cannot take another image size (set_input_size), or None when it can."""
    return family_of(model).resize_refusal(model)
