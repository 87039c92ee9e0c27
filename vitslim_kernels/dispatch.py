"""Which implementation of an op runs, and every reason the others were refused; and the registry of the ops.
Mechanism only.

Each op module (ops/<op>.py) registers its implementations here, in order of preference, each with a refusal
rule: a function of the op's arguments (all of them, as the op is called) that returns every reason the
implementation cannot run on them, [] when it can (xformers' not_supported_reasons). `select` returns the first
implementation without a reason; `explain` lists every decision. Each op also registers what the tools need to
check it without knowing it (describe_op): its functional, reference, sample inputs, the torch.library ops and
the kernels behind it; the selftest and the tests loop over `op_infos()`. This module imports no op, no backend,
and touches no GPU; the process state the rules read (interpreter, compile-only target, ...) is in runtime.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

Refusals = Callable[..., list[str]]


@dataclass(frozen=True)
class Implementation:
    op: str
    name: str
    load: Callable[[], Callable]   # imports lazily, returns the callable (same signature as the op's functional)
    refusals: Refusals             # (*args, **kwargs) of a call -> every reason it cannot run them; [] if it can
    forward_only: bool = False     # no backward: it refuses inputs that need a gradient


@dataclass(frozen=True)
class OpInfo:
    """What a tool needs to check an op it does not know: call it (`functional(*args, implementation=name,
    **kwargs)`), compare it (`reference`, float64-capable), feed it (`sample_inputs(device, dtype,
    requires_grad) -> [(args, kwargs)]`; its library ops through `library_samples`), and find what it runs (its
    torch.library ops, the fail-safe names of the kernels it launches, and the backend modules that hold them)."""
    name: str
    functional: Callable
    reference: Callable
    sample_inputs: Callable[..., list[tuple[tuple, dict]]]
    library_ops: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    kernel_modules: tuple[str, ...] = ()
    # (label, torch.library op name, a function making its args) per case, for torch.library.opcheck
    library_samples: Callable[[], list[tuple[str, str, Callable[[], tuple]]]] = list
    uses_dot: bool = False         # its kernels multiply with tl.dot (the interpreter gets bfloat16 dots wrong)
    composite: bool = False        # made of other described ops only: its kernels are checked through theirs


_REGISTRY: dict[str, list[Implementation]] = {}
_OPS: dict[str, OpInfo] = {}


def describe_op(info: OpInfo) -> None:
    """Register what the tools need to know of an op (ops/<op>.py calls this once per public op)."""
    _OPS[info.name] = info


def op_infos() -> list[OpInfo]:
    """Every described op, by name."""
    return [_OPS[name] for name in sorted(_OPS)]


def register(op: str, name: str, load: Callable[[], Callable], refusals: Refusals, forward_only: bool = False
             ) -> None:
    """Add an implementation of `op`; earlier registrations are preferred. Registering a name again replaces it
    in place (a module reloaded keeps one entry)."""
    implementations = _REGISTRY.setdefault(op, [])
    new = Implementation(op, name, load, refusals, forward_only)
    for i, impl in enumerate(implementations):
        if impl.name == name:
            implementations[i] = new
            return
    implementations.append(new)


def ops() -> list[str]:
    """The names of every registered op."""
    return sorted(_REGISTRY)


def implementations(op: str) -> list[Implementation]:
    """The implementations of `op`, in order of preference."""
    return list(_implementations(op))


def _implementations(op: str) -> list[Implementation]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known: {ops()}")
    return _REGISTRY[op]


def refusals(op: str, *args, **kwargs) -> list[tuple[str, list[str]]]:
    """(implementation, every reason it cannot run these arguments) for every implementation of `op`."""
    return [(impl.name, list(impl.refusals(*args, **kwargs))) for impl in _implementations(op)]


def explain(op: str, *args, **kwargs) -> list[tuple[str, str | None]]:
    """(implementation, why it is skipped, its reasons joined by '; ', or None if usable) for every
    implementation of `op`, for a call with these arguments (or only the first tensor of one)."""
    return [(name, "; ".join(reasons) or None) for name, reasons in refusals(op, *args, **kwargs)]


def select(op: str, *args, forced: str | None = None, **kwargs) -> Callable:
    """The callable of the preferred implementation of `op` that can run these arguments.

    `forced` (or the environment variable VITSLIM_FORCE_<OP>=name) picks one by name.
    """
    candidates = _implementations(op)
    forced = forced or os.environ.get(f"VITSLIM_FORCE_{op.upper()}")
    if forced is not None and forced not in (impl.name for impl in candidates):
        raise ValueError(f"{op}: unknown implementation {forced!r}; accepted: {[i.name for i in candidates]}")
    for impl in candidates:
        if forced is not None and impl.name != forced:
            continue
        reasons = impl.refusals(*args, **kwargs)
        if not reasons:
            return impl.load()
        if forced is not None:
            raise RuntimeError(f"{op}: implementation {forced!r} cannot run here: {'; '.join(reasons)}")
    example = args[0] if args else None
    raise RuntimeError(f"{op}: no implementation can run on {getattr(example, 'device', '?')} "
                       f"{getattr(example, 'dtype', '?')}")


def no_refusals(*args, **kwargs) -> list[str]:
    """The refusal rule of a reference implementation: it runs anything its argument checks accept."""
    return []
