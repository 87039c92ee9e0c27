"""CPU deployment speed of slim models against the dense timm model (issue 24, item 7): DeiT-S and Swin-T at about
70% of the MACs, eager PyTorch and ONNX Runtime, batch 1 and 32, one thread; each speed ratio beside its FLOPs ratio.

    python -m benchmarks.cpu_deploy [--models deit_small_patch16_224 swin_tiny_patch4_window7_224] [--batches 1 32]
                                    [--buckets 1 8 16 32 64] [--no-onnx] [--threads 1]

The slim model's PyTorch path pads its ragged heads to a multiple of a bucket and runs one
scaled_dot_product_attention per group of equal padded width (vitslim.layers.bucketed_attention); the eager rows
time every bucket of --buckets and the per-head reference (the path before it: a loop over heads with an explicit
softmax), so the bucket the library uses (vitslim.layers.PYTORCH_BUCKET) is chosen by these numbers. The ONNX rows
export the dense and the slim model (its default path) at each batch with torch's dynamo exporter and time them in
ONNX Runtime (timm's dense Swin is exported with its explicit-softmax attention, fused_attn=False: torch 2.14's
exporter fails on its SDPA with a float mask).

No searched ImageNet gates exist on this machine (no network, no weights): the plans come from synthetic searched
gates, every head its own importance scale (|gate| = s_head * u, s_head ~ U(0.3, 1), u ~ U(0, 1); MLP units likewise
per block), so kept head widths differ from head to head as after a search; budgets attn 0.7, mlp 0.7 and every
token kept. Weights are random (speed does not depend on them). Models take turns (A B A B ...) in windows; the
median of the per-window rates is reported. Writes benchmarks/results/cpu_deploy.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch import nn

import vitslim
from vitslim.layers import PYTORCH_BUCKET, SlimAttention, _AlignedHeads

from .common import RESULTS, write_results


PLANS = ("synthetic searched gates (|gate| = s_head * u, s_head ~ U(0.3, 1), u ~ U(0, 1); MLP per block likewise), "
         "budgets attn 0.7, mlp 0.7, every token kept; random weights")


def synthetic_search(name: str, seed: int = 0) -> nn.Module:
    """A searchable timm model with synthetic searched gates (module docstring)."""
    torch.manual_seed(seed)
    model = vitslim.make_searchable(timm.create_model(name, pretrained=False).eval())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gates in vitslim.gates(model):
            heads = torch.empty(gates.attn.shape[0], 1).uniform_(0.3, 1.0, generator=g)
            gates.attn.copy_(heads * torch.rand(gates.attn.shape, generator=g))
            gates.mlp.copy_(torch.empty(()).uniform_(0.5, 1.0, generator=g) * torch.rand(gates.mlp.shape, generator=g))
    return model


def with_bucket(model: nn.Module, bucket: int | None) -> nn.Module:
    """`model` with its slim attention's PyTorch path at this bucket (None: the per-head reference)."""
    for m in model.modules():
        if isinstance(m, SlimAttention):
            if bucket is None:
                m.implementation = "per_head"
            else:
                m.implementation = "reference"
                m._bucketed = _AlignedHeads(m.head_dims, bucket, by_width=True)
    return model


def rates(fns: dict, repeats: int, window_s: float) -> dict[str, float]:
    """Images per second of each callable (one batch per call), the callables taking turns in windows of at least
    window_s and 2 calls; the median over `repeats` windows."""
    for fn in fns.values():
        fn()  # warm-up
    seen: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while True:
                images = fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= window_s and calls >= 2:
                    break
            seen[name].append(calls * images / elapsed)
    return {name: statistics.median(values) for name, values in seen.items()}


def eager(model: nn.Module, x: torch.Tensor):
    def call() -> int:
        with torch.inference_mode():
            model(x)
        return x.shape[0]
    return call


