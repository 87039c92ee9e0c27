"""The seam between the family-agnostic library and a model family (docs/design.md section 8).

A `Family` knows one kind of timm model: it recognises and describes it (an arch record with `family` and
`block_widths()`), builds it again, finds its blocks, makes them searchable, builds the slim model of a plan and
slices the weights into it, and counts what a block costs. Gates, threshold, the plan, the targets, counting,
saving and the command line talk to a model only through its family: adding a family is one module that
subclasses `Family`, its tests, and its line in vitslim.families.FAMILIES.

The cost of a block is one formula (block_macs, its terms block_terms) that the families, the plan targets
(vitslim.planning) and the latency model (vitslim.latency) share.
"""
from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..plan import BlockWidths, SlimPlan


def block_terms(attn_width: int, mlp_width: int, tokens: int, window: int = 0) -> tuple[int, int, int, int]:
    """The terms the cost of a block is made of, for attention width W (summed over heads), M MLP units, T tokens
    and S keys per query (the window's tokens, or all T when window is 0): (T, T*W, T*M, T*S*W). Its MACs are
    block_macs; vitslim.latency fits one time per term."""
    keys = window or tokens
    return tokens, tokens * attn_width, tokens * mlp_width, tokens * keys * attn_width


def block_macs(embed_dim: int, attn_width: int, mlp_width: int, tokens: int, window: int = 0) -> int:
    """MACs of one block of embedding width C: qkv (3WC), proj (WC), fc1 and fc2 (2MC) per token, and q @ k^T and
    attn @ v (2 S W per token, S keys per query): T * (4WC + 2MC) + 2 T S W. The one cost formula (module doc)."""
    _, tw, tm, tsw = block_terms(attn_width, mlp_width, tokens, window)
    return embed_dim * (4 * tw + 2 * tm) + 2 * tsw


def qkv_rows(plan_heads: tuple[tuple[int, ...], ...], head_dim: int) -> tuple[list[int], list[int]]:
    """Rows of a dense qkv weight (q, k, v heads packed) kept for q, k, v, in that order, and the proj columns
    kept, for a plan's kept dims of every head."""
    H = len(plan_heads)
    cols = [h * head_dim + j for h, dims in enumerate(plan_heads) for j in dims]
    rows = [part * H * head_dim + c for part in range(3) for c in cols]
    return rows, cols


class ArchRecord:
    """What a family's arch dataclass shares: to_dict, and from_dict of it (a saved model's config: unknown settings
    refused, JSON lists made tuples again, nested ones too)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; accepted: {sorted(names)}")

        def tuples(value):
            return tuple(tuples(v) for v in value) if isinstance(value, list) else value
        return cls(**{k: tuples(v) for k, v in d.items()})


def dropout_p(module: nn.Module) -> float:
    """The rate of a dropout layer (0 for anything else: nn.Identity)."""
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


def set_pretrained_cfg(model: nn.Module, cfg: dict | None) -> None:
    """Give `model` timm's pretrained_cfg (and its old alias default_cfg): input size, mean/std, crop,
    interpolation, ... so timm.data.resolve_data_config(model=model) preprocesses as for the dense model."""
    if cfg is None:
        return
    model.pretrained_cfg = copy.deepcopy(dict(cfg))
    model.default_cfg = model.pretrained_cfg


class Family(ABC):
    """One kind of model behind the seam (module docstring). `arch` below is the family's description of a
    model: a frozen record with `family` (this family's name), `block_widths()`, `to_dict()`."""

    name: str        # what plans and saved models record
    supported: str   # the models it takes, for the error that names what vitslim supports
    attention_op = "vitslim::ragged_attention_fwd"  # the op a fused slim model's exported graph holds per block
    # The family's own retrain recipe on real data, where it differs from DeiT's (the flags' defaults otherwise).
    retrain_recipe: dict = {}

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether `model` (dense, searchable or slim) is of this family, before any check of its features."""

    @abstractmethod
    def describe(self, model: nn.Module):
        """Check every feature vitslim relies on and return the arch; UnsupportedModelError names the first
        unsupported one. Accepts dense and searchable models (a slim model carries its arch as slim_arch)."""

    @abstractmethod
    def arch_from_dict(self, d: dict):
        """The arch from its to_dict() (a saved model's config), every field checked."""

    @abstractmethod
    def build(self, arch) -> nn.Module:
        """A dense timm model shaped like `arch`, weights uninitialised, on the default device."""

    def build_meta(self, arch) -> nn.Module:
        """`build(arch)` on the meta device: the structure alone, for counting (no memory, no time)."""
        with torch.device("meta"):
            return self.build(arch)

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's blocks in forward order: those a plan has one entry for."""

    @abstractmethod
    def make_searchable(self, model: nn.Module, arch, search: str, implementation: str) -> None:
        """Replace every block by its searchable block (gates; the same state-dict names), in place."""

    @abstractmethod
    def build_slim(self, arch, plan: SlimPlan, token_scale: bool) -> nn.Module:
        """The slim model of `plan` (checked to fit `arch`), weights uninitialised; it carries slim_plan and
        slim_arch. token_scale: its blocks scale their kept patch tokens (fold_gates=True)."""

    @abstractmethod
    def slim_state_dict(self, model: nn.Module, plan: SlimPlan, gates: list | None, fold_gates: bool
                        ) -> dict[str, torch.Tensor]:
        """The slim model's weights, sliced from `model` (dense or searchable; `gates`: its BlockGates per
        block, None for a dense model); fold_gates multiplies the kept gate values in (docs/design.md section 4)."""

    @abstractmethod
    def count_macs(self, model: nn.Module) -> int:
        """Multiply-accumulates of one image's forward pass (dense, searchable or slim): the blocks' block_cost
        on the tokens each holds, and what lies outside the blocks."""

    def block_cost(self, widths: BlockWidths, attn_width: int, mlp_width: int, tokens: int) -> int:
        """MACs of one block of these dense widths keeping attn_width, mlp_width and `tokens` tokens."""
        return block_macs(widths.embed_dim, attn_width, mlp_width, tokens, widths.window)

    def block_params(self, arch, widths: BlockWidths, attn_width: int, mlp_width: int, heads: int) -> int:
        """Parameters of one slim block keeping attn_width dims over `heads` heads with any dim and mlp_width
        units, counting only what the plan changes (the rest of the model is the dense one's): the qkv rows (and
        their biases when arch.qkv_bias), the proj columns, fc1's rows and biases, fc2's columns."""
        C = widths.embed_dim
        return 4 * attn_width * C + 2 * mlp_width * C + (3 * attn_width if arch.qkv_bias else 0) + mlp_width

    def resize_refusal(self, model: nn.Module) -> str | None:
        """Why this slim model cannot take another image size, or None when it can."""
        return f"{self.name} slim models keep the image size of their plan"


def activation_name(act: nn.Module) -> str:
    """"gelu" or "gelu_tanh" for an MLP's activation module; UnsupportedModelError for any other."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    name = type(act).__name__
    if name in ("GELU", "GELUTanh"):  # timm's own GELU modules
        return "gelu" if name == "GELU" else "gelu_tanh"
    raise UnsupportedModelError(f"unsupported MLP activation {name}; vitslim supports GELU (exact or tanh)")
