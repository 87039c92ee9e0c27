"""A straightforward implementation of docs/design.md section 2, written from the text, independent of vitslim.

It reads the weights of a timm ViT (plain or searchable: the block submodules keep timm's names) and
computes the gated forward with explicit tensors, optionally removing tokens before each block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _layer_scale(module, t):
    return t * module.gamma if hasattr(module, "gamma") else t


def _act(mlp, t):
    tanh = getattr(mlp.act, "approximate", "none") == "tanh" or type(mlp.act).__name__ == "GELUTanh"
    approximate = "tanh" if tanh else "none"
    return F.gelu(t, approximate=approximate)


def reference_forward(model, images, attn_gates, mlp_gates, token_raw, kept_tokens=None):
    """Gated ViT forward.

    attn_gates[l]: broadcastable to (H, d); mlp_gates[l]: (M,); token_raw[l]: (P,) raw token gates
    (scale = tanh(raw)); kept_tokens[l]: sorted patch indices kept in block l (None: keep all).
    Returns the model's head output.
    """
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    R = model.num_prefix_tokens
    current = list(range(x.shape[1] - R))  # patch indices present in the sequence
    for l, blk in enumerate(model.blocks):
        if kept_tokens is not None:
            keep = list(kept_tokens[l])
            positions = list(range(R)) + [R + current.index(p) for p in keep]
            x = x[:, positions]
            current = keep
        B, N, C = x.shape
        H, d = blk.attn.num_heads, blk.attn.head_dim
        tok = torch.tanh(token_raw[l][current])
        s = torch.cat([torch.ones(R, dtype=x.dtype), tok.to(x.dtype)]).view(1, N, 1)
        u = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps) * s
        qkv = u @ blk.attn.qkv.weight.T
        if blk.attn.qkv.bias is not None:
            qkv = qkv + blk.attn.qkv.bias
        g = attn_gates[l].expand(H, d).reshape(1, H, 1, d)
        q, k, v = (qkv[..., i * H * d:(i + 1) * H * d].reshape(B, N, H, d).transpose(1, 2) * g
                   for i in range(3))
        probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
        o = (probs @ v).transpose(1, 2).reshape(B, N, H * d) @ blk.attn.proj.weight.T
        if blk.attn.proj.bias is not None:
            o = o + blk.attn.proj.bias
        x = x + _layer_scale(blk.ls1, o)
        w = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps) * s
        h = _act(blk.mlp, w @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) * mlp_gates[l]
        x = x + _layer_scale(blk.ls2, h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
    x = model.norm(x)
    return model.forward_head(x)


def plan_gates(plan, gates=None, fold=True):
    """Gate tensors that implement a plan on the search model.

    Pruned entries are 0. Kept entries keep their value (fold=True) or become 1 (fold=False); kept token
    gates keep their raw value (fold=True) or become +inf, i.e. scale 1 (fold=False).
    Returns (attn_gates, mlp_gates, token_raw, kept_tokens).
    """
    attn, mlp, tok, kept = [], [], [], []
    for l, b in enumerate(plan.blocks):
        a = torch.zeros(plan.num_heads, plan.head_dim, dtype=torch.float64)
        for h, dims in enumerate(b.heads):
            a[h, list(dims)] = 1.0
        m = torch.zeros(plan.mlp_hidden, dtype=torch.float64)
        m[list(b.mlp)] = 1.0
        t = torch.full((plan.num_patches,), float("inf"), dtype=torch.float64)
        if fold and gates is not None:
            a = a * gates[l].attn.detach().expand(plan.num_heads, plan.head_dim)
            m = m * gates[l].mlp.detach()
            t = gates[l].tokens.detach().clone()
        attn.append(a)
        mlp.append(m)
        tok.append(t)
        kept.append(list(b.tokens))
    return attn, mlp, tok, kept
