"""Which implementation of an op runs, and why the others were skipped.

Nothing here touches the GPU at import. Implementations register themselves with a predicate that
returns None when they can run on the given tensors, or a one-line reason when they cannot; `select`
returns the first that can, in order of preference, and `explain` lists every decision.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Implementation:
    op: str
    name: str
    load: Callable[[], Callable]                       # imports lazily, returns the callable
    unavailable: Callable[[torch.Tensor], str | None]  # None if usable on these tensors, else why not


_REGISTRY: dict[str, list[Implementation]] = {}


def register(op: str, name: str, load: Callable[[], Callable],
             unavailable: Callable[[torch.Tensor], str | None]) -> None:
    """Add an implementation of `op`; earlier registrations are preferred."""
    _REGISTRY.setdefault(op, []).append(Implementation(op, name, load, unavailable))


_COMPILE_ONLY_TARGETS: list = []  # stack of vitslim_kernels.compile_only targets; the last one is active


def compile_only_target():
    """The stand-in GPU target (vitslim_kernels.compile_only.Target) while `compile_only` is active, else None.

    While one is active, CPU tensors take the Triton path and every kernel launch only compiles, for that
    target: nothing runs, outputs stay uninitialised. The compile gate reads what was compiled."""
    return _COMPILE_ONLY_TARGETS[-1] if _COMPILE_ONLY_TARGETS else None


def compile_only_all_candidates() -> bool:
    """Whether the active `compile_only` compiles every candidate config of the autotuned kernels (the compile
    gate: a config the autotuner may pick on a GPU must pass it too), not only the default one."""
    return bool(_COMPILE_ONLY_TARGETS) and _COMPILE_ALL_CANDIDATES[-1]


_COMPILE_ALL_CANDIDATES: list[bool] = []  # pushed and popped with _COMPILE_ONLY_TARGETS


def autotune_enabled() -> bool:
    """VITSLIM_AUTOTUNE=1: the attention kernels time their short config lists once per shape key on the GPU and
    keep the fastest (vitslim_kernels.triton._common.tuned). Off by default: the tiles set the order of the
    fp32 sums, so two processes that tuned differently would not be bitwise equal (a resumed run included)."""
    return os.environ.get("VITSLIM_AUTOTUNE", "0") == "1"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_broken() -> str | None:
    """Why the installed triton's interpreter cannot run our kernels, or None. Seen: triton 3.6's interpreter
    with numpy 2.4 fails every kernel with "TypeError: only 0-dimensional arrays can be converted to Python
    scalars"; triton 3.8 with numpy 2.4 works."""
    import importlib.metadata as md

    try:
        triton_version, numpy_version = md.version("triton"), md.version("numpy")
    except md.PackageNotFoundError:
        return None
    major_minor = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with numpy {numpy_version}; "
                f"it needs numpy < 2.4 (or triton >= 3.7)")
    return None


# -- kernels that fail on a user's GPU ---------------------------------------------------------------------
class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed to compile or launch on a device; its op computes in PyTorch there from now on."""


_KERNEL_FAILURES: dict[tuple[str, str], str] = {}  # (kernel, device) -> "ErrorType: first line"

# CUDA errors after which the context is unusable: nothing can fall back on that device, so they propagate.
_FATAL_DEVICE_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                        "misaligned address", "illegal instruction", "hardware stack error")


def strict_kernels() -> bool:
    """Whether a kernel failure raises instead of falling back: VITSLIM_STRICT_KERNELS=1 (the test suite sets it,
    so a broken kernel fails its test instead of passing on the reference), or inside compile_only."""
    return os.environ.get("VITSLIM_STRICT_KERNELS", "0") == "1" or compile_only_target() is not None


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


def fail_safe(kernel: str, reference: Callable) -> Callable[[Callable], Callable]:
    """Decorate a launcher so that a kernel that fails to compile or launch on a device (an architecture,
    shared-memory size or Triton version we did not test) does not end the run: the first failure warns once,
    naming the kernel, the device and the error (KernelFallbackWarning), and from then on `reference`, a plain
    PyTorch function with the launcher's signature and results, computes the same values on that device.

    Not caught: out-of-memory, errors that leave the CUDA context unusable (illegal address, device assert),
    and anything while strict_kernels() holds. While torch.compile or a dispatch mode traces, a kernel that
    already failed is traced as its reference; one that has not is traced as usual (no try: a trace is no run).
    """
    def decorate(launcher: Callable) -> Callable:
        @functools.wraps(launcher)
        def guarded(*args, **kwargs):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            key = (kernel, str(device))
            if key in _KERNEL_FAILURES:
                return reference(*args, **kwargs)
            if strict_kernels() or tracing():
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
                return reference(*args, **kwargs)
        guarded.kernel = kernel
        return guarded
    return decorate


def tracing() -> bool:
    """True while torch.compile / torch.export / a dispatch mode (fake, functional, ...) runs the code: no
    tensor made then may enter a cache that eager calls read, and no kernel failure is caught."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _imported_triton_interprets() -> bool | None:
    """Whether the already imported triton interprets @triton.jit functions; None if not imported yet.

    Triton reads TRITON_INTERPRET once, at import: its own library (tl.cdiv, tl.max, ...) is interpreted or
    compiled for the rest of the process, and kernels of the other kind fail when run.
    """
    tl = sys.modules.get("triton.language")
    if tl is None or not hasattr(tl, "cdiv"):
        return None
    return type(tl.cdiv).__name__ == "InterpretedFunction"


