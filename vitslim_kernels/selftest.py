"""`python -m vitslim_kernels.info --selftest`: every kernel launched once on this machine, against the reference.

Small odd shapes (N = 50, heads 0, 17, 41 and 64 wide, a token-dropping gather), forward and backward, in
float32, float16 and bfloat16 (where the device has them), through each op with the implementation forced. The
accuracy rule is the test suite's (CONVENTIONS.md): the kernel's error against the float64 reference is at most
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

from . import dispatch, runtime
from .ops.gated_linear import gated_gelu_linear, gated_linear
from .ops.layernorm_token_scale import layernorm_token_scale
from .ops.qkv_attention import qkv_attention
from .ops.ragged_attention import ragged_attention

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

# Each case: (name, kernels, implementation, fn(implementation, dtype, device) -> tensors to compare).
# fn builds its inputs from a fixed seed in float64 on the CPU and casts them, so every dtype sees the same values.
def _inputs(*shapes: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0,
            scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
            .requires_grad_() for shape in shapes]


def _with_grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
    return [out.detach()] + [gr for gr in grads if gr is not None]


_WIDTHS = (17, 0, 64, 41)
_N = 50


def _ragged(implementation: str, dtype: torch.dtype, device: torch.device, grad: bool = True) -> list[torch.Tensor]:
    D = sum(_WIDTHS)
    q, k, v = _inputs((2, _N, D), (2, _N, D), (2, _N, D), dtype=dtype, device=device)
    if not grad:
        with torch.no_grad():
            return [ragged_attention(q, k, v, _WIDTHS, 64 ** -0.5, implementation=implementation)]
    return _with_grads(ragged_attention(q, k, v, _WIDTHS, 64 ** -0.5, implementation=implementation), [q, k, v])


def _qkv_attention(implementation: str, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The search path: the gated qkv projection and the attention as one op (every head the same width, a
    compile-time width; the qkv bias gradient summed by the attention kernel)."""
    widths, C = (32, 32, 32), 48
    D = sum(widths)
    x, weight, bias, gate = _inputs((2, _N, C), (3 * D, C), (3 * D,), (D,), dtype=dtype, device=device, scale=0.5)
    out = qkv_attention(x, weight, bias, gate, widths, 32 ** -0.5, implementation=implementation)
    return _with_grads(out, [x, weight, bias, gate])


def _layernorm(implementation: str, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    C, kept = 48, tuple([0] + list(range(1, _N, 2)))  # the prefix row and every other patch
    x, token_raw = _inputs((2, _N, C), (len(kept) - 1,), dtype=dtype, device=device)
    weight, bias = _inputs((C,), (C,), dtype=dtype, device=device, seed=2)
    out = layernorm_token_scale(x, weight, bias, 1e-6, token_raw, 1, kept, implementation=implementation)
    return _with_grads(out, [x, weight, bias, token_raw])


def _gated_linear(implementation: str, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    C, H, d = 48, 3, 16
    x, weight, bias, gate = _inputs((2, _N, C), (3 * H * d, C), (3 * H * d,), (H * d,), dtype=dtype,
                                    device=device, scale=0.5)
    return _with_grads(gated_linear(x, weight, bias, gate, implementation=implementation), [x, weight, bias, gate])


def _gated_gelu_linear(implementation: str, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    C, M = 48, 96
    x, weight, bias, gate = _inputs((2, _N, C), (M, C), (M,), (M,), dtype=dtype, device=device, scale=0.5)
    out = gated_gelu_linear(x, weight, bias, gate, implementation=implementation)
    return _with_grads(out, [x, weight, bias, gate])


CASES: tuple[tuple[str, str, str, Callable], ...] = (
    ("layernorm_token_scale (triton)", "layernorm_token_scale_fwd/bwd", "triton", _layernorm),
    ("gated_linear (triton)", "gated_linear_fwd/bwd (the fold)", "triton", _gated_linear),
    ("gated_gelu_linear (triton)", "gated_gelu_linear_fwd/bwd", "triton", _gated_gelu_linear),
    ("ragged_attention (triton)", "ragged_attention_fwd, _bwd_preprocess, _bwd", "triton", _ragged),
    ("qkv_attention (triton)", "gated_linear_fwd/bwd, ragged_attention_fwd/bwd (uniform width, bias sums)",
     "triton", _qkv_attention),
    ("ragged_attention (cuda)", "csrc ragged_attention_fwd", "cuda",
     lambda impl, dtype, device: _ragged(impl, dtype, device, grad=False)),
)


def _dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _unavailable(implementation: str, device: torch.device, dtype: torch.dtype) -> str | None:
    example = torch.empty(1, 1, 1, device=device, dtype=dtype)
    with torch.no_grad():
        return dict(dispatch.explain("ragged_attention", example)).get(implementation, "unknown implementation")


def _check(name: str, kernels: str, implementation: str, fn: Callable, dtype: torch.dtype,
           device: torch.device) -> Check:
    start = time.perf_counter()
    label = str(dtype).removeprefix("torch.")
    try:
        with _strict():
            got = fn(implementation, dtype, device)
    except Exception as error:  # noqa: BLE001 (reported, not raised: every kernel gets its line)
        return Check(name, kernels, label, False, None, None, time.perf_counter() - start,
                     f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
    same = fn("reference", dtype, device)
    exact = fn("reference", torch.float64, device)
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
    for name, kernels, implementation, fn in cases:
        for dtype in dtypes or _dtypes(device):
            if implementation == "cuda" and _unavailable("cuda", device, dtype) is not None:
                continue
            attention = name.startswith(("ragged_attention", "qkv_attention"))
            if device.type == "cpu" and dtype == torch.bfloat16 and attention:
                check = Check(name, kernels, "bfloat16", True, None, None, 0.0, skipped=_INTERPRETER_BF16_DOT)
            else:
                check = _check(name, kernels, implementation, fn, dtype, device)
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
