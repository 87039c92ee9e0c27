"""How every op of vitslim_kernels is defined with torch.library, and the autodiff helper their backwards share.

The ops are defined here, in ops/, not beside their kernels: an op then exists, with its CPU implementation (the
reference math), wherever vitslim_kernels imports, with or without Triton, so a fused model exported to .pt2 loads
and runs on any machine. Where Triton compiles and torch has it, an op is a torch.library.triton_op: AOTAutograd
decomposes it into the Triton launches its implementation makes, and Inductor sees the kernels. Defining a
triton_op reads its implementation's source for kernels (torch does, for its compile cache), which imports triton
where it is installed: importing vitslim_kernels therefore imports triton, and TRITON_INTERPRET must be set before
(as it must before anything imports triton). Under the interpreter the ops are custom_ops (runtime.uses_triton_op).
The implementations reach their kernels through a lazy import, so torch finds none of them for its cache key;
the traced graph still holds every launch. That is the trade for one schema that exists everywhere.
"""
from __future__ import annotations

import torch

from .. import runtime


def ops_are_interpreted() -> bool:
    """Whether the kernels behind the ops run in Triton's interpreter: as the imported triton does, else as
    TRITON_INTERPRET says (triton reads it at its import)."""
    imported = runtime._imported_triton_interprets()
    return runtime.interpreter_enabled() if imported is None else imported


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in, as the kernels do: float16, bfloat16 and float32 in float32; float64
    stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op's matmuls run in: the autocast dtype where autocast is on for x's device, else x.dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def define_op(name: str, fn, fake):
    """The custom op `name` implemented by `fn` (schema from its annotations) with the fake implementation
    `fake`, as triton_op or custom_op (runtime.uses_triton_op). triton_op would trace `fn` itself as the fake
    implementation; ours replaces it in both modes, so fake tensors never reach a launcher."""
    if runtime.uses_triton_op(ops_are_interpreted()):
        op = torch.library.triton_op(name, fn, mutates_args=())
    else:
        op = torch.library.custom_op(name, fn, mutates_args=())
    op.register_fake(fake)
    return op


def formula_vjp(formula, args: tuple, cotangents: tuple, needs_input_grad: tuple) -> tuple:
    """The vector-Jacobian product of `formula(*args)` (plain differentiable PyTorch; a tuple of outputs, or one
    tensor) with `cotangents` (a tuple, one per output): one gradient per argument, None for arguments that are
    not floating tensors or need no gradient.

    The backward of each backward op: its formula written out in PyTorch is a function of all its inputs, and
    torch.func.vjp of it is differentiable again (a third derivative is right, too). A None cotangent (an
    output nobody used) counts as zero.
    """
    wrt = [i for i, a in enumerate(args)
           if isinstance(a, torch.Tensor) and a.is_floating_point() and needs_input_grad[i]]
    if not wrt:
        return (None,) * len(args)

    def of_differentiable(*tensors):
        full = list(args)
        for i, t in zip(wrt, tensors):
            full[i] = t
        return formula(*full)

    outputs, pullback = torch.func.vjp(of_differentiable, *(args[i] for i in wrt))
    single = isinstance(outputs, torch.Tensor)  # a formula with one output returns it bare
    cotangents = tuple(torch.zeros_like(o) if c is None else c
                       for c, o in zip(cotangents, (outputs,) if single else outputs))
    grads = [None] * len(args)
    for i, g in zip(wrt, pullback(cotangents[0] if single else cotangents)):
        grads[i] = g
    return tuple(grads)


def sample_tensors(*shapes: tuple[int, ...], device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                   scale: float = 1.0, requires_grad: bool = False) -> list[torch.Tensor]:
    """Random tensors for an op's sample_inputs: drawn in float64 on the CPU from `seed`, then scaled and cast, so
    every dtype and device sees the same values (rounded)."""
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
            .requires_grad_(requires_grad) for shape in shapes]


def refuse_dropout(what: str, remedy: str, kind: str = "dropout", **rates: float) -> None:
    """The kernels have no RNG, so they have no dropout: a non-zero rate is refused with this ValueError rather than
    silently ignored (the one place that rule is written)."""
    for name, p in rates.items():
        if p > 0.0:
            raise ValueError(f"{what} has no {kind} (the kernels have no RNG), got {name}={p}; {remedy}")
