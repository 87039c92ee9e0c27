"""vitslim_kernels: the ops behind vitslim (reference, Triton, CUDA), with dispatch.

Knows nothing about timm or training. Importing it touches no GPU and loads no kernel; each op is defined, with
its CPU implementation, in ops/<op>.py, which registers its implementations with dispatch. Defining the ops
imports triton where it is installed (ops/_library.py says why): set TRITON_INTERPRET before importing this.
The compiled extension loads when its kernel first runs.
"""
from .dispatch import explain, select
from .ops.gated_branches import (gated_attention_branch, gated_attention_branch_ref, gated_mlp_branch,
                                 gated_mlp_branch_ref)
from .ops.gated_linear import gated_gelu_linear, gated_gelu_linear_ref, gated_linear, gated_linear_ref
from .ops.layernorm_token_scale import layernorm_token_scale, layernorm_token_scale_ref
from .ops.qkv_attention import qkv_attention, qkv_attention_ref
from .ops.ragged_attention import ragged_attention, ragged_attention_ref
from .ops.window_attention import (window_attention, window_attention_ref, window_qkv_attention,
                                    window_qkv_attention_ref)
from .runtime import KernelFallbackWarning, clear_kernel_failures, kernel_failures

__all__ = ["ragged_attention", "ragged_attention_ref", "explain", "select", "KernelFallbackWarning",
           "kernel_failures", "clear_kernel_failures",
           "layernorm_token_scale", "layernorm_token_scale_ref", "gated_linear", "gated_linear_ref",
           "gated_gelu_linear", "gated_gelu_linear_ref", "gated_attention_branch", "gated_attention_branch_ref",
           "gated_mlp_branch", "gated_mlp_branch_ref", "qkv_attention", "qkv_attention_ref",
           "window_attention", "window_attention_ref", "window_qkv_attention", "window_qkv_attention_ref"]
__version__ = "0.1.0"
