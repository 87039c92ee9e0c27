"""What every benchmark shares: device-timed medians, peak memory, and results files with their provenance.

Results are written only by scripts, as {"device", "torch", "triton", "cuda", "commit", "rows": [...]}
(plus "limits": the measured device limits the percentages refer to).
"""
from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# Measured limits of the H100 SXM machines we use (DESIGN.md section 6); percentages in results refer to them.
H100_LIMITS = {"bf16_dense_tflops": 800.0, "hbm_tb_per_s": 3.0}


def provenance() -> dict:
    """Where a result comes from: device, python, torch, triton and CUDA versions, git commit ("+dirty" when
    tracked files differ from it) and date."""
    import sys
    import time
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "python": sys.version.split()[0], "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def environment() -> dict:
    """provenance() and the measured device limits the percentages of timed results refer to."""
    return {**provenance(), "limits": H100_LIMITS}


def device_time_ms(fn: Callable[[], object], warmup: int = 10, iters: int = 50) -> float:
    """Median device time of fn() in milliseconds (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 10, iters: int = 50) -> float:
    """Median device time (CUDA events) on a GPU; median wall time on the CPU (the scripts' --dry-run)."""
    if device.type == "cuda":
        return device_time_ms(fn, warmup=warmup, iters=iters)
    import time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device`, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during one call of fn(), above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def achieved(flops: float | None, bytes_moved: float | None, ms: float) -> dict:
    """TFLOP/s and GB/s achieved in `ms`, and their share of the device limits."""
    out = {}
    if flops is not None:
        tflops = flops / (ms * 1e-3) / 1e12
        out.update(tflops=tflops, pct_of_bf16_peak=100.0 * tflops / H100_LIMITS["bf16_dense_tflops"])
    if bytes_moved is not None:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        out.update(gb_per_s=gbps, pct_of_hbm=100.0 * gbps / (H100_LIMITS["hbm_tb_per_s"] * 1e3))
    return out


def write_results(name: str, rows: list[dict]) -> Path:
    """benchmarks/results/<name>.json with the environment and the rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**environment(), "rows": rows}, indent=1) + "\n")
    return path


def benchmark_pedantic(benchmark, fn: Callable[[], object], rounds: int = 20, warmup_rounds: int = 5) -> float:
    """Run fn under pytest-benchmark with a device sync inside the timed function; record the device-timed
    median in extra_info and return it (ms)."""
    def synced():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    ms = device_time_ms(fn, warmup=3, iters=rounds)
    benchmark.extra_info["device_median_ms"] = ms
    return ms
