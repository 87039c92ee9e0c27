"""Kernels fail safe (runtime.fail_safe): a kernel that cannot compile or launch on a user's GPU warns once,
naming the kernel, the device and the error, and its op computes in PyTorch from then on, so a search or a slim
model keeps running with the same results. Failures are injected on CPU, under Triton's interpreter: the kernel
object a launcher calls is replaced by one whose launch raises what Triton raises on a real GPU.

Also `python -m vitslim_kernels.info --selftest` (vitslim_kernels.selftest) reports a kernel that writes wrong
values, or raises, as failed. That it passes on working kernels, every case in every dtype, is the selftest part
of the gpu_check dry run (tests/test_gpu_check.py), which runs the whole selftest under the interpreter.
"""
import importlib
import inspect
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

import timm  # noqa: E402

import vitslim  # noqa: E402
import vitslim_kernels  # noqa: E402
from vitslim_kernels import KernelFallbackWarning, dispatch, info, runtime  # noqa: E402

from .interpreter import INTERPRETED, rerun_under_interpreter, require_interpreter  # noqa: E402

# Every backend module of every op described to dispatch (a new op's are checked without naming them here).
KERNEL_MODULES = tuple(sorted({m for info in dispatch.op_infos() for m in info.kernel_modules}))
VIT = dict(img_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    require_interpreter(request, monkeypatch)


@pytest.fixture(autouse=True)
def fail_safe_on(monkeypatch):
    """Fallbacks as a user gets them (the suite runs strict) and no failure left over from another test."""
    monkeypatch.delenv("VITSLIM_STRICT_KERNELS", raising=False)
    runtime.clear_kernel_failures()
    yield
    runtime.clear_kernel_failures()


@pytest.mark.skipif(INTERPRETED, reason="the CPU tests run in this process")
def test_cpu_tests_under_the_interpreter():
    rerun_under_interpreter(__file__)


class _Unlaunchable:
    """Stands in for a @triton.jit kernel: indexing by a grid works, the launch raises `error`."""
    def __init__(self, error: Exception):
        self.error = error
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error
        return launch


def out_of_shared_memory() -> Exception:
    from triton.runtime.errors import OutOfResources
    return OutOfResources(262144, 232448, "shared memory")


def break_kernel(monkeypatch, module: str, kernel: str, error: Exception | None = None) -> _Unlaunchable:
    broken = _Unlaunchable(error or out_of_shared_memory())
    monkeypatch.setattr(importlib.import_module(module), kernel, broken)
    return broken


def fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, KernelFallbackWarning)]


