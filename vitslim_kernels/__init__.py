"""vitslim_kernels: the ops behind vitslim (reference, Triton, CUDA), with dispatch.

Knows nothing about timm or training. Importing it touches no GPU and imports neither Triton nor the
compiled extension; those load when an op first needs them.
"""
from .dispatch import explain, select
from .ops.ragged_attention import ragged_attention, ragged_attention_ref

__all__ = ["ragged_attention", "ragged_attention_ref", "explain", "select"]
__version__ = "0.1.0"
