"""Search-step benchmarks (docs/design.md section 6, P1): fused vs unfused masks, the step and its two branches.

    python -m benchmarks.run_search_benchmarks            # H100: writes benchmarks/results/search_step.json
    python -m benchmarks.run_search_benchmarks --dry-run  # CPU, tiny shapes: checks the plumbing, writes nothing

Variants (the same searchable model, gates on every head dim, MLP unit and patch token):
  paper_eager          explicit softmax, masks multiplied into the activations (the paper's code)
  folded_sdpa          gates folded into the qkv rows / fc2 columns, F.scaled_dot_product_attention
  folded_sdpa_compile  torch.compile of folded_sdpa (its compilation is timed apart, not in the medians)
  fused                the "fused" implementation (the Triton search kernels where wired in)

Workloads, fp32 weights under bf16 autocast, random init, random data:
  search_step  forward + backward + AdamW of timm's DeiT-S at batch 256 and DeiT-B at batch 128
               (loss = cross-entropy + the paper's l1 penalties)
  attn_block   one block's attention branch, fwd + bwd: ls1(attn(LN1(x) * token_scale)) (residual left out)
  mlp_block    one block's MLP branch, fwd + bwd: ls2(mlp(LN2(x) * token_scale))
Block-level "fused" calls the vitslim_kernels ops (layernorm_token_scale -> gated_*_branch) directly.

Rows: median device time, peak memory above what was allocated before the call, and for the blocks the
achieved TFLOP/s and GB/s from analytic counts (fwd+bwd = 3x fwd). A "summary" row per model and workload
gives the speedups of fused over each baseline (baseline_ms / fused_ms) beside docs/design.md's targets.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/<script>.py` from the root

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitslim  # noqa: E402
from vitslim.gates import SparsityWeights  # noqa: E402

from benchmarks.common import (Progress, achieved, autocast_dtype, kernel_times_ms, peak_memory_bytes,  # noqa: E402
                               sdpa_flash_where_possible, time_ms, write_results)

VARIANTS = ("paper_eager", "folded_sdpa", "folded_sdpa_compile", "fused")
IMPLEMENTATION = {"paper_eager": "eager", "folded_sdpa": "folded", "folded_sdpa_compile": "folded",
                  "fused": "fused"}
BASELINES = ("paper_eager", "folded_sdpa", "folded_sdpa_compile")
SDPA_VARIANTS = ("folded_sdpa", "folded_sdpa_compile")  # the variants whose attention is SDPA (flash forced)
# Wall seconds a cold inductor compile of the DeiT-S search step (fwd + bwd) is expected to take on the GPU
# machine's 16 cores: a compiled variant starts only when this much of the part's time is left.
COMPILE_NEEDS_S = {"deit_small_patch16_224": 90.0, "deit_base_patch16_224": 100.0}
# docs/design.md section 6, P1: fused speedup over each baseline, and fused peak memory / paper_eager's.
TARGETS = {"speedup_vs_paper_eager": 3.0, "speedup_vs_folded_sdpa": 1.25, "speedup_vs_folded_sdpa_compile": 1.05,
           "peak_mem_ratio_vs_paper_eager": 0.5}


@dataclass(frozen=True)
class ModelConfig:
    name: str      # timm model name
    batch: int
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name if not self.overrides else f"{self.name}(tiny)"


MODELS = (ModelConfig("deit_small_patch16_224", 256), ModelConfig("deit_base_patch16_224", 128))
DRY_RUN_MODELS = (ModelConfig("deit_small_patch16_224", 2, dict(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                                 num_heads=3, num_classes=10)),)


@dataclass(frozen=True)
class Iterations:
    step_warmup: int = 5
    step_iters: int = 20
    block_warmup: int = 10
    block_iters: int = 50


DRY_RUN_ITERATIONS = Iterations(1, 1, 1, 1)  # the plumbing only: one warm-up, one timed call


# -- timing --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem(fn: Callable[[], object], device: torch.device) -> int | None:
    return peak_memory_bytes(fn) if device.type == "cuda" else None


def first_calls_s(fn: Callable[[], object], device: torch.device, calls: int = 2) -> float:
    """Wall time of the first calls (torch.compile compiles forward and backward here): kept out of medians."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- workloads -----------------------------------------------------------------------------------------
def compile_backend(device: torch.device) -> str:
    # The CPU dry run checks that dynamo traces the model and its backward, not inductor's C++ codegen
    # (minutes on 2 cores); on the GPU it is the default inductor.
    return "inductor" if device.type == "cuda" else "aot_eager"


