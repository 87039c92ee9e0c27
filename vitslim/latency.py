"""Latency of slim models on the device at hand: a measured table, a fitted cost model, cached per device.

The table times whole slim models whose blocks all keep the same (width per head, MLP units, tokens), on a grid
of those, at one batch size (eval mode; bf16 autocast and device-synchronised on CUDA; warm-up, then the median
of timed repeats). A linear model in the terms a block costs,

    ms = a0 + a1 * sum_l T_l + a2 * sum_l T_l W_l + a3 * sum_l T_l M_l + a4 * sum_l T_l S_l W_l

(T tokens, W attention width, M MLP units, S keys per query (T, or the window's tokens) of block l; coefficients
>= 0) is fitted to the grid and predicts any plan. Tables are cached as JSON under $VITSLIM_CACHE (default
~/.cache/vitslim)/latency, one per device, versions, thread count (CPU: torch's intra-op threads the timings ran with), batch size and
model shape. A table whose fit misses a sample by more than MAX_FIT_ERROR (after re-timing the worst samples
once) was measured on a machine too noisy to time: it is refused, never cached, and the error says how to
measure again (remeasure=True, `--remeasure`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .errors import NoisyTableError
from .families import block_terms
from .plan import BlockPlan, SlimPlan, has_token_gates
from .files import atomic_write
from .searchable import describe_searchable, search_mode
from .slim import slim

GRID = (0.25, 0.5, 0.75, 1.0)  # fractions of the head width, MLP width and patch count that the table times
TABLE_VERSION = 3  # 2: the thread count in the key, the fit-error bound; 3: every block's widths in the key
# The largest |predicted - measured| / measured a table may show on its own samples, and a plan's measured latency
# against its prediction. On a quiet 2-core machine the tests' tables fit within ~8%; under load, 25-50%; the
# table that started this bound (a loaded machine) was off by 4267%.
MAX_FIT_ERROR = 0.5


def _features(plan: SlimPlan) -> list[float]:
    """1 and the sums over blocks of the cost terms (vitslim.families.base.block_terms): T, T*W, T*M, T*S*W."""
    terms = [block_terms(b.attn_width, len(b.mlp), plan.tokens_in(i), w.window)
             for i, (b, w) in enumerate(zip(plan.blocks, plan.block_widths))]
    return [1.0, *(float(sum(column)) for column in zip(*terms))]


def _fit_non_negative(rows: list[list[float]], ms: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0: refit without the most negative term until none is left
    (the terms are costs; a negative one would predict a faster model for more work). Terms that are linear
    combinations of earlier ones on this grid are left out first (the fit would split their cost arbitrarily)."""
    X = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ms, dtype=torch.float64)
    scale = X.abs().amax(0).clamp_min(1e-12)  # columns span 1 to ~1e7: solve on unit-scaled columns
    active = []  # a term the grid cannot tell from earlier ones is left out (0): a Swin's token count never changes
    for j in range(X.shape[1]):
        if int(torch.linalg.matrix_rank(X[:, active + [j]] / scale[active + [j]])) > len(active):
            active.append(j)
    while True:
        sol = torch.linalg.lstsq(X[:, active] / scale[active], y[:, None]).solution.flatten() / scale[active]
        if (sol >= 0).all() or len(active) == 1:
            coef = [0.0] * X.shape[1]
            for i, c in zip(active, sol.clamp_min(0).tolist()):
                coef[i] = c
            return coef
        active.pop(int(sol.argmin()))


@dataclass
class LatencyTable:
    """Measured slim-model latencies on one device and their fitted cost model (module docstring)."""

    key: dict                 # device, versions, batch size, model shape: what the table is valid for
    samples: list[dict]       # {"attn", "mlp", "tokens" (fractions kept), "ms", "predicted_ms"} per grid point
    coefficients: list[float]
    max_fit_error: float = 0.0  # the largest |predicted - measured| / measured over the grid

    def predict_ms(self, plan: SlimPlan) -> float:
        return sum(c * f for c, f in zip(self.coefficients, _features(plan)))

    def to_json(self) -> str:
        return json.dumps({"version": TABLE_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LatencyTable":
        d = json.loads(text)
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"latency table version {d.get('version')!r}; accepted: {TABLE_VERSION}")
        return cls(key=d["key"], samples=d["samples"], coefficients=d["coefficients"],
                   max_fit_error=d.get("max_fit_error", 0.0))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    parts = ["cpu", platform.machine(), platform.processor(), f"x{torch.get_num_threads()} threads"]
    return " ".join(part for part in parts if part)


def _triton_version() -> str | None:
    try:
        import triton  # optional: the table's key records its version where it is installed
        return triton.__version__
    except ImportError:
        return None


def _key(arch, device: torch.device, batch_size: int, fused: bool) -> dict:
    return {"device": device_name(device), "threads": None if device.type == "cuda" else torch.get_num_threads(),
            "torch": torch.__version__, "triton": _triton_version(),
            "batch_size": batch_size, "fused": fused, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            "family": arch.family, "blocks": [w.to_dict() for w in arch.block_widths()]}


def cache_path(key: dict, cache_dir: Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("VITSLIM_CACHE", Path.home() / ".cache" / "vitslim")) / "latency"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in key["device"]).strip("-")[:40]
    return root / f"{slug}-b{key['batch_size']}-{digest}.json"


