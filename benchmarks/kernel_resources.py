"""What every Triton kernel compiles to for sm_90 and sm_80, on the real workloads, without a GPU.

    python -m benchmarks.kernel_resources [--targets sm_90,sm_80] [--workloads ...] [-o DIR] [--readme]

Each workload runs the project's own code paths (searchable and slim models, the public ops) on CPU tensors
inside vitslim_kernels.compile_only, so every kernel launch is specialised and compiled by Triton exactly as on
the GPU and then skipped. For each distinct compiled kernel it records registers, spills, shared memory,
warps, stages, the global load widths, cp.async / TMA copies and tensor-core MMA instructions, and checks the
rules the compile gate (tests/kernels/test_compile_gate.py) enforces:

- every kernel compiles;
- no kernel spills, in any dtype (fp32 included);
- the attention kernels on aligned layouts (the search, slim models) load q/k/v/o/dO with 16-byte vectors
  (no element-by-element loads), pipeline them (cp.async or TMA), and use tensor-core MMA (wgmma on sm_90,
  mma.sync on sm_80).

Results: DIR/kernel_resources.json (default benchmarks/results) with versions and commit; --readme rewrites
the README's table between its kernel-resources markers from that file.

Shapes: the model widths, heads and token counts are the real ones; the search runs at batch 16 (B * 197
divisible by 16, as at batch 256 and 128, so every integer argument specialises as in the real runs), the slim
and direct workloads at batch 2 (none of their kernels takes B * N); the depth is cut to 2 blocks, since every
block launches the same kernels on the same shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import provenance
from vitslim.files import atomic_write
from vitslim_kernels.compile_only import TARGETS, Launch, compile_only, distinct, resources

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "benchmarks" / "results"
BATCH = 16          # search: B * N divisible by 16 like the benchmark batches (256, 128): same specialisations
SLIM_BATCH = 2      # slim and direct: no kernel of theirs takes B * N, and 2 keeps the CPU work small
DEPTH = 2           # every block launches the same kernels; two blocks cover a token-dropped one
ATTENTION_KERNELS = ("_ragged_attention_fwd_kernel", "_ragged_attention_bwd_kernel", "_window_attention_fwd_kernel",
                     "_window_attention_bwd_kernel")
SLIM_HEADS = (0, 1, 17, 41, 63, 64)          # block 0 of the slim workloads: docs/design.md's odd widths
README_BEGIN, README_END = "<!-- kernel-resources:begin -->", "<!-- kernel-resources:end -->"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    name: str
    dtype: str                         # "fp32", "fp16", "bf16"
    run: Callable[[torch.dtype], None]
    aligned: bool                      # its attention layout is 16-byte aligned: the vector-load rules apply
    what: str
    kernels: frozenset | None          # the kernels it must launch (else a fallback skipped the Triton path);
                                       # None: at least one (an op's own samples: whatever they launch)


def _timm_vit(name: str, img_size: int = 224):
    import timm
    return timm.create_model(name, pretrained=False, depth=DEPTH, img_size=img_size, drop_path_rate=0.0)


def _searchable(name: str):
    import vitslim
    model = vitslim.make_searchable(_timm_vit(name), fused=True)
    # Block 1 drops 60 of its 196 patches (the search's token dropping): a gathered, shorter block.
    with torch.no_grad():
        vitslim.gates(model)[1].tokens[::3] = 0.0
    vitslim.drop_tokens(model, eps=1e-3)
    return model.train()


def _search_step(name: str) -> Callable[[torch.dtype], None]:
    def run(dtype: torch.dtype) -> None:
        model = _searchable(name)
        x = torch.randn(BATCH, 3, 224, 224)
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x).float().sum()
        loss.backward()
    return run


def _slim_model(img_size: int, dtype: torch.dtype):
    """A DeiT-S slim model: block 0 with the odd head widths SLIM_HEADS and 1197 MLP units, block 1 with
    70%-like heads, 1075 units and 137 of 196 patches (a token-dropped block)."""
    import vitslim
    from vitslim.plan import BlockPlan, SlimPlan

    base = _timm_vit("deit_small_patch16_224", img_size)
    P = base.patch_embed.num_patches
    blocks = (BlockPlan(heads=tuple(tuple(range(w)) for w in SLIM_HEADS), mlp=tuple(range(1197)),
                        tokens=tuple(range(P))),
              BlockPlan(heads=tuple(tuple(range(w)) for w in (48, 40, 44, 0, 36, 52)), mlp=tuple(range(1075)),
                        tokens=tuple(range(0, P, 10)) + tuple(i for i in range(P) if i % 10 and i % 3)))
    blocks = tuple(BlockPlan(b.heads, b.mlp, tuple(sorted(set(b.tokens)))) for b in blocks)
    plan = SlimPlan(embed_dim=384, num_heads=6, head_dim=64, mlp_hidden=1536, num_prefix_tokens=1,
                    num_patches=P, search="dims", budgets={"attn": 0.7, "mlp": 0.7, "tokens": 1.0},
                    blocks=blocks)
    model = vitslim.slim(base, plan, fused=True)
    return model.to(dtype) if dtype == torch.float32 else model


def _slim_step(dtype: torch.dtype) -> None:
    """A retrain step and an inference pass of the slim model at N = 197, and in bf16 also at N = 50 (112 px)
    and 577 (384 px). (N only specialises on divisibility by 16, which none of the three has; fp16 and fp32
    stay at 197 because half-precision matmuls are slow on a CPU.)"""
    for img_size in (224, 112, 384) if dtype == torch.bfloat16 else (224,):
        model = _slim_model(img_size, torch.float32).train()
        x = torch.randn(SLIM_BATCH, 3, img_size, img_size)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x).float().sum()
        loss.backward()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model.eval()(x)


def _direct_ragged(dtype: torch.dtype) -> None:
    """The public op on a packed, unaligned layout (widths SLIM_HEADS, no padding): compiles, no spills."""
    import vitslim_kernels
    D = sum(SLIM_HEADS)
    for N in (197, 50):
        qkv = torch.randn(SLIM_BATCH, N, 3 * D, dtype=dtype, requires_grad=True)
        q, k, v = qkv.split(D, -1)
        out = vitslim_kernels.ragged_attention(q, k, v, SLIM_HEADS, 64 ** -0.5, implementation="triton")
        out.backward(torch.randn_like(out))  # a dense gradient, as in training (a .sum() gives a 0-stride one)


SWIN_DEPTHS = (2, 2, 2, 2)   # Swin-T's stages cut to one shifted and one unshifted block each (stage 3 has 6 alike)
SWIN_SLIM_HEADS = ((32, 17, 0), (1, 32, 24, 8, 0, 32), (16, 32, 0, 32, 9, 32, 32, 32, 32, 32, 32, 17),
                   tuple([32] * 20 + [0, 5, 31, 32]))  # per stage: odd widths, pruned heads, full heads


def _swin_t(**overrides):
    import timm
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=SWIN_DEPTHS,
                             drop_path_rate=0.0, **overrides)


def _swin_search_step(dtype: torch.dtype) -> None:
    """Swin-T's fused search step (window 7: N = 49; stage 1 has B * 64 windows of 3 heads, stage 4 B windows of 24),
    under autocast."""
    import vitslim
    model = vitslim.make_searchable(_swin_t(), fused=True).train()
    x = torch.randn(SLIM_BATCH, 3, 224, 224)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(x).float().sum()
    loss.backward()


def _swin_slim_step(dtype: torch.dtype) -> None:
    """A slim Swin-T (heads SWIN_SLIM_HEADS, 60% MLP): a retrain step and an inference pass, fused."""
    import dataclasses

    import vitslim
    from vitslim.plan import BlockPlan
    base = vitslim.make_searchable(_swin_t())
    plan = vitslim.threshold(base, 1.0, 1.0)
    blocks, stage_of = [], [s for s, d in enumerate(SWIN_DEPTHS) for _ in range(d)]
    for b, s in zip(plan.blocks, stage_of):
        heads = tuple(tuple(range(w)) for w in SWIN_SLIM_HEADS[s])
        blocks.append(BlockPlan(heads=heads, mlp=tuple(i for i in range(len(b.mlp)) if i % 5 < 3), tokens=b.tokens))
    model = vitslim.slim(base, dataclasses.replace(plan, blocks=tuple(blocks)), fused=True).train()
    x = torch.randn(SLIM_BATCH, 3, 224, 224)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x).float().sum()
    loss.backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model.eval()(x)


def _direct_window(dtype: torch.dtype) -> None:
    """window_attention at window 12 (N = 144: 3 x 3 tiles of 64), aligned (the search's 4 heads of 32) and packed
    odd widths (17, 0, 32, 1), with and without the shift mask, forward and backward."""
    from vitslim_kernels import window_attention
    from vitslim_kernels.ops.window_attention import _sample
    for dims, shifted in (((32, 32, 32, 32), True), ((17, 0, 32, 1), False)):
        q, k, v, dims, scale, table, index, mask = _sample(12, dims, SLIM_BATCH, 4, shifted, device="cpu", dtype=dtype,
                                                           requires_grad=True)
        out = window_attention(q, k, v, dims, scale, table, index, mask, implementation="triton")
        out.backward(torch.randn_like(out))


def _op_step(info) -> Callable[[torch.dtype], None]:
    """An op's own sample inputs (dispatch.op_infos: every op describes them) through its Triton implementation,
    forward and backward: so an op's kernels are compiled and gated without a workload written for them."""
    def run(dtype: torch.dtype) -> None:
        for args, kwargs in info.sample_inputs("cpu", dtype, requires_grad=True):
            out = info.functional(*args, implementation="triton", **kwargs)
            out.backward(torch.randn_like(out))
    return run


def _op_workloads() -> list[Workload]:
    """One fp32 workload per op with a Triton implementation (composite ops: through their parts)."""
    from vitslim_kernels import dispatch
    return [Workload(f"op_{info.name}_fp32", "fp32", _op_step(info), False,
                     f"{info.name} on its sample inputs (dispatch.op_infos), forward and backward, fp32", None)
            for info in dispatch.op_infos() if not info.composite
            and any(impl.name == "triton" for impl in dispatch.implementations(info.name))]


_ATTENTION = frozenset({"_ragged_attention_fwd_kernel", "_ragged_attention_bwd_preprocess_kernel",
                        "_ragged_attention_bwd_kernel"})
_SEARCH = _ATTENTION | {f"_{op}_{d}_kernel" for op in ("layernorm_token_scale", "gated_linear", "gated_gelu_linear")
                        for d in ("fwd", "bwd")}
_WINDOW = frozenset({"_window_attention_fwd_kernel", "_window_attention_bwd_kernel"})
_SWIN_SEARCH = _WINDOW | {f"_{op}_{d}_kernel" for op in ("gated_linear", "gated_gelu_linear") for d in ("fwd", "bwd")}

WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("search_deit_s_bf16", "bf16", _search_step("deit_small_patch16_224"), True,
             "DeiT-S fused search step, bf16 autocast, a token-dropped block", _SEARCH),
    Workload("search_deit_b_bf16", "bf16", _search_step("deit_base_patch16_224"), True,
             "DeiT-B fused search step, bf16 autocast, a token-dropped block", _SEARCH),
    *[Workload(f"slim_ragged_{d}", d, _slim_step, True,
               f"DeiT-S slim model (heads {SLIM_HEADS}, N = {'197/50/577' if d == 'bf16' else '197'}, a "
               f"token-dropped block): retrain step + inference, {d}", _ATTENTION) for d in ("bf16", "fp16", "fp32")],
    *[Workload(f"direct_unaligned_{d}", d, _direct_ragged, False,
               f"ragged_attention on packed widths {SLIM_HEADS} (unaligned), {d}", _ATTENTION)
      for d in ("bf16", "fp32")],
    *[Workload(f"search_swin_t_{d}", d, _swin_search_step, True,
               f"Swin-T fused search step (window 7, N = 49, shifted and unshifted blocks), {d} autocast",
               _SWIN_SEARCH) for d in ("bf16",)],
    *[Workload(f"slim_swin_t_{d}", d, _swin_slim_step, True,
               f"slim Swin-T (odd head widths, pruned heads, padded to 8): retrain step + inference, {d}", _WINDOW)
      for d in ("bf16", "fp32")],
    *[Workload(f"direct_window12_{d}", d, _direct_window, False,
               f"window_attention at window 12 (N = 144), aligned and packed odd widths, {d}", _WINDOW)
      for d in ("bf16",)],
    *_op_workloads(),
]}


