"""Launcher of the CUDA C++ ragged-attention forward (csrc/kernels/ragged_attention_fwd.cuh).

`_fwd(q, k, v, head_dims, scale) -> o`: q, k, v (B, N, sum(head_dims)), any strides (views of one (B, N, 3D) qkv
tensor are fine); o (B, N, D), contiguous. Forward only, for inference. The op that calls it
(vitslim::ragged_attention_fwd_cuda), its checks, refusal rules and fallback are in ops/ragged_attention.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ..runtime import alloc as _alloc
from ..runtime import fail_safe


@fail_safe("ragged_attention_fwd_cuda")  # its fallback: ops/ragged_attention.py registers it
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float
         ) -> torch.Tensor:
    out = _alloc(q.shape, q)
    _ext.load().ragged_attention_fwd(q, k, v, out, [int(w) for w in head_dims], float(scale))
    return out