def build_search_model(config: ModelConfig, variant: str, device: torch.device) -> torch.nn.Module:
    """A random-init timm model made searchable, in train mode, computing with `variant`'s implementation."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    with torch.device(device):
        model = timm.create_model(config.name, pretrained=False, **config.overrides)
    vitslim.make_searchable(model, fused=variant == "fused")
    vitslim.set_implementation(model, IMPLEMENTATION[variant])
    return model.train()


def fused_fell_back(fn: Callable[[], object]) -> bool:
    """Run fn once; True if the searchable model said it used the folded path instead of the fused kernels."""
    from vitslim import implementations
    implementations._fused_warnings.clear()  # the fallback warns once per reason per process: let it warn here again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return any("fused" in str(w.message) and "folded" in str(w.message) for w in caught)


def make_search_step(model: torch.nn.Module, config: ModelConfig, variant: str, device: torch.device
                     ) -> Callable[[], None]:
    """One search training step: bf16 autocast forward, task loss + l1 penalties, backward, AdamW."""
    module = torch.compile(model, backend=compile_backend(device)) if variant == "folded_sdpa_compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                  fused=device.type == "cuda")  # the same optimizer for every variant
    weights = SparsityWeights()
    h, w = model.patch_embed.img_size
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(config.batch, 3, h, w, device=device, generator=g)
    labels = torch.randint(0, model.num_classes, (config.batch,), device=device, generator=g)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(module(images), labels)
        loss = loss + weights.penalty(model)["penalty"]
        loss.backward()
        optimizer.step()
    return step


def selected_implementation(op: str, device: torch.device) -> str | None:
    """The implementation vitslim_kernels' dispatch picks for `op` on bf16 tensors of `device` (None: no op)."""
    import vitslim_kernels as K
    try:
        decisions = K.explain(op, torch.empty(1, 1, 1, dtype=torch.bfloat16, device=device))
    except ValueError:  # unknown op in this build
        return None
    return next((name for name, reason in decisions if reason is None), None)


