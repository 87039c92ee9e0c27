"""The compiled extension vitslim_kernels._C: built and importable wherever it should be (CI included), clear
reasons where it is not, and `python -m vitslim_kernels.info`. None of these needs a GPU."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitslim_kernels import _ext


def expected_build_missing() -> str | None:
    """None when setup.py must have built the extension here (as it does in CI: nvcc on the machine, torch
    with CUDA, no opt-out now or at install time), else why not. The same rules as setup.py's."""
    if os.environ.get("VITSLIM_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "VITSLIM_SKIP_CUDA_BUILD is set"
    info = _ext.build_info() or {}
    if info.get("reason") == "VITSLIM_SKIP_CUDA_BUILD is set":  # opted out when it was installed
        return "it was installed with VITSLIM_SKIP_CUDA_BUILD set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    nvcc = _nvcc()
    if nvcc is None:
        return "no nvcc on this machine"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release (\d+)\.", version)
    if match is None:
        return f"{nvcc} does not run"
    if match.group(1) != torch.version.cuda.split(".")[0]:
        return (f"nvcc {match.group(1)}.x ({nvcc}) and torch's CUDA {torch.version.cuda} differ in major version "
                f"(setup.py builds only when they agree)")
    return None


def _nvcc() -> str | None:
    """The nvcc setup.py would use: $CUDA_HOME's, $CUDA_PATH's, the one on PATH, /usr/local/cuda's."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var], "bin", "nvcc")
            return str(candidate) if candidate.exists() else None
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None


@pytest.fixture
def fresh_ext():
    """Forget what _ext cached, before and after the test."""
    _ext._try_load.cache_clear()
    _ext._device_reason.cache_clear()
    yield _ext
    _ext._try_load.cache_clear()
    _ext._device_reason.cache_clear()


def test_extension_built_and_importable():
    why_not = expected_build_missing()
    if why_not is not None:
        pytest.skip(f"the extension is not expected here: {why_not}")
    info = _ext.build_info()
    assert info is not None and info.get("build_requested"), \
        f"setup.py did not build the extension although nvcc is here: {info}"
    reason = _ext.unavailable()
    assert reason is None, reason
    module = _ext.load()
    assert callable(module.ragged_attention_fwd)
    archs = _ext.compiled_archs()
    assert archs, "the extension reports no architecture"
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and info.get("arch_list") == "8.0;9.0+PTX":
        assert archs == [80, 90]
        assert _ext._ptx_archs() == [90]
    assert module.cuda_runtime_version() // 1000 == int(torch.version.cuda.split(".")[0])


def test_reason_when_not_built(fresh_ext, monkeypatch):
    monkeypatch.setitem(sys.modules, "vitslim_kernels._C", None)  # makes the import fail like a missing file
    monkeypatch.setattr(fresh_ext, "build_info", lambda: {"build_requested": False,
                                                           "reason": "VITSLIM_SKIP_CUDA_BUILD is set"})
    assert fresh_ext.unavailable() == "vitslim_kernels._C is not built: VITSLIM_SKIP_CUDA_BUILD is set"
    with pytest.raises(fresh_ext.ExtensionUnavailable, match="not built: VITSLIM_SKIP_CUDA_BUILD"):
        fresh_ext.load()
    fresh_ext._try_load.cache_clear()
    monkeypatch.setattr(fresh_ext, "build_info", lambda: {"build_requested": True, "torch": torch.__version__})
    assert "meant to build it (did the compile fail?" in fresh_ext.unavailable()
    fresh_ext._try_load.cache_clear()
    monkeypatch.setattr(fresh_ext, "build_info", lambda: None)
    assert "not built (no build record either)" in fresh_ext.unavailable()


def test_reason_when_import_fails(fresh_ext, monkeypatch):
    def broken_import(name):
        raise ImportError("undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
    monkeypatch.setattr(fresh_ext.importlib, "import_module", broken_import)
    monkeypatch.setattr(fresh_ext, "build_info", lambda: {"build_requested": True, "torch": "2.0.0"})
    reason = fresh_ext.unavailable()
    assert reason.startswith("vitslim_kernels._C failed to import: ImportError: undefined symbol")
    assert f"built against torch 2.0.0, this is torch {torch.__version__}: rebuild" in reason


def test_device_reasons(fresh_ext, monkeypatch):
    if fresh_ext.unavailable() is not None:
        pytest.skip(f"needs the extension: {fresh_ext.unavailable()}")
    if not torch.cuda.is_available():
        assert fresh_ext.device_unavailable(torch.device("cuda")) == \
            "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    monkeypatch.setattr(fresh_ext, "compiled_archs", lambda: [80, 90])
    monkeypatch.setattr(fresh_ext, "_ptx_archs", lambda: [90])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert fresh_ext._device_reason(0) == ('GPU 0 is sm_75 but vitslim_kernels._C has code for sm_80, sm_90 only; '
                                           'rebuild with TORCH_CUDA_ARCH_LIST="7.5"')


@pytest.mark.parametrize("capability, archs, ptx, runs", [
    ((8, 0), [80, 90], [90], True),
    ((8, 6), [80, 90], [90], True),     # sm_80 machine code runs on any 8.x at least as new
    ((9, 0), [80, 90], [90], True),
    ((10, 0), [80, 90], [90], True),    # through the compute_90 PTX
    ((10, 0), [80, 90], [], False),
    ((7, 5), [80, 90], [90], False),
    ((8, 0), [86], [], False),          # machine code does not run on an older minor
])
def test_runs_on(capability, archs, ptx, runs):
    assert _ext._runs_on(capability, archs, ptx) is runs


def test_info_runs_and_names_every_ragged_attention_implementation():
    proc = subprocess.run([sys.executable, "-m", "vitslim_kernels.info"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"torch {torch.__version__}" in out and "triton" in out
    assert "extension vitslim_kernels._C:" in out
    assert "GPU" in out
    section = out[out.index("\nragged_attention\n"):]
    for line in ("cuda: skipped: CPU tensor: the CUDA kernel runs on CUDA tensors",
                 "cuda: skipped: the CUDA kernel is forward-only; training uses triton",
                 "reference: USED"):
        assert line in section, out
    if expected_build_missing() is None:
        assert "extension vitslim_kernels._C: loaded from" in out
        assert "kernels for sm_" in out
