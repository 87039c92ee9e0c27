"""Compile the Triton kernels for a GPU that is not there, and read what the compiled code does.

    with compile_only("sm_90") as launches:
        model(x).sum().backward()          # CPU tensors; every Triton launch compiles for sm_90 and returns
    for launch in launches:
        print(launch.name, resources(launch).registers)

Inside the context Triton's active driver is a stand-in that reports the target (GPUTarget("cuda", 90, 32)),
and dispatch sends CPU tensors down the Triton path. Each launch then goes through Triton's real binder, which
specialises every argument exactly as on the GPU (16-byte pointer alignment, integers divisible by 16 or equal
to 1, constexprs), compiles with the bundled ptxas, and stops where the kernel would start: the stand-in's
launcher records the launch instead. Nothing runs, so every output stays uninitialised; the point is the
compiled code. The project's own launchers choose the configs, so what compiles here is what a GPU would run.

`resources(launch)` reads the compiled kernel: registers, spills and stack (ptxas -v on its PTX), shared
memory, warps, stages, and from the PTX the global load widths, cp.async / TMA copies and tensor-core MMA.

Compiled kernels are dropped from our JIT functions' in-process caches on entry and exit, so a kernel
compiled for the stand-in never launches on a real GPU in the same process.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import runtime


@dataclass(frozen=True)
class Target:
    """A GPU the kernels are compiled for. sm_count and max_shared_mem are what the launchers may read."""
    name: str             # "sm_90"
    arch: int             # 90: compute capability major * 10 + minor
    sm_count: int         # streaming multiprocessors of the reference device
    max_shared_mem: int   # bytes of shared memory per block (opt-in maximum)
    device: str           # the reference device these numbers are taken from


TARGETS: dict[str, Target] = {
    "sm_90": Target("sm_90", 90, 132, 232448, "H100 / H200 SXM"),
    "sm_80": Target("sm_80", 80, 108, 166912, "A100"),
}


@dataclass
class Launch:
    """One compile-only launch: the kernel, its grid and the compiled kernel Triton would have run."""
    name: str
    grid: tuple[int, int, int]
    target: Target
    compiled: Any = field(repr=False)   # triton.compiler.CompiledKernel
    constants: dict = field(default_factory=dict)         # constexpr parameter name -> value
    args: dict = field(default_factory=dict, repr=False)  # argument name -> ArgInfo (tensors) or the value

    @property
    def key(self) -> tuple:
        """Identifies the compiled binary: one entry per distinct specialisation."""
        return (self.name, self.target.name, self.compiled.hash)


@dataclass(frozen=True)
class Resources:
    """What the compiled code of one kernel uses and does (per CTA where it says so)."""
    registers: int                 # per thread
    spill_stores: int              # bytes per thread
    spill_loads: int               # bytes per thread
    stack: int                     # bytes of stack frame per thread
    shared: int                    # bytes of shared memory per CTA (dynamic, as launched)
    num_warps: int
    num_stages: int
    global_loads: dict             # bytes per access -> number of ld.global instructions in the PTX
    async_copies: dict             # bytes per copy -> number of cp.async instructions
    tma_copies: int                # cp.async.bulk(.tensor) instructions
    mma: dict                      # "wgmma" / "mma.sync" -> number of instructions
    global_stores: dict            # bytes per access -> number of st.global instructions

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def to_dict(self) -> dict:
        return {"registers": self.registers, "spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
                "stack": self.stack, "shared": self.shared, "num_warps": self.num_warps,
                "num_stages": self.num_stages,
                "global_loads": {str(k): v for k, v in sorted(self.global_loads.items())},
                "async_copies": {str(k): v for k, v in sorted(self.async_copies.items())},
                "tma_copies": self.tma_copies, "mma": dict(self.mma),
                "global_stores": {str(k): v for k, v in sorted(self.global_stores.items())}}


@dataclass(frozen=True)
class ArgInfo:
    """A tensor argument of a launch, as a cost model needs it."""
    shape: tuple[int, ...]
    dtype: str
    nbytes: int          # bytes of the tensor's elements (its view, not its storage)


def _describe(value):
    if hasattr(value, "data_ptr") and hasattr(value, "shape"):
        return ArgInfo(tuple(value.shape), str(value.dtype).replace("torch.", ""),
                       value.numel() * value.element_size())
    return _plain(value)


class _StandInUtils:
    def __init__(self, target: Target) -> None:
        self.target = target

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": self.target.max_shared_mem, "multiprocessor_count": self.target.sm_count,
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): nothing is loaded; resources() reads the code.
        return None, None, 0, 0, 1024

    def unload_module(self, module) -> None:
        pass


class _StandInDriver:
    """Triton's active driver while compile_only is active: reports the target, launches nothing."""

    def __init__(self, target: Target, launches: list[Launch]) -> None:
        from triton.backends.compiler import GPUTarget  # optional: triton (compile_only needs it)
        self._target = GPUTarget("cuda", target.arch, 32)
        self.utils = _StandInUtils(target)
        self.launcher_cls = _recording_launcher(target, launches)

    def get_current_target(self):
        return self._target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self._target.arch, 10)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp  # optional: triton (compile_only needs it)
        return ty_to_cpp(ty)


