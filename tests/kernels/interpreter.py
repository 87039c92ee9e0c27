"""Running Triton kernel tests on CPU under Triton's interpreter, from an ordinary pytest run.

Triton reads TRITON_INTERPRET once, when it is imported: from then on every @triton.jit function, its own
library (tl.max, tl.cdiv, ...) included, is interpreted or compiled for the whole process. When this process
imported triton with it (TRITON_INTERPRET=1 for the whole run), a file's CPU tests run here. Otherwise (the
usual `pytest tests/`: importing timm imports triton) they are skipped here and the file's
`test_cpu_tests_under_the_interpreter` reruns it in a fresh process with TRITON_INTERPRET=1, so the variable
never leaks into other test files, which keep sending CPU tensors to the reference.

Tests whose name contains `compiled_import` are the other way round: they exercise what CPU tensors do when
triton was imported compiled (the custom ops' CPU path), so they run only here, never in the rerun.
"""
import os
import subprocess
import sys

import pytest
import triton
from triton.runtime.interpreter import InterpretedFunction

INTERPRETED = isinstance(triton.language.cdiv, InterpretedFunction)  # how this process imported triton
CHILD_FLAG = "VITSLIM_TEST_INTERPRETER_CHILD"
RERUN_TEST = "test_cpu_tests_under_the_interpreter"
COMPILED_ONLY = "compiled_import"  # in a test's name: it needs triton imported compiled


def require_interpreter(request, monkeypatch) -> None:
    """For an autouse fixture: CPU tests run only where triton was imported interpreted."""
    if "gpu" in request.keywords or request.node.name == RERUN_TEST:
        return
    if COMPILED_ONLY in request.node.name:
        if INTERPRETED:
            pytest.skip("triton was imported with TRITON_INTERPRET=1; this test needs it imported compiled")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return
    if not INTERPRETED:
        if os.environ.get(CHILD_FLAG) == "1":
            pytest.fail("TRITON_INTERPRET=1 was set for this process, yet triton was imported compiled")
        pytest.skip(f"triton was imported without TRITON_INTERPRET=1; {RERUN_TEST} runs this test in a fresh process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rerun_under_interpreter(path: str) -> None:
    """Run the CPU tests of the test file `path` in a fresh process with TRITON_INTERPRET=1; all must pass."""
    from vitslim_kernels.runtime import interpreter_broken

    broken = interpreter_broken()
    if broken:  # e.g. the GPU image: triton 3.6 with numpy 2.5; its GPU tests run the compiled kernels instead
        pytest.skip(broken)
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_FLAG: "1"})
    proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                           "-k", f"not {RERUN_TEST} and not {COMPILED_ONLY}"],
                          env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and " passed" in summary and "skipped" not in summary, \
        f"interpreter run failed ({summary!r}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def poison_allocations(monkeypatch, *modules) -> None:
    """Every buffer the kernels of `modules` (their launchers' `_alloc`) write starts as NaN, so an element they skip
    stays NaN."""
    import torch

    def alloc_nan(shape, like, dtype=None):
        return torch.full(tuple(shape), float("nan"), dtype=dtype or like.dtype, device=like.device)
    for module in modules:
        monkeypatch.setattr(module, "_alloc", alloc_nan)