class _NoMatmulMath(TorchDispatchMode):
    """Matrix products return uninitialised tensors of the shape, dtype and strides the real op gives (from its
    meta implementation) instead of computing on the CPU. Under compile_only the values are garbage anyway (the
    Triton kernels only compile), and the CPU's bf16 matmuls were most of the gate's time: DeiT-B's search
    step took 75 s per target with them."""

    _OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self._OPS:
            return func(*args, **kwargs)
        meta = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta[0], **meta[1])
        return torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=args[0].device)


def compile_workload(workload: Workload, target: str, all_candidates: bool = True) -> list[tuple[Launch, dict]]:
    """The distinct kernels `workload` compiles for `target`, each with its resources as a dict; with
    all_candidates, every config of the autotune lists (VITSLIM_AUTOTUNE=1 may launch any of them on a GPU),
    not only the defaults."""
    torch.manual_seed(0)
    with compile_only(target, all_candidates=all_candidates) as launches, _NoMatmulMath():
        workload.run(_DTYPES[workload.dtype])
    return [(launch, resources(launch).to_dict()) for launch in distinct(launches)]


def violations(workload: Workload, target: str, kernel: str, constants: dict, res: dict) -> list[str]:
    """Why this compiled kernel fails the gate (empty: it passes)."""
    bad = []
    if res["spill_stores"] or res["spill_loads"]:  # in every dtype: fp32 too compiles without spills
        bad.append(f"spills {res['spill_stores']} B stores / {res['spill_loads']} B loads per thread")
    if not kernel.startswith(("_ragged_attention", "_window_attention")) or not workload.aligned:
        return bad
    elem = _DTYPES[workload.dtype].itemsize
    full = 16 // elem
    if constants.get("VEC") != full:
        bad.append(f"layout not proven 16-byte aligned (VEC={constants.get('VEC')}, want {full})")
    if elem == 2 and res["global_loads"].get("2", 0):
        bad.append(f"{res['global_loads']['2']} element-by-element 2-byte loads")
    if kernel in ATTENTION_KERNELS:
        if not res["async_copies"] and not res["tma_copies"]:
            bad.append("q/k/v loads not pipelined (no cp.async or TMA)")
        mma = "wgmma" if TARGETS[target].arch >= 90 else "mma.sync"
        ieee = workload.dtype == "fp32" and constants.get("DOT_PRECISION") == "ieee"  # no tensor core does it
        if not ieee and not res["mma"].get(mma):
            bad.append(f"no tensor-core MMA ({mma}) on {target}")
    return bad


