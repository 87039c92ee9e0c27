"""A roofline model you can run: every kernel one step launches, its bytes and FLOPs, and the time it would take
at the device's limits.

    python -m benchmarks.roofline --model deit_small_patch16_224 --batch 256 [--bandwidth-tbs 4.3]
        [--peak-tflops 790] [--launch-us 2.5] [-o DIR]      # -> roofline.json (DeiT-S), roofline_<model>.json

Four comparisons, each path recorded from the project's real code on CPU tensors:
- the search training step (forward, backward, AdamW; bf16 autocast), fused vs folded (docs/design.md's strong
  baseline: gates folded into the weights, SDPA, cuBLAS);
- the retrain step (the same, without gates) of the slim model (budgets 0.7, below) vs the dense timm model;
- slim-model inference (budgets 0.7 for every gate kind the model has, from random gates with a fixed seed: a
  ViT's 70/70/70, a Swin's 70/70), fused vs the dense timm model, at --batch and at batch 1.

For a Swin (--model swin_tiny_patch4_window7_224) the fused path's attention is the window kernel (bias and
shift mask inside); folded is SDPA with the bias and mask as one float mask (the memory-efficient backend).

How each launch is seen: the Triton kernels through vitslim_kernels.compile_only (the same launches, grids and
tensors as on an sm_90 GPU, nothing run); everything else (cuBLAS matmuls, SDPA, LayerNorm, elementwise,
autocast casts, the optimizer) as the aten ops a TorchDispatchMode sees, views excluded. Each op's bytes are
the sizes of the tensors it takes and returns (a kernel that streams them once); FLOPs come from torch's flop
counter for matmuls and attention, and for our attention kernels from their tiles (padded work included: what
the tensor cores execute). Its time at the limits is max(FLOPs / peak, bytes / bandwidth) (fp32 matmuls at the
fp32 peak), plus --launch-us per launch. Costs are affine in the batch, so each path is recorded at batch 2
and 4 and extrapolated to --batch exactly; the dense and slim models are full depth.

An estimate, not a measurement: the GPU benchmarks print measured / predicted beside it once they have run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.common import provenance
from vitslim.files import atomic_write
from vitslim_kernels.compile_only import ArgInfo, compile_only

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "benchmarks" / "results"
H200 = dict(bandwidth_tbs=4.3, peak_tflops=790.0, fp32_tflops=67.0)  # docs/design.md section 6; fp32: spec sheet
_RECORD_BATCHES = (2, 4)


@dataclass
class Op:
    name: str
    kind: str        # "triton" or "aten"
    flops: float
    bytes: float
    fp32: bool = False

    def seconds(self, bandwidth: float, peak: float, fp32_peak: float) -> float:
        return max(self.flops / (fp32_peak if self.fp32 else peak), self.bytes / bandwidth)


# ---------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------

def _nbytes(values) -> int:
    total = 0
    for v in tree_flatten(values)[0]:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _sdpa_flops(q_shape, backward: bool) -> float:
    B, H, N, d = q_shape
    return (10.0 if backward else 4.0) * B * H * N * N * d  # 2 matmuls forward, FlashAttention-2's 5 backward


class _AtenRecorder(TorchDispatchMode):
    """Every aten op that moves data (views, allocations and metadata excluded), with bytes and FLOPs.

    Custom ops (vitslim::*) are entered with the recorder still active, so the cuBLAS matmuls inside them are
    seen; their Triton kernels are counted from compile_only's launches instead."""

    _FREE = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense",
             "set_", "resize_", "new_empty", "new_empty_strided", "is_same_size", "_has_compatible_shallow_copy_type"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self._muted = 0

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Ops run inside are not recorded (a caller records them as one)."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vitslim":
            # The op's Python implementation, called directly (not through dispatch, which would come here
            # again) with the recorder active: its aten ops are recorded, its Triton launches by compile_only.
            from torch._library.custom_ops import OPDEFS
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self._muted or func.is_view or name in self._FREE or func.namespace != "aten":
            return out
        flops, fp32 = self._flops(func, args, kwargs, out)
        self.ops.append(Op(name, "aten", flops, _nbytes((args, kwargs)) + _nbytes(out), fp32))
        return out

    @staticmethod
    def _flops(func, args, kwargs, out) -> tuple[float, bool]:
        name = func.overloadpacket.__name__
        if name.startswith("_scaled_dot_product") and "attention" in name:
            q = args[0] if "backward" not in name else args[1]
            return _sdpa_flops(tuple(q.shape), "backward" in name), q.dtype == torch.float32
        from torch.utils.flop_counter import flop_registry
        formula = flop_registry.get(func.overloadpacket)
        if formula is None:
            return 0.0, False
        try:
            flops = float(formula(*args, **kwargs, out_val=out))
        except Exception:  # a formula that does not take this overload's arguments: count its bytes only
            return 0.0, False
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return flops, first is not None and first.dtype == torch.float32


