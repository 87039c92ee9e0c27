"""Plans from what a deployer asks for: a FLOPs, parameter or latency target, and hardware-aligned widths.

`plan_for(model, flops=3.1e9)` finds the budgets (attn, mlp, tokens) whose plan is the largest that does not exceed
the target, the three budgets' pruned fractions in a fixed ratio (`mix`). `align_plan(model, plan, Alignment(8, 64))`
rounds every kept head width to a multiple of 8 and every MLP width to a multiple of 64, keeping the
highest-magnitude entries. FLOPs and parameters are analytic (`PlanCost`: what the slim model of a plan has);
latency comes from the device's measured table (vitslim.latency).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from . import latency
from .errors import TargetError
from .counting import count_flops, count_params
from .families import family_named
from .plan import SlimPlan
from .slim import slim
from .threshold import GateRanking, gate_ranking, keep_masks, plan_from_masks

KINDS = ("attn", "mlp", "tokens")
TARGETS = ("flops", "params", "latency_ms")


@dataclass(frozen=True)
class Alignment:
    """Kept head widths a multiple of `head` (0 allowed), MLP widths a multiple of `mlp` (1: no constraint)."""

    head: int = 1
    mlp: int = 1

    def __post_init__(self) -> None:
        for name in ("head", "mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TargetError(f"Alignment.{name} must be a positive integer, got {value!r}")

    def check_divides(self, arch) -> None:
        """TargetError unless the multiples divide every block's head width and MLP width (arch: a family's)."""
        widths = arch.block_widths()
        for head_dim in sorted({w.head_dim for w in widths}):
            if head_dim % self.head:
                raise TargetError(f"--align-heads {self.head} does not divide the head width {head_dim}; "
                                  f"accepted: a divisor of {head_dim}")
        for mlp_hidden in sorted({w.mlp_hidden for w in widths}):
            if mlp_hidden % self.mlp:
                raise TargetError(f"--align-mlp {self.mlp} does not divide the MLP width {mlp_hidden}; "
                                  f"accepted: a divisor of {mlp_hidden}")


class PlanCost:
    """MACs (per image) and parameters of the slim model a plan builds, without building it.

    A block costs what its family says (Family.block_cost: the one formula, vitslim.families.base.block_macs;
    Family.block_params) for the attention width, MLP units and tokens it keeps; everything else (patch embedding,
    norms, output biases, heads) is the dense model's.
    """

    def __init__(self, model: nn.Module, arch) -> None:
        self.arch = arch
        self.family = family_named(arch.family)
        self.widths = arch.block_widths()
        # The dense model the search started from: every token in every block, whatever the search dropped.
        dense = count_flops(self.family.build_meta(arch))
        self.dense = {"flops": dense, "params": count_params(model)}
        full = [(w.attn_width, w.mlp_hidden, w.num_prefix_tokens + w.num_patches, w.num_heads) for w in self.widths]
        self.base = {"flops": dense - self._flops(full), "params": self.dense["params"] - self._params(full)}

    def _flops(self, kept: list[tuple[int, int, int, int]]) -> int:
        return sum(self.family.block_cost(w, width, units, tokens)
                   for w, (width, units, tokens, _) in zip(self.widths, kept))

    def _params(self, kept: list[tuple[int, int, int, int]]) -> int:
        return sum(self.family.block_params(self.arch, w, width, units, heads)
                   for w, (width, units, _, heads) in zip(self.widths, kept))

    def __call__(self, plan: SlimPlan) -> dict[str, int]:
        kept = [(b.attn_width, len(b.mlp), plan.tokens_in(i), sum(1 for d in b.head_dims if d))
                for i, b in enumerate(plan.blocks)]
        return {"flops": self.base["flops"] + self._flops(kept), "params": self.base["params"] + self._params(kept)}


def _check_mix(mix) -> dict[str, float]:
    values = tuple(mix) if isinstance(mix, (tuple, list)) else None
    if values is None or len(values) != 3 or not all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values) \
            or not any(values):
        raise TargetError(f"mix must be three numbers >= 0, not all 0 (attn, mlp, tokens), got {mix!r}")
    return dict(zip(KINDS, (float(v) for v in values)))


def _align_kind(importance: list[torch.Tensor], keep: list[torch.Tensor], multiple: int
                ) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Each row's kept entries rounded to a multiple of `multiple`, over all rows of all blocks together.

    A row (a head's dims, a block's MLP units) is cut into chunks of `multiple` entries in descending magnitude;
    the chunks of all rows are ranked by their summed magnitude and the best round(K / multiple) are kept, K the
    unaligned plan's kept count. Chunk sums fall within a row, so every row keeps a prefix of its own ranking,
    and the result keeps the most gate magnitude of any aligned plan with that many chunks."""
    rows = [(b, r) for b, imp in enumerate(importance) for r in range(imp.reshape(-1, imp.shape[-1]).shape[0])]
    flat = [imp.reshape(-1, imp.shape[-1]) for imp in importance]
    kept = sum(int(k.sum()) for k in keep)
    chunks, orders = [], {}
    for i, (b, r) in enumerate(rows):
        values = flat[b][r]
        order = torch.sort(values, descending=True, stable=True).indices
        orders[i] = order
        sums = values[order].reshape(-1, multiple).sum(-1).tolist()
        chunks += [(-s, i, j) for j, s in enumerate(sums)]
    chunks.sort()
    width = [0] * len(rows)
    for _, i, _ in chunks[: math.floor(kept / multiple + 0.5)]:
        width[i] += multiple
    aligned = [torch.zeros_like(k) for k in keep]
    for i, (b, r) in enumerate(rows):
        aligned[b].reshape(-1, aligned[b].shape[-1])[r, orders[i][: width[i]]] = True
    dropped = sum(float(imp[k & ~a].sum()) for imp, k, a in zip(importance, keep, aligned))
    added = sum(float(imp[a & ~k].sum()) for imp, k, a in zip(importance, keep, aligned))
    before = sum(float(imp[k].sum()) for imp, k in zip(importance, keep))
    return aligned, {"magnitude_dropped": dropped, "magnitude_added": added,
                     "moved_fraction": (dropped + added) / before if before else 0.0}