def collect(workloads: list[str], targets: list[str], progress: Callable[[str], None] = lambda s: None) -> dict:
    rows = []
    for target in targets:
        for name in workloads:
            workload = WORKLOADS[name]
            start = time.perf_counter()
            compiled = compile_workload(workload, target)
            for launch, res in compiled:
                rows.append({"workload": name, "target": target, "dtype": workload.dtype, "kernel": launch.name,
                             "config": launch.constants, "grid": list(launch.grid), **res,
                             "violations": violations(workload, target, launch.name, launch.constants, res)})
            progress(f"{target} {name}: {len(compiled)} kernels in {time.perf_counter() - start:.1f} s")
    return {"what": "Triton kernels compiled for real GPU targets without a GPU (vitslim_kernels.compile_only)",
            "versions": provenance(), "batch": BATCH, "depth": DEPTH,
            "targets": {t: vars(TARGETS[t]) for t in targets},
            "workloads": {n: WORKLOADS[n].what for n in workloads}, "kernels": rows}


def _loads(row: dict) -> str:
    loads = ", ".join(f"{n}x{b}B" for b, n in sorted(row["global_loads"].items(), key=lambda kv: -int(kv[0])))
    copies = sum(row["async_copies"].values())
    return loads + (f"; cp.async {copies}" if copies else "") + (f"; TMA {row['tma_copies']}" if row["tma_copies"] else "")


