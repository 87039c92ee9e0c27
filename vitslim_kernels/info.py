"""`python -m vitslim_kernels.info`: what was built, for which GPUs, and which implementation each op uses.

Prints the versions (torch, triton, CUDA), the visible GPUs, the compiled extension (loaded or why not, the
architectures it has code for, how it was built), and for every op the implementation dispatch picks on a
CUDA tensor (inference and training) and on a CPU tensor, with the reason each other one is skipped.
Without a GPU, the CUDA rows are computed for a stand-in that has only a device, a dtype and requires_grad.
Kernels that failed in this process and fell back to PyTorch (runtime.fail_safe) are listed too.

    python -m vitslim_kernels.info [--selftest]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from dataclasses import dataclass

import torch

from . import __version__, _ext, dispatch, runtime
from . import selftest as st


@dataclass(frozen=True)
class _StandIn:
    """What the dispatch predicates read of a tensor, for a device this machine does not have."""
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool = False


def _versions() -> list[str]:
    try:
        import triton  # optional: its version, where it is installed
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [f"vitslim_kernels {__version__}, python {platform.python_version()}",
            f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU-only build'}), "
            f"triton {triton_version}"]


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return ["GPU: none visible (torch.cuda.is_available() is False)"]
    lines = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return lines


def _extension() -> list[str]:
    info = _ext.build_info()
    reason = _ext.unavailable()
    if reason is not None:
        lines = [f"extension vitslim_kernels._C: not available: {reason}"]
    else:
        module = _ext.load()
        archs = ", ".join(f"sm_{a}" for a in _ext.compiled_archs()) or "unknown"
        ptx = ", ".join(f"compute_{a}" for a in _ext._ptx_archs())
        cudart = module.cuda_runtime_version()
        lines = [f"extension vitslim_kernels._C: loaded from {module.__file__}",
                 f"  kernels for {archs}{f' (+ PTX for {ptx})' if ptx else ''}, "
                 f"CUDA runtime {cudart // 1000}.{cudart % 1000 // 10}"]
    if info and info.get("build_requested"):
        lines.append(f"  build: TORCH_CUDA_ARCH_LIST={info.get('arch_list')}, nvcc {info.get('nvcc')} from "
                     f"{info.get('cuda_home')}, against torch {info.get('torch')}")
    return lines


def _examples() -> list[tuple[str, object, bool]]:
    """(label, example tensor or stand-in, grad mode) for each situation shown."""
    if torch.cuda.is_available():
        cuda_infer = torch.empty(1, 1, 1, device="cuda", dtype=torch.bfloat16)
        cuda_train = torch.empty(1, 1, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        where = ""
    else:
        cuda_infer = _StandIn(torch.device("cuda"), torch.bfloat16)
        cuda_train = _StandIn(torch.device("cuda"), torch.bfloat16, requires_grad=True)
        where = " [stand-in: no GPU here]"
    return [(f"CUDA tensor, bfloat16, inference (no grad){where}", cuda_infer, False),
            (f"CUDA tensor, bfloat16, training (requires grad){where}", cuda_train, True),
            ("CPU tensor, float32", torch.empty(1, 1, 1), torch.is_grad_enabled())]


def _decisions(op: str, example: object, grad: bool) -> tuple[str | None, list[str]]:
    """(implementation used or None, one line per implementation) for `op` on `example`."""
    with torch.set_grad_enabled(grad):
        try:
            decisions = dispatch.explain(op, example)  # type: ignore[arg-type]
        except Exception as error:  # a predicate that needs more than a stand-in offers
            return None, [f"could not be evaluated here: {type(error).__name__}: {error}"]
    used = next((name for name, why in decisions if why is None), None)
    forced = os.environ.get(f"VITSLIM_FORCE_{op.upper()}")
    lines = []
    for name, why in decisions:
        if name == used:
            lines.append(f"{name}: USED")
        elif why is None:
            lines.append(f"{name}: could run, lower in the order")
        else:
            lines.append(f"{name}: skipped: {why}")
    if forced:
        lines.append(f"(VITSLIM_FORCE_{op.upper()}={forced} overrides the order)")
    return used, lines


def report() -> str:
    lines = _versions() + _gpus() + _extension()
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}")
    lines.append("")
    lines.append("Implementation dispatch picks per op (first usable in the order shown):")
    for op in dispatch.ops():
        lines.append(f"{op}")
        for label, example, grad in _examples():
            used, details = _decisions(op, example, grad)
            lines.append(f"  {label}: {used or 'none'}")
            lines.extend(f"      {d}" for d in details)
    failures = runtime.kernel_failures()
    if failures:
        lines.append("")
        lines.append("Kernels that failed here and now compute in PyTorch:")
        lines.extend(f"  {kernel} on {device}: {error}" for (kernel, device), error in sorted(failures.items()))
    return "\n".join(lines)


def selftest() -> int:
    """Launch every kernel once here against the reference (vitslim_kernels.selftest); 0 when all pass."""
    return st.main([])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitslim_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true",
                        help="also launch every kernel once on the visible GPU (on CPU: under TRITON_INTERPRET=1) "
                             "and compare it with the reference; exit 1 if one fails")
    args = parser.parse_args(argv)
    print(report())
    if args.selftest:
        print()
        return selftest()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