def _recording_launcher(target: Target, launches: list[Launch]):
    class RecordingLauncher:
        def __init__(self, src, metadata) -> None:
            self.src, self.metadata = src, metadata

        def __call__(self, grid_x, grid_y, grid_z, *args, **kwargs) -> None:
            # args: stream, function, packed metadata, launch metadata, enter hook, exit hook, then the kernel's
            # bound arguments in signature order (the same on triton 3.6 and 3.8).
            fn = self.src.fn
            values = dict(zip((p.name for p in fn.params), args[6:]))
            launches.append(Launch(fn.__name__, (int(grid_x), int(grid_y), int(grid_z)), target,
                                   _compiled_kernel(fn, self.metadata),
                                   {p.name: _plain(values[p.name]) for p in fn.params if p.is_constexpr},
                                   {name: _describe(v) for name, v in values.items()}))
    return RecordingLauncher


def _plain(value):
    value = getattr(value, "value", value)  # tl.constexpr
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _compiled_kernel(fn, metadata):
    for cache in fn.device_caches.values():
        for kernel in cache[0].values():
            if kernel.metadata is metadata:
                return kernel
    raise RuntimeError(f"compile_only: the compiled kernel of {fn.__name__} is not in its JIT cache")


def _our_kernels() -> list:
    """Every @triton.jit function of vitslim_kernels.triton (imports those modules)."""
    from triton.runtime.jit import JITFunction  # optional: triton (compile_only needs it, and says so)

    from . import triton as package  # optional: the kernels import triton
    kernels = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        kernels += [v for v in vars(module).values() if isinstance(v, JITFunction)]
    return kernels


def _drop_compiled(kernels: list) -> None:
    for kernel in kernels:
        kernel.device_caches.clear()


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown compile target {name!r}; accepted: {', '.join(TARGETS)}")
    return TARGETS[name]


@contextlib.contextmanager
def compile_only(target: str | Target = "sm_90", all_candidates: bool = False) -> Iterator[list[Launch]]:
    """Within the block, Triton launches compile for `target` and record a Launch instead of running.

    Args:
        target: a Target or a name in TARGETS ("sm_90", "sm_80").
        all_candidates: also compile (and record) every other config of the autotuned kernels' lists, as
            VITSLIM_AUTOTUNE=1 would try them on a GPU; the default config is launched last.
    Yields:
        the list the launches are appended to, in launch order.
    Raises:
        RuntimeError under TRITON_INTERPRET=1 (the interpreter compiles nothing) or without Triton.
    """
    if isinstance(target, str):
        target = target_named(target)
    if runtime.interpreter_enabled():
        raise RuntimeError("compile_only: TRITON_INTERPRET=1 interprets the kernels and compiles nothing; "
                           "unset it before anything imports triton")
    try:
        from triton.runtime.driver import driver  # optional: triton; refused below with a clear error
    except ImportError as e:
        raise RuntimeError("compile_only needs triton (pip install triton)") from e
    kernels = _our_kernels()
    launches: list[Launch] = []
    previous = driver._active  # None until Triton first needed a driver
    _drop_compiled(kernels)
    driver.set_active(_StandInDriver(target, launches))
    try:
        with runtime.compile_only_context(target, all_candidates):
            yield launches
    finally:
        driver._active = previous
        _drop_compiled(kernels)