@torch.no_grad()
def time_forward_ms(model: nn.Module, batch_size: int, device: torch.device, repeats: int = 7,
                    min_seconds: float = 0.05) -> float:
    """Median milliseconds of one eval-mode forward of `batch_size` images, after warm-up; each repeat times
    enough forwards to last min_seconds (device-synchronised on CUDA, bf16 autocast there)."""
    model.eval()
    h, w = model.patch_embed.img_size
    x = torch.randn(batch_size, model.patch_embed.proj.in_channels, h, w, device=device)
    cuda = device.type == "cuda"

    def run(n: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                model(x)
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3 / n

    once = max(run(1), run(1), 1e-3)  # warm-up, and how long one forward takes
    n = max(1, int(min_seconds * 1e3 / once))
    return statistics.median(run(n) for _ in range(repeats))


def _uniform_plan(arch, search: str, attn: float, mlp: float, tokens: float) -> SlimPlan:
    """The plan whose every block keeps these fractions of each head's width, of its MLP units and (where it has
    token gates) of its patches, at least one of each; the first entries of each (timing does not care which)."""
    widths = arch.block_widths()
    blocks = []
    for w in widths:
        kept = (max(1, round(attn * w.head_dim)), max(1, round(mlp * w.mlp_hidden)),
                max(1, round(tokens * w.num_patches)) if "tokens" in w.gates else 0)
        blocks.append(BlockPlan(heads=tuple(tuple(range(kept[0])) for _ in range(w.num_heads)),
                                mlp=tuple(range(kept[1])), tokens=tuple(range(kept[2]))))
    return SlimPlan(embed_dim=None, num_heads=None, head_dim=None, mlp_hidden=None, num_prefix_tokens=None,
                    num_patches=None, search=search, budgets={"attn": 1.0, "mlp": 1.0, "tokens": 1.0},
                    blocks=tuple(blocks), family=arch.family, widths=widths)


def measure_table(model: nn.Module, device: torch.device, batch_size: int = 1, fused: bool = False,
                  grid=None, progress: bool = True) -> LatencyTable:
    """Time slim models of `model` (a searchable model) on the grid (default GRID, of every fraction of the
    head width x MLP width x patches) and fit the cost model."""
    arch, search = describe_searchable(model), search_mode(model)
    grid = grid or GRID
    token_grid = grid if has_token_gates(arch.block_widths()) else (1.0,)  # Swin: every token
    points = [(a, m, t) for a in grid for m in grid for t in token_grid]
    plans = [_uniform_plan(arch, search, *point) for point in points]
    rows = [_features(plan) for plan in plans]

    def time_plan(plan: SlimPlan) -> float:
        net = slim(model, plan, fused=fused).to(device)
        return time_forward_ms(net, batch_size, device)

    ms = [time_plan(plan) for plan in tqdm(plans, desc=f"latency table on {device_name(device)}", leave=False,
                                           disable=not progress, dynamic_ncols=True)]
    coefficients, errors = _fit(rows, ms)
    if max(errors) > MAX_FIT_ERROR:  # a transient (another job): the samples far off the fit timed once more
        for i in [i for i, e in enumerate(errors) if e > MAX_FIT_ERROR / 2]:
            ms[i] = min(ms[i], time_plan(plans[i]))
        coefficients, errors = _fit(rows, ms)
    samples = [{"attn": a, "mlp": m, "tokens": t, "ms": y,  # the fractions each block keeps
                "predicted_ms": sum(c * f for c, f in zip(coefficients, row))}
               for (a, m, t), y, row in zip(points, ms, rows)]
    return LatencyTable(key=_key(arch, device, batch_size, fused), samples=samples, coefficients=coefficients,
                        max_fit_error=max(errors))


def _fit(rows: list[list[float]], ms: list[float]) -> tuple[list[float], list[float]]:
    """The non-negative fit and its relative error on each sample."""
    coefficients = _fit_non_negative(rows, ms)
    return coefficients, [abs(sum(c * f for c, f in zip(coefficients, row)) - y) / y for row, y in zip(rows, ms)]


def latency_table(model: nn.Module, device: torch.device, batch_size: int = 1, fused: bool = False,
                  measure: bool = True, cache_dir: Path | None = None, progress: bool = True,
                  remeasure: bool = False) -> LatencyTable:
    """The cached table for this device, versions, threads, batch size and model shape; measured and cached when
    there is none or remeasure=True (measure=False: LookupError instead). A measured table that fits its samples
    worse than MAX_FIT_ERROR raises NoisyTableError and is not cached."""
    key = _key(describe_searchable(model), device, batch_size, fused)
    path = cache_path(key, cache_dir)
    if path.is_file() and not remeasure:
        try:
            table = LatencyTable.from_json(path.read_text())
            if table.key == key:
                return table
        except (ValueError, KeyError):
            pass  # an older or damaged table: measured again below
    if not measure:
        raise LookupError(f"no latency table for {key['device']} at batch {batch_size} (looked for {path}); "
                          f"measure one first (without --no-measure)")
    table = measure_table(model, device, batch_size, fused, progress=progress)
    if table.max_fit_error > MAX_FIT_ERROR:
        times = [s["ms"] for s in table.samples]
        raise NoisyTableError(
            f"the latency table measured on {key['device']} at batch {batch_size} is not cached: its fit misses a "
            f"sample by {table.max_fit_error:.0%} (bound {MAX_FIT_ERROR:.0%}; samples {min(times):.3g} to "
            f"{max(times):.3g} ms), so the timings were too noisy to trust (another job on this machine?); measure "
            f"again on a quiet machine with --remeasure")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(table.to_json() + "\n"))
    return table
