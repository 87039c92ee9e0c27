"""Swin benchmarks (issue 25; `make gpu-check`'s part "swin", after P1-P4 and cut first when late).

    python -m benchmarks.run_swin_benchmarks            # GPU: writes benchmarks/results/swin.json
    python -m benchmarks.run_swin_benchmarks --dry-run  # CPU, a tiny Swin, Triton's interpreter: the plumbing only

Rows, each a device-timed median (benchmarks.common.time_ms), bf16 autocast:
  search_step       Swin-T search step (forward, backward, AdamW) at the search batch: "fused" (window_qkv_attention
                    and gated_mlp_branch), "folded_sdpa" (gates folded into the weights, SDPA with the bias and the
                    shift mask as one float mask: the memory-efficient backend, forced), "paper_eager" (explicit
                    softmax, gates multiplied into q, k, v and the hidden units)
  window_attention  the attention of every block of a slim Swin-T (budgets 0.7, heads of their planned widths): the
                    window kernel on q, k, v viewed from one packed qkv against "padded_sdpa" (every head zero-padded
                    to the widest, multiple of 8) and "grouped_sdpa" (one SDPA per group of heads of equal padded
                    width); each SDPA variant builds its float mask (bias gathered + shift mask) inside the timed
                    call, as the model does; modes "fwd" (no grad) and "fwd_bwd" (gradients of qkv and the table)
  slim_inference    slim Swin-T (fused) against the dense timm model with its attention on SDPA (timm's fused_attn,
                    off for Swin by default), eval, at the search batch and batch 1
  retrain_step      one training step of the slim Swin-T against the dense one
Plans: random gate magnitudes (a fixed seed) thresholded at 0.7 / 0.7 (Swin has no token gates).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F

import vitslim
from benchmarks.common import Progress, achieved, time_ms, write_results
from vitslim.families import family_of
from vitslim.families.swin import window_scores_mask

SEED = 0
BUDGETS = (0.7, 0.7)


@dataclass(frozen=True)
class Setup:
    device: torch.device
    model: str
    overrides: dict
    batch: int               # search step, window attention, throughput inference, retrain
    warmup: int
    iters: int


GPU_SETUP = Setup(torch.device("cuda"), "swin_tiny_patch4_window7_224", {}, 128, warmup=5, iters=20)
DRY_RUN_SETUP = Setup(torch.device("cpu"), "swin_tiny_patch4_window7_224",
                      dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
                           num_classes=10), 2, warmup=1, iters=1)


def _dense(setup: Setup) -> torch.nn.Module:
    """timm's Swin with its attention on SDPA (bias and shift mask as one float mask): timm leaves Swin on its
    explicit softmax by default (fused_attn False); SDPA is the strong dense baseline."""
    torch.manual_seed(SEED)
    model = timm.create_model(setup.model, pretrained=False, drop_path_rate=0.0, **setup.overrides)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def _searched(setup: Setup) -> tuple[torch.nn.Module, vitslim.SlimPlan]:
    model = vitslim.make_searchable(_dense(setup))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for gate in vitslim.gates(model):
            gate.attn.copy_(torch.rand(gate.attn.shape, generator=g))
            gate.mlp.copy_(torch.rand(gate.mlp.shape, generator=g))
    return model, vitslim.threshold(model, *BUDGETS)


def _images(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(SEED)
    h, w = model.patch_embed.img_size
    return (torch.randn(batch, 3, h, w, device=device, generator=g),
            torch.randint(0, model.num_classes, (batch,), device=device, generator=g))


def _step(model: torch.nn.Module, batch: int, device: torch.device, search: bool) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    images, labels = _images(model, batch, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
            if search:
                attn, mlp, _ = vitslim.sparsity_losses(model)
                loss = loss + 2e-4 * attn + 5e-5 * mlp
        loss.backward()
        optimizer.step()
    return step


def efficient_sdpa(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str]:
    """fn with SDPA forced onto its memory-efficient backend (the one that takes a float mask) where it runs, else
    as it is; and the backend's name for the row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced() -> object:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return fn()
    if device.type != "cuda":
        return fn, "default (CPU)"
    try:
        forced()
        return forced, "efficient"
    except RuntimeError as e:
        return fn, f"default (efficient refused: {str(e).splitlines()[0][:80]})"


