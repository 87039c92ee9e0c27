"""`python -m vitslim_kernels.info --selftest`: every kernel launched once on this machine, against the reference.

Every op described to dispatch (dispatch.op_infos: each ops/<op>.py describes its own) but the composite ones
(the search's branches: their kernels are checked through the ops they are made of), on its sample inputs
(small odd shapes: N = 50, heads 0, 17, 41 and 64 wide, a token-dropping gather), forward and backward (forward
only for a forward-only implementation), in float32, float16 and bfloat16 (where the device has them), through
each implementation but the reference, forced. The
accuracy rule is the test suite's (docs/conventions.md): the kernel's error against the float64 reference is at most
twice the error of the reference run in the same dtype, plus a floor of 16 eps of that dtype (times the largest
|value|, at least 1). Failures raise here (VITSLIM_STRICT_KERNELS=1 for the run): a kernel that would fall back
to PyTorch in a model is reported as failed, with its error.

On CPU it runs the Triton kernels under TRITON_INTERPRET=1 (nothing to test otherwise); the CUDA kernel runs
when the extension is loaded and a GPU is visible.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from . import dispatch, runtime  # (importing vitslim_kernels imported every op: they are all described)

FLOOR_EPS = 16


@dataclass(frozen=True)
class Check:
    """One kernel family in one dtype: the largest error over its output and every gradient, and its bound."""
    name: str                 # e.g. "ragged_attention (triton)"
    kernels: str              # the kernels it launches
    dtype: str
    passed: bool
    error: float | None       # max |kernel - float64 reference| over all tensors checked
    bound: float | None
    seconds: float
    failure: str | None = None  # the exception, when the kernel raised
    skipped: str | None = None  # why this dtype is not checked here (then passed is True)


@contextlib.contextmanager
def _strict() -> Iterator[None]:
    before = os.environ.get("VITSLIM_STRICT_KERNELS")
    os.environ["VITSLIM_STRICT_KERNELS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["VITSLIM_STRICT_KERNELS"]
        else:
            os.environ["VITSLIM_STRICT_KERNELS"] = before


# Triton's interpreter computes tl.dot on bfloat16 operands wrongly (off by ~1e10 in a 16x16 dot, triton 3.8/3.9):
# the attention kernels' bf16 runs are checked on a GPU only, as in tests/kernels/test_ragged_attention_triton.py.
_INTERPRETER_BF16_DOT = "Triton's interpreter computes tl.dot on bfloat16 wrongly: checked on a GPU only"


def _with_grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
    return [out.detach()] + [gr for gr in grads if gr is not None]


def _outputs(info: dispatch.OpInfo, implementation: str, dtype: torch.dtype, device: torch.device,
             gradients: bool) -> list[torch.Tensor]:
    """The op's output on each of its sample inputs (made alike in every dtype), and with `gradients` the gradient
    of every input that takes one, through `implementation`."""
    tensors = []
    for args, kwargs in info.sample_inputs(device, dtype, requires_grad=gradients):
        with torch.set_grad_enabled(gradients):
            out = info.functional(*args, implementation=implementation, **kwargs)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        tensors += _with_grads(out, leaves) if gradients else [out]
    return tensors


def _cases() -> tuple[tuple[str, str, str, dispatch.OpInfo], ...]:
    """(name, the kernels it launches, implementation, op) of every implementation of every described op but the
    references (what the others are checked against) and the composite ops (their kernels are their parts')."""
    return tuple((f"{info.name} ({impl.name})", ", ".join(info.kernels) or "(composed of the ops above)", impl.name,
                  info)
                 for info in dispatch.op_infos() if not info.composite for impl in dispatch.implementations(info.name)
                 if impl.name != "reference")


CASES = _cases()


def _dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _forward_only(info: dispatch.OpInfo, implementation: str) -> bool:
    return next(impl.forward_only for impl in dispatch.implementations(info.name) if impl.name == implementation)


def _unavailable(info: dispatch.OpInfo, implementation: str, device: torch.device, dtype: torch.dtype) -> str | None:
    args, kwargs = info.sample_inputs(device, dtype)[0]
    with torch.no_grad():
        return dict(dispatch.explain(info.name, *args, **kwargs)).get(implementation, "unknown implementation")


def _check(name: str, kernels: str, implementation: str, info: dispatch.OpInfo, dtype: torch.dtype,
           device: torch.device) -> Check:
    start = time.perf_counter()
    label = str(dtype).removeprefix("torch.")
    gradients = not _forward_only(info, implementation)
    try:
        with _strict():
            got = _outputs(info, implementation, dtype, device, gradients)
    except Exception as error:  # noqa: BLE001 (reported, not raised: every kernel gets its line)
        return Check(name, kernels, label, False, None, None, time.perf_counter() - start,
                     f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
    same = _outputs(info, "reference", dtype, device, gradients)
    exact = _outputs(info, "reference", torch.float64, device, gradients)
    passed, error, bound = len(got) == len(exact), 0.0, 0.0  # (error, bound) of the tensor nearest its bound
    for g, s, e in zip(got, same, exact):
        if torch.isnan(g).any():
            passed, error, bound = False, float("nan"), float("nan")
            break
        largest = e.abs().max().item() if e.numel() else 0.0
        err = (g.double() - e).abs().max().item() if e.numel() else 0.0
        ref_err = (s.double() - e).abs().max().item() if e.numel() else 0.0
        limit = 2 * ref_err + FLOOR_EPS * torch.finfo(dtype).eps * max(largest, 1.0)
        passed = passed and err <= limit
        if err * bound >= error * limit:  # err / limit >= error / bound, without dividing by zero
            error, bound = err, limit
    return Check(name, kernels, label, passed, error, bound, time.perf_counter() - start)


def selftest_device() -> tuple[torch.device | None, str]:
    """(the device the selftest runs on, what it is) or (None, why there is nothing to test)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), f"cuda ({torch.cuda.get_device_name()})"
    if runtime.interpreter_enabled():
        return torch.device("cpu"), "cpu, Triton interpreter"
    return None, "no GPU visible and TRITON_INTERPRET is not 1: there is no kernel to launch here"


def run(device: torch.device, dtypes: list[torch.dtype] | None = None,
        log: Callable[[str], None] | None = None, cases=CASES) -> list[Check]:
    """Every case (default: all of CASES) in every dtype on `device`; a case whose implementation cannot run there
    is left out."""
    checks = []
    for name, kernels, implementation, info in cases:
        for dtype in dtypes or _dtypes(device):
            if implementation != "triton" and _unavailable(info, implementation, device, dtype) is not None:
                continue
            if device.type == "cpu" and dtype == torch.bfloat16 and info.uses_dot:
                check = Check(name, kernels, "bfloat16", True, None, None, 0.0, skipped=_INTERPRETER_BF16_DOT)
            else:
                check = _check(name, kernels, implementation, info, dtype, device)
            checks.append(check)
            if log is not None:
                log(format_check(check))
    return checks


def format_check(c: Check) -> str:
    if c.skipped:
        return f"  skip {c.name:38s} {c.dtype:9s} {c.skipped}"
    status = "ok  " if c.passed else "FAIL"
    detail = (f"error {c.error:.3g} <= bound {c.bound:.3g}" if c.passed else
              c.failure or f"error {c.error:.3g} > bound {c.bound:.3g}")
    return f"  {status} {c.name:38s} {c.dtype:9s} {detail}  ({c.seconds:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    """`python -m vitslim_kernels.selftest [--dtypes float32 ...] [--json PATH]`: the selftest alone (what
    `python -m vitslim_kernels.info --selftest` runs after its report), e.g. under compute-sanitizer."""
    parser = argparse.ArgumentParser(prog="python -m vitslim_kernels.selftest", description=main.__doc__.split(":")[0])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
                        help="the dtypes to check (default: every one the device has)")
    parser.add_argument("--json", type=str, help="also write the checks to this file")
    args = parser.parse_args(argv)
    device, where = selftest_device()
    if device is None:
        print(f"selftest: nothing to run: {where}")
        return 2
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    print(f"selftest on {where}")
    checks = run(device, dtypes, log=lambda line: print(line, flush=True))
    failed = [c for c in checks if not c.passed]
    print(f"selftest: {sum(1 for c in checks if not c.skipped) - len(failed)} of "
          f"{sum(1 for c in checks if not c.skipped)} passed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "checks": [asdict(c) for c in checks]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