def _aligned_masks(ranking: GateRanking, masks: dict, alignment: Alignment) -> tuple[dict, dict]:
    arch = ranking.arch
    alignment.check_divides(arch)
    masks, moved = dict(masks), {}
    heads_mode = ranking.attn[0].shape[-1] == 1  # an entry is a whole head: its width is already 0 or d
    if alignment.head > 1 and not heads_mode:
        masks["attn"], moved["attn"] = _align_kind(ranking.attn, masks["attn"], alignment.head)
    if alignment.mlp > 1:
        masks["mlp"], moved["mlp"] = _align_kind(ranking.mlp, masks["mlp"], alignment.mlp)
    record = {"head": alignment.head, "mlp": alignment.mlp, **{f"{k}_{m}": v for k, r in moved.items()
                                                             for m, v in r.items()}}
    return masks, record


def masks_of(plan: SlimPlan, ranking: GateRanking) -> dict[str, list[torch.Tensor]]:
    """A plan's kept entries as masks like the ranking's tensors."""
    masks = {kind: [torch.zeros_like(t, dtype=torch.bool) for t in getattr(ranking, kind)] for kind in KINDS}
    for b, block in enumerate(plan.blocks):
        attn = masks["attn"][b]
        for h, dims in enumerate(block.heads):  # the clamps map onto (H, 1) "heads" and (1, d) "uniform" gates
            attn[min(h, attn.shape[0] - 1), [min(d, attn.shape[1] - 1) for d in dims]] = True
        masks["mlp"][b][list(block.mlp)] = True
        masks["tokens"][b][list(block.tokens)] = True
    return masks


@torch.no_grad()
def align_plan(model: nn.Module, plan: SlimPlan, alignment: Alignment) -> SlimPlan:
    """`plan` (made by threshold on this model) with every kept head width a multiple of alignment.head and every
    MLP width a multiple of alignment.mlp; the plan's alignment record says how much gate magnitude moved."""
    ranking = gate_ranking(model)
    plan.check_fits(ranking.arch)
    masks, record = _aligned_masks(ranking, masks_of(plan, ranking), alignment)
    return plan_from_masks(ranking, masks, dict(plan.budgets), target=plan.target, alignment=record)


def _resolve(kind: str, value, dense: int) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise TargetError(f"the {kind} target must be a positive number (a count, or a fraction <= 1 of the "
                          f"dense model), got {value!r}")
    return float(value) * dense if value <= 1 else float(value)


def _format(kind: str, value: float) -> str:
    if kind == "latency_ms":
        return f"{value:.4g} ms"
    return f"{value / 1e9:.4g} GMACs" if kind == "flops" else f"{value / 1e6:.4g}M parameters"