def search_model(fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vitslim.make_searchable(timm.create_model("deit_small_patch16_224", pretrained=False, **VIT),
                                    fused=fused)
    vitslim.set_implementation(model, "fused" if fused else "folded")
    return model.train()


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 24, 24, generator=g)
    labels = torch.randint(0, 10, (2,), generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_step(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("module, kernel, name", [
    ("vitslim_kernels.triton.ragged_attention", "_ragged_attention_fwd_kernel", "ragged_attention_fwd"),
    ("vitslim_kernels.triton.ragged_attention", "_ragged_attention_bwd_kernel", "ragged_attention_bwd"),
    ("vitslim_kernels.triton.layernorm_token_scale", "_layernorm_token_scale_bwd_kernel",
     "layernorm_token_scale_bwd"),
    ("vitslim_kernels.triton.gated_linear", "_gated_linear_fwd_kernel", "gated_linear_fold"),
    ("vitslim_kernels.triton.gated_linear", "_gated_gelu_linear_fwd_kernel", "gated_gelu_fwd"),
])
def test_search_step_survives_a_failing_kernel_with_one_warning(monkeypatch, module, kernel, name):
    expected = loss_and_grads(search_model(fused=False))
    broken = break_kernel(monkeypatch, module, kernel)
    model = search_model(fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = loss_and_grads(model)
        second = loss_and_grads(model)
    assert_same_step(first, expected)
    assert_same_step(second, expected)
    messages = fallback_warnings(caught)
    assert len(messages) == 1, messages  # once, though every block calls the kernel in both steps
    assert f"kernel {name} failed on cpu" in messages[0] and "OutOfResources" in messages[0] \
        and "shared memory" in messages[0], messages[0]
    assert broken.launches == 1  # never tried again on that device
    assert list(runtime.kernel_failures()) == [(name, "cpu")]
    assert f"{name} on cpu: OutOfResources" in info.report()


def test_slim_model_survives_a_failing_attention_kernel(monkeypatch):
    search = search_model(fused=False).eval()
    plan = vitslim.threshold(search, 0.7, 0.7, 1.0)
    reference = vitslim.slim(search, plan, fused=False).eval()
    fused = vitslim.slim(search, plan, fused=True).eval()
    images = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    break_kernel(monkeypatch, "vitslim_kernels.triton.ragged_attention", "_ragged_attention_fwd_kernel")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fused(images)
    torch.testing.assert_close(out, reference(images), rtol=1e-5, atol=1e-5)
    messages = fallback_warnings(caught)
    assert len(messages) == 1 and "ragged_attention_fwd" in messages[0], messages


def test_strict_mode_raises_the_kernel_error(monkeypatch):
    monkeypatch.setenv("VITSLIM_STRICT_KERNELS", "1")
    break_kernel(monkeypatch, "vitslim_kernels.triton.ragged_attention", "_ragged_attention_fwd_kernel")
    q = torch.randn(2, 17, 24)
    with pytest.raises(Exception, match="shared memory"):
        vitslim_kernels.ragged_attention(q, q, q, (8, 16), 0.25, implementation="triton")
    assert runtime.kernel_failures() == {}


def test_errors_that_break_the_device_are_not_hidden(monkeypatch):
    error = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    break_kernel(monkeypatch, "vitslim_kernels.triton.ragged_attention", "_ragged_attention_fwd_kernel", error)
    q = torch.randn(2, 17, 24)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        vitslim_kernels.ragged_attention(q, q, q, (8, 16), 0.25, implementation="triton")
    assert runtime.kernel_failures() == {}


def test_clearing_the_failures_tries_the_kernel_again(monkeypatch):
    broken = break_kernel(monkeypatch, "vitslim_kernels.triton.ragged_attention", "_ragged_attention_fwd_kernel")
    q = torch.randn(2, 17, 24)
    expected = vitslim_kernels.ragged_attention_ref(q, q, q, (8, 16), 0.25)
    with pytest.warns(KernelFallbackWarning):
        out = vitslim_kernels.ragged_attention(q, q, q, (8, 16), 0.25, implementation="triton")
    torch.testing.assert_close(out, expected)
    runtime.clear_kernel_failures()
    with pytest.warns(KernelFallbackWarning):
        vitslim_kernels.ragged_attention(q, q, q, (8, 16), 0.25, implementation="triton")
    assert broken.launches == 2


def _cases(*ops: str) -> list:
    """The selftest's Triton cases of these ops (the failure tests need only the broken kernel and a neighbour)."""
    from vitslim_kernels import selftest
    cases = [case for case in selftest.CASES if case[3].name in ops and case[2] == "triton"]
    assert {case[3].name for case in cases} == set(ops), cases
    return cases


def test_selftest_reports_a_kernel_that_writes_wrong_values(monkeypatch):
    from vitslim_kernels import selftest

    class _WritesNothing:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def alloc_nan(shape, like, dtype=None):
        return torch.full(tuple(shape), float("nan"), dtype=dtype or like.dtype, device=like.device)

    module = importlib.import_module("vitslim_kernels.triton.gated_linear")
    monkeypatch.setattr(module, "_gated_gelu_linear_fwd_kernel", _WritesNothing())
    monkeypatch.setattr(module, "_alloc", alloc_nan)
    checks = {c.name: c for c in selftest.run(torch.device("cpu"), dtypes=[torch.float32],
                                               cases=_cases("gated_gelu_linear", "ragged_attention",
                                                            "layernorm_token_scale"))}
    assert not checks["gated_gelu_linear (triton)"].passed
    assert checks["ragged_attention (triton)"].passed and checks["layernorm_token_scale (triton)"].passed


def test_selftest_reports_a_kernel_that_raises(monkeypatch):
    from vitslim_kernels import selftest
    break_kernel(monkeypatch, "vitslim_kernels.triton.ragged_attention", "_ragged_attention_bwd_kernel")
    checks = {c.name: c for c in selftest.run(torch.device("cpu"), dtypes=[torch.float32],
                                               cases=_cases("ragged_attention"))}
    failed = checks["ragged_attention (triton)"]
    assert not failed.passed and "OutOfResources" in failed.failure, failed
    assert runtime.kernel_failures() == {}  # strict while it runs: reported, never fallen back


def test_compiled_import_every_launcher_is_guarded():
    """Every function of the Triton and CUDA modules that launches a kernel is a fail_safe launcher, and its op
    registered the PyTorch function it falls back to."""
    unguarded, without_fallback = [], []
    assert "vitslim_kernels.cuda.ragged_attention" in KERNEL_MODULES and len(KERNEL_MODULES) >= 4
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for fname, fn in vars(module).items():
            if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            source = inspect.getsource(inspect.unwrap(fn))
            launches = "wrap_triton(_" in source or "_ext.load()." in source
            if launches and not hasattr(fn, "kernel"):
                unguarded.append(f"{name}.{fname}")
            elif launches and fn.kernel not in runtime._FALLBACKS:
                without_fallback.append(fn.kernel)
    assert unguarded == [] and without_fallback == []
