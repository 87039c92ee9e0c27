"""vitslim: Vision Transformer Slimming (ViT-Slim, CVPR 2022) that really removes what it prunes.

search -> threshold (budgets, or plan_for: a FLOPs or parameter target, aligned widths) -> slim on timm
Vision Transformers (the model families of vitslim.families). The README documents the semantics.
"""
from .errors import UnsupportedModelError
from .families.vit import SearchableBlock, SlimBlock, ViTArch
from .counting import count_flops, count_params
from .saving import SlimFileError, load_slim, save_slim
from .gates import BlockGates, gates, sparsity_losses
from .plan import BlockPlan, BlockWidths, PlanMismatchError, SlimPlan
from .searchable import make_searchable, set_implementation
from .layers import SlimAttention, SlimMlp
from .slim import slim
from .cuda_graphs import use_cuda_graphs
from .threshold import threshold
from .planning import Alignment, TargetError, align_plan, plan_for
from . import latency
from .token_drop import drop_tokens

__all__ = [
    "make_searchable", "gates", "sparsity_losses", "threshold", "slim", "count_params", "count_flops",
    "save_slim", "load_slim", "set_implementation", "SlimPlan", "BlockPlan", "BlockWidths", "BlockGates",
    "SearchableBlock", "SlimAttention", "SlimBlock", "SlimMlp", "ViTArch", "UnsupportedModelError", "PlanMismatchError",
    "SlimFileError", "use_cuda_graphs", "plan_for", "align_plan", "Alignment", "TargetError",
]
__version__ = "0.1.0"
