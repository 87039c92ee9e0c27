"""vitslim_kernels: the ops behind vitslim (reference, Triton, CUDA), with dispatch.

Knows nothing about timm or training. Importing it touches no GPU and imports neither Triton nor the
compiled extension; those load when an op first needs them.
"""
from .dispatch import KernelFallbackWarning, clear_kernel_failures, explain, kernel_failures, select
from .ops.gated_branches import (gated_attention_branch, gated_attention_branch_ref, gated_mlp_branch,
                                 gated_mlp_branch_ref)
from .ops.gated_linear import gated_gelu_linear, gated_gelu_linear_ref, gated_linear, gated_linear_ref
from .ops.layernorm_token_scale import layernorm_token_scale, layernorm_token_scale_ref
from .ops.ragged_attention import ragged_attention, ragged_attention_ref

__all__ = ["ragged_attention", "ragged_attention_ref", "explain", "select", "KernelFallbackWarning",
           "kernel_failures", "clear_kernel_failures",
           "layernorm_token_scale", "layernorm_token_scale_ref", "gated_linear", "gated_linear_ref",
           "gated_gelu_linear", "gated_gelu_linear_ref", "gated_attention_branch", "gated_attention_branch_ref",
           "gated_mlp_branch", "gated_mlp_branch_ref"]
__version__ = "0.1.0"
