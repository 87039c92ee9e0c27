"""The process state every op and launcher reads on the hot path, in one place, and set only through functions here.

- Triton's interpreter (TRITON_INTERPRET=1): whether CPU tensors run the Triton kernels, and whether the installed
  triton's interpreter can (interpreter_enabled, interpreter_broken, triton_refusals).
- Tracing: torch.compile, torch.export or a dispatch mode is running the code (tracing).
- Strict kernels (VITSLIM_STRICT_KERNELS=1, or inside compile_only): a failing kernel raises instead of falling
  back (strict_kernels).
- The compile-only target: while vitslim_kernels.compile_only is active, CPU tensors take the Triton path and
  every launch only compiles for that stand-in GPU (compile_only_target; set with compile_only_context).
- Kernel failures: a kernel that failed to compile or launch on a device computes in PyTorch there from then on
  (fail_safe, kernel_failures, clear_kernel_failures).
- Autotuning (VITSLIM_AUTOTUNE=1) and whether the ops are torch.library.triton_op (uses_triton_op).

Nothing here imports triton, the extension or any op, and nothing touches a GPU at import.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


# -- Triton's interpreter and availability ------------------------------------------------------------------
def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_broken() -> str | None:
    """Why the installed triton's interpreter cannot run our kernels, or None. Seen: triton 3.6's interpreter
    with numpy 2.4 fails every kernel with "TypeError: only 0-dimensional arrays can be converted to Python
    scalars"; triton 3.8 with numpy 2.4 works."""
    try:
        triton_version = importlib.metadata.version("triton")
        numpy_version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None
    major_minor = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with numpy {numpy_version}; "
                f"it needs numpy < 2.4 (or triton >= 3.7)")
    return None


# Looked up at import (find_spec imports nothing and touches no device): torch.compile traces a plain global
# quietly, while torch 2.11's dynamo refuses to trace find_spec on a first call inside a compiled function.
TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None
_INTERPRETER_BROKEN: str | None = interpreter_broken()  # package metadata only: no import, no device
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _imported_triton_interprets() -> bool | None:
    """Whether the already imported triton interprets @triton.jit functions; None if not imported yet.

    Triton reads TRITON_INTERPRET once, at import: its own library (tl.cdiv, tl.max, ...) is interpreted or
    compiled for the rest of the process, and kernels of the other kind fail when run.
    """
    tl = sys.modules.get("triton.language")
    if tl is None or not hasattr(tl, "cdiv"):
        return None
    return type(tl.cdiv).__name__ == "InterpretedFunction"


def triton_refusals(example: torch.Tensor, *_, **__) -> list[str]:
    """Every reason the Triton kernels cannot run on tensors like `example` (an op's data tensor, its first
    argument: its device and dtype decide; read at call time); [] if they can. The other arguments of the call are
    accepted and not read, so an op registers this as the refusal rule of its Triton implementation."""
    reasons: list[str] = []
    device = example.device.type
    if device == "cpu" and compile_only_target() is None:  # (compile_only: CPU compiles for its stand-in GPU)
        if not interpreter_enabled():
            reasons.append("CPU tensor and TRITON_INTERPRET is not 1")
        elif _INTERPRETER_BROKEN:
            reasons.append(_INTERPRETER_BROKEN)
    elif device not in ("cpu", "cuda"):
        reasons.append(f"{device} tensor: Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1")
    if example.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {example.dtype} is not supported by the Triton kernels (float32, float16, bfloat16 "
                       f"are)")
    if not TRITON_INSTALLED:
        reasons.append("triton is not installed")
    interprets = _imported_triton_interprets()
    if interprets is not None and interprets != interpreter_enabled():
        reasons.append(f"TRITON_INTERPRET is {'1' if interpreter_enabled() else 'not 1'} but triton was imported "
                       f"{'with' if interprets else 'without'} it (triton reads it once, at import)")
    return reasons


def triton_unavailable(example: torch.Tensor) -> str | None:
    """The first reason the Triton kernels cannot run on tensors like `example`, or None if they can."""
    reasons = triton_refusals(example)
    return reasons[0] if reasons else None


def reference_on(t: torch.Tensor) -> bool:
    """Whether an op computes its reference math instead of launching kernels for tensors like `t`: CPU tensors
    without the interpreter (and outside compile_only). So every op runs on CPU, and torch.export / ONNX export
    of a fused model trace it there, without Triton."""
    return t.device.type == "cpu" and not interpreter_enabled() and compile_only_target() is None


def alloc(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, through its launcher module's `_alloc` (tests swap in a
    NaN-filled one there, to prove the kernel writes every element)."""
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)


# -- tracing, strictness, autotuning -------------------------------------------------------------------------
def tracing() -> bool:
    """True while torch.compile / torch.export / a dispatch mode (fake, functional, ...) runs the code: no
    tensor made then may enter a cache that eager calls read, and no kernel failure is caught."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def strict_kernels() -> bool:
    """Whether a kernel failure raises instead of falling back: VITSLIM_STRICT_KERNELS=1 (the test suite sets it,
    so a broken kernel fails its test instead of passing on the reference), or inside compile_only."""
    return os.environ.get("VITSLIM_STRICT_KERNELS", "0") == "1" or compile_only_target() is not None


