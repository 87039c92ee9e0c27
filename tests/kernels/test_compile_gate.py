"""The compile gate: every Triton kernel, compiled without a GPU for sm_90 and sm_80 through the project's own
launchers on the real workloads (benchmarks.kernel_resources), must compile, must not spill (any dtype), and
the attention kernels on aligned layouts must load with 16-byte vectors, pipeline (cp.async / TMA) and use
tensor-core MMA. python -m benchmarks.kernel_resources writes the same table to benchmarks/results/."""
import os

import pytest

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton.language.cdiv, InterpretedFunction) or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the interpreter compiles nothing", allow_module_level=True)

from benchmarks.kernel_resources import WORKLOADS, compile_workload, violations  # noqa: E402
from vitslim_kernels import runtime  # noqa: E402
from vitslim_kernels.compile_only import TARGETS, compile_only, ptx_summary  # noqa: E402


# Workloads whose every autotune candidate is compiled too (the others: defaults only, to keep the gate short):
# the lists are the same for bf16 and fp16 and for DeiT-S and DeiT-B (head width 64), fp32 and unaligned layouts
# have one config. python -m benchmarks.kernel_resources compiles every candidate of every workload.
ALL_CANDIDATES = ("search_deit_s_bf16", "slim_ragged_bf16")


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_kernels_compile_for_the_real_targets_within_the_rules(name, target):
    workload = WORKLOADS[name]
    compiled = compile_workload(workload, target, all_candidates=name in ALL_CANDIDATES)
    launched = {launch.name for launch, _ in compiled}
    if workload.kernels is None:  # an op's own samples: whatever they launch, but Triton kernels
        assert launched, f"{name}: no Triton kernel launched"
    else:
        assert launched == workload.kernels, (f"{name}: expected launches of {sorted(workload.kernels)}, got "
                                              f"{sorted(launched)}")
    failures = [f"{launch.name} {launch.constants}: {'; '.join(bad)}" for launch, res in compiled
                if (bad := violations(workload, target, launch.name, launch.constants, res))]
    assert not failures, f"{name} on {target}:\n" + "\n".join(failures)


def _res(**overrides):
    res = {"spill_stores": 0, "spill_loads": 0, "global_loads": {"16": 4}, "async_copies": {"16": 16},
           "tma_copies": 0, "mma": {"wgmma": 8}}
    return {**res, **overrides}


def test_the_rules_fail_what_they_must():
    search, unaligned = WORKLOADS["search_deit_s_bf16"], WORKLOADS["direct_unaligned_bf16"]
    fwd, config = "_ragged_attention_fwd_kernel", {"VEC": 8, "DOT_PRECISION": "tf32"}
    assert violations(search, "sm_90", fwd, config, _res()) == []
    assert "spills" in violations(search, "sm_90", "_gated_linear_fwd_kernel", config, _res(spill_stores=16))[0]
    assert "2-byte loads" in violations(search, "sm_90", fwd, config, _res(global_loads={"2": 168}))[0]
    assert "not pipelined" in violations(search, "sm_90", fwd, config, _res(async_copies={}))[0]
    assert "wgmma" in violations(search, "sm_90", fwd, config, _res(mma={"mma.sync": 4}))[0]
    assert "mma.sync" in violations(search, "sm_80", fwd, config, _res(mma={"wgmma": 4}))[0]
    assert "VEC=1" in violations(search, "sm_90", fwd, {"VEC": 1}, _res())[0]
    # Unaligned layouts only have to compile without spills.
    assert violations(unaligned, "sm_90", fwd, {"VEC": 1}, _res(global_loads={"2": 168}, async_copies={})) == []


def test_ptx_summary_reads_widths_copies_and_mma():
    ptx = """
        ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
        ld.global.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
        cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
        cp.async.ca.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 4, %r10;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
        st.global.v4.b32 [ %rd6 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    assert ptx_summary(ptx) == {"global_loads": {2: 1, 16: 1, 8: 1}, "global_stores": {16: 1},
                                "async_copies": {16: 1, 4: 1}, "tma_copies": 0, "mma": {"wgmma": 1, "mma.sync": 1}}


def test_compile_only_restores_dispatch_and_the_driver():
    from triton.runtime.driver import driver

    before = driver._active
    with compile_only("sm_80"):
        assert runtime.compile_only_target().arch == 80
    assert runtime.compile_only_target() is None and driver._active is before
    with pytest.raises(ValueError, match="unknown compile target 'sm_75'"):
        with compile_only("sm_75"):
            pass


def test_matrix_products_skip_their_arithmetic_but_keep_shape_dtype_and_strides():
    import torch

    from benchmarks.kernel_resources import _NoMatmulMath
    a, b = torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16)
    bias = torch.randn(4, dtype=torch.bfloat16)
    cases = [lambda: torch.mm(a, b.t()), lambda: torch.addmm(bias, a, b.t()),
             lambda: torch.bmm(a[None], b.t()[None]), lambda: torch.nn.functional.linear(a, b, bias)]
    for case in cases:
        real = case()
        with _NoMatmulMath():
            skipped = case()
            added = skipped + 1  # other ops still compute
        assert (skipped.shape, skipped.stride(), skipped.dtype) == (real.shape, real.stride(), real.dtype)
        assert added.shape == real.shape