def _tile_flops(launch) -> float:
    """FLOPs our attention kernels execute (tile padding included); 0 for the memory-bound kernels."""
    if launch.name.startswith("_window_attention"):
        return _window_tile_flops(launch)
    if not launch.name.startswith("_ragged_attention") or "preprocess" in launch.name:
        return 0.0
    a, c = launch.args, launch.constants
    B, N, _ = a["Q"].shape
    heads = a["HEAD_OFFSET"].shape[0]  # kept heads
    # Uniform heads: the forward's split tile (UNIFORM_A + UNIFORM_B) or the backward's power of two; ragged
    # heads: the widest tile, an upper bound (the per-head widths live in a device table).
    uniform = c.get("UNIFORM_A", 0) + c.get("UNIFORM_B", 0)
    tile = uniform if uniform else 2 ** c["LOG2_DMAX"]
    bm, bn = c["BLOCK_M"], c["BLOCK_N"]
    rows, keys = math.ceil(N / bm) * bm, math.ceil(N / bn) * bn
    matmuls = 2 if "fwd" in launch.name else 5
    return 2.0 * matmuls * B * heads * rows * keys * tile


def _window_tile_flops(launch) -> float:
    """The window kernels: every window padded to its tiles (49 -> 64 x 64); the forward's 2 matmuls per tile, the
    backward's 5 on one block, 7 on several (p and dS recomputed in its query-block pass); the widest head's tile
    (an upper bound for ragged heads)."""
    a, c = launch.args, launch.constants
    BW, N, _ = a["Q"].shape
    heads = a["HEADS"].shape[1]
    bm, bn = (c["BLOCK_M"], c["BLOCK_N"]) if "BLOCK_M" in c else (c["BLOCK"], c["BLOCK"])
    rows, keys = math.ceil(N / bm) * bm, math.ceil(N / bn) * bn
    matmuls = 2 if "fwd" in launch.name else 5 if c["ONE_BLOCK"] else 7
    return 2.0 * matmuls * BW * heads * rows * keys * 2 ** c["LOG2_DMAX"]


def _triton_ops(launches) -> list[Op]:
    ops = []
    for launch in launches:
        tensors = [v for v in launch.args.values() if isinstance(v, ArgInfo)]
        fp32 = any(t.dtype == "float32" for t in tensors[:1])
        ops.append(Op(launch.name.strip("_"), "triton", _tile_flops(launch), sum(t.nbytes for t in tensors), fp32))
    return ops


class _MaskedSDPA(torch.autograd.Function):
    """scaled_dot_product_attention with a float mask, recorded as the one fused kernel a GPU runs (its memory-
    efficient backend: q, k, v, the mask and o move once, no scores in memory), forward and backward. On a CPU
    SDPA with a mask runs its math path (matmuls, softmax, the scores written out), which is not what the GPU
    baseline does."""

    @staticmethod
    def forward(ctx, recorder, q, k, v, mask, kwargs):
        with recorder.muted():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        recorder.ops.append(Op("sdpa_efficient_masked", "aten", _sdpa_flops(tuple(q.shape), False),
                               _nbytes((q, k, v, mask, out)), q.dtype == torch.float32))
        ctx.save_for_backward(q, k, v, mask)
        ctx.recorder, ctx.kwargs = recorder, kwargs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask = ctx.saved_tensors
        with ctx.recorder.muted(), torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v, mask)]
            out = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], **ctx.kwargs)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, dout) if wanted else ())
        result = tuple(next(grads) if t.requires_grad else None for t in leaves)
        ctx.recorder.ops.append(Op("sdpa_efficient_masked_backward", "aten", _sdpa_flops(tuple(q.shape), True),
                                   _nbytes((q, k, v, mask, out, dout)) + _nbytes([g for g in result if g is not None]),
                                   q.dtype == torch.float32))
        return (None, *result, None)


class _ModelSDPA(torch.overrides.TorchFunctionMode):
    """Sends masked scaled_dot_product_attention calls through _MaskedSDPA."""

    def __init__(self, recorder: "_AtenRecorder") -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            mask = kwargs.pop("attn_mask", rest[0] if rest else None)
            if mask is not None and mask.is_floating_point():
                return _MaskedSDPA.apply(self.recorder, q, k, v, mask, kwargs)
            kwargs["attn_mask"] = mask
            return func(q, k, v, **kwargs)
        return func(*args, **kwargs)


