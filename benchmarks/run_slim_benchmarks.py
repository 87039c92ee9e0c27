"""Slim-model benchmarks (docs/design.md section 6: P2 ragged attention, P3 slim inference, P4 retrain step).

    python benchmarks/run_slim_benchmarks.py            # GPU (H100): writes three files to benchmarks/results/
    python benchmarks/run_slim_benchmarks.py --dry-run  # CPU, tiny shapes: checks the plumbing, writes nothing

Plans: a random-init timm model is made searchable and its gates get magnitudes from a fixed seed shaped like a
trained search's (wide early blocks, narrow late ones): block l of L (depth t = l / (L - 1)) gives head h a
scale (2 - 1.4 t) * U(0.25, 1.75), a head of a late block is nearly switched off (x 0.01) with probability 0.3 t,
and each dim of a head is uniform in [0, its head's scale); MLP units are uniform in [0, 1.5 - t), tokens in
[0, 3 (1.2 - 0.6 t)). vitslim.threshold then keeps 70% of each (0.7 / 0.7 / 0.7), ranked globally: DeiT-S keeps
about 320 of 384 attention dims in its first blocks and 131 in its last, with heads from 0 (pruned) to 61 wide,
not the even 40-46 spread that uniform random gates give.

ragged_attention.json (P2): the attention of every block of the plan's model, heads at the plan's widths,
B = 256 (P2) and 1 (latency), N = 197, bf16; mode "fwd" (no grad) and "fwd_bwd" (gradients of q, k, v).
Variants:
  ragged        the ragged-attention kernels on q, k, v viewed from one (B, N, 3D) qkv tensor; one row per
                implementation that runs on this device ("implementation"), called directly so that each is
                timed at every size; "dispatch_default" marks the one dispatch picks at that size
  padded_sdpa   F.scaled_dot_product_attention with every head zero-padded to the widest (rounded up to a
                multiple of 8), tensors laid out (B, H, N, W) beforehand (zero-padded qkv / proj weights give
                that layout for free, so no copy is timed)
  grouped_sdpa  one SDPA call per group of heads of equal padded width (multiple of 8), laid out beforehand
  FLOPs are the useful ones (kept widths): 4 B N^2 sum(w) forward, 3.5x that forward + backward (the flash
  backward does 5 matmuls to the forward's 2); bytes: q, k, v read and o written once.
slim_inference.json (P3): DeiT-S dense (timm, SDPA) vs slim at 70/70/70 (vitslim.slim(..., fused=True)),
  eval, no grad, bf16 autocast, batch 256 and 1.
retrain_step.json (P4): one training step (bf16 autocast forward, cross-entropy, backward, AdamW) of DeiT-S at
  batch 256: dense timm model (SDPA); the slim model; the paper's retraining (the full model made searchable,
  gates fixed to the plan's 0/1 masks, requires_grad False, implementation "eager").
"flops" in the last two files is vitslim.count_flops: multiply-accumulates (the paper's convention), so the
TFLOP/s beside them count 2 FLOPs per MAC (and a training step as 3 forwards).
"""
from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitslim  # noqa: E402
import vitslim_kernels  # noqa: E402
from vitslim.cuda_graphs import use_cuda_graphs  # noqa: E402
from benchmarks.common import (Progress, achieved, kernel_times_ms, sdpa_flash_where_possible,  # noqa: E402
                               write_results)
from benchmarks.common import time_ms as common_time_ms  # noqa: E402

BUDGET = 0.7
PLAN_SEED = 0
# Wall seconds a cold inductor compile of DeiT-S is expected to take on the GPU machine's 16 cores (inference;
# training fwd + bwd): a torch.compile'd dense baseline starts only when this much of the part's time is left.
COMPILE_NEEDS_S = {"inference": 60.0, "training": 90.0}


@dataclass(frozen=True)
class ModelConfig:
    label: str
    name: str                      # timm model name
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    device: torch.device
    attention_models: tuple[ModelConfig, ...]
    slim_model: ModelConfig        # P3 and P4
    attention_batches: tuple[int, ...]
    inference_batches: tuple[int, ...]
    train_batch: int
    warmup: int
    iters: int


_TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
GPU_SETUP = Setup(torch.device("cuda"),
                  (ModelConfig("deit_small", "deit_small_patch16_224"), ModelConfig("deit_base", "deit_base_patch16_224")),
                  ModelConfig("deit_small", "deit_small_patch16_224"), (256, 1), (256, 1), 256, warmup=10, iters=30)
DRY_RUN_SETUP = Setup(torch.device("cpu"), (ModelConfig("deit_small(tiny)", "deit_small_patch16_224", _TINY),),
                      ModelConfig("deit_small(tiny)", "deit_small_patch16_224", _TINY), (2,), (2, 1), 2, warmup=1,
                      iters=1)


# -- timing --------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], setup: Setup) -> float:
    return common_time_ms(fn, setup.device, setup.warmup, setup.iters)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- plans ---------------------------------------------------------------------------------------------
def searchable_with_plan_like_gates(config: ModelConfig, seed: int = PLAN_SEED) -> torch.nn.Module:
    """Random-init timm model made searchable, gates shaped like a trained search's (module docstring), CPU."""
    torch.manual_seed(seed)
    model = timm.create_model(config.name, pretrained=False, **config.overrides)
    vitslim.make_searchable(model)
    g = torch.Generator().manual_seed(seed)
    gates = list(vitslim.gates(model))
    with torch.no_grad():
        for l, gate in enumerate(gates):
            depth = l / max(1, len(gates) - 1)
            H = gate.attn.shape[0]
            per_head = (2.0 - 1.4 * depth) * (0.25 + 1.5 * torch.rand(H, generator=g))
            off = torch.rand(H, generator=g) < 0.3 * depth
            per_head = torch.where(off, 0.01 * per_head, per_head)
            gate.attn.copy_(per_head[:, None] * torch.rand(gate.attn.shape, generator=g))
            gate.mlp.copy_((1.5 - 1.0 * depth) * torch.rand(gate.mlp.shape, generator=g))
            gate.tokens.copy_(3.0 * (1.2 - 0.6 * depth) * torch.rand(gate.tokens.shape, generator=g))
    return model


def plan_for(config: ModelConfig) -> tuple[torch.nn.Module, vitslim.SlimPlan]:
    model = searchable_with_plan_like_gates(config)
    return model, vitslim.threshold(model, BUDGET, BUDGET, BUDGET)


def head_widths(plan: vitslim.SlimPlan) -> list[tuple[int, ...]]:
    """The kept width of every head, per block."""
    return [tuple(b.head_dims) for b in plan.blocks]


# -- P2: ragged attention ------------------------------------------------------------------------------
def _pad8(w: int) -> int:
    return max(8, -(-w // 8) * 8)


@dataclass
class AttentionWorkload:
    """Inputs of every block's attention for one variant, built once; call(mode) runs all blocks."""
    variant: str
    blocks: list                   # per block: the variant's tensors
    head_dims: list[tuple[int, ...]]
    scale: float
    kernel: Callable | None = None  # ragged: the implementation on a packed qkv (qkv, head_dims, scale)

    def run(self, grad: bool) -> Callable[[], None]:
        if self.variant == "ragged":
            def block(inputs, dims):
                qkv, gout = inputs
                o = self.kernel(qkv, dims, self.scale)
                if grad:
                    torch.autograd.grad(o, qkv, gout)
        else:
            def block(inputs, dims):
                for q, k, v, gout in inputs:  # one SDPA call per group (padded: one group)
                    o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
                    if grad:
                        torch.autograd.grad(o, (q, k, v), gout)

        def call() -> None:
            with torch.set_grad_enabled(grad):
                for inputs, dims in zip(self.blocks, self.head_dims):
                    block(inputs, dims)
        return call


def attention_workload(variant: str, head_dims: list[tuple[int, ...]], B: int, N: int, scale: float,
                       device: torch.device, dtype: torch.dtype, grad: bool, kernel: Callable | None = None
                       ) -> AttentionWorkload:
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)

    blocks = []
    for dims in head_dims:
        D = sum(dims)
        if variant == "ragged":
            blocks.append((randn(B, N, 3 * D), torch.randn(B, N, D, device=device, dtype=dtype, generator=g)))
            continue
        if variant == "padded_sdpa":
            groups = {_pad8(max(dims)): sum(1 for w in dims if w > 0)}
        elif variant == "grouped_sdpa":
            groups: dict[int, int] = {}
            for w in dims:
                if w > 0:
                    groups[_pad8(w)] = groups.get(_pad8(w), 0) + 1
        else:
            raise ValueError(f"variant must be ragged, padded_sdpa or grouped_sdpa, got {variant!r}")
        blocks.append([(randn(B, h, N, w), randn(B, h, N, w), randn(B, h, N, w),
                        torch.randn(B, h, N, w, device=device, dtype=dtype, generator=g))
                       for w, h in sorted(groups.items())])
    return AttentionWorkload(variant, blocks, head_dims, scale, kernel)


def _on_packed(fn: Callable) -> Callable:
    """An implementation taking q, k, v as one taking the packed qkv (B, N, 3D), q, k, v its column thirds."""
    def packed(qkv: torch.Tensor, dims: tuple[int, ...], scale: float) -> torch.Tensor:
        D = sum(dims)
        return fn(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], dims, scale)
    return packed


