"""pytest-benchmark: fused vs unfused masks for the search step and its branches (docs/design.md section 6, P1).

    pytest benchmarks/test_search_bench.py --benchmark-group-by=group

Each group compares the four variants of benchmarks/run_search_benchmarks.py on one workload (DeiT-S bs 256,
DeiT-B bs 128, bf16 autocast): the whole search step, one block's attention branch and its MLP branch, each
forward + backward. The device is synchronised inside the timed function; extra_info holds the device-timed
median, peak memory and whether the fused kernels really ran. Skipped without CUDA (benchmarks/conftest.py).
"""
import pytest
import torch

from vitslim.searchable import searchable_blocks

from .common import benchmark_pedantic, peak_memory_bytes
from .run_search_benchmarks import (MODELS, VARIANTS, build_search_model, first_calls_s, fused_fell_back,
                                    make_branch_step, make_search_step, selected_implementation)

CONFIGS = [pytest.param(c, id=f"{c.name}-bs{c.batch}") for c in MODELS]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch._dynamo.reset()  # every test compiles a new model: start each from an empty cache
    torch.cuda.empty_cache()


def _record(benchmark, config, variant, fn, first_s, **info):
    benchmark.extra_info.update(model=config.name, batch=config.batch, variant=variant, first_calls_s=first_s,
                                **info)
    benchmark.extra_info["peak_mem_bytes"] = peak_memory_bytes(fn)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_search_step(benchmark, config, variant):
    device = torch.device("cuda")
    model = build_search_model(config, variant, device)
    step = make_search_step(model, config, variant, device)
    fused_kernels = not fused_fell_back(step) if variant == "fused" else None
    first_s = first_calls_s(step, device)  # torch.compile's compilation happens here, outside the timing
    benchmark.group = f"search_step-{config.name}-bs{config.batch}"
    benchmark_pedantic(benchmark, step, rounds=10, warmup_rounds=3)
    _record(benchmark, config, variant, step, first_s, fused_kernels=fused_kernels,
            fused_impl=selected_implementation("gated_attention_branch", device) if fused_kernels else None)


@pytest.mark.parametrize("kind", ["attn", "mlp"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_block_branch(benchmark, config, variant, kind):
    device = torch.device("cuda")
    block = searchable_blocks(build_search_model(config, variant, device))[0]
    fn, fused_impl = make_branch_step(block, kind, variant, config, device)
    first_s = first_calls_s(fn, device)
    benchmark.group = f"{kind}_block-{config.name}-bs{config.batch}"
    benchmark_pedantic(benchmark, fn, rounds=30, warmup_rounds=5)
    _record(benchmark, config, variant, fn, first_s, fused_impl=fused_impl,
            fused_kernels=fused_impl not in (None, "reference") if variant == "fused" else None)

