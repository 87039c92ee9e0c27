"""Which implementation of an op runs, and why the others were skipped.

Nothing here touches the GPU at import. Implementations register themselves with a predicate that
returns None when they can run on the given tensors, or a one-line reason when they cannot; `select`
returns the first that can, in order of preference, and `explain` lists every decision.
"""
from __future__ import annotations

import importlib.util
import os
import sys
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


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def triton_unavailable(example: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on tensors like `example`, else why not (read at call time)."""
    if example.device.type == "cpu":
        if not interpreter_enabled():
            return "CPU tensor and TRITON_INTERPRET is not 1"
    elif example.device.type != "cuda":
        return f"{example.device.type} tensor: Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1"
    if example.dtype not in _TRITON_DTYPES:
        return f"dtype {example.dtype} is not supported by the Triton kernels (float32, float16, bfloat16 are)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    interprets = _imported_triton_interprets()
    if interprets is not None and interprets != interpreter_enabled():
        return (f"TRITON_INTERPRET is {'1' if interpreter_enabled() else 'not 1'} but triton was imported "
                f"{'with' if interprets else 'without'} it (triton reads it once, at import)")
    return None


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

    register("ragged_attention", "triton", ragged_triton, triton_unavailable)
    register("ragged_attention", "reference", ragged_ref, lambda t: None)