def ragged_implementations(device: torch.device, dtype: torch.dtype, grad: bool, shape: tuple[int, int, int]
                           ) -> list[tuple[str, Callable, bool]]:
    """(name, callable on a packed qkv, is dispatch's pick for q of `shape`) for each kernel (not the reference)
    that runs on this device and dtype at all; only the reference where none does (the CPU dry run). With grad,
    Triton is the packed op training runs (its backward writes one dqkv, vitslim_kernels' ragged_attention_qkv);
    the others slice qkv into q, k, v (views: no copy)."""
    small = torch.empty(1, 1, 1, device=device, dtype=dtype, requires_grad=grad)
    full = torch.empty(shape, device=device, dtype=dtype, requires_grad=grad)
    found = []
    with torch.set_grad_enabled(grad):
        pick = next(name for name, why in vitslim_kernels.explain("ragged_attention", full) if why is None)
        names = [name for name, _ in vitslim_kernels.explain("ragged_attention", small)]
        for name in [n for n in names if n != "reference"]:
            try:
                fn = _on_packed(vitslim_kernels.select("ragged_attention", small, forced=name))
            except RuntimeError:  # cannot run on this device or dtype at all
                continue
            if grad and name == "triton":
                from vitslim_kernels.ops.ragged_attention import ragged_attention_qkv_triton
                fn = ragged_attention_qkv_triton
            found.append((name, fn, name == pick))
        if not found:
            found.append(("reference", _on_packed(vitslim_kernels.select("ragged_attention", small,
                                                                          forced="reference")), pick == "reference"))
    return found