# ---------------------------------------------------------------------------------------------------------
# Reading the compiled code
# ---------------------------------------------------------------------------------------------------------

_LOAD = re.compile(r"\bld\.global((?:\.[a-z0-9]+)*)")
_STORE = re.compile(r"\bst\.global((?:\.[a-z0-9]+)*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_TMA = re.compile(r"\bcp\.async\.bulk\b")
_BITS = re.compile(r"^(?:b|u|s|f)(\d+)$")


def _access_bytes(suffix: str) -> int | None:
    vector, bits = 1, None
    for part in suffix.strip(".").split("."):
        if part in ("v2", "v4", "v8"):
            vector = int(part[1:])
        elif (m := _BITS.match(part)):
            bits = int(m.group(1))
    return None if bits is None else vector * bits // 8


def _widths(pattern: re.Pattern, ptx: str) -> dict[int, int]:
    counts: Counter = Counter()
    for suffix in pattern.findall(ptx):
        size = _access_bytes(suffix)
        if size is not None:
            counts[size] += 1
    return dict(counts)


def ptx_summary(ptx: str) -> dict:
    """Load and store widths, async copies and MMA instructions counted in `ptx`."""
    return {
        "global_loads": _widths(_LOAD, ptx),
        "global_stores": _widths(_STORE, ptx),
        "async_copies": dict(Counter(int(n, 0) for n in _CP_ASYNC.findall(ptx))),
        "tma_copies": len(_TMA.findall(ptx)),
        "mma": {k: v for k, v in (("wgmma", len(re.findall(r"\bwgmma\.mma_async\b", ptx))),
                                  ("mma.sync", len(re.findall(r"\bmma\.sync\b", ptx)))) if v},
    }


_PTXAS_CACHE: dict[str, tuple[int, int, int, int]] = {}


def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas  # get_ptxas(arch) on triton 3.6 and 3.8
    return get_ptxas(arch).path


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack bytes) from Triton's own ptxas -v on `ptx`."""
    if ptx in _PTXAS_CACHE:
        return _PTXAS_CACHE[ptx]
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas_path(arch), "-v", f"--gpu-name={gpu}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed on a compiled kernel for {gpu}:\n{out.stderr[-2000:]}")
    log = out.stderr + out.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    usage = (number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"),
             number(r"(\d+) bytes spill loads"), number(r"(\d+) bytes stack frame"))
    _PTXAS_CACHE[ptx] = usage
    return usage


def resources(launch: Launch) -> Resources:
    """Registers, spills, shared memory, warps, stages and the PTX's memory and MMA instructions."""
    compiled = launch.compiled
    ptx = compiled.asm["ptx"]
    registers, spill_stores, spill_loads, stack = ptxas_usage(ptx, launch.target.arch)
    meta = compiled.metadata
    return Resources(registers=registers, spill_stores=spill_stores, spill_loads=spill_loads, stack=stack,
                     shared=int(meta.shared), num_warps=int(meta.num_warps), num_stages=int(meta.num_stages),
                     **ptx_summary(ptx))


def distinct(launches: list[Launch]) -> list[Launch]:
    """The launches with distinct compiled binaries, in first-launch order."""
    seen, out = set(), []
    for launch in launches:
        if launch.key not in seen:
            seen.add(launch.key)
            out.append(launch)
    return out