def _fused_branch_ops(block, kind: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The branch through the vitslim_kernels search ops, or None when this build has none."""
    import vitslim_kernels as K
    needed = ("layernorm_token_scale", "gated_attention_branch" if kind == "attn" else "gated_mlp_branch")
    if not all(hasattr(K, n) for n in needed):
        return None
    R = block.num_prefix_tokens

    def tokens() -> torch.Tensor:
        raw = block.gates.tokens
        return raw if block.kept_patches is None else raw.index_select(0, block.kept_patches)

    if kind == "attn":
        attn, norm = block.attn, block.norm1

        def attn_branch(x: torch.Tensor) -> torch.Tensor:
            u = K.layernorm_token_scale(x, norm.weight, norm.bias, norm.eps, tokens(), R,
                                        out_dtype=autocast_dtype(x.device))
            return block.ls1(K.gated_attention_branch(u, attn.qkv.weight, attn.qkv.bias, block.gates.attn_per_dim(),
                                                      attn.proj.weight, attn.proj.bias, attn.num_heads, attn.scale))
        return attn_branch
    mlp, norm = block.mlp, block.norm2
    approximate = getattr(mlp.act, "approximate", "none")

    def mlp_branch(x: torch.Tensor) -> torch.Tensor:
        w = K.layernorm_token_scale(x, norm.weight, norm.bias, norm.eps, tokens(), R,
                                    out_dtype=autocast_dtype(x.device))
        return block.ls2(K.gated_mlp_branch(w, mlp.fc1.weight, mlp.fc1.bias, block.gates.mlp, mlp.fc2.weight,
                                            mlp.fc2.bias, approximate))
    return mlp_branch


def make_branch(block, kind: str, variant: str, device: torch.device
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str | None]:
    """(x -> branch output, the implementation of the fused op or None) for a block's "attn" or "mlp" branch."""
    if variant == "fused":
        fused = _fused_branch_ops(block, kind)
        if fused is not None:
            return fused, selected_implementation(f"gated_{'attention' if kind == 'attn' else 'mlp'}_branch", device)
    eager = variant == "paper_eager"
    if kind == "attn":
        op, norm, ls = (block._attn_eager if eager else block._attn_folded), block.norm1, block.ls1
    else:
        op, norm, ls = (block._mlp_eager if eager else block._mlp_folded), block.norm2, block.ls2

    def branch(x: torch.Tensor) -> torch.Tensor:
        return ls(op(norm(x) * block._sequence_scale(x.dtype)))
    return branch, None


def make_branch_step(block, kind: str, variant: str, config: ModelConfig, device: torch.device
                     ) -> tuple[Callable[[], None], str | None]:
    """fwd + bwd of one branch under bf16 autocast; gradients of the input and every parameter of the block.
    Returns the step and the fused op's implementation (None: not the fused ops)."""
    branch, fused = make_branch(block, kind, variant, device)
    if variant == "folded_sdpa_compile":
        branch = torch.compile(branch, backend=compile_backend(device))
    n_tokens = block.input_tokens
    dim = block.attn.qkv.in_features
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(config.batch, n_tokens, dim, device=device, generator=g, requires_grad=True)
    grad_out = torch.randn(config.batch, n_tokens, dim, device=device, generator=g)
    params = [p for p in block.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = branch(x)
        torch.autograd.grad(out, [x] + params, grad_out.to(out.dtype), allow_unused=True)
    return step, fused


def branch_counts(block, kind: str, batch: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one branch, fwd + bwd = 3x fwd.

    FLOPs: 2 x the multiply-accumulates of the matmuls (attention: qkv, q @ k^T, p @ v, proj; MLP: fc1, fc2).
    Bytes: an idealised traffic model: each bf16 intermediate between two matmul-sized steps written once and
    read once, the fp32 input and output once, the bf16 weights once. Effective GB/s, to compare variants,
    not measured DRAM traffic.
    """
    B, N, C = batch, block.input_tokens, block.attn.qkv.in_features
    if kind == "attn":
        width = block.attn.qkv.out_features // 3
        macs = B * N * C * 3 * width + 2 * B * N * N * width + B * N * width * C
        # x in, out (fp32); u, qkv, o (bf16) each written and read; qkv and proj weights.
        traffic = 4 * 2 * B * N * C + 2 * 2 * (B * N * C + 3 * B * N * width + B * N * width) \
            + 2 * (3 * width * C + width * C)
    else:
        M = block.mlp.fc1.out_features
        macs = 2 * B * N * C * M
        traffic = 4 * 2 * B * N * C + 2 * 2 * (B * N * C + B * N * M) + 2 * 2 * C * M
    return 3 * 2 * float(macs), 3 * float(traffic)


# -- the run ---------------------------------------------------------------------------------------------
def bench_variant(config: ModelConfig, variant: str, device: torch.device, it: Iterations) -> list[dict]:
    """The search_step, attn_block and mlp_block rows of one variant."""
    model = build_search_model(config, variant, device)
    base = {"model": config.label, "batch": config.batch, "variant": variant}
    rows = []

    step = make_search_step(model, config, variant, device)
    fused_kernels = not fused_fell_back(step) if variant == "fused" else None
    step, backend, warmup_s = with_sdpa_backend(step, variant, device)
    ms = time_ms(step, device, it.step_warmup, it.step_iters)
    step_flops = 3 * 2 * vitslim.count_flops(model, batch_size=config.batch)
    rows.append({"bench": "search_step", **base, "median_ms": ms, "peak_mem_bytes": peak_mem(step, device),
                 "first_calls_s": warmup_s, "fused_kernels": fused_kernels, "sdpa_backend": backend,
                 "fused_impl": selected_implementation("gated_attention_branch", device) if fused_kernels else None,
                 "flops": step_flops, **achieved(step_flops, None, ms)})
    del step
    release_memory(device)

    block = vitslim.searchable.searchable_blocks(model)[0]
    for kind in ("attn", "mlp"):
        fn, fused_impl = make_branch_step(block, kind, variant, config, device)
        fn, backend, warmup_s = with_sdpa_backend(fn, variant if kind == "attn" else "", device)
        ms = time_ms(fn, device, it.block_warmup, it.block_iters)
        flops, traffic = branch_counts(block, kind, config.batch)
        rows.append({"bench": f"{kind}_block", **base, "median_ms": ms, "peak_mem_bytes": peak_mem(fn, device),
                     "first_calls_s": warmup_s, "fused_impl": fused_impl, "sdpa_backend": backend,
                     "fused_kernels": fused_impl not in (None, "reference") if variant == "fused" else None,
                     "flops": flops, "bytes": traffic, **achieved(flops, traffic, ms)})
        del fn
        release_memory(device)
    del model
    if variant == "folded_sdpa_compile":
        torch._dynamo.reset()
    release_memory(device)
    return rows


def with_sdpa_backend(fn: Callable[[], None], variant: str, device: torch.device
                      ) -> tuple[Callable[[], None], str | None, float]:
    """(fn to time, the SDPA backend it runs or None, wall seconds of its first two calls): the SDPA variants are
    forced onto flash where their shapes allow (common.sdpa_flash_where_possible); the others use no SDPA."""
    if variant not in SDPA_VARIANTS:
        return fn, None, first_calls_s(fn, device)
    chosen, backend, probe_s = sdpa_flash_where_possible(fn)
    return chosen, backend, probe_s + first_calls_s(chosen, device, calls=1)


def profile_fused(config: ModelConfig, device: torch.device) -> dict[str, dict]:
    """Per-kernel device times of the fused search step (common.kernel_times_ms): run after every timing."""
    model = build_search_model(config, "fused", device)
    step = make_search_step(model, config, "fused", device)
    try:
        return kernel_times_ms(step)
    finally:
        del step, model
        release_memory(device)


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and workload: fused speedup over each baseline (baseline_ms / fused_ms), memory ratio."""
    out = []
    keys = sorted({(r["model"], r["batch"], r["bench"]) for r in rows}, key=str)
    for model, batch, bench in keys:
        by_variant = {r["variant"]: r for r in rows if (r["model"], r["batch"], r["bench"]) == (model, batch, bench)}
        fused = by_variant.get("fused")
        if fused is None:
            continue
        row = {"bench": "summary", "of": bench, "model": model, "batch": batch,
               "fused_kernels": fused["fused_kernels"]}
        for baseline in BASELINES:
            if baseline in by_variant:
                row[f"speedup_vs_{baseline}"] = by_variant[baseline]["median_ms"] / fused["median_ms"]
                # "fused/each baseline" as a time ratio too (< 1 is faster)
                row[f"time_ratio_fused_over_{baseline}"] = fused["median_ms"] / by_variant[baseline]["median_ms"]
        eager = by_variant.get("paper_eager")
        if eager is not None and eager["peak_mem_bytes"] and fused["peak_mem_bytes"] is not None:
            row["peak_mem_ratio_vs_paper_eager"] = fused["peak_mem_bytes"] / eager["peak_mem_bytes"]
        if bench == "search_step":
            row["targets"] = TARGETS
            row["meets_targets"] = {k: (row[k] <= v if k.startswith("peak_mem") else row[k] >= v)
                                    for k, v in TARGETS.items() if k in row}
        out.append(row)
    return out


def run(models: tuple[ModelConfig, ...], variants: tuple[str, ...], device: torch.device, it: Iterations,
        log: Callable[[str], None] = print, progress: Progress | None = None,
        earlier: list[dict] = ()) -> list[dict]:
    """Every variant of every model (in the order given), then the summary rows (with `earlier` rows of this run
    to compare with, e.g. the fused rows when only the compiled baseline runs here). With a `progress`, a variant
    starts only before its deadline (a compiled one only with its compile time left) and each finished one is
    reported (rows so far + their summary). Last, on a GPU, the fused step's per-kernel times are profiled (after
    every timing: see common.kernel_times_ms)."""
    progress = progress or Progress()
    measured: list[dict] = []
    earlier = [r for r in earlier if r.get("bench") != "summary"]
    for config in models:
        for variant in variants:
            needs_s = COMPILE_NEEDS_S.get(config.name, 90.0) if "compile" in variant and device.type == "cuda" else 0
            if not progress.starts(f"P1 {config.label} bs{config.batch} {variant}", needs_s):
                continue
            start = time.perf_counter()
            new = bench_variant(config, variant, device, it)
            measured.extend(new)
            progress.rows = measured + summarise(earlier + measured)
            progress.update()
            times = ", ".join(f"{r['bench']} {r['median_ms']:.2f} ms" for r in new)
            log(f"{config.label} bs{config.batch} {variant}: {times} ({time.perf_counter() - start:.0f} s)")
    fused = next((r for r in measured if r["bench"] == "search_step" and r["variant"] == "fused"), None)
    if fused is not None and device.type == "cuda" and progress.starts(f"P1 {fused['model']} profile"):
        config = next(c for c in models if c.label == fused["model"] and c.batch == fused["batch"])
        fused["kernel_ms"] = profile_fused(config, device)  # for the roofline's measured / predicted
    progress.rows = measured + summarise(earlier + measured)
    progress.update()
    return progress.rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, one timed iteration: check that everything runs; write no file")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.dry_run:
        rows = run(DRY_RUN_MODELS, tuple(args.variants), torch.device("cpu"), DRY_RUN_ITERATIONS)
        print(json.dumps(rows, indent=1))
        return
    if not torch.cuda.is_available():
        raise SystemExit("the search benchmarks need a CUDA GPU (use --dry-run to check them on the CPU)")
    rows = run(MODELS, tuple(args.variants), torch.device("cuda"), Iterations())
    print(f"wrote {write_results('search_step', rows)}")


if __name__ == "__main__":
    main()
