"""Host-side helpers shared by the Triton launchers: the interpreter/compiled checks, the device queries,
`wrap_triton`, and the autotuner of the attention kernels (buffer allocation is runtime.alloc)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
import triton.language as tl
import triton.testing
from triton.runtime.interpreter import InterpretedFunction

from ..runtime import (autotune_enabled, compile_only_all_candidates, compile_only_target, tracing,
                       uses_triton_op)


def interpreted(kernel) -> bool:
    return isinstance(kernel, InterpretedFunction)


def interpreter_agrees(kernel, module: str) -> bool:
    """Whether `kernel` is interpreted; ImportError if Triton's own library was imported the other way.

    Triton decides once, at import, whether @triton.jit gives interpreted or compiled functions
    (TRITON_INTERPRET): its library (tl.max, tl.cdiv, ...) and our kernels must agree, or the kernels fail deep
    inside Triton. Dispatch checks the same before loading a Triton op.
    """
    ours, triton_lib = interpreted(kernel), interpreted(tl.cdiv)
    if ours != triton_lib:
        raise ImportError(f"TRITON_INTERPRET changed between importing triton ({'=1' if triton_lib else 'unset'}) "
                          f"and {module} ({'=1' if ours else 'unset'}); set it before anything imports triton")
    return ours


def check_device(t: torch.Tensor, op: str, is_interpreted: bool) -> None:
    if t.device.type == "cpu" and not is_interpreted and compile_only_target() is None:
        raise RuntimeError(f"{op}: CPU tensors run the Triton kernels only in Triton's interpreter; "
                           "set TRITON_INTERPRET=1 before anything imports triton")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (of the stand-in target under vitslim_kernels.compile_only)."""
    target = compile_only_target()
    if target is not None:
        return target.sm_count
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def arch(device: torch.device) -> int:
    """Compute capability of `device` as major * 10 + minor (of the stand-in target under compile_only)."""
    target = compile_only_target()
    if target is not None:
        return target.arch
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kernel_wrapper(is_interpreted: bool):
    """`wrap_triton` for the kernel launches inside the ops: torch.library.wrap_triton for triton_ops (a traced
    launch under torch.compile, the plain kernel in eager), else the kernel itself. Call it by that bare name
    in the launchers: triton_op finds the kernels of an op (for the AOTAutograd cache key) by reading its
    source for `wrap_triton(kernel)`."""
    if uses_triton_op(is_interpreted):
        return torch.library.wrap_triton
    return lambda kernel: kernel


Config = TypeVar("Config")

_TUNED: dict[tuple[str, Hashable], int] = {}  # (kernel, key) -> index of the fastest candidate, per process


def tuned(kernel: str, key: Hashable, candidates: Sequence[Config], launch: Callable[[Config], None],
          device: torch.device) -> Config:
    """The config to launch `kernel` with for this shape `key` (e.g. (N, widest head, dtype, alignment, arch)).

    candidates[0] is the default, chosen from the compiled code (benchmarks.kernel_resources). With
    VITSLIM_AUTOTUNE=1 on a GPU (not while tracing or capturing a CUDA graph) each candidate is launched on the
    real arguments, timed with triton.testing.do_bench (warm-up 5 ms, 20 ms of repetitions), once per (kernel,
    key) in the process, and the fastest is kept; a candidate that fails to compile or launch there (shared
    memory, registers) is skipped. `launch(config)` must overwrite everything it writes: it runs several times.
    Under compile_only(all_candidates=True) every candidate is compiled (the gate checks them all). Returns the
    config; the caller launches it.
    """
    if len(candidates) > 1 and compile_only_all_candidates():
        for config in candidates[1:]:
            launch(config)  # compile-only: recorded, not run
        return candidates[0]
    if (len(candidates) == 1 or not autotune_enabled() or device.type != "cuda" or tracing()
            or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    index = _TUNED.get((kernel, key))
    if index is None:
        index = _TUNED[(kernel, key)] = _fastest(candidates, launch)
    return candidates[index]


def tuning_possible() -> bool:
    """Whether `tuned` may launch a candidate other than the default (VITSLIM_AUTOTUNE=1, or compile_only compiling
    every candidate): buffers whose size depends on the tile are then sized for all candidates."""
    return autotune_enabled() or compile_only_all_candidates()


def _fastest(candidates: Sequence[Config], launch: Callable[[Config], None]) -> int:
    times = []
    for config in candidates:
        try:
            times.append(triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20))
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 (a config this device cannot run is simply not chosen)
            times.append(float("inf"))
    return min(range(len(candidates)), key=times.__getitem__)


def tuned_configs() -> dict[tuple[str, Hashable], int]:
    """What VITSLIM_AUTOTUNE=1 chose in this process: (kernel, key) -> index into that kernel's candidate list."""
    return dict(_TUNED)