def autotune_enabled() -> bool:
    """VITSLIM_AUTOTUNE=1: the attention kernels time their short config lists once per shape key on the GPU and
    keep the fastest (vitslim_kernels.triton._launch.tuned). Off by default: the tiles set the order of the
    fp32 sums, so two processes that tuned differently would not be bitwise equal (a resumed run included)."""
    return os.environ.get("VITSLIM_AUTOTUNE", "0") == "1"


def uses_triton_op(is_interpreted: bool) -> bool:
    """Whether the Triton-backed ops are torch.library.triton_op (torch.compile traces into them) or custom_op.

    triton_op where torch has it and Triton compiles. Under TRITON_INTERPRET=1 custom_op: the interpreted
    kernels are no JITFunction, so torch 2.11's wrap_triton refuses them and 2.14's hands them back unwrapped,
    and triton_op's traced implementation then runs the interpreter on FakeTensors (opcheck: "Attempted to
    set the storage of a tensor on device meta"). Triton decides interpreted or compiled once, at import.
    """
    return not is_interpreted and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


# -- the compile-only target ---------------------------------------------------------------------------------
_COMPILE_ONLY: list[tuple[object, bool]] = []  # stack of (vitslim_kernels.compile_only.Target, all_candidates)


def compile_only_target():
    """The stand-in GPU target (vitslim_kernels.compile_only.Target) while `compile_only` is active, else None.

    While one is active, CPU tensors take the Triton path and every kernel launch only compiles, for that
    target: nothing runs, outputs stay uninitialised. The compile gate reads what was compiled."""
    return _COMPILE_ONLY[-1][0] if _COMPILE_ONLY else None


def compile_only_all_candidates() -> bool:
    """Whether the active `compile_only` compiles every candidate config of the autotuned kernels (the compile
    gate: a config the autotuner may pick on a GPU must pass it too), not only the default one."""
    return bool(_COMPILE_ONLY) and _COMPILE_ONLY[-1][1]


@contextlib.contextmanager
def compile_only_context(target, all_candidates: bool) -> Iterator[None]:
    """Make `target` the active compile-only target for the block (vitslim_kernels.compile_only uses this)."""
    _COMPILE_ONLY.append((target, all_candidates))
    try:
        yield
    finally:
        _COMPILE_ONLY.pop()


# -- kernels that fail on a user's GPU -----------------------------------------------------------------------
class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed to compile or launch on a device; its op computes in PyTorch there from now on."""


_KERNEL_FAILURES: dict[tuple[str, str], str] = {}  # (kernel, device) -> "ErrorType: first line"

# CUDA errors after which the context is unusable: nothing can fall back on that device, so they propagate.
_FATAL_DEVICE_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                        "misaligned address", "illegal instruction", "hardware stack error")


def kernel_failures() -> dict[tuple[str, str], str]:
    """{(kernel, device): error} of every kernel that failed in this process and now runs in PyTorch."""
    return dict(_KERNEL_FAILURES)


def clear_kernel_failures() -> None:
    """Forget the failures: the next call tries each kernel again."""
    _KERNEL_FAILURES.clear()


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, sm_{major}{minor})"
    return f"{device} (Triton interpreter)" if device.type == "cpu" and interpreter_enabled() else str(device)


def _error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


_FALLBACKS: dict[str, Callable] = {}  # kernel -> the plain PyTorch function its launcher falls back to


def register_fallback(kernel: str, reference: Callable) -> None:
    """What the launcher of `kernel` computes, in plain PyTorch, with its signature and results: the op that
    calls the launcher registers it (the backends import no op, so they cannot name it themselves)."""
    _FALLBACKS[kernel] = reference


def fail_safe(kernel: str, reference: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorate a launcher so that a kernel that fails to compile or launch on a device (an architecture,
    shared-memory size or Triton version we did not test) does not end the run: the first failure warns once,
    naming the kernel, the device and the error (KernelFallbackWarning), and from then on `reference` (default:
    the one registered for `kernel`, register_fallback), a plain PyTorch function with the launcher's signature
    and results, computes the same values on that device. A kernel without a fallback raises as if strict.

    Not caught: out-of-memory, errors that leave the CUDA context unusable (illegal address, device assert),
    and anything while strict_kernels() holds. While torch.compile or a dispatch mode traces, a kernel that
    already failed is traced as its reference; one that has not is traced as usual (no try: a trace is no run).
    """
    def decorate(launcher: Callable) -> Callable:
        @functools.wraps(launcher)
        def guarded(*args, **kwargs):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            key = (kernel, str(device))
            fallback = reference if reference is not None else _FALLBACKS.get(kernel)
            if key in _KERNEL_FAILURES and fallback is not None:
                return fallback(*args, **kwargs)
            if strict_kernels() or tracing() or fallback is None:
                return launcher(*args, **kwargs)
            try:
                return launcher(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 (any compile or launch failure of this kernel)
                if any(text in str(error) for text in _FATAL_DEVICE_ERRORS):
                    raise
                _KERNEL_FAILURES[key] = _error_line(error)
                warnings.warn(f"vitslim_kernels: kernel {kernel} failed on {_device_label(device)}: "
                              f"{_KERNEL_FAILURES[key]}; its op computes in PyTorch on that device from now on "
                              f"(slower, same results). Set VITSLIM_STRICT_KERNELS=1 to raise instead; "
                              f"`python -m vitslim_kernels.info --selftest` checks every kernel",
                              KernelFallbackWarning, stacklevel=2)
                return fallback(*args, **kwargs)
        guarded.kernel = kernel
        return guarded
    return decorate
