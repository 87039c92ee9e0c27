"""The search model: timm blocks with gates on every head dim, MLP unit and patch token.

Each timm `Block` is replaced in place by a `SearchableBlock` that keeps the block's own submodules
(same state-dict names) and adds `gates`. Two plain-PyTorch implementations compute the function of
docs/design.md section 2:

- "eager": the paper's way. Gates multiply the activations, attention is an explicit softmax. This is the
  "unfused masks" baseline of the benchmarks.
- "folded" (default): the attention gate is folded into the qkv rows and bias, the MLP gate into the fc2
  columns (exact: a gate scales a row/column of a linear map), then `F.scaled_dot_product_attention`.
  Gate gradients come from the weight gradients through autograd at O(C^2) cost.

"fused" selects the Triton kernels of vitslim_kernels where available.

Token dropping (vitslim.drop_tokens): `token_alive` marks the patches still present in a block. As in the
slim model (docs/design.md section 4), a block first gathers its kept tokens from its input (`gather_index`,
derived from its own and the previous block's `token_alive` by `sync_token_inputs`); dropped tokens are
gone, and the token gate scales only the surviving patches.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from vitslim_kernels import gated_attention_branch, gated_mlp_branch, layernorm_token_scale
from vitslim_kernels.runtime import triton_unavailable

from .arch import activation_name, describe
from .gates import BlockGates
from .plan import check_search_mode
from .implementations import SEARCHABLE as IMPLEMENTATIONS
from .implementations import chosen
from .intermediates import install_checked_forward_intermediates



class SearchableBlock(nn.Module):
    """A timm pre-norm ViT block with search gates. Input (B, N_in, C) -> output (B, R + kept patches, C).

    N_in = R + P until tokens are dropped; then R + the patches alive in the previous block.
    token_alive: (P,) bool, saved; the patches present in this block.
    gather_index: positions of this block's tokens in its input sequence (None: the same tokens).
    kept_patches: absolute indices of the patches present (None: all P), to index the token gate.
    """

    def __init__(self, block: nn.Module, search: str, num_prefix_tokens: int, num_patches: int,
                 implementation: str = "folded") -> None:
        super().__init__()
        # The block's own modules, under timm's names, so checkpoints load either way.
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.num_prefix_tokens, self.num_patches = num_prefix_tokens, num_patches
        weight = self.attn.qkv.weight
        self.gates = BlockGates(search, self.attn.num_heads, self.attn.head_dim, self.mlp.fc1.out_features,
                                num_patches, device=weight.device, dtype=weight.dtype)
        self.implementation = implementation
        # Fixed shape (P,) so that a checkpoint loads whatever was dropped; the rest is derived from it.
        self.register_buffer("token_alive", torch.ones(num_patches, dtype=torch.bool, device=weight.device))
        self.register_buffer("gather_index", None, persistent=False)
        self.register_buffer("kept_patches", None, persistent=False)
        self.input_tokens = num_prefix_tokens + num_patches
        self._token_input_stale = False  # token_alive loaded without the model's hook re-deriving the rest

    @torch.no_grad()
    def set_token_input(self, input_alive: torch.Tensor | None) -> None:
        """Derive gather_index, kept_patches and the input length from token_alive.

        input_alive: (P,) bool, the patches present in this block's input (the previous block's
        token_alive); None for the first block (all patches).
        """
        alive = self.token_alive
        present = torch.ones_like(alive) if input_alive is None else input_alive.to(alive.device)
        revived = alive & ~present
        if revived.any():
            raise ValueError(f"token_alive keeps patches {torch.nonzero(revived).flatten().tolist()} that are "
                             f"not in this block's input: a dropped token never returns")
        R = self.num_prefix_tokens
        self.kept_patches = None if alive.all() else torch.nonzero(alive).flatten()
        if torch.equal(alive, present):
            self.gather_index = None
        else:
            position = torch.cumsum(present.long(), 0) - 1  # of each present patch among the input's patches
            prefix = torch.arange(R, dtype=torch.long, device=alive.device)
            self.gather_index = torch.cat([prefix, R + position[alive]])
        self.input_tokens = R + int(present.sum())
        self._token_input_stale = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "token_alive"
        saved = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not saved and key in missing_keys:  # a checkpoint from before token dropping: nothing dropped
            missing_keys.remove(key)
            with torch.no_grad():
                self.token_alive.fill_(True)
        self._token_input_stale = True  # cleared by sync_token_inputs (the model's load hook)

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
                             f"got {value!r}")
        self._implementation = value

    def _sequence_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """Per-position scale of the normalised input: 1 for prefix tokens, tanh(gate) for patches. (N, 1)."""
        tok = self.gates.token_scale()
        if self.kept_patches is not None:
            tok = tok.index_select(0, self.kept_patches)  # the gates of the surviving patches
        ones = tok.new_ones(self.num_prefix_tokens)
        return torch.cat([ones, tok]).to(dtype).unsqueeze(-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("searchable blocks take no attention mask (ViT self-attention is unmasked)")
        if self._token_input_stale:
            raise RuntimeError("token_alive was loaded into a block without its model: call "
                               "vitslim.searchable.sync_token_inputs(model) (model.load_state_dict does it)")
        expected = self.input_tokens
        if x.dim() != 3 or x.shape[1] != expected:
            raise ValueError(f"expected input (B, {expected}, C) for {self.num_prefix_tokens} prefix and "
                             f"{expected - self.num_prefix_tokens} patch tokens, got {tuple(x.shape)}")
        if self.gather_index is not None:
            x = x.index_select(1, self.gather_index)  # dropped tokens are gone: the same positions for every image
        impl = self.implementation
        if impl == "fused":
            why_not = self._fused_unavailable(x)
            if why_not is None:
                return self._forward_fused(x)
            impl = _fused_fallback(why_not)
        scale = self._sequence_scale(x.dtype)
        attn_fn, mlp_fn = (self._attn_eager, self._mlp_eager) if impl == "eager" else \
                          (self._attn_folded, self._mlp_folded)
        x = x + self.drop_path1(self.ls1(attn_fn(self.norm1(x) * scale)))
        x = x + self.drop_path2(self.ls2(mlp_fn(self.norm2(x) * scale)))
        return x

    # -- fused path: the Triton kernels of vitslim_kernels ---------------------------------------------------
    def _fused_unavailable(self, x: torch.Tensor) -> str | None:
        if self.training and any(p > 0 for p in (self.attn.attn_drop.p, self.attn.proj_drop.p,
                                                  self.mlp.drop1.p, self.mlp.drop2.p)):
            return "the fused kernels have no dropout (attn_drop/proj_drop/mlp drop > 0)"
        return triton_unavailable(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp, R = self.attn, self.mlp, self.num_prefix_tokens
        tok = self.gates.tokens if self.kept_patches is None else self.gates.tokens.index_select(0, self.kept_patches)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        u = layernorm_token_scale(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, tok, R, out_dtype=out_dtype)
        a = gated_attention_branch(u, attn.qkv.weight, attn.qkv.bias, self.gates.attn_per_dim(), attn.proj.weight,
                                   attn.proj.bias, attn.num_heads, attn.scale)
        x = x + self.drop_path1(self.ls1(a))
        w = layernorm_token_scale(x, self.norm2.weight, self.norm2.bias, self.norm2.eps, tok, R, out_dtype=out_dtype)
        m = gated_mlp_branch(w, mlp.fc1.weight, mlp.fc1.bias, self.gates.mlp, mlp.fc2.weight, mlp.fc2.bias,
                             approximate="tanh" if activation_name(mlp.act) == "gelu_tanh" else "none")
        return x + self.drop_path2(self.ls2(m))

    # -- paper-style eager path: masks multiplied into activations, explicit softmax --------------------
    def _attn_eager(self, u: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        B, N, _ = u.shape
        H, d = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(u).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        g = self.gates.attn_per_dim().to(u.dtype).view(1, H, 1, d)
        q, k, v = q * g, k * g, v * g
        scores = (q * attn.scale) @ k.transpose(-2, -1)  # scale is d_original ** -0.5
        probs = attn.attn_drop(scores.softmax(dim=-1))
        o = (probs @ v).transpose(1, 2).reshape(B, N, H * d)
        return attn.proj_drop(attn.proj(o))

    def _mlp_eager(self, w: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        h = mlp.drop1(mlp.act(mlp.fc1(w))) * self.gates.mlp.to(w.dtype)
        return mlp.drop2(mlp.fc2(mlp.norm(h)))

    # -- folded path: gates inside the weights, SDPA -------------------------------------------------------
    def folded_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """qkv weight (3Hd, C) and bias (3Hd,) with the attention gate multiplied into the rows."""
        qkv = self.attn.qkv
        rows = self.gates.attn_per_dim().reshape(-1).repeat(3)  # the same gate on q, k and v
        bias = qkv.bias * rows if qkv.bias is not None else None
        return qkv.weight * rows.unsqueeze(1), bias

    def folded_fc2(self) -> torch.Tensor:
        """fc2 weight (C, M) with the MLP gate multiplied into the columns."""
        return self.mlp.fc2.weight * self.gates.mlp.unsqueeze(0)

    def _attn_folded(self, u: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        B, N, _ = u.shape
        H, d = attn.num_heads, attn.head_dim
        weight, bias = self.folded_qkv()
        q, k, v = F.linear(u, weight, bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0,
                                           scale=attn.scale)
        return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, N, H * d)))

    def _mlp_folded(self, w: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        h = mlp.drop1(mlp.act(mlp.fc1(w)))
        return mlp.drop2(F.linear(h, self.folded_fc2(), mlp.fc2.bias))

    def extra_repr(self) -> str:
        kept = self.num_patches if self.kept_patches is None else self.kept_patches.numel()
        return (f"implementation={self.implementation!r}, prefix_tokens={self.num_prefix_tokens}, "
                f"patches={self.num_patches}" + (f", alive_patches={kept}" if kept != self.num_patches else ""))


_fused_warnings: set[str] = set()


def _fused_fallback(reason: str) -> str:
    """"fused" asked but the kernels cannot run: say why once, and compute the same function with "folded"."""
    if reason not in _fused_warnings:
        warnings.warn(f"fused search kernels not used ({reason}); using the folded PyTorch path (same function)",
                      stacklevel=3)
        _fused_warnings.add(reason)
    return "folded"


def searchable_blocks(model: nn.Module) -> list[SearchableBlock]:
    return [b for b in getattr(model, "blocks", ()) if isinstance(b, SearchableBlock)]


def is_searchable(model: nn.Module) -> bool:
    return len(searchable_blocks(model)) > 0


def sync_token_inputs(model: nn.Module) -> None:
    """Re-derive every block's token gather from the blocks' token_alive (after dropping or loading)."""
    previous = None
    for block in searchable_blocks(model):
        block.set_token_input(previous)
        previous = block.token_alive


def _sync_token_inputs_after_load(model: nn.Module, incompatible_keys) -> None:
    sync_token_inputs(model)  # gather_index is not saved (like SlimBlock's): derive it from token_alive


def make_searchable(model: nn.Module, search: str = "dims", fused: bool = False, *,
                    implementation: str | None = None) -> nn.Module:
    """Put gates on every block of a timm ViT, in place; returns the model.

    search: "dims" (one gate per head dim, the paper's default), "heads" (one per head) or "uniform"
    (one per dim, shared by all heads of a block). implementation: "eager", "folded" (default) or "fused" (the
    fused kernels where available; fused=True says the same), see vitslim.implementations.
    """
    check_search_mode(search)
    implementation = chosen(implementation, fused, IMPLEMENTATIONS, "folded")
    if is_searchable(model):
        raise ValueError("model is already searchable (it has gates); build it from a plain timm model")
    arch = describe(model)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = SearchableBlock(block, search, arch.num_prefix_tokens, arch.num_patches,
                                          implementation).train(block.training)  # a new module starts in train
    model.register_load_state_dict_post_hook(_sync_token_inputs_after_load)
    install_checked_forward_intermediates(model)  # drop_tokens shortens later blocks
    return model


def set_implementation(model: nn.Module, implementation: str) -> nn.Module:
    """Choose how a searchable model computes its blocks: "eager", "folded" or "fused"."""
    blocks = searchable_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not searchable: call vitslim.make_searchable(model) first")
    for block in blocks:
        block.implementation = implementation
    return model


def search_mode(model: nn.Module) -> str:
    blocks = searchable_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not searchable: call vitslim.make_searchable(model) first")
    return blocks[0].gates.search


def describe_searchable(model: nn.Module):
    """describe() that also accepts searchable blocks."""
    return describe(model, block_types=(SearchableBlock,) + _timm_block())


def _timm_block() -> tuple[type, ...]:
    return (Block,)