def onnx_session(model: nn.Module, batch: int, path: Path, threads: int):
    """An ONNX Runtime session of `model` exported at this batch (static shapes: torch's exporter fails on timm's
    dense Swin with a dynamic batch), and a call running it on one batch of images."""
    import onnxruntime as ort  # optional (vitslim[export])
    from vitslim.deploy.export import export_onnx
    x = torch.randn(batch, 3, *model.pretrained_cfg["input_size"][1:])
    try:
        export_onnx(model, x, path, dynamic_batch=False)
    except Exception:  # timm's dense Swin: torch's exporter fails on its SDPA with a float mask (see module doc)
        fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
        if not fused:
            raise
        for m in fused:
            m.fused_attn = False  # timm's own explicit-softmax path, the same function
        export_onnx(model, x, path, dynamic_batch=False)
        for m in fused:
            m.fused_attn = True
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}

    def call() -> int:
        session.run(None, feed)
        return batch
    return call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "swin_tiny_patch4_window7_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--buckets", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=float, default=0.5, help="seconds per timing window")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        searched = synthetic_search(name)
        plan = vitslim.threshold(searched, 0.7, 0.7, None)
        dense = timm.create_model(name, pretrained=False).eval()
        slim = vitslim.slim(searched, plan).eval()
        flops_ratio = vitslim.count_flops(dense) / vitslim.count_flops(slim)
        widths = sorted({w for b in plan.blocks for w in b.head_dims})
        print(f"{name}: plan keeps {1 / flops_ratio:.1%} of the MACs; head widths {widths[0]}..{widths[-1]}, "
              f"{len(widths)} distinct", flush=True)
        variants = {"dense": dense, "per_head": with_bucket(vitslim.slim(searched, plan).eval(), None)}
        for bucket in args.buckets:
            variants[f"bucket_{bucket}"] = with_bucket(vitslim.slim(searched, plan).eval(), bucket)
        for batch in args.batches:
            x = torch.randn(batch, 3, *dense.pretrained_cfg["input_size"][1:])
            measured = rates({k: eager(m, x) for k, m in variants.items()}, args.repeats, args.window)
            for variant, rate in measured.items():
                if variant == "dense":
                    continue
                row = {"model": name, "runtime": "eager", "batch": batch, "variant": variant,
                       "img_per_s": rate, "dense_img_per_s": measured["dense"], "speedup": rate / measured["dense"],
                       "flops_ratio": flops_ratio, "fraction_of_flops_gain": rate / measured["dense"] / flops_ratio}
                rows.append(row)
                print(f"  eager b{batch:<3} {variant:<10} {row['speedup']:.3f}x (FLOPs {flops_ratio:.3f}x: "
                      f"{row['fraction_of_flops_gain']:.2f} of the gain)", flush=True)
        if args.onnx:
            for batch in args.batches:
                with tempfile.TemporaryDirectory() as tmp:
                    sessions = {"dense": onnx_session(dense, batch, Path(tmp) / "dense.onnx", args.threads),
                                f"bucket_{PYTORCH_BUCKET}": onnx_session(slim, batch, Path(tmp) / "slim.onnx",
                                                                       args.threads)}
                    measured = rates(sessions, args.repeats, args.window)
                for variant, rate in measured.items():
                    if variant == "dense":
                        continue
                    speedup = rate / measured["dense"]
                    rows.append({"model": name, "runtime": "onnxruntime", "batch": batch, "variant": variant,
                                 "img_per_s": rate, "dense_img_per_s": measured["dense"], "speedup": speedup,
                                 "flops_ratio": flops_ratio, "fraction_of_flops_gain": speedup / flops_ratio})
                    print(f"  onnx  b{batch:<3} {variant:<10} {speedup:.3f}x (FLOPs {flops_ratio:.3f}x: "
                          f"{speedup / flops_ratio:.2f} of the gain)", flush=True)
        write_results("cpu_deploy", rows, args.results_dir, threads=args.threads, library_bucket=PYTORCH_BUCKET,
                      plans=PLANS)  # after each model: a later failure keeps these rows
    print(f"wrote {Path(args.results_dir) / 'cpu_deploy.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
