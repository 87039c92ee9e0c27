"""What every benchmark shares: device-timed medians, peak memory, and results files with their provenance.

Results are written only by scripts, as {"device", "driver", "torch", "triton", "cuda", "commit", "rows": [...]}
(plus "limits": the device limits the percentages refer to, measured on this device, beside the spec sheet's),
atomically, so a run killed at its time limit leaves the last complete file.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# The spec sheet's dense bf16 tensor-core TFLOP/s and memory TB/s, quoted beside the limits measured on the device
# (percentages always refer to the measured ones). Matched against torch.cuda.get_device_name(), first hit wins.
SPEC_SHEETS = (("H200", {"bf16_dense_tflops": 989.4, "memory_tb_per_s": 4.8}),
               ("H100 PCIe", {"bf16_dense_tflops": 756.0, "memory_tb_per_s": 2.0}),
               ("H100", {"bf16_dense_tflops": 989.4, "memory_tb_per_s": 3.35}),
               ("A100-SXM4-80GB", {"bf16_dense_tflops": 312.0, "memory_tb_per_s": 2.039}),
               ("A100", {"bf16_dense_tflops": 312.0, "memory_tb_per_s": 1.555}))
# Earlier readings on the machines lent here (docs/design.md section 6), quoted beside this run's measurement.
EARLIER_READINGS = {"H100": {"bf16_matmul_tflops": 798.0, "copy_tb_per_s": 3.0},
                    "H200": {"bf16_matmul_tflops": 790.0, "copy_tb_per_s": 4.3}}
LIMITS_ENV = "VITSLIM_DEVICE_LIMITS"  # a limits.json measured earlier in this run (benchmarks.gpu_check sets it)
COMMIT_ENV = "VITSLIM_COMMIT"         # the commit, when the caller knows it and .git did not travel


@functools.cache
def provenance() -> dict:
    """Where a result comes from: device, python, torch, triton and CUDA versions, git commit ("+dirty" when
    tracked files differ from it; $VITSLIM_COMMIT when set, for a copy without .git) and date. Computed once per
    process."""
    import sys
    import time
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "driver": driver(),
            "python": sys.version.split()[0], "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def git_commit() -> str | None:
    """$VITSLIM_COMMIT if set, else HEAD of the checkout ("+dirty" when tracked files differ), else None."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    root = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=root, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi), else the CUDA driver API version torch sees, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    version = torch._C._cuda_getDriverVersion()
    return f"CUDA driver API {version // 1000}.{version % 1000 // 10}"


def spec_sheet(device_name: str) -> dict | None:
    return next((dict(spec, model=key) for key, spec in SPEC_SHEETS if key in device_name), None)


def measure_device_limits(device: torch.device) -> dict:
    """The limits every percentage refers to, measured now: a large bf16 matmul (8192^3 on a GPU) and a
    device-to-device copy (1 GiB; bytes read + written). On the CPU (dry runs) the same with tiny sizes: the
    plumbing, not a limit."""
    cuda = device.type == "cuda"
    n, copy_bytes, iters = (8192, 1 << 30, 20) if cuda else (256, 1 << 24, 3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_ms = time_ms(lambda: a @ b, device, warmup=5 if cuda else 1, iters=iters)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup=5 if cuda else 1, iters=iters)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    measured = {"bf16_matmul_tflops": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e12,
                "copy_tb_per_s": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12,
                "how": f"median of {iters}: {n}^3 bf16 matmul, {copy_bytes >> 20} MiB device-to-device copy "
                       f"(read + write)"}
    earlier = next((v for k, v in EARLIER_READINGS.items() if k in name), None)
    return {"device": name, "measured": measured, "spec_sheet": spec_sheet(name), "earlier_reading": earlier}


@functools.cache
def device_limits() -> dict | None:
    """This run's measured limits: the file $VITSLIM_DEVICE_LIMITS when set (gpu_check measures them once, at
    its start), else measured now on a GPU, else None (no percentages on the CPU)."""
    path = os.environ.get(LIMITS_ENV)
    if path:
        data = read_results(Path(path))
        if data and data.get("limits"):
            return data["limits"]
    if torch.cuda.is_available():
        return measure_device_limits(torch.device("cuda"))
    return None


