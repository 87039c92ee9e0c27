"""SlimPlan: what each block keeps (docs/design.md section 3), with its JSON form.

A plan indexes into the widths of the dense blocks it was made for: `BlockWidths`, one per block. Version 1 (the
design contract's JSON shape) states them once for the whole model: a ViT, whose blocks are all alike. Version 2
adds a `family` and per-block `widths`, so blocks of different widths (Swin's stages, with window attention and
no token gates) are plans too. A plan is written in the lowest version that holds it: a ViT plan stays version
1, byte for byte what earlier releases wrote; both versions load.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..errors import PlanMismatchError

PLAN_VERSION = 2
VERSIONS = (1, 2)
SEARCH_MODES = ("dims", "heads", "uniform")
GATE_KINDS = ("attn", "mlp", "tokens")  # the kinds of gate a block may have, in the order budgets name them
# The model-wide widths of a version 1 plan (and of any plan whose blocks agree on them).
UNIFORM_FIELDS = ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens", "num_patches")


def check_search_mode(search: str) -> str:
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(map(repr, SEARCH_MODES))}, got {search!r}")
    return search


@dataclass(frozen=True)
class BlockWidths:
    """The dense widths of one block: what its plan entries index into.

    num_patches: patch tokens of the block's input sequence (after num_prefix_tokens prefix tokens); window: tokens
    per attention window (0: the whole sequence attends, as in ViT; Swin: window_size ** 2); gates: the gate kinds
    the block has (a block without "tokens" keeps every token: its plan lists none).
    """

    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_prefix_tokens: int
    num_patches: int
    window: int = 0
    gates: tuple[str, ...] = GATE_KINDS

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_patches"):
            _check_int(getattr(self, name), f"block {name}", minimum=1)
        for name in ("num_prefix_tokens", "window"):
            _check_int(getattr(self, name), f"block {name}", minimum=0)
        kinds = tuple(self.gates)
        if not set(kinds) <= set(GATE_KINDS) or len(set(kinds)) != len(kinds) or not kinds:
            raise ValueError(f"block gates must be distinct kinds among {list(GATE_KINDS)}, got {list(kinds)}")
        object.__setattr__(self, "gates", tuple(k for k in GATE_KINDS if k in kinds))

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "gates": list(self.gates)}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "BlockWidths":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or set(d) - set(names) or set(names[:6]) - set(d):
            raise ValueError(f"{where} widths must be an object with {', '.join(names)}, got {d!r}")
        if "gates" in d and not isinstance(d["gates"], list):
            raise ValueError(f"{where} widths gates must be a list of gate kinds, got {d['gates']!r}")
        return cls(**{k: tuple(v) if k == "gates" else v for k, v in d.items()})


def has_token_gates(widths) -> bool:
    """Whether any block of these BlockWidths gates its tokens (a ViT does; a Swin keeps every token)."""
    return any("tokens" in w.gates for w in widths)


def _check_int(value, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"plan {what} must be a {kind} integer, got {value!r}")


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
    """What each block of a model keeps.

    The model-wide widths (embed_dim ... num_patches) are those its blocks share, None where they differ; `widths`
    gives every block's, and is None exactly when the plan is a version 1 plan (family "vit", every block alike,
    global attention, all three gate kinds): then block_widths derives them from the model-wide fields. The
    constructor takes either form and keeps that one, so equal plans compare equal however they were made.
    """

    embed_dim: int | None
    num_heads: int | None
    head_dim: int | None
    mlp_hidden: int | None
    num_prefix_tokens: int | None
    num_patches: int | None
    search: str
    budgets: dict = field(hash=False)
    blocks: tuple[BlockPlan, ...]
    version: int = 1  # the JSON version the plan is written in: set by the plan (1 when it holds the plan)
    target: dict | None = field(default=None, hash=False)     # plan_for: what was asked and what was met
    alignment: dict | None = field(default=None, hash=False)  # align_plan: the widths' multiples, what moved
    family: str = "vit"
    widths: tuple[BlockWidths, ...] | None = None

    def __post_init__(self) -> None:
        _normalise(self)
        _validate(self)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def block_widths(self) -> tuple[BlockWidths, ...]:
        """The dense widths of every block (see the class docstring)."""
        if self.widths is not None:
            return self.widths
        return (BlockWidths(*(getattr(self, name) for name in UNIFORM_FIELDS)),) * self.depth

    def tokens_in(self, i: int) -> int:
        """Tokens in block i's sequence: its prefix and kept patches (every patch where it has no token gate)."""
        w, b = self.block_widths[i], self.blocks[i]
        return w.num_prefix_tokens + (len(b.tokens) if "tokens" in w.gates else w.num_patches)

    def kept_fractions(self) -> dict[str, float]:
        """Kept fraction of attention dims, MLP units and patch-token slots over all blocks that gate them."""
        widths = self.block_widths
        gated = [(b, w) for b, w in zip(self.blocks, widths) if "tokens" in w.gates]
        return {
            "attn": sum(b.attn_width for b in self.blocks) / sum(w.attn_width for w in widths),
            "mlp": sum(len(b.mlp) for b in self.blocks) / sum(w.mlp_hidden for w in widths),
            "tokens": (sum(len(b.tokens) for b, _ in gated) / sum(w.num_patches for _, w in gated)) if gated
            else 1.0,
        }

    def to_dict(self) -> dict:
        """The plan as JSON data: version 1 (docs/design.md section 3) when it holds the plan, else version 2."""
        version = self.version
        blocks = [{"heads": [list(h) for h in b.heads], "mlp": list(b.mlp), "tokens": list(b.tokens)}
                  for b in self.blocks]
        if version == 2:
            blocks = [{**b, "widths": w.to_dict()} for b, w in zip(blocks, self.widths)]
        return {
            "version": version, **({"family": self.family} if version == 2 else {}),
            **{name: getattr(self, name) for name in UNIFORM_FIELDS},
            "search": self.search, "budgets": dict(self.budgets), "blocks": blocks,
            **({"target": dict(self.target)} if self.target is not None else {}),
            **({"alignment": dict(self.alignment)} if self.alignment is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SlimPlan":
        if not isinstance(d, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        if "version" not in d:
            raise ValueError("plan is missing version")
        version = d["version"]
        if isinstance(version, bool) or version not in VERSIONS:
            raise ValueError(f"plan version {version!r} is not supported; accepted: "
                             f"{', '.join(map(str, VERSIONS))}")
        required = ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens", "num_patches",
                    "search", "budgets", "blocks") + (("family",) if version == 2 else ())
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"plan is missing {', '.join(missing)}")
        try:
            blocks = tuple(BlockPlan(heads=tuple(_indices(h, f"block {i} head {j} dims")
                                                 for j, h in enumerate(b["heads"])),
                                     mlp=_indices(b["mlp"], f"block {i} mlp units"),
                                     tokens=_indices(b["tokens"], f"block {i} tokens"))
                           for i, b in enumerate(d["blocks"]))
            widths = tuple(BlockWidths.from_dict(b["widths"], f"block {i}")
                           for i, b in enumerate(d["blocks"])) if version == 2 else None
        except (KeyError, TypeError) as e:
            needed = "'heads', 'mlp', 'tokens'" + (" and 'widths'" if version == 2 else "")
            raise ValueError(f"malformed plan blocks ({e!r}); each block needs {needed} (lists of integers"
                             f"{', and its widths' if version == 2 else ''})") from None
        if version == 2 and not isinstance(d["family"], str):
            raise ValueError(f"plan family must be a family name, got {d['family']!r}")
        return cls(**{name: d[name] for name in UNIFORM_FIELDS}, search=d["search"], budgets=dict(d["budgets"]),
                   blocks=blocks, version=version, target=_optional_dict(d, "target"),
                   alignment=_optional_dict(d, "alignment"), family=d.get("family", "vit"), widths=widths)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "SlimPlan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from None

    def check_fits(self, arch) -> None:
        """Raise PlanMismatchError unless this plan was made for a model shaped like `arch` (its family's
        description of a model: family, block_widths())."""
        have, want = arch.block_widths(), self.block_widths
        if arch.family != self.family:
            raise PlanMismatchError(f"plan does not fit this model: the plan is for a {self.family} model, the "
                                    f"model is a {arch.family} model")
        diff = [f"depth={len(want)} (model: {len(have)})"] if len(want) != len(have) else []
        fields = [f.name for f in dataclasses.fields(BlockWidths)]
        for name in fields:  # the fields every block agrees on, then each block's own
            mine, theirs = {getattr(w, name) for w in want}, {getattr(w, name) for w in have}
            if len(mine) == 1 and len(theirs) == 1 and mine != theirs:
                diff.append(f"{name}={_shown(mine.pop())} (model: {_shown(theirs.pop())})")
        if not diff:
            for i, (w, h) in enumerate(zip(want, have)):
                diff += [f"block {i} {n}={_shown(getattr(w, n))} (model: {_shown(getattr(h, n))})"
                         for n in fields if getattr(w, n) != getattr(h, n)]
        if diff:
            raise PlanMismatchError("plan does not fit this model: " + ", ".join(diff))
        empty = [i for i, (b, w) in enumerate(zip(self.blocks, want))
                 if "tokens" in w.gates and not b.tokens and w.num_prefix_tokens == 0]
        if empty:
            raise PlanMismatchError(f"block {empty[0]} keeps no token, and the model has no prefix token: its "
                                    "sequence would be empty; keep at least one patch per block")

    def summary(self) -> str:
        """A table: kept width of every head, MLP width and tokens per block."""
        f = self.kept_fractions()
        widths = self.block_widths
        lines = [f"SlimPlan ({self.search}) budgets {self.budgets} -> kept attn {f['attn']:.1%}, "
                 f"mlp {f['mlp']:.1%}, tokens {f['tokens']:.1%}"]
        if self.widths is None:
            lines.append(f"{'block':>5}  {'head widths (of ' + str(self.head_dim) + ')':<32} "
                         f"{'mlp (of ' + str(self.mlp_hidden) + ')':>14} "
                         f"{'tokens (of ' + str(self.num_patches) + ')':>16}")
            for i, b in enumerate(self.blocks):
                lines.append(f"{i:>5}  {' '.join(str(w) for w in b.head_dims):<32} {len(b.mlp):>14} "
                             f"{len(b.tokens):>16}")
        else:  # each block's widths differ: each row says what it is out of
            lines.append(f"{'block':>5}  {'head widths':<40} {'mlp':>12} {'tokens':>12}")
            for i, (b, w) in enumerate(zip(self.blocks, widths)):
                heads = f"{' '.join(str(d) for d in b.head_dims)} (of {w.head_dim})"
                tokens = f"{len(b.tokens)}/{w.num_patches}" if "tokens" in w.gates else "all"
                lines.append(f"{i:>5}  {heads:<40} {f'{len(b.mlp)}/{w.mlp_hidden}':>12} {tokens:>12}")
        if self.target is not None:
            t = self.target
            lines.append(f"target: {t['kind']} <= {t['value']:.6g}, met {t['met']:.6g} "
                         f"({t['fraction_of_dense']:.1%} of the dense model)")
        if self.alignment is not None:
            lines.append(f"aligned: head widths x{self.alignment['head']}, MLP widths x{self.alignment['mlp']}")
        return "\n".join(lines)


def _shown(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


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


def _normalise(plan: SlimPlan) -> None:
    """Keep one form of the plan's widths (the class docstring): per-block widths that a version 1 plan holds
    become the model-wide fields; model-wide fields are those the blocks share."""
    if not isinstance(plan.family, str) or not plan.family:
        raise ValueError(f"plan family must be a family name, got {plan.family!r}")
    if isinstance(plan.version, bool) or plan.version not in VERSIONS:
        raise ValueError(f"plan version {plan.version!r} is not supported; accepted: {', '.join(map(str, VERSIONS))}")
    if plan.widths is None:
        if plan.family != "vit":
            raise ValueError(f"a {plan.family} plan needs its blocks' widths (widths=...)")
        for name in UNIFORM_FIELDS:
            _check_int(getattr(plan, name), name, minimum=0 if name == "num_prefix_tokens" else 1)
        object.__setattr__(plan, "version", 1)
        return
    widths = tuple(plan.widths)
    if not all(isinstance(w, BlockWidths) for w in widths):
        raise ValueError("plan widths must be BlockWidths, one per block")
    if len(widths) != len(plan.blocks):
        raise ValueError(f"plan has {len(plan.blocks)} blocks and widths for {len(widths)}")
    for name in UNIFORM_FIELDS:
        values = {getattr(w, name) for w in widths}
        shared = values.pop() if len(values) == 1 else None
        given = getattr(plan, name)
        if given is not None and given != shared:
            raise ValueError(f"plan {name}={given!r} disagrees with its blocks' widths "
                             f"({[getattr(w, name) for w in widths]})")
        object.__setattr__(plan, name, shared)
    v1 = plan.family == "vit" and widths and len(set(widths)) == 1 and widths[0].window == 0 \
        and widths[0].gates == GATE_KINDS
    object.__setattr__(plan, "widths", None if v1 else widths)
    object.__setattr__(plan, "version", 1 if v1 else 2)


def _validate(plan: SlimPlan) -> None:
    check_search_mode(plan.search)
    if not plan.blocks:
        raise ValueError("plan has no blocks")
    previous = None  # the kept patches of the previous block with token gates, on the same grid
    for i, (b, w) in enumerate(zip(plan.blocks, plan.block_widths)):
        if len(b.heads) != w.num_heads:
            raise ValueError(f"block {i} lists {len(b.heads)} heads, plan has num_heads={w.num_heads}")
        for h, dims in enumerate(b.heads):
            _check_indices(dims, w.head_dim, f"block {i} head {h} dims")
        _check_indices(b.mlp, w.mlp_hidden, f"block {i} mlp units")
        if "tokens" not in w.gates:
            if b.tokens:
                raise ValueError(f"block {i} has no token gates (it keeps every token) but lists tokens "
                                 f"{list(b.tokens)[:8]}; list none")
            previous = None
            continue
        _check_indices(b.tokens, w.num_patches, f"block {i} tokens")
        if previous is not None and previous[0] == w.num_patches and not set(b.tokens) <= previous[1]:
            raise ValueError(f"block {i} keeps tokens that block {i - 1} dropped; kept token sets must "
                             "shrink with depth")
        previous = (w.num_patches, set(b.tokens))