# Looked up at import (find_spec imports nothing and touches no device): torch.compile traces a plain global
# quietly, while torch 2.11's dynamo refuses to trace find_spec on a first call inside a compiled function.
_TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


_INTERPRETER_BROKEN: str | None = interpreter_broken()  # package metadata only: no import, no device


def triton_unavailable(example: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on tensors like `example`, else why not (read at call time)."""
    device = example.device.type
    if device == "cpu" and compile_only_target() is None:  # (compile_only: CPU compiles for its stand-in GPU)
        if not interpreter_enabled():
            return "CPU tensor and TRITON_INTERPRET is not 1"
        if _INTERPRETER_BROKEN:
            return _INTERPRETER_BROKEN
    elif device not in ("cpu", "cuda"):
        return f"{example.device.type} tensor: Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1"
    if example.dtype not in _TRITON_DTYPES:
        return f"dtype {example.dtype} is not supported by the Triton kernels (float32, float16, bfloat16 are)"
    if not _triton_installed():
        return "triton is not installed"
    interprets = _imported_triton_interprets()
    if interprets is not None and interprets != interpreter_enabled():
        return (f"TRITON_INTERPRET is {'1' if interpreter_enabled() else 'not 1'} but triton was imported "
                f"{'with' if interprets else 'without'} it (triton reads it once, at import)")
    return None


_CUDA_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_forward_unavailable(example: torch.Tensor) -> str | None:
    """None if the forward-only CUDA kernels of vitslim_kernels._C can run on tensors like `example`.

    Only `example` is seen: a gradient is assumed needed when grad mode is on and it requires grad (the
    launcher checks every input again and refuses, rather than return an output without a graph).
    """
    if example.device.type != "cuda":
        kind = "CPU" if example.device.type == "cpu" else example.device.type
        return f"{kind} tensor: the CUDA kernel runs on CUDA tensors"
    if example.dtype not in _CUDA_EXT_DTYPES:
        return f"dtype {example.dtype} is not supported by the CUDA kernel (float32, float16, bfloat16 are)"
    if torch.is_grad_enabled() and example.requires_grad:
        return "the CUDA kernel is forward-only; training uses triton"
    from . import _ext
    return _ext.device_unavailable(example.device)


# ESTIMATE, not measured (no GPU where this was written): the CUDA ragged-attention kernel is plain fp32 SIMT
# (tens of TFLOP/s at best on an H100) while Triton's uses tensor cores; the CUDA kernel only wins where
# Triton's launch cost (tens of microseconds) outweighs that, i.e. small inference batches. Taken as
# B * N * N * sum(head_dims) <= 2**27 (DeiT-S at 70%, N = 197: batch <= ~12). Set from
# benchmarks/run_slim_benchmarks.py (ragged_attention.json has both kernels at batch 1 and 256).
RAGGED_CUDA_MAX_WORK = 2 ** 27


def ragged_attention_cuda_unavailable(example: torch.Tensor) -> str | None:
    """cuda_forward_unavailable, and a size limit: above it Triton is expected faster (see RAGGED_CUDA_MAX_WORK)."""
    why = cuda_forward_unavailable(example)
    shape = getattr(example, "shape", None)  # info's stand-ins have no shape
    if why is None and shape is not None and len(shape) == 3:
        B, N, D = shape
        if B * N * N * D > RAGGED_CUDA_MAX_WORK:
            return (f"B * N^2 * sum(head_dims) = {B * N * N * D} > {RAGGED_CUDA_MAX_WORK}: Triton's tensor-core "
                    f"kernel is expected faster than the CUDA SIMT kernel there (estimate, not yet measured)")
    return why


def explain(op: str, example: torch.Tensor) -> list[tuple[str, str | None]]:
    """(implementation, reason it is skipped or None if usable) for every implementation of `op`."""
    _ensure_registered()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_REGISTRY)}")
    return [(impl.name, impl.unavailable(example)) for impl in _REGISTRY[op]]


def select(op: str, example: torch.Tensor, forced: str | None = None) -> Callable:
    """The callable of the preferred usable implementation of `op` for tensors like `example`.

    `forced` (or the environment variable VITSLIM_FORCE_<OP>=name) picks one by name.
    """
    _ensure_registered()
    forced = forced or os.environ.get(f"VITSLIM_FORCE_{op.upper()}")
    for impl in _REGISTRY[op]:
        if forced is not None and impl.name != forced:
            continue
        why_not = impl.unavailable(example)
        if why_not is None:
            return impl.load()
        if forced is not None:
            raise RuntimeError(f"{op}: implementation {forced!r} cannot run here: {why_not}")
    if forced is not None:
        names = [impl.name for impl in _REGISTRY[op]]
        raise ValueError(f"{op}: unknown implementation {forced!r}; accepted: {names}")
    raise RuntimeError(f"{op}: no implementation can run on {example.device} {example.dtype}")


_registered = False


def _ensure_registered() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    def ragged_ref():
        from .ops.ragged_attention import ragged_attention_ref
        return ragged_attention_ref

    def ragged_triton():
        from .triton.ragged_attention import ragged_attention_triton
        return ragged_attention_triton

    def ragged_cuda():
        from .cuda.ragged_attention import ragged_attention_cuda
        return ragged_attention_cuda

    # CUDA before Triton for inference (small batches, see RAGGED_CUDA_MAX_WORK): UNMEASURED (no GPU where
    # this was written). The CUDA kernel is plain SIMT with a cheaper launch; Triton's uses tensor cores.
    # benchmarks/run_slim_benchmarks.py decides the order and the limit once it has run on the H100.
    register("ragged_attention", "cuda", ragged_cuda, ragged_attention_cuda_unavailable)
    register("ragged_attention", "triton", ragged_triton, triton_unavailable)
    register("ragged_attention", "reference", ragged_ref, lambda t: None)
    _register_search_ops()


def _register_search_ops() -> None:
    """The fused search path (issue 4): each op's Triton implementation, then its reference.

    The loaders are plain import statements (not importlib), so torch.compile traces through dispatch.
    """
    def triton_layernorm():
        from .triton import layernorm_token_scale as module
        return module

    def triton_gated_linear():
        from .triton import gated_linear as module
        return module

    def ops_layernorm():
        from .ops import layernorm_token_scale as module
        return module

    def ops_gated_linear():
        from .ops import gated_linear as module
        return module

    def ops_branches():
        from .ops import gated_branches as module
        return module

    for op, triton_module, ref_module in (
            ("layernorm_token_scale", triton_layernorm, ops_layernorm),
            ("gated_linear", triton_gated_linear, ops_gated_linear),
            ("gated_gelu_linear", triton_gated_linear, ops_gated_linear),
            ("gated_attention_branch", ops_branches, ops_branches),
            ("gated_mlp_branch", ops_branches, ops_branches)):
        register(op, "triton", lambda module=triton_module, name=f"{op}_triton": getattr(module(), name),
                 triton_unavailable)
        register(op, "reference", lambda module=ref_module, name=f"{op}_ref": getattr(module(), name),
                 lambda t: None)