def bench_ragged_attention(setup: Setup, progress: Progress | None = None,
                           implementations: tuple[str, ...] | None = None) -> list[dict]:
    """P2: ragged attention against padded and grouped SDPA; with `implementations`, only those ragged
    implementations and no baseline (gpu_check's autotune part)."""
    dtype = torch.bfloat16
    progress = progress or Progress()
    for config in setup.attention_models:
        _, plan = plan_for(config)
        dims = head_widths(plan)
        N = plan.num_prefix_tokens + plan.num_patches
        scale = plan.head_dim ** -0.5
        useful = sum(sum(d) for d in dims)
        for B in setup.attention_batches:
            fwd_flops = 4 * B * N * N * useful
            io_bytes = 4 * B * N * useful * torch.finfo(dtype).bits // 8
            for mode, grad in (("fwd", False), ("fwd_bwd", True)):
                flops = fwd_flops * (3.5 if grad else 1.0)
                bytes_moved = io_bytes * (2.5 if grad else 1.0)  # + dO read, dq dk dv written
                widest_block = (B, N, max(sum(d) for d in dims))
                cases = [("ragged", name, fn, default)
                         for name, fn, default in ragged_implementations(setup.device, dtype, grad, widest_block)
                         if implementations is None or name in implementations]
                if implementations is None:
                    cases += [("padded_sdpa", None, None, None), ("grouped_sdpa", None, None, None)]
                for variant, name, fn, default in cases:
                    if not progress.starts(f"P2 {config.label} B={B} {mode} {variant} {name or ''}".rstrip()):
                        continue
                    work = attention_workload(variant, dims, B, N, scale, setup.device, dtype, grad, fn)
                    call, backend = work.run(grad), None
                    if variant != "ragged":
                        call, backend, _ = sdpa_flash_where_possible(call)
                    ms = time_ms(call, setup)
                    row = {"mode": mode, "variant": variant, "model": config.label, "median_ms": ms, "batch": B,
                           "tokens": N, "head_dims": [list(d) for d in dims], "sdpa_backend": backend}
                    if variant == "ragged":
                        row.update(implementation=name, dispatch_default=default,
                                   packed_qkv=grad and name == "triton")
                    row.update(achieved(flops, bytes_moved, ms))
                    progress.add(row)
                    print(f"ragged_attention {config.label:16s} B={B:<4d} {mode:8s} {variant:13s} {name or '':9s} "
                          f"{ms:9.3f} ms", flush=True)
                    del work
                    release_memory()
    return progress.rows


# -- P3: slim inference --------------------------------------------------------------------------------
def slim_from_plan(searchable: torch.nn.Module, plan: vitslim.SlimPlan, device: torch.device) -> torch.nn.Module:
    return vitslim.slim(searchable, plan, fused=True).to(device)


def _compile_backend(device: torch.device) -> str:
    # As benchmarks.run_search_benchmarks: the CPU dry run checks that dynamo traces the model (aot_eager), not
    # inductor's C++ code generation (minutes on 2 cores); on the GPU it is inductor.
    return "inductor" if device.type == "cuda" else "aot_eager"


