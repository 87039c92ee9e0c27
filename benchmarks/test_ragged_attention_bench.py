"""pytest-benchmark: ragged attention vs padded SDPA vs grouped SDPA (docs/design.md section 6, P2). GPU only.

    pytest benchmarks/test_ragged_attention_bench.py --benchmark-group-by=group

Workload (see run_slim_benchmarks.py): every block's attention of DeiT-S and DeiT-B with the head widths of a
70% plan, B = 256, N = 197, bf16; "fwd" without gradients, "fwd_bwd" with dq, dk, dv. The ragged forward runs
each implementation that can (the CUDA kernel and Triton), so the dispatch order can be read off the results.
Each test records its device-timed median (ms) and achieved TFLOP/s in extra_info; the ratios to padded and
grouped SDPA are taken in the same run, in test_ratios.
"""
import pytest
import torch

from .common import achieved, benchmark_pedantic, device_time_ms
from .run_slim_benchmarks import GPU_SETUP, attention_workload, head_widths, plan_for, ragged_implementations

MODELS = {config.label: config for config in GPU_SETUP.attention_models}
B = 256  # docs/design.md P2
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def plans():
    """label -> (head widths per block, N, scale), built once (CPU)."""
    out = {}
    for label, config in MODELS.items():
        _, plan = plan_for(config)
        out[label] = (head_widths(plan), plan.num_prefix_tokens + plan.num_patches, plan.head_dim ** -0.5)
    return out


def _flops(dims, N, grad):
    return 4 * B * N * N * sum(sum(d) for d in dims) * (3.5 if grad else 1.0)


def _cases():
    for label in MODELS:
        for mode in ("fwd", "fwd_bwd"):
            for variant in ("ragged", "padded_sdpa", "grouped_sdpa"):
                yield label, mode, variant


@pytest.mark.gpu
@pytest.mark.parametrize("model, mode, variant", list(_cases()))
def test_attention(benchmark, plans, model, mode, variant):
    dims, N, scale = plans[model]
    grad = mode == "fwd_bwd"
    device = torch.device("cuda")
    impls = (ragged_implementations(device, DTYPE, grad, (B, N, max(sum(d) for d in dims)))
             if variant == "ragged" else [(None, None, None)])
    benchmark.group = f"ragged_attention {model} {mode}"
    for impl, kernel, default in impls:
        fn = attention_workload(variant, dims, B, N, scale, device, DTYPE, grad, kernel).run(grad)
        if impl is None or default:  # the row pytest-benchmark times: what dispatch runs at this size
            ms = benchmark_pedantic(benchmark, fn)
        else:
            ms = device_time_ms(fn)
        key = f"{variant}_{impl}" if impl else variant
        benchmark.extra_info[f"{key}_median_ms"] = ms
        benchmark.extra_info[f"{key}_tflops"] = achieved(_flops(dims, N, grad), None, ms)["tflops"]


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_ratios(benchmark, plans, model, mode):
    """Speedups of ragged (dispatch's pick) over padded and grouped SDPA, all timed in this test."""
    dims, N, scale = plans[model]
    grad = mode == "fwd_bwd"
    device = torch.device("cuda")
    impl, kernel, _ = next(i for i in ragged_implementations(device, DTYPE, grad, (B, N, max(sum(d) for d in dims)))
                           if i[2])
    ms = {variant: device_time_ms(attention_workload(variant, dims, B, N, scale, device, DTYPE, grad,
                                                     kernel if variant == "ragged" else None).run(grad))
          for variant in ("ragged", "padded_sdpa", "grouped_sdpa")}
    benchmark.group = f"ragged_attention ratios {model} {mode}"
    benchmark_pedantic(benchmark, attention_workload("ragged", dims, B, N, scale, device, DTYPE, grad, kernel).run(grad))
    benchmark.extra_info.update({f"{k}_median_ms": v for k, v in ms.items()})
    benchmark.extra_info["ragged_implementation"] = impl
    benchmark.extra_info["speedup_vs_padded_sdpa"] = ms["padded_sdpa"] / ms["ragged"]   # P2 target >= 1.3
    benchmark.extra_info["speedup_vs_grouped_sdpa"] = ms["grouped_sdpa"] / ms["ragged"]  # P2 target >= 1.0