def environment() -> dict:
    """provenance() and the measured device limits the percentages of timed results refer to."""
    return {**provenance(), "limits": device_limits()}


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
    """TFLOP/s and GB/s achieved in `ms`, and their share of the limits measured on this device (none on the
    CPU, where nothing is measured against a limit)."""
    out = {}
    measured = (device_limits() or {}).get("measured") if torch.cuda.is_available() else None
    if flops is not None:
        tflops = flops / (ms * 1e-3) / 1e12
        out["tflops"] = tflops
        if measured:
            out["pct_of_measured_matmul"] = 100.0 * tflops / measured["bf16_matmul_tflops"]
    if bytes_moved is not None:
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        out["gb_per_s"] = gbps
        if measured:
            out["pct_of_measured_copy"] = 100.0 * gbps / (measured["copy_tb_per_s"] * 1e3)
    return out


def write_results(name: str, rows: list[dict], results_dir: Path | None = None, **extra) -> Path:
    """<results_dir>/<name>.json (default benchmarks/results) with the environment, `extra` fields and the rows,
    written atomically."""
    from vitslim.files import atomic_write

    results_dir = Path(results_dir) if results_dir is not None else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    text = json.dumps({**environment(), **extra, "rows": rows}, indent=1, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_results(path: Path) -> dict | None:
    """A results JSON file, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def between_markers(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by body (on its own lines)."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"the README has no {begin} ... {end} section")
    return text[:start + len(begin)] + "\n" + body + text[stop:]


def available_cores() -> int:
    """CPU cores this process may run on."""
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


class Progress:
    """Rows as they are measured, and when to stop starting new ones (benchmarks.gpu_check's time slices).

    `deadline` (time.time()) is when no new measurement may start; what is skipped then is listed in not_run as
    "<what>: not run: budget". `on_update(rows, not_run)` is called after every row, so a run killed at its hard
    limit has written everything it measured.
    """

    def __init__(self, deadline: float | None = None,
                 on_update: Callable[[list[dict], list[str]], None] | None = None) -> None:
        self.deadline, self.on_update = deadline, on_update
        self.rows: list[dict] = []
        self.not_run: list[str] = []

    def starts(self, what: str, needs_s: float = 0.0) -> bool:
        """True if `what` may start now and, by the estimate `needs_s` (a cold torch.compile, say), finish before
        the deadline; else it is recorded as not run."""
        import time
        if self.deadline is None or time.time() + needs_s < self.deadline:
            return True
        self.not_run.append(f"{what}: not run: budget" + (f" (needs about {needs_s:.0f} s)" if needs_s else ""))
        self.update()
        return False

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.update()
        return row

    def update(self) -> None:
        if self.on_update is not None:
            self.on_update(self.rows, self.not_run)


def sdpa_flash_where_possible(fn: Callable[[], object]) -> tuple[Callable[[], object], str, float]:
    """(fn forced onto SDPA's flash backend, "flash", s) when every scaled_dot_product_attention call in fn accepts
    it, else (fn as it is, "default (flash refused: ...)", s), s the wall seconds of the one call of fn that finds
    out (a torch.compile'd fn compiles in it). Baselines go through this so that a row says which SDPA kernel it
    timed."""
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced() -> object:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return fn()
    start = time.perf_counter()
    try:
        forced()
        backend, chosen = "flash", forced
    except RuntimeError as error:  # "No available kernel": a head width or dtype flash does not take
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        backend, chosen = f"default (flash refused: {reason[:160]})", fn
        chosen()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return chosen, backend, time.perf_counter() - start


def kernel_times_ms(fn: Callable[[], object], calls: int = 3) -> dict[str, dict]:
    """Device time of each CUDA kernel fn() launches, per call, from torch.profiler: {kernel name: {"ms",
    "launches"}}, largest first. The kernels of our Triton ops carry their @triton.jit names. Call it after the
    process's last timing: CUPTI stays attached once the profiler has run and slows what is timed after it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us() / 1e3
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {name: {"ms": ms / calls, "launches": n / calls} for name, (ms, n) in ranked}