def bench_slim_inference(setup: Setup, progress: Progress | None = None) -> list[dict]:
    """Dense (timm, SDPA with flash forced where it applies) and slim, each also replayed from CUDA graphs where
    there is a GPU (vitslim.cuda_graphs: at batch 1 the launches set the latency), and last the torch.compile'd
    dense model at the largest batch (its compilation timed apart). speedup_vs_dense compares each slim row with
    the dense row of the same mode (graphs or not); best_speedup_vs_dense the best slim with the best dense, eager
    or graphs (docs/design.md's baseline); speedup_vs_dense_compile the best slim with the compiled dense. The slim
    model's per-kernel times are profiled after every timing (common.kernel_times_ms)."""
    progress = progress or Progress()
    config = setup.slim_model
    searchable, plan = plan_for(config)
    torch.manual_seed(PLAN_SEED)
    dense = timm.create_model(config.name, pretrained=False, **config.overrides).to(setup.device).eval()
    slim = slim_from_plan(searchable.eval(), plan, setup.device).eval()
    models = [("dense", dense), ("slim", slim)]
    if setup.device.type == "cuda":
        graphed_dense = timm.create_model(config.name, pretrained=False, **config.overrides)
        graphed_dense.load_state_dict(dense.state_dict())
        models += [("dense_cuda_graphs", use_cuda_graphs(graphed_dense.to(setup.device).eval())),
                   ("slim_cuda_graphs", vitslim.slim(searchable, plan, fused=True, cuda_graphs=True)
                    .to(setup.device).eval())]
    else:
        progress.not_run.append("P3 dense_cuda_graphs, slim_cuda_graphs: not run: CUDA graphs need a GPU")
    models.append(("dense_compile", torch.compile(dense, backend=_compile_backend(setup.device), dynamic=False)))
    needs_s = COMPILE_NEEDS_S["inference"] if setup.device.type == "cuda" else 0.0
    h, w = dense.patch_embed.img_size
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    for batch in setup.inference_batches:
        images = torch.randn(batch, 3, h, w, device=setup.device)
        timings = {}
        for variant, model in models:
            if variant == "dense_compile" and batch != max(setup.inference_batches):
                continue  # compiled at the throughput batch only (a cold compile per batch size; bs 1: CUDA graphs)
            if not progress.starts(f"P3 batch {batch} {variant}", needs_s if variant.endswith("compile") else 0.0):
                continue

            def forward(model=model) -> None:
                with torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
                    model(images)
            backend, first_s = None, None
            if variant.startswith("dense"):
                forward, backend, first_s = sdpa_flash_where_possible(forward)
            ms = time_ms(forward, setup)
            macs = vitslim.count_flops(dense if variant == "dense_compile" else model, batch)
            timings[variant] = (ms, macs)
            row = {"batch": batch, "variant": variant, "median_ms": ms, "flops": macs, "flop_unit": "MAC",
                   "sdpa_backend": backend, **achieved(2 * macs, None, ms)}
            if variant == "dense_compile":
                row["first_call_s"] = first_s  # the compilation (per input shape), left out of the median
            if variant.startswith("slim"):
                base = timings.get(variant.replace("slim", "dense"))
                row.update(ragged_attention_implementation=_dispatched(  # (its first block's attention)
                    setup.device, False, (batch, tokens, slim.blocks[0].attn.width)))
                if base is not None:
                    row.update(speedup_vs_dense=base[0] / ms, flops_ratio_vs_dense=base[1] / macs)
            progress.add(row)
            print(f"slim_inference   batch {batch:4d} {variant:17s} {ms:9.3f} ms", flush=True)
        dense_best = min((t for v, t in timings.items() if v in ("dense", "dense_cuda_graphs")), default=None)
        slim_best = min((t for v, t in timings.items() if v.startswith("slim")), default=None)
        if dense_best and slim_best:
            summary = {"batch": batch, "variant": "summary", "best_speedup_vs_dense": dense_best[0] / slim_best[0],
                       "flops_ratio_vs_dense": dense_best[1] / slim_best[1]}
            if "dense_compile" in timings:
                summary["speedup_vs_dense_compile"] = timings["dense_compile"][0] / slim_best[0]
            progress.add(summary)
        del images
        release_memory()
    batch = max(setup.inference_batches)
    slim_row = next((r for r in progress.rows if r["variant"] == "slim" and r["batch"] == batch), None)
    if slim_row is not None and setup.device.type == "cuda" and progress.starts(f"P3 batch {batch} slim profile"):
        images = torch.randn(batch, 3, h, w, device=setup.device)

        def forward() -> None:
            with torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
                slim(images)
        slim_row["kernel_ms"] = kernel_times_ms(forward)
        progress.update()
    return progress.rows


def _dispatched(device: torch.device, grad: bool, shape: tuple[int, int, int] = (1, 1, 1)) -> str:
    example = torch.empty(shape, device=device, dtype=torch.bfloat16, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        return next(name for name, why in vitslim_kernels.explain("ragged_attention", example) if why is None)


# -- P4: retrain step ----------------------------------------------------------------------------------
def mask_gates_to_plan(searchable: torch.nn.Module, plan: vitslim.SlimPlan) -> torch.nn.Module:
    """The paper's retraining: gates fixed to the plan's 0/1 masks (tokens: tanh(raw) = 1 or 0), no gradient."""
    with torch.no_grad():
        for gate, block in zip(vitslim.gates(searchable), plan.blocks):
            attn = torch.zeros_like(gate.attn)
            for h, kept in enumerate(block.heads):
                attn[h, list(kept)] = 1.0
            mlp = torch.zeros_like(gate.mlp)
            mlp[list(block.mlp)] = 1.0
            tokens = torch.zeros_like(gate.tokens)
            tokens[list(block.tokens)] = 20.0  # tanh(20) rounds to 1 in fp32 and bf16
            gate.attn.copy_(attn)
            gate.mlp.copy_(mlp)
            gate.tokens.copy_(tokens)
            for p in gate.parameters():
                p.requires_grad_(False)
    return vitslim.set_implementation(searchable, "eager")


def training_step(model: torch.nn.Module, batch: int, device: torch.device,
                  compiled: Callable | None = None) -> Callable[[], None]:
    """One step of model (forward through `compiled` when given: torch.compile(model))."""
    forward = compiled if compiled is not None else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    h, w = model.patch_embed.img_size
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, h, w, device=device, generator=g)
    labels = torch.randint(0, model.num_classes, (batch,), device=device, generator=g)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
    return step


