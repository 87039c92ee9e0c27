"""SlimPlan: what each block keeps (docs/design.md section 3), with its JSON form."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import PlanMismatchError

PLAN_VERSION = 1
SEARCH_MODES = ("dims", "heads", "uniform")


def check_search_mode(search: str) -> str:
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(map(repr, SEARCH_MODES))}, got {search!r}")
    return search


@dataclass(frozen=True)
class BlockPlan:
    """Kept entries of one block. heads[h]: kept dims of head h; mlp: kept units; tokens: kept patches."""

    heads: tuple[tuple[int, ...], ...]
    mlp: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(len(h) for h in self.heads)

    @property
    def attn_width(self) -> int:
        return sum(self.head_dims)


@dataclass(frozen=True)
class SlimPlan:
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_prefix_tokens: int
    num_patches: int
    search: str
    budgets: dict = field(hash=False)
    blocks: tuple[BlockPlan, ...]
    version: int = PLAN_VERSION
    target: dict | None = field(default=None, hash=False)     # plan_for: what was asked and what was met
    alignment: dict | None = field(default=None, hash=False)  # align_plan: the widths' multiples, what moved

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def kept_fractions(self) -> dict[str, float]:
        """Kept fraction of attention dims, MLP units and patch-token slots over all blocks."""
        n = self.depth
        return {
            "attn": sum(b.attn_width for b in self.blocks) / (n * self.num_heads * self.head_dim),
            "mlp": sum(len(b.mlp) for b in self.blocks) / (n * self.mlp_hidden),
            "tokens": sum(len(b.tokens) for b in self.blocks) / (n * self.num_patches),
        }

    def to_dict(self) -> dict:
        return {
            "version": self.version, "embed_dim": self.embed_dim, "num_heads": self.num_heads,
            "head_dim": self.head_dim, "mlp_hidden": self.mlp_hidden,
            "num_prefix_tokens": self.num_prefix_tokens, "num_patches": self.num_patches,
            "search": self.search, "budgets": dict(self.budgets),
            "blocks": [{"heads": [list(h) for h in b.heads], "mlp": list(b.mlp), "tokens": list(b.tokens)}
                       for b in self.blocks],
            **({"target": dict(self.target)} if self.target is not None else {}),
            **({"alignment": dict(self.alignment)} if self.alignment is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SlimPlan":
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        required = ("version", "embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens",
                    "num_patches", "search", "budgets", "blocks")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"plan is missing {', '.join(missing)}")
        if d["version"] != PLAN_VERSION:
            raise ValueError(f"plan version {d['version']!r} is not supported; accepted: {PLAN_VERSION}")
        try:
            blocks = tuple(BlockPlan(heads=tuple(_indices(h, f"block {i} head {j} dims")
                                                 for j, h in enumerate(b["heads"])),
                                     mlp=_indices(b["mlp"], f"block {i} mlp units"),
                                     tokens=_indices(b["tokens"], f"block {i} tokens"))
                           for i, b in enumerate(d["blocks"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed plan blocks ({e!r}); each block needs 'heads', 'mlp', 'tokens' "
                             "lists of integers") from None
        return cls(embed_dim=d["embed_dim"], num_heads=d["num_heads"], head_dim=d["head_dim"],
                   mlp_hidden=d["mlp_hidden"], num_prefix_tokens=d["num_prefix_tokens"],
                   num_patches=d["num_patches"], search=d["search"], budgets=dict(d["budgets"]),
                   blocks=blocks, version=d["version"], target=_optional_dict(d, "target"),
                   alignment=_optional_dict(d, "alignment"))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "SlimPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from None

    def check_fits(self, arch) -> None:
        """Raise PlanMismatchError unless this plan was made for a model shaped like `arch` (a ViTArch)."""
        have = dict(embed_dim=arch.embed_dim, num_heads=arch.num_heads, head_dim=arch.head_dim,
                    mlp_hidden=arch.mlp_hidden, num_prefix_tokens=arch.num_prefix_tokens,
                    num_patches=arch.num_patches, depth=arch.depth)
        want = dict(embed_dim=self.embed_dim, num_heads=self.num_heads, head_dim=self.head_dim,
                    mlp_hidden=self.mlp_hidden, num_prefix_tokens=self.num_prefix_tokens,
                    num_patches=self.num_patches, depth=self.depth)
        diff = [f"{k}={want[k]} (model: {have[k]})" for k in want if want[k] != have[k]]
        if diff:
            raise PlanMismatchError("plan does not fit this model: " + ", ".join(diff))
        empty = [i for i, b in enumerate(self.blocks) if not b.tokens]
        if self.num_prefix_tokens == 0 and empty:
            raise PlanMismatchError(f"block {empty[0]} keeps no token, and the model has no prefix token: its "
                                    "sequence would be empty; keep at least one patch per block")

    def summary(self) -> str:
        """A table: kept width of every head, MLP width and tokens per block."""
        f = self.kept_fractions()
        lines = [f"SlimPlan ({self.search}) budgets {self.budgets} -> kept attn {f['attn']:.1%}, "
                 f"mlp {f['mlp']:.1%}, tokens {f['tokens']:.1%}",
                 f"{'block':>5}  {'head widths (of ' + str(self.head_dim) + ')':<32} "
                 f"{'mlp (of ' + str(self.mlp_hidden) + ')':>14} {'tokens (of ' + str(self.num_patches) + ')':>16}"]
        for i, b in enumerate(self.blocks):
            widths = " ".join(str(w) for w in b.head_dims)
            lines.append(f"{i:>5}  {widths:<32} {len(b.mlp):>14} {len(b.tokens):>16}")
        if self.target is not None:
            t = self.target
            lines.append(f"target: {t['kind']} <= {t['value']:.6g}, met {t['met']:.6g} "
                         f"({t['fraction_of_dense']:.1%} of the dense model)")
        if self.alignment is not None:
            lines.append(f"aligned: head widths x{self.alignment['head']}, MLP widths x{self.alignment['mlp']}")
        return "\n".join(lines)


def _optional_dict(d: dict, key: str) -> dict | None:
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"plan {key} must be a JSON object, got {type(value).__name__}")
    return value


def _indices(values, what: str) -> tuple[int, ...]:
    """A JSON list of indices as a tuple of ints; anything but an integer is an error, never truncated."""
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ValueError(f"{what} must be integers, got {bad[0]!r}")
    return tuple(values)


def _check_indices(values: tuple[int, ...], upper: int, what: str) -> None:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be sorted ascending without repeats, got {list(values)}")
    if values and (values[0] < 0 or values[-1] >= upper):
        raise ValueError(f"{what} must lie in [0, {upper}), got {list(values)}")


def _validate(plan: SlimPlan) -> None:
    check_search_mode(plan.search)
    for name in ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_patches"):
        value = getattr(plan, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"plan {name} must be a positive integer, got {value!r}")
    if not isinstance(plan.num_prefix_tokens, int) or plan.num_prefix_tokens < 0:
        raise ValueError(f"plan num_prefix_tokens must be a non-negative integer, got {plan.num_prefix_tokens!r}")
    if not plan.blocks:
        raise ValueError("plan has no blocks")
    previous = None
    for i, b in enumerate(plan.blocks):
        if len(b.heads) != plan.num_heads:
            raise ValueError(f"block {i} lists {len(b.heads)} heads, plan has num_heads={plan.num_heads}")
        for h, dims in enumerate(b.heads):
            _check_indices(dims, plan.head_dim, f"block {i} head {h} dims")
        _check_indices(b.mlp, plan.mlp_hidden, f"block {i} mlp units")
        _check_indices(b.tokens, plan.num_patches, f"block {i} tokens")
        if previous is not None and not set(b.tokens) <= previous:
            raise ValueError(f"block {i} keeps tokens that block {i - 1} dropped; kept token sets must "
                             "shrink with depth")
        previous = set(b.tokens)