def table(results: dict) -> str:
    """The README table: one line per workload and kernel, its compiled variants summarised per target."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in results["kernels"]:
        groups.setdefault((r["workload"], r["kernel"]), {}).setdefault(r["target"], []).append(r)
    targets = list(results["targets"])
    head = ("| workload | kernel | variants | " + " | ".join(f"{t} regs / spill B" for t in targets)
            + f" | {targets[0]} global loads (count x width) | MMA | gate |")
    lines = [head, "|" + "---|" * (5 + len(targets))]
    for (workload, kernel), per_target in groups.items():
        rows = [r for t in targets for r in per_target.get(t, [])]
        usage = []
        for t in targets:
            rs = per_target.get(t, [])
            usage.append(f"{max(r['registers'] for r in rs)} / {max(r['spill_stores'] for r in rs)}" if rs else "-")
        first = per_target.get(targets[0], rows)[0]
        mma = " / ".join(sorted({k for r in rows for k in r["mma"]})) or "-"
        bad = sorted({v for r in rows for v in r["violations"]})
        lines.append(f"| {workload} | `{kernel.strip('_')}` | {len(rows)} | " + " | ".join(usage)
                     + f" | {_loads(first)} | {mma} | {'ok' if not bad else 'FAIL: ' + '; '.join(bad)} |")
    v = results["versions"]
    lines.append(f"\nGenerated by `python -m benchmarks.kernel_resources --readme` from "
                 f"benchmarks/results/kernel_resources.json (torch {v['torch']}, triton {v['triton']}, commit "
                 f"{(v['commit'] or 'unknown')[:12]}): compiled only, nothing here ran on a GPU. Registers and spills are the "
                 f"largest over a kernel's compiled variants (specialisations).")
    return "\n".join(lines)


def write_readme_table(results: dict, readme: Path = ROOT / "README.md") -> None:
    """Replace the README's section between README_BEGIN and README_END with table(results)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} section to fill")
    before, rest = text.split(README_BEGIN, 1)
    _, after = rest.split(README_END, 1)
    readme.write_text(f"{before}{README_BEGIN}\n{table(results)}\n{README_END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90,sm_80", help="comma-separated, of: " + ", ".join(TARGETS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated, of: " + ", ".join(WORKLOADS))
    parser.add_argument("-o", "--results-dir", type=Path, default=DEFAULT_DIR, help="where kernel_resources.json goes")
    parser.add_argument("--readme", action="store_true", help="regenerate the README's kernel table from the JSON")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    workloads = [w for w in args.workloads.split(",") if w]
    for t in targets:
        if t not in TARGETS:
            parser.error(f"--targets: unknown target {t!r}; accepted: {', '.join(TARGETS)}")
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r}; accepted: {', '.join(WORKLOADS)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 interprets the kernels and compiles nothing; unset it")
    results = collect(workloads, targets, progress=lambda s: print(s, flush=True))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / "kernel_resources.json"
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))
    failing = [r for r in results["kernels"] if r["violations"]]
    print(f"{len(results['kernels'])} compiled kernels -> {out}; {len(failing)} fail the gate")
    for r in failing:
        print(f"  {r['target']} {r['workload']} {r['kernel']}: {'; '.join(r['violations'])}")
    if args.readme:
        write_readme_table(results)
        print("README.md: kernel table regenerated")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
