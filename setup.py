"""Build script. Metadata lives in pyproject.toml; this file only adds the compiled extension
`vitslim_kernels._C` (csrc/), so that `pip install .` works with or without a CUDA toolkit.

The extension is built when torch with CUDA is importable in the build environment (so: pip install
--no-build-isolation) and an nvcc of the same CUDA major version is found (CUDA_HOME, CUDA_PATH, nvcc on
PATH, or /usr/local/cuda). Otherwise the pure-Python package installs alone and the reason is printed
(pip shows it with -v) and recorded in vitslim_kernels/_build_info.json, which `python -m
vitslim_kernels.info` reports.

Environment:
  VITSLIM_SKIP_CUDA_BUILD=1   do not build the extension
  TORCH_CUDA_ARCH_LIST        GPU architectures (default "8.0;9.0+PTX": A100 and H100 machine code, plus
                              PTX that newer GPUs compile at load time)
  MAX_JOBS                    parallel compile jobs (default: the CPUs this process may use)
  CUDA_HOME                   the toolkit to use
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
BUILD_INFO = ROOT / "vitslim_kernels" / "_build_info.json"
DEFAULT_ARCHS = "8.0;9.0+PTX"
SOURCES = ["csrc/module.cpp", "csrc/ragged_attention.cpp", "csrc/kernels/ragged_attention_fwd.cu"]


def _say(message: str) -> None:
    print(f"vitslim setup: {message}", file=sys.stderr, flush=True)


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root an nvcc belongs to, even when `nvcc` is a wrapper script or a symlink elsewhere."""
    try:  # nvcc's dry run prints its own install location as "#$ TOP=<root>"
        proc = subprocess.run([nvcc, "--dryrun", "-c", "vitslim_probe.cu", "-o", os.devnull], capture_output=True,
                              text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
        if match:
            top = Path(match.group(1).strip()).resolve()
            if (top / "bin" / "nvcc").exists():
                return str(top)
    except (OSError, subprocess.SubprocessError):
        pass
    top = Path(nvcc).resolve().parent.parent
    return str(top) if (top / "include" / "cuda_runtime.h").exists() else None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return _nvcc_top(nvcc)
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


SKIP_REASON = "VITSLIM_SKIP_CUDA_BUILD is set"


def plan_cuda_build() -> tuple[dict, str | None]:
    """(build info, None) when the extension should be built, else (build info, why not)."""
    info: dict = {"extension": "vitslim_kernels._C"}
    if os.environ.get("VITSLIM_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return info, SKIP_REASON
    try:
        import torch
    except ImportError:
        return info, ("torch is not importable in the build environment (pip's build isolation? install torch "
                      "first, then pip install --no-build-isolation)")
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.version.cuda is None:
        return info, f"torch {torch.__version__} is a build without CUDA"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return info, "no CUDA toolkit found (CUDA_HOME and CUDA_PATH unset, no nvcc on PATH, no /usr/local/cuda)"
    info["cuda_home"] = cuda_home
    version = nvcc_version(cuda_home)
    if version is None:
        return info, f"{cuda_home}/bin/nvcc does not run"
    info["nvcc"] = version
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return info, (f"nvcc {version} in {cuda_home} and torch's CUDA {torch.version.cuda} differ in major "
                      f"version; set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit")
    info["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    return info, None


def cuda_extension(info: dict) -> tuple[list, dict]:
    # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST when imported or building; set them
    # first (its own guess takes the parent of the parent of `which nvcc`, wrong for wrapper scripts).
    os.environ["CUDA_HOME"] = info["cuda_home"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = info["arch_list"]
    jobs = os.environ.get("MAX_JOBS") or str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    os.environ["MAX_JOBS"] = jobs  # ninja's parallel jobs (torch reads MAX_JOBS)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="vitslim_kernels._C",
        sources=SOURCES,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            # No -std: torch's build adds the C++ standard its headers need (C++17 up to 2.12, C++20 after).
            # -g0: Python's CFLAGS ask for debug info, which only slows the build.
            "cxx": ["-O3", "-g0"],
            # --threads: nvcc compiles the architectures of one file in parallel.
            "nvcc": ["-O3", "--threads", jobs, "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


def main() -> None:
    info, skip = plan_cuda_build()
    ext_modules, cmdclass = [], {}
    if skip is None:
        ext_modules, cmdclass = cuda_extension(info)
        info.update(build_requested=True, jobs=int(os.environ["MAX_JOBS"]))
        _say(f"building vitslim_kernels._C for TORCH_CUDA_ARCH_LIST={info['arch_list']} with nvcc "
             f"{info['nvcc']} from {info['cuda_home']}, {info['jobs']} jobs")
    else:
        info.update(build_requested=False, reason=skip)
        _say(f"not building the CUDA extension: {skip}. Installing the pure-Python package (Triton and "
             f"PyTorch implementations only).")
        if skip == SKIP_REASON:  # asked for no extension: drop an earlier in-place build
            for stale in (ROOT / "vitslim_kernels").glob("_C.*"):
                _say(f"removing {stale.name} left by an earlier build")
                stale.unlink()
    BUILD_INFO.write_text(json.dumps(info, indent=1) + "\n")
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