def record(step: Callable[[int], None], batch: int) -> list[Op]:
    """The ops of step(batch): Triton launches (compile only, sm_90) and aten ops; SDPA with a float mask as the one
    kernel a GPU runs (_MaskedSDPA)."""
    recorder = _AtenRecorder()
    with compile_only("sm_90") as launches, recorder, _ModelSDPA(recorder):
        step(batch)
    return recorder.ops + _triton_ops(launches)


def extrapolate(step: Callable[[int], None], batch: int) -> list[Op]:
    """The ops of step at `batch`, from two recorded batches (every op's bytes and FLOPs are affine in B)."""
    b1, b2 = _RECORD_BATCHES
    record(step, b1)  # warm-up: the optimizer creates its state on the first step
    first, second = record(step, b1), record(step, b2)
    if [o.name for o in first] != [o.name for o in second]:
        raise RuntimeError("the step launched different ops at two batch sizes; cannot extrapolate")
    out = []
    for o1, o2 in zip(first, second):
        scale = (batch - b1) / (b2 - b1)
        out.append(Op(o1.name, o1.kind, max(0.0, o1.flops + (o2.flops - o1.flops) * scale),
                      max(0.0, o1.bytes + (o2.bytes - o1.bytes) * scale), o1.fp32))
    return out


# ---------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------

def _timm(model_name: str):
    """The timm model, its attention on SDPA (timm leaves Swin's on its explicit softmax by default: the strong
    dense baseline is SDPA with the bias and mask as a float mask)."""
    import timm
    model = timm.create_model(model_name, pretrained=False, drop_path_rate=0.0)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def search_step(model_name: str, fused: bool) -> Callable[[int], None]:
    import vitslim
    torch.manual_seed(0)
    model = vitslim.make_searchable(_timm(model_name), fused=fused).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-3, foreach=True)

    def step(batch: int) -> None:
        x = torch.randn(batch, 3, 224, 224)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
            attn, mlp, tok = vitslim.sparsity_losses(model)
            loss = loss + 2e-4 * attn + 5e-5 * mlp + 1e-4 * tok
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _model(model_name: str, slim: bool):
    """The dense timm model, or its slim model at budgets 0.7 for every gate kind it has (fused), from fixed-seed
    random gate magnitudes."""
    import vitslim
    torch.manual_seed(0)
    model = _timm(model_name)
    if not slim:
        return model
    searchable = vitslim.make_searchable(model)
    with torch.no_grad():
        for gate in vitslim.gates(searchable):  # fixed-seed random magnitudes, as benchmarks/ uses
            gate.attn.uniform_(0.0, 1.0)
            gate.mlp.uniform_(0.0, 1.0)
            gate.tokens.uniform_(0.0, 3.0)
    plan = vitslim.threshold(searchable, budget_attn=0.7, budget_mlp=0.7)  # tokens: 0.7 where the model has them
    return vitslim.slim(searchable, plan, fused=True)


def train_step(model_name: str, slim: bool) -> Callable[[int], None]:
    """One retrain step (forward, backward, AdamW; bf16 autocast) of the slim model, or of the dense model."""
    model = _model(model_name, slim).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, foreach=True)

    def step(batch: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(batch, 3, 224, 224)).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def inference_step(model_name: str, slim: bool) -> Callable[[int], None]:
    model = _model(model_name, slim).eval()

    def step(batch: int) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(batch, 3, 224, 224))
    return step


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def summarise(ops: list[Op], limits: dict, launch_us: float) -> dict:
    bw, peak, fp32_peak = limits["bandwidth_tbs"] * 1e12, limits["peak_tflops"] * 1e12, limits["fp32_tflops"] * 1e12
    kernels: dict[tuple[str, str], dict] = {}
    for o in ops:
        k = kernels.setdefault((o.kind, o.name), {"kind": o.kind, "kernel": o.name, "launches": 0, "flops": 0.0,
                                                  "bytes": 0.0, "seconds": 0.0})
        k["launches"] += 1
        k["flops"] += o.flops
        k["bytes"] += o.bytes
        k["seconds"] += o.seconds(bw, peak, fp32_peak)
    rows = sorted(kernels.values(), key=lambda k: -k["seconds"])
    limit_s = sum(k["seconds"] for k in rows)
    return {"launches": len(ops), "flops": sum(o.flops for o in ops), "bytes": sum(o.bytes for o in ops),
            "predicted_ms_at_limits": 1e3 * limit_s,
            "predicted_ms_with_launches": 1e3 * (limit_s + len(ops) * launch_us * 1e-6),
            "kernels": [{**k, "predicted_ms": 1e3 * k["seconds"]} for k in rows]}