def bench_retrain_step(setup: Setup, progress: Progress | None = None) -> list[dict]:
    """One training step of the dense model (SDPA, flash forced where it applies), the slim model, the paper's
    masked retraining, and last the torch.compile'd dense model (its compilation timed apart)."""
    progress = progress or Progress()
    config = setup.slim_model
    timed = {}
    for variant in ("dense", "slim", "paper_masked", "dense_compile"):
        compiled = variant == "dense_compile"
        needs_s = COMPILE_NEEDS_S["training"] if compiled and setup.device.type == "cuda" else 0.0
        if not progress.starts(f"P4 {variant}", needs_s):
            continue
        searchable, plan = plan_for(config)
        if variant in ("dense", "dense_compile"):
            torch.manual_seed(PLAN_SEED)
            model = timm.create_model(config.name, pretrained=False, **config.overrides)
        elif variant == "slim":
            model = vitslim.slim(searchable, plan, fused=True)
        else:
            model = mask_gates_to_plan(searchable, plan)
        model = model.to(setup.device).train()
        macs = vitslim.count_flops(model, setup.train_batch)  # paper_masked: the full model's, all computed
        step = training_step(model, setup.train_batch, setup.device,
                             torch.compile(model, backend=_compile_backend(setup.device)) if compiled else None)
        backend, first_s = None, None
        if variant.startswith("dense"):
            step, backend, first_s = sdpa_flash_where_possible(step)
        ms = time_ms(step, setup)
        row = {"variant": variant, "median_ms": ms, "flops": 3 * macs, "flop_unit": "MAC", "batch": setup.train_batch,
               "sdpa_backend": backend, **achieved(2 * 3 * macs, None, ms)}
        if compiled:
            row["first_call_s"] = first_s  # the compilation, left out of the median
        if variant == "slim":
            row["ragged_attention_implementation"] = _dispatched(setup.device, True)
        timed[variant] = progress.add(row)
        print(f"retrain_step     {variant:12s} {ms:9.3f} ms", flush=True)
        del model, searchable, step
        if compiled:
            torch._dynamo.reset()
        release_memory()
    dense, slim_row, masked, compiled = (timed.get(v) for v in ("dense", "slim", "paper_masked", "dense_compile"))
    for row in (slim_row, masked):
        if row is not None and dense is not None:
            row["speedup_vs_dense"] = dense["median_ms"] / row["median_ms"]
    if slim_row is not None and dense is not None:
        slim_row["flops_ratio_vs_dense"] = dense["flops"] / slim_row["flops"]
    if slim_row is not None and masked is not None:
        slim_row["speedup_vs_paper_masked"] = masked["median_ms"] / slim_row["median_ms"]
    if slim_row is not None and compiled is not None:
        slim_row["speedup_vs_dense_compile"] = compiled["median_ms"] / slim_row["median_ms"]
    progress.update()
    return progress.rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, nothing written")
    args = parser.parse_args(argv)
    if args.dry_run:
        setup = DRY_RUN_SETUP
    elif torch.cuda.is_available():
        setup = GPU_SETUP
    else:
        parser.error("no CUDA GPU: these benchmarks need one (use --dry-run to check the script on CPU)")
    print("ragged_attention dispatch on this device, small inference / training:",
          _dispatched(setup.device, False), "/", _dispatched(setup.device, True), flush=True)
    results = {"ragged_attention": bench_ragged_attention(setup),
               "slim_inference": bench_slim_inference(setup),
               "retrain_step": bench_retrain_step(setup)}
    if args.dry_run:
        print(f"dry run: {sum(len(r) for r in results.values())} rows computed, nothing written")
        return 0
    for name, rows in results.items():
        print(f"wrote {write_results(name, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
