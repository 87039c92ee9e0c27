"""Gates -> SlimPlan for chosen budgets (docs/design.md section 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from .errors import UserError
from .plan import BlockPlan, SlimPlan, has_token_gates
from .searchable import describe_searchable, search_mode, searchable_blocks


def check_budget(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def global_keep(importances: list[torch.Tensor], budget: float,
                eligible: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Rank all entries of all blocks together; keep those with importance >= the budget's threshold.

    thr = sorted(importance)[floor((1 - budget) * n)], so budget 1.0 keeps everything.
    eligible: bool masks like `importances` (dropped tokens are False): an ineligible entry counts as
    importance 0 in the ranking (n still counts every slot, so the budget stays a fraction of all of them)
    and is never kept.
    """
    if eligible is not None:
        importances = [imp.masked_fill(~ok, 0.0) for imp, ok in zip(importances, eligible)]
    flat = torch.cat([imp.reshape(-1) for imp in importances])
    if flat.numel() == 0:  # no gate of this kind (Swin's tokens): nothing to keep or drop
        return [torch.zeros_like(imp, dtype=torch.bool) for imp in importances]
    # min(): for budgets below float64 resolution, 1 - budget rounds to 1.0 and the index to n.
    index = min(math.floor((1.0 - budget) * flat.numel()), flat.numel() - 1)
    thr = flat.sort().values[index]
    keep = [imp >= thr for imp in importances]
    return keep if eligible is None else [k & ok for k, ok in zip(keep, eligible)]


@dataclass
class GateRanking:
    """What thresholding ranks, read once from a searchable model: float64 magnitudes on the CPU."""

    attn: list[torch.Tensor]     # per block |attn|, like the gate: (H, d) dims, (H, 1) heads, (1, d) uniform
    mlp: list[torch.Tensor]      # per block |mlp|, (M,)
    tokens: list[torch.Tensor]   # per block |tanh(tokens)|, (P,)
    alive: list[torch.Tensor]    # per block, bool (P,): not dropped during the search
    arch: object                 # the model's arch, from its family (vitslim.families)
    search: str

    def counts(self) -> dict[str, int]:
        """Number of entries of each kind over all blocks (what a budget is a fraction of)."""
        return {"attn": sum(t.numel() for t in self.attn), "mlp": sum(t.numel() for t in self.mlp),
                "tokens": sum(t.numel() for t in self.tokens)}


def _token_alive(block: nn.Module) -> torch.Tensor:
    """The block's patches not dropped during the search: (P,) bool; (0,) for a block without token gates."""
    alive = getattr(block, "token_alive", None)
    if alive is None:
        return torch.ones(block.gates.tokens.shape[0], dtype=torch.bool)
    return alive.detach().cpu()


@torch.no_grad()
def gate_ranking(model: nn.Module) -> GateRanking:
    blocks = searchable_blocks(model)
    search = search_mode(model)
    gates = [b.gates for b in blocks]
    cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731 - ranking is done once, exactly
    return GateRanking(attn=[cpu(g.attn).abs() for g in gates], mlp=[cpu(g.mlp).abs() for g in gates],
                       tokens=[cpu(g.tokens).tanh().abs() for g in gates],
                       alive=[_token_alive(b) for b in blocks], arch=describe_searchable(model),
                       search=search)


def keep_masks(ranking: GateRanking, budgets: dict[str, float]) -> dict[str, list[torch.Tensor]]:
    """The kept entries for budgets {"attn", "mlp", "tokens"}: bool masks like the ranking's tensors."""
    keep_tok = global_keep(ranking.tokens, budgets["tokens"], eligible=ranking.alive)
    for keep, imp, ok, w in zip(keep_tok, ranking.tokens, ranking.alive, ranking.arch.block_widths()):
        # No prefix token: an empty sequence would have nothing to pool.
        if w.num_prefix_tokens == 0 and not keep.any() and ok.any():
            keep[imp.masked_fill(~ok, -1.0).argmax()] = True
    for i in range(len(keep_tok) - 2, -1, -1):  # monotone: deeper keeps imply shallower keeps
        keep_tok[i] = keep_tok[i] | keep_tok[i + 1]
    return {"attn": global_keep(ranking.attn, budgets["attn"]), "mlp": global_keep(ranking.mlp, budgets["mlp"]),
            "tokens": keep_tok}


def plan_from_masks(ranking: GateRanking, masks: dict[str, list[torch.Tensor]], budgets: dict,
                    **extra) -> SlimPlan:
    arch = ranking.arch
    widths = arch.block_widths()
    plans = []
    for w, ka, km, kt in zip(widths, masks["attn"], masks["mlp"], masks["tokens"]):
        H, d = w.num_heads, w.head_dim
        per_dim = ka.expand(H, d)  # heads: (H, 1) -> whole heads; uniform: (1, d) -> same dims in all heads
        heads = tuple(tuple(torch.nonzero(per_dim[h]).flatten().tolist()) for h in range(H))
        tokens = tuple(torch.nonzero(kt).flatten().tolist()) if "tokens" in w.gates else ()
        plans.append(BlockPlan(heads=heads, mlp=tuple(torch.nonzero(km).flatten().tolist()), tokens=tokens))
    return SlimPlan(embed_dim=None, num_heads=None, head_dim=None, mlp_hidden=None, num_prefix_tokens=None,
                    num_patches=None, search=ranking.search, budgets=budgets, blocks=tuple(plans), family=arch.family,
                    widths=widths, **extra)


DEFAULT_BUDGET = 0.7


def check_budgets(budget_attn, budget_mlp, budget_tokens, arch=None) -> dict[str, float]:
    """The three budgets checked. budget_tokens None: DEFAULT_BUDGET where the model (its arch) has token gates, 1.0
    (everything) where it has none; a token budget below 1 for a model without token gates is an error."""
    token_gates = arch is None or has_token_gates(arch.block_widths())
    if budget_tokens is None:
        budget_tokens = DEFAULT_BUDGET if token_gates else 1.0
    budgets = {"attn": check_budget("budget_attn", budget_attn), "mlp": check_budget("budget_mlp", budget_mlp),
               "tokens": check_budget("budget_tokens", budget_tokens)}
    if not token_gates and budgets["tokens"] < 1.0:
        raise UserError(f"budget_tokens={budget_tokens!r}: {arch.family} models have no token gates (windows and "
                         "patch merging need the whole grid); leave it unset or give 1.0")
    return budgets


@torch.no_grad()
def threshold(model: nn.Module, budget_attn: float = DEFAULT_BUDGET, budget_mlp: float = DEFAULT_BUDGET,
              budget_tokens: float | None = None) -> SlimPlan:
    """The plan keeping the given fraction of attention entries, MLP units and patch tokens.

    budget_tokens unset: 0.7 for a model with token gates (ViT), 1.0 for one without (Swin, where a smaller token
    budget is refused).

    Each kind is ranked over all blocks by gate magnitude (|attn|, |mlp|, |tanh(tokens)|). Tokens dropped
    during the search (vitslim.drop_tokens) rank as importance 0 and are never kept; budget_tokens stays
    a fraction of all patch slots. Kept tokens are then made monotone: a patch kept by a deeper block is
    kept by every shallower one (where it is alive too, since dropping is monotone). A model without prefix
    tokens keeps at least its strongest patch in every block.
    """
    ranking = gate_ranking(model)
    budgets = check_budgets(budget_attn, budget_mlp, budget_tokens, ranking.arch)
    return plan_from_masks(ranking, keep_masks(ranking, budgets), budgets)