def compare(label: str, ours: tuple[str, Callable], baseline: tuple[str, Callable], batch: int, limits: dict,
            launch_us: float) -> dict:
    paths = {}
    for name, step in (ours, baseline):
        paths[name] = summarise(extrapolate(step, batch), limits, launch_us)
    a, b = paths[ours[0]], paths[baseline[0]]
    return {"what": label, "batch": batch, "paths": paths,
            "predicted_ratio_at_limits": a["predicted_ms_at_limits"] / b["predicted_ms_at_limits"],
            "predicted_ratio_with_launches": a["predicted_ms_with_launches"] / b["predicted_ms_with_launches"],
            "ratio_is": f"{ours[0]} time / {baseline[0]} time (below 1: {ours[0]} faster)"}


def _print(result: dict, top: int) -> None:
    print(f"\n{result['what']} (batch {result['batch']})")
    for name, p in result["paths"].items():
        print(f"  {name}: {p['launches']} launches, {p['flops'] / 1e12:.2f} TFLOP, {p['bytes'] / 1e9:.2f} GB -> "
              f"{p['predicted_ms_at_limits']:.2f} ms at the limits, {p['predicted_ms_with_launches']:.2f} ms with launches")
        for k in p["kernels"][:top]:
            print(f"      {k['predicted_ms']:8.3f} ms  {k['launches']:4d} x {k['kind']:6s} {k['kernel']:<44s} "
                  f"{k['flops'] / 1e9:9.1f} GFLOP {k['bytes'] / 1e9:7.3f} GB")
    print(f"  predicted ratio: {result['predicted_ratio_at_limits']:.3f} at the limits, "
          f"{result['predicted_ratio_with_launches']:.3f} with launches ({result['ratio_is']})")


def results_name(model: str) -> str:
    """roofline.json for DeiT-S (what gpu_check and benchmarks.loader read), roofline_<model>.json otherwise."""
    return "roofline.json" if model == "deit_small_patch16_224" else f"roofline_{model}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT or Swin name")
    parser.add_argument("--batch", type=int, default=256, help="batch of the search step and slim inference")
    parser.add_argument("--bandwidth-tbs", type=float, default=H200["bandwidth_tbs"], help="device memory TB/s")
    parser.add_argument("--peak-tflops", type=float, default=H200["peak_tflops"], help="bf16 matmul TFLOP/s")
    parser.add_argument("--fp32-tflops", type=float, default=H200["fp32_tflops"], help="fp32 (no tensor core)")
    parser.add_argument("--launch-us", type=float, default=2.5, help="host cost per launch, microseconds")
    parser.add_argument("--only", choices=("search", "retrain", "inference"), help="one comparison only")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per path")
    parser.add_argument("-o", "--results-dir", type=Path, default=DEFAULT_DIR, help="where roofline.json goes")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    for flag in ("bandwidth_tbs", "peak_tflops", "fp32_tflops"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 interprets the kernels and compiles nothing; unset it")
    limits = {"bandwidth_tbs": args.bandwidth_tbs, "peak_tflops": args.peak_tflops, "fp32_tflops": args.fp32_tflops}
    start = time.perf_counter()
    results = []
    if args.only in (None, "search"):
        results.append(compare(f"{args.model} search step (fwd + bwd + AdamW, bf16 autocast)",
                               ("fused", search_step(args.model, fused=True)),
                               ("folded", search_step(args.model, fused=False)), args.batch, limits, args.launch_us))
    if args.only in (None, "retrain"):
        results.append(compare(f"{args.model} retrain step (fwd + bwd + AdamW, bf16 autocast), slim at budgets 0.7 "
                               f"(fused) vs dense timm (SDPA)",
                               ("slim", train_step(args.model, slim=True)),
                               ("dense", train_step(args.model, slim=False)), args.batch, limits, args.launch_us))
    if args.only in (None, "inference"):
        for batch in dict.fromkeys((args.batch, 1)):
            results.append(compare(f"{args.model} inference, slim at budgets 0.7 (fused) vs dense timm (SDPA), bf16",
                                   ("slim", inference_step(args.model, slim=True)),
                                   ("dense", inference_step(args.model, slim=False)), batch, limits, args.launch_us))
    for r in results:
        _print(r, args.top)
    out = {"what": "roofline model: predicted time at the device limits (an estimate, not a measurement)",
           "limits": limits, "launch_us": args.launch_us, "model": args.model, "versions": provenance(),
           "seconds_to_compute": round(time.perf_counter() - start, 1), "comparisons": results}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / results_name(args.model)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1) + "\n"))
    print(f"\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
