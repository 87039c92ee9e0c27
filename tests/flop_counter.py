"""torch's own FLOP count of a forward pass, pinned to a path every supported torch version counts the same.

torch.utils.flop_counter knows some attention kernels and not others, and which one F.scaled_dot_product_attention
picks on the CPU changes between torch versions (seen: torch 2.11 and 2.14 run float64 SDPA through a kernel the
counter does not count, so the attention matmuls vanish from the total). The math backend decomposes SDPA into
bmm/matmul, which every version counts, so the comparison with vitslim.count_flops checks our formula, not the
counter's coverage.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def torch_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-accumulate) torch counts for model(x), attention through SDPA's math backend."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()