def bench_search_step(setup: Setup, progress: Progress) -> None:
    timed = {}
    for variant, implementation in (("fused", "fused"), ("folded_sdpa", "folded"), ("paper_eager", "eager")):
        if not progress.starts(f"swin search_step {variant}"):
            continue
        model = vitslim.make_searchable(_dense(setup), implementation=implementation).to(setup.device).train()
        step, backend = _step(model, setup.batch, setup.device, search=True), None
        if variant == "folded_sdpa":
            step, backend = efficient_sdpa(step, setup.device)
        ms = time_ms(step, setup.device, setup.warmup, setup.iters)
        macs = vitslim.count_flops(model, setup.batch)
        timed[variant] = progress.add({"bench": "search_step", "variant": variant, "batch": setup.batch,
                                       "median_ms": ms, "flops": 3 * macs, "flop_unit": "MAC",
                                       "sdpa_backend": backend, **achieved(6 * macs, None, ms)})
        print(f"swin search_step {variant:12s} {ms:9.3f} ms", flush=True)
        del model, step
    fused = timed.get("fused")
    for name, row in timed.items():
        if fused is not None and name != "fused":
            fused[f"speedup_vs_{name}"] = row["median_ms"] / fused["median_ms"]
    progress.update()


def _attention_blocks(searched: torch.nn.Module, plan: vitslim.SlimPlan, batch: int) -> list[dict]:
    """Per block of the slim model: kept head widths, window, windows per image, shifted or not, the table."""
    slim = vitslim.slim(searched, plan)
    out = []
    for block, b in zip(family_of(slim).blocks(slim), plan.blocks):
        dims = tuple(w for w in b.head_dims if w)
        if not dims:
            continue
        H, W = block.input_resolution
        ws = block.window_size[0]
        nW = (-(-H // ws)) * (-(-W // ws))
        mask = block.attn_mask if getattr(block, "attn_mask", None) is not None else None
        out.append(dict(dims=dims, window=ws, windows=batch * nW, mask=mask,
                        table=block.attn.relative_position_bias_table.detach(),
                        index=block.attn.relative_position_index, scale=block.attn.scale))
    return out


def _window_call(variant: str, b: dict, grad: bool, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    from vitslim_kernels import window_attention
    g = torch.Generator(device=device).manual_seed(SEED)
    dims, N, BW = b["dims"], b["window"] ** 2, b["windows"]
    table = b["table"].to(device).requires_grad_(grad)
    index = b["index"].to(device)
    mask = b["mask"].to(device) if b["mask"] is not None else None
    if variant == "window":
        D = sum(dims)
        qkv = torch.randn(BW, N, 3 * D, device=device, dtype=dtype, generator=g).requires_grad_(grad)
        gout = torch.randn(BW, N, D, device=device, dtype=dtype, generator=g)

        def call() -> None:
            with torch.set_grad_enabled(grad):
                o = window_attention(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], dims, b["scale"], table,
                                     index, mask)
                if grad:
                    torch.autograd.grad(o, (qkv, table), gout)
        return call
    pad = lambda w: max(8, -(-w // 8) * 8)  # noqa: E731
    if variant == "padded_sdpa":  # one group: every head at the widest
        groups = {pad(max(dims)): list(range(len(dims)))}
    else:  # one group per padded width
        groups = {}
        for h, w in enumerate(dims):
            groups.setdefault(pad(w), []).append(h)
    tensors = [(torch.randn(BW, len(hs), N, w, device=device, dtype=dtype, generator=g).requires_grad_(grad),
                torch.randn(BW, len(hs), N, w, device=device, dtype=dtype, generator=g).requires_grad_(grad),
                torch.randn(BW, len(hs), N, w, device=device, dtype=dtype, generator=g).requires_grad_(grad),
                torch.randn(BW, len(hs), N, w, device=device, dtype=dtype, generator=g), torch.tensor(hs, device=device))
               for w, hs in groups.items()]

    def call() -> None:
        with torch.set_grad_enabled(grad):
            bias = table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)
            for q, k, v, gout, heads in tensors:
                add = window_scores_mask(bias.index_select(0, heads), mask, BW).to(dtype)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=b["scale"])
                if grad:
                    torch.autograd.grad(o, (q, k, v, table), gout)
    return call


def bench_window_attention(setup: Setup, progress: Progress) -> None:
    blocks = _attention_blocks(*_searched(setup), setup.batch)
    useful = sum(b["windows"] * b["window"] ** 4 * sum(b["dims"]) for b in blocks)
    for mode, grad in (("fwd", False), ("fwd_bwd", True)):
        timed = {}
        for variant in ("window", "padded_sdpa", "grouped_sdpa"):
            if not progress.starts(f"swin window_attention {mode} {variant}"):
                continue
            calls = [_window_call(variant, b, grad, setup.device, torch.bfloat16) for b in blocks]

            def run_all() -> None:
                for call in calls:
                    call()
            fn, backend = (run_all, None) if variant == "window" else efficient_sdpa(run_all, setup.device)
            ms = time_ms(fn, setup.device, setup.warmup, setup.iters)
            flops = 4 * useful * (3.5 if grad else 1.0)
            timed[variant] = progress.add({"bench": "window_attention", "mode": mode, "variant": variant,
                                           "batch": setup.batch, "median_ms": ms, "sdpa_backend": backend,
                                           "head_dims": [list(b["dims"]) for b in blocks],
                                           **achieved(flops, None, ms)})
            print(f"swin window_attention {mode:8s} {variant:13s} {ms:9.3f} ms", flush=True)
        if "window" in timed:
            for name in ("padded_sdpa", "grouped_sdpa"):
                if name in timed:
                    timed["window"][f"speedup_vs_{name}"] = timed[name]["median_ms"] / timed["window"]["median_ms"]
        progress.update()


def bench_slim(setup: Setup, progress: Progress) -> None:
    searched, plan = _searched(setup)
    dense = _dense(setup).to(setup.device)
    slim = vitslim.slim(searched, plan, fused=True).to(setup.device)
    for batch in dict.fromkeys((setup.batch, 1)):
        timed = {}
        for variant, model in (("dense", dense), ("slim", slim)):
            if not progress.starts(f"swin slim_inference batch {batch} {variant}"):
                continue
            model.eval()
            images, _ = _images(model, batch, setup.device)

            def forward(model=model) -> None:
                with torch.no_grad(), torch.autocast(setup.device.type, dtype=torch.bfloat16):
                    model(images)
            ms = time_ms(forward, setup.device, setup.warmup, setup.iters)
            macs = vitslim.count_flops(model, batch)
            timed[variant] = progress.add({"bench": "slim_inference", "variant": variant, "batch": batch,
                                           "median_ms": ms, "flops": macs, "flop_unit": "MAC",
                                           **achieved(2 * macs, None, ms)})
            print(f"swin slim_inference batch {batch:4d} {variant:6s} {ms:9.3f} ms", flush=True)
        _ratios(timed)
    timed = {}
    for variant, model in (("dense", dense), ("slim", slim)):
        if not progress.starts(f"swin retrain_step {variant}"):
            continue
        step = _step(model.train(), setup.batch, setup.device, search=False)
        ms = time_ms(step, setup.device, setup.warmup, setup.iters)
        macs = vitslim.count_flops(model, setup.batch)
        timed[variant] = progress.add({"bench": "retrain_step", "variant": variant, "batch": setup.batch,
                                       "median_ms": ms, "flops": 3 * macs, "flop_unit": "MAC",
                                       **achieved(6 * macs, None, ms)})
        print(f"swin retrain_step {variant:6s} {ms:9.3f} ms", flush=True)
    _ratios(timed)
    progress.update()


def _ratios(timed: dict) -> None:
    dense, slim = timed.get("dense"), timed.get("slim")
    if dense is not None and slim is not None:
        slim.update(speedup_vs_dense=dense["median_ms"] / slim["median_ms"],
                    flops_ratio_vs_dense=dense["flops"] / slim["flops"])


def run(setup: Setup, progress: Progress | None = None) -> list[dict]:
    """Every Swin row, in the order they are cut when time runs out (last first)."""
    progress = progress or Progress()
    bench_search_step(setup, progress)
    bench_window_attention(setup, progress)
    bench_slim(setup, progress)
    return progress.rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_swin_benchmarks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny Swin, Triton's interpreter; writes nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        run(DRY_RUN_SETUP)
        return 0
    if not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run on a CPU machine")
    rows = run(GPU_SETUP)
    write_results("swin", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