@torch.no_grad()
def plan_for(model: nn.Module, *, flops: float | None = None, params: float | None = None,
             latency_ms: float | None = None, mix=(1, 1, 1), align: Alignment | None = None,
             device=None, batch_size: int = 1, fused: bool = False, measure: bool = True,
             cache_dir=None, progress: bool = False, remeasure: bool = False) -> SlimPlan:
    """The largest plan of a searchable model that does not exceed one target.

    flops: MACs per image (3.1e9) or a fraction of the dense model's (0.67); params: a count or a fraction;
    latency_ms: milliseconds of one forward of `batch_size` images on `device` (default CPU), predicted by the
    device's latency table (vitslim.latency: measured on first use unless measure=False, then cached;
    remeasure=True measures it again); the plan's slim model is then built and timed, and the plan records
    predicted and measured milliseconds and how far apart they are (prediction_error).
    mix: the ratio of the pruned fractions of (attn, mlp, tokens): (1, 1, 0) prunes attention and MLP alike and
    keeps every token. The budgets move together along the mix in steps of one entry of the finest kind pruned
    hardest; the result is within one such step of the target. align: hardware-aligned widths (align_plan),
    the target still met. The plan records the target, what was met and the budgets found.
    """
    given = {k: v for k, v in (("flops", flops), ("params", params), ("latency_ms", latency_ms)) if v is not None}
    if len(given) != 1:
        raise TargetError(f"give exactly one target of {', '.join(TARGETS)}; got "
                          f"{', '.join(given) if given else 'none'}")
    (kind, requested), = given.items()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TargetError(f"batch_size must be a positive integer, got {batch_size!r}")
    mix = _check_mix(mix)
    ranking = gate_ranking(model)
    if align is not None:
        align.check_divides(ranking.arch)
    counts = ranking.counts()
    if counts["tokens"] == 0:  # a model without token gates (Swin) keeps every token whatever the mix says
        mix["tokens"] = 0.0
    if not any(mix[k] > 0 for k in KINDS):
        raise TargetError("mix prunes tokens only, and this model has no token gates; give attn or mlp a share")
    pruned = [k for k in KINDS if mix[k] > 0]
    lead = max(pruned, key=lambda k: (mix[k], counts[k]))  # the finest of the kinds pruned hardest
    steps = counts[lead]

    def plan_at(step: int) -> SlimPlan:
        fraction = (step + 0.5) / steps  # +0.5: threshold's floor((1 - budget) * n) lands on `step` exactly
        budgets = {k: 1.0 - fraction * mix[k] / mix[lead] if mix[k] > 0 else 1.0 for k in KINDS}
        masks, record = keep_masks(ranking, budgets), None
        if align is not None:
            masks, record = _aligned_masks(ranking, masks, align)
        return plan_from_masks(ranking, masks, budgets, alignment=record)

    analytic = PlanCost(model, ranking.arch)
    if kind == "latency_ms":
        if isinstance(requested, bool) or not isinstance(requested, Real) or not 0 < requested < float("inf"):
            raise TargetError(f"the latency target must be a positive number of milliseconds, got {requested!r}")
        device = torch.device(device if device is not None else "cpu")
        try:
            table = latency.latency_table(model, device, batch_size, fused=fused, measure=measure, cache_dir=cache_dir,
                                  progress=progress, remeasure=remeasure)
        except LookupError as e:
            raise TargetError(str(e)) from None
        cost = table.predict_ms
        dense = cost(plan_from_masks(ranking, keep_masks(ranking, {k: 1.0 for k in KINDS}), {}))
        goal = float(requested)
    else:
        cost = lambda plan: analytic(plan)[kind]  # noqa: E731
        dense = analytic.dense[kind]
        goal = _resolve(kind, requested, dense)
    if goal >= dense:
        raise TargetError(f"the {kind} target {_format(kind, goal)} is not below the dense model's "
                          f"{_format(kind, dense)}: nothing to prune")
    smallest = cost(plan_at(steps - 1))
    if smallest > goal:
        raise TargetError(f"the {kind} target {_format(kind, goal)} is below the smallest plan of this mix, "
                          f"{_format(kind, smallest)}; raise the target or change the mix")
    lo, hi = 0, steps - 1  # cost is non-increasing in the step: kept sets only shrink
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(plan_at(mid)) <= goal:
            hi = mid
        else:
            lo = mid + 1
    plan = plan_at(lo)
    met = analytic(plan)
    target = {"kind": kind, "requested": float(requested), "value": goal, "met": cost(plan),
              "fraction_of_dense": cost(plan) / dense, "flops": met["flops"], "params": met["params"],
              "mix": [mix[k] for k in KINDS], "step": lo, "steps": steps}
    if kind == "latency_ms":
        measured = latency.time_forward_ms(slim(model, plan, fused=fused).to(device), batch_size, device)
        target.update({"predicted_ms": cost(plan), "measured_ms": measured, "dense_predicted_ms": dense,
                       "prediction_error": abs(measured - cost(plan)) / cost(plan),
                       "device": table.key["device"], "batch_size": batch_size})
    return dataclasses.replace(plan, target=target)
