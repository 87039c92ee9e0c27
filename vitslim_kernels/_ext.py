"""Guarded load of the compiled extension `vitslim_kernels._C` (csrc/, built by setup.py).

Nothing here runs at import. `load()` imports the extension once and either returns it or raises with the
reason it is missing: not built (and why, from the build record setup.py wrote), an import error (with its
text), or built against another torch. `device_unavailable(device)` adds the per-GPU reasons: no GPU visible,
or no code in the build for that GPU's architecture.
"""
from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

BUILD_INFO = Path(__file__).with_name("_build_info.json")
REBUILD = "pip install --no-build-isolation -e . with a CUDA toolkit (see python -m vitslim_kernels.info)"


class ExtensionUnavailable(RuntimeError):
    """The compiled extension cannot be used here; the message says why."""


def build_info() -> dict | None:
    """What setup.py recorded at build time (toolkit, torch, arch list, or why it did not build); None if absent."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None


def _missing_reason(error: ImportError) -> str:
    info = build_info()
    if isinstance(error, ModuleNotFoundError) and error.name == f"{__package__}._C":
        if info is None:
            return f"vitslim_kernels._C is not built (no build record either); {REBUILD}"
        if not info.get("build_requested"):
            return f"vitslim_kernels._C is not built: {info.get('reason', 'no reason recorded')}"
        return (f"vitslim_kernels._C is missing although setup.py meant to build it (did the compile fail? "
                f"rerun pip install -v); {REBUILD}")
    built_with = info.get("torch") if info else None
    hint = (f"; it was built against torch {built_with}, this is torch {torch.__version__}: rebuild"
            if built_with and built_with != torch.__version__ else f"; {REBUILD}")
    return f"vitslim_kernels._C failed to import: {type(error).__name__}: {error}{hint}"


@functools.lru_cache(maxsize=1)
def _try_load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"{__package__}._C"), None
    except ImportError as error:
        return None, _missing_reason(error)


def unavailable() -> str | None:
    """None if the extension imports, else why it does not (imports it on first call, never touches a GPU)."""
    return _try_load()[1]


def load() -> ModuleType:
    """The extension module; raises ExtensionUnavailable with the reason when it cannot be loaded."""
    module, reason = _try_load()
    if module is None:
        raise ExtensionUnavailable(reason)
    return module


def compiled_archs() -> list[int]:
    """Architectures with code in the loaded extension, e.g. [80, 90] (from nvcc's __CUDA_ARCH_LIST__,
    which counts like __CUDA_ARCH__: "800,900")."""
    return [int(a) // 10 for a in load().compiled_archs().split(",") if a.strip()]


def _runs_on(capability: tuple[int, int], archs: list[int], ptx_archs: list[int]) -> bool:
    """Whether a GPU of compute capability `capability` can run a build with machine code for `archs` and PTX
    for `ptx_archs`: machine code runs on the same major and a higher or equal minor; PTX is compiled by the
    driver for any GPU at least as new."""
    cc = 10 * capability[0] + capability[1]
    return any(a // 10 == capability[0] and a <= cc for a in archs) or any(a <= cc for a in ptx_archs)


def _ptx_archs() -> list[int]:
    """Architectures whose PTX the build embeds ("9.0+PTX" in TORCH_CUDA_ARCH_LIST gives 90)."""
    archs = []
    for entry in (build_info() or {}).get("arch_list", "").replace(" ", ";").split(";"):
        if entry.endswith("+PTX"):
            try:
                archs.append(round(float(entry[:-4]) * 10))
            except ValueError:  # a named architecture ("Hopper+PTX"): not worth decoding here
                pass
    return archs


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> str | None:
    capability = torch.cuda.get_device_capability(index)
    archs = compiled_archs()
    if archs and not _runs_on(capability, archs, _ptx_archs()):
        return (f"GPU {index} is sm_{capability[0]}{capability[1]} but vitslim_kernels._C has code for "
                f"{', '.join(f'sm_{a}' for a in archs)} only; rebuild with TORCH_CUDA_ARCH_LIST="
                f"\"{capability[0]}.{capability[1]}\"")
    return None


# A constant of the process for torch.compile: called once while tracing, not traced into (importlib and
# lru_cache would break the graph at every attention call).
@torch.compiler.assume_constant_result
def device_unavailable(device: torch.device) -> str | None:
    """None if the extension's kernels can run on `device` (a CUDA device), else why not. Cached per GPU."""
    reason = unavailable()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return _device_reason(device.index if device.index is not None else torch.cuda.current_device())
