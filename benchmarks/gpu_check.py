"""`make gpu-check`: everything the project must show on a GPU, in one command that fits a lent machine's call.

    python3 -m benchmarks.gpu_check [--budget-s 480] [--parts NAME ...] [--continue] [--commit SHA]
    python3 -m benchmarks.gpu_check --dry-run [--results-dir DIR]      # the same orchestration on this CPU
    python3 -m benchmarks.gpu_check --publish RUN                       # a finished run -> benchmarks/results
    python3 -m benchmarks.gpu_check --readme                            # the README's GPU table from those

A lent GPU machine gives one command at most 600 s and brings back at most 8 files of $OUT. So: every run writes
to a fresh folder (default build/gpu-check/<date>-<time>, never the tracked benchmarks/results), and after every
part, from a SIGTERM/SIGINT handler and from a `finally`, atomically refreshes exactly three files in $OUT when it
is set: SUMMARY.md, gpu_check.json (every part's status and time, every row of every results file) and
gpu_check.tgz (all the run's JSON and logs, under 16 MiB). Nothing from an earlier run or another device is
reported as this run's; `--continue` adds parts to the newest run of the same device and commit (a second call on
the still-warm machine), and Triton's and inductor's caches live under build/cache, so it compiles nothing twice.

Parts, in this order; each runs in its own process under a hard limit (its slice, less when the budget has less
left; time a part leaves unused passes on), writes its JSON as it measures, and is cut first when late:
  limits      the device limits every percentage refers to: an 8192^3 bf16 matmul, a 1 GiB device-to-device copy
  build       pip install --no-build-isolation --no-deps -e . (skipped when vitslim_kernels._C already imports
              for this torch), then python -m vitslim_kernels.info
  selftest    each kernel once against the float64 reference (the CUDA kernel first)
  tests       pytest -m "gpu and not slow", test files in buckets over up to 4 processes, results file updated
              as each bucket ends
  sanitizer   compute-sanitizer memcheck over the float32 selftest, caching allocator off
  P1          search step: fused, folded gates + SDPA (flash forced where it applies), paper eager; DeiT-S bs 256
              then DeiT-B bs 128; the fused step's kernels profiled after every timing
  P2          ragged attention against padded and grouped SDPA (fwd; fwd+bwd through the packed op training uses)
  P3          slim inference against dense: eager, CUDA graphs, torch.compile'd dense at the throughput batch
  P4          retrain step: slim, dense, the paper's masked retrain, torch.compile'd dense
  P1-compile  the search step's torch.compile baseline (a cold inductor compile: last of the targets)
  autotune    P2's Triton cases with VITSLIM_AUTOTUNE=1
  loader      benchmarks.loader on synthetic JPEGs: --loader cpu and gpu, worker counts, the device half
  swin        benchmarks.run_swin_benchmarks: Swin-T's search step (fused, folded + SDPA with the float mask, eager),
              the window attention against padded and grouped SDPA, slim Swin-T inference and retrain against
              dense. Last, so cut first; a second call on the warm machine runs it: --continue --parts swin
A torch.compile row starts only when its expected compile time is left in its part (else "not run: budget").

Exit status: 0 when every correctness part that was asked for (build, selftest, tests, sanitizer) passed; 1 when
one failed, timed out, was cut by the budget or crashed (SUMMARY.md says which); 128 + the signal when stopped.
--dry-run runs the same orchestration on this CPU: no build, tiny shapes, Triton's interpreter, timings that
check the plumbing and mean nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "build" / "gpu-check"          # each run's own folder (ignored by git, kept on a warm machine)
CACHE = ROOT / "build" / "cache"             # Triton's and inductor's caches, shared by the parts and by calls
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
DEFAULT_BUDGET_S = 480.0
OUT_FILES = ("SUMMARY.md", "gpu_check.json", "gpu_check.tgz")
OUT_MAX_BYTES = 16 << 20                     # the most one file of $OUT may hold to come back
TGZ_TARGET_BYTES = 15 << 20


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    slice_s: float        # its hard limit on the GPU machine (less if the budget has less left)
    dry_slice_s: float    # the same for --dry-run
    expected_s: float     # expected on an H100 from a cold start (README, SUMMARY.md: the time plan)
    results: str | None   # the JSON file it writes, if any
    correctness: bool     # a correctness check: its failure, time-out or cut makes the exit status 1


# Expected H100 seconds, cold (nothing compiled, nothing cached): torch + CUDA start ~5 s a process; the build is
# three translation units against torch's headers on 16 cores (~60-80 s); Triton compiles ~1-2 s a kernel
# specialisation (selftest ~45 with the window kernels, tests ~40 more, P1 ~15, P2 ~20); a cold inductor compile
# of DeiT-S is ~40-60 s for inference and ~70-90 s for fwd + bwd. The timed loops themselves are short: a DeiT-S
# bs-256 search step is ~7 TFLOP (tens of ms at these rates). The dry-run limits are about three times a dry part's
# time on our 2 cores at their quickest: the same machine ran the same selftest in 31 s and, hours later, in 50 s,
# and triton 3.6's interpreter is slower (its selftest passed its old 40 s limit in CI).
PARTS = (
    Part("limits", "device limits: 8192^3 bf16 matmul, 1 GiB device-to-device copy", 20, 20, 8, "limits.json", False),
    Part("build", "CUDA extension (skipped when _C imports for this torch), vitslim_kernels.info", 150, 40, 80,
         "build.json", True),
    Part("selftest", "each kernel once against the float64 reference, the CUDA kernel first", 90, 120, 55,
         "selftest.json", True),
    Part("tests", 'pytest -m "gpu and not slow"', 110, 120, 80, "gpu_tests.json", True),
    Part("sanitizer", "compute-sanitizer memcheck on the float32 selftest, caching allocator off", 75, 20, 45,
         "sanitizer.json", True),
    Part("P1", "search step: fused, folded + SDPA, paper eager", 100, 150, 70, "search_step.json", False),
    Part("P2", "ragged attention vs padded and grouped SDPA", 45, 40, 30, "ragged_attention.json", False),
    Part("P3", "slim inference vs dense (eager, CUDA graphs, torch.compile)", 110, 40, 75, "slim_inference.json",
         False),
    Part("P4", "retrain step: slim, dense, paper masked, torch.compile'd dense", 130, 40, 95, "retrain_step.json",
         False),
    Part("P1-compile", "search step: folded + SDPA under torch.compile", 150, 60, 100, "search_step_compile.json",
         False),
    Part("autotune", "P2's Triton cases again with VITSLIM_AUTOTUNE=1", 40, 40, 30, "ragged_attention_tuned.json",
         False),
    Part("loader", "input pipeline: loader workers on this machine's cores, --loader gpu's device half", 60, 40, 50,
         "loader.json", False),
    Part("swin", "Swin-T: search step fused vs folded + SDPA (float mask) and eager; window attention vs padded and "
         "grouped SDPA; slim inference and retrain vs dense", 120, 60, 90, "swin.json", False),
)
PART_NAMES = tuple(p.name for p in PARTS)
PARTS_BY_NAME = {p.name: p for p in PARTS}
SUMMARY_RESERVE_S = {False: 10.0, True: 2.0}  # kept for the summary and $OUT (GPU, dry run)
MIN_START_S = {False: 15.0, True: 1.0}       # a part starts only with at least this much of its slice left
SOFT_MARGIN_S = {False: 8.0, True: 0.5}      # a part stops starting new measurements this long before its limit
STATUS_PREFIX = "gpu_check part status: "


NOT_RUN_CUT = ("not run: budget", "not run: stopped", "not run: the orchestration ended early")


def is_correctness_failure(part: Part, status: str) -> bool:
    """Whether a correctness part's status fails the run: it failed, timed out, crashed, was stopped, or never ran
    because the budget or a stop cut it. "not run: <reason>" for a missing tool or a dry run is reported, not a
    failure."""
    return part.correctness and status.startswith(("failed", "timeout", "stopped", "incomplete") + NOT_RUN_CUT)


# -- the parts (each runs in a child process: python -m benchmarks.gpu_check --run-part NAME ...) ----------
@dataclass(frozen=True)
class PartContext:
    results_dir: Path
    dry_run: bool
    deadline: float       # time.time() after which no new measurement starts

    def write(self, name: str, rows: list[dict], **extra) -> Path:
        from benchmarks.common import write_results
        return write_results(name, rows, self.results_dir, dry_run=self.dry_run, **extra)

    def read(self, name: str) -> dict | None:
        from benchmarks.common import read_results
        return read_results(self.results_dir / f"{name}.json")


def part_limits(ctx: PartContext) -> str:
    import torch

    from benchmarks.common import measure_device_limits

    device = torch.device("cpu" if ctx.dry_run or not torch.cuda.is_available() else "cuda")
    limits = measure_device_limits(device)
    m = limits["measured"]
    print(f"limits on {limits['device']}: {m['bf16_matmul_tflops']:.1f} TFLOP/s bf16 matmul, "
          f"{m['copy_tb_per_s']:.3f} TB/s copy (spec sheet: {limits['spec_sheet']}; earlier reading: "
          f"{limits['earlier_reading']})", flush=True)
    ctx.write("limits", [m], limits=limits, complete=True)
    return "ok"


_EXTENSION_CURRENT = """
import sys, torch
from vitslim_kernels import _ext
info = _ext.build_info() or {}
reason = _ext.unavailable()
if reason is None and info.get("torch") != torch.__version__:
    reason = f"built for torch {info.get('torch')}, this is torch {torch.__version__}"
print(reason or f"vitslim_kernels._C imports, built for torch {torch.__version__}")
sys.exit(0 if reason is None else 1)
"""


def part_build(ctx: PartContext) -> str:
    record: dict = {}
    # In a separate process: a build must not replace a .so this process has mapped.
    current = subprocess.run([sys.executable, "-c", _EXTENSION_CURRENT], cwd=ROOT, capture_output=True, text=True)
    why = (current.stdout.strip().splitlines() or [current.stderr.strip()[-300:]])[-1]
    if current.returncode == 0:
        record["pip"] = {"status": f"skipped: {why}"}
    elif ctx.dry_run:
        record["pip"] = {"status": f"not run: dry run ({why})"}
    else:
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        print(f"build: {why}; {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        record["pip"] = {"command": " ".join(cmd[1:]), "rc": proc.returncode, "max_jobs": env["MAX_JOBS"],
                         "seconds": time.perf_counter() - start, "why": why}
        if proc.returncode != 0:
            ctx.write("build", [record], complete=True)
            return f"failed: pip install exited {proc.returncode}"
    print(f"build: {record['pip'].get('status', 'built')}", flush=True)
    info = subprocess.run([sys.executable, "-m", "vitslim_kernels.info"], cwd=ROOT, capture_output=True, text=True)
    print(info.stdout, end="")
    (ctx.results_dir / "info.txt").write_text(info.stdout + info.stderr)
    record["info"] = {"rc": info.returncode, "extension": next(
        (line for line in info.stdout.splitlines() if line.startswith("extension")), None)}
    ctx.write("build", [record], complete=True)
    return "ok" if info.returncode == 0 else f"failed: vitslim_kernels.info exited {info.returncode}"


def selftest_cases() -> list[tuple]:
    """The selftest's cases, the CUDA kernel's first (built ahead, nothing to JIT: its verdict comes soonest)."""
    from vitslim_kernels import selftest
    return sorted(selftest.CASES, key=lambda case: case[2] != "cuda")


def part_selftest(ctx: PartContext) -> str:
    from dataclasses import asdict

    from vitslim_kernels import selftest

    device, where = selftest.selftest_device()
    if device is None:
        ctx.write("selftest", [], complete=True, status=f"not run: {where}")
        return f"not run: {where}"
    rows: list[dict] = []
    for case in selftest_cases():  # one case at a time: the file grows as they pass
        for dtype in selftest._dtypes(device):
            for check in selftest.run(device, [dtype], cases=[case]):
                print(selftest.format_check(check), flush=True)
                rows.append(asdict(check))
                ctx.write("selftest", rows, complete=False, where=where)
    ctx.write("selftest", rows, complete=True, where=where)
    failed = [f"{r['name']} {r['dtype']}" for r in rows if not r["passed"]]
    return f"failed: {', '.join(failed)}" if failed else "ok"


TEST_MARKERS = "gpu and not slow"  # the sanitizer tests and cold inductor compiles are "slow": not in this slice


def _test_buckets(files: dict[str, int], k: int) -> list[list[str]]:
    """The test files in at most k groups of about equal test counts (largest first into the smallest group)."""
    buckets: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, min(k, len(files))))]
    for name, count in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])):
        total, names = min(buckets, key=lambda b: b[0])
        buckets.remove((total, names))
        buckets.append((total + count, names + [name]))
    return [names for _, names in buckets if names]


def _junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]] += 1
        if outcome in ("failure", "error"):
            failures.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failures


def part_tests(ctx: PartContext) -> str:
    """pytest -m "gpu and not slow", the test files in up to 8 buckets run by up to 4 processes at a time (the GPU
    tests spend most of their time compiling Triton kernels, on the CPU cores); gpu_tests.json is rewritten as each
    bucket ends, so a part killed at its limit keeps the buckets that finished."""
    env = dict(os.environ, VITSLIM_STRICT_KERNELS="1")
    base = [sys.executable, "-m", "pytest", "-m", TEST_MARKERS, "-q", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    collected = subprocess.run(base + ["--collect-only", "tests"], cwd=ROOT, env=env, capture_output=True, text=True)
    files: dict[str, int] = {}
    for line in collected.stdout.splitlines():
        if "::" in line:
            files[line.split("::")[0]] = files.get(line.split("::")[0], 0) + 1
    if collected.returncode not in (0, 5):
        print(collected.stdout[-3000:], collected.stderr[-3000:])
        ctx.write("gpu_tests", [{"rc": collected.returncode, "collected": 0}], complete=True)
        return f"failed: pytest could not collect the GPU tests (exit {collected.returncode})"
    concurrent = min(4, max(1, (os.cpu_count() or 1) // 2))
    buckets = _test_buckets(files, 2 * concurrent)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    done: list[dict] = []
    not_run: list[str] = []
    running: list[tuple[subprocess.Popen, object, int]] = []
    pending = list(enumerate(buckets))

    def record(complete: bool) -> None:
        row = {"command": " ".join(base[1:] + ["tests"]), "collected": sum(files.values()), "buckets": len(buckets),
               "processes": concurrent, "seconds": time.perf_counter() - start, **counts, "failures": failures,
               "buckets_done": done}
        ctx.write("gpu_tests", [row], complete=complete, not_run=not_run)

    record(complete=not buckets)
    while pending or running:
        while pending and len(running) < concurrent:
            i, bucket = pending.pop(0)
            if time.time() >= ctx.deadline:
                not_run.append(f"tests bucket {i} ({len(bucket)} files, {sum(files[f] for f in bucket)} tests): "
                               f"not run: budget")
                continue
            log = open(ctx.results_dir / "logs" / f"tests_{i}.log", "w")
            cmd = base + [f"--junitxml={ctx.results_dir / f'gpu_tests_{i}.xml'}"] + bucket
            print(f"tests [{i}]: {' '.join(cmd[1:])}", flush=True)
            running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, i))
        for proc, log, i in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, log, i))
            log.close()
            tail = (ctx.results_dir / "logs" / f"tests_{i}.log").read_text().strip().splitlines()[-1:]
            print(f"tests [{i}]: {tail[0] if tail else ''}", flush=True)
            junit = ctx.results_dir / f"gpu_tests_{i}.xml"
            bucket_counts, bucket_failures = _junit_counts(junit) if junit.exists() else ({}, [])
            for key, n in bucket_counts.items():
                counts[key] += n
            failures.extend(bucket_failures)
            if proc.returncode not in (0, 5) and not bucket_failures:  # 5: nothing collected
                failures.append(f"bucket {i} exited {proc.returncode} (logs/tests_{i}.log)")
            done.append({"bucket": i, "files": buckets[i], "rc": proc.returncode, **bucket_counts})
            record(complete=not pending and not running and not not_run)
        time.sleep(0.2)
    if failures:
        return f"failed: {counts['failed']} failed, {counts['errors']} errors (logs/tests_*.log)"
    if not_run:
        return f"incomplete: {len(not_run)} of {len(buckets)} buckets not run (budget)"
    return "ok"


def sanitizer_path() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else None


def part_sanitizer(ctx: PartContext) -> str:
    import torch

    tool = sanitizer_path()
    reason = ("dry run: no GPU" if ctx.dry_run or not torch.cuda.is_available() else
              "compute-sanitizer not found (PATH, $CUDA_HOME/bin)" if tool is None else None)
    if reason is not None:
        ctx.write("sanitizer", [], complete=True, status=f"not run: {reason}", tool=tool)
        return f"not run: {reason}"
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "20", sys.executable, "-m",
           "vitslim_kernels.selftest", "--dtypes", "float32"]
    # Without the caching allocator every tensor is its own allocation, so an access past its end is reported
    # (inside one of the allocator's segments it would be invisible to memcheck).
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    output = (proc.stdout + proc.stderr).splitlines()
    summary = next((line.strip("= ") for line in output if "ERROR SUMMARY" in line), None)
    unsupported = next((line.strip("= ") for line in output if "Device not supported" in line), None)
    row = {"command": " ".join(cmd), "env": "PYTORCH_NO_CUDA_MEMORY_CACHING=1", "rc": proc.returncode,
           "error_summary": summary, "seconds": time.perf_counter() - start}
    if unsupported and proc.returncode != 0:  # e.g. under gVisor the tool cannot attach to the GPU at all
        ctx.write("sanitizer", [row], complete=True, tool=tool, status=f"not run: {unsupported}")
        return f"not run: compute-sanitizer cannot attach here ({unsupported})"
    ctx.write("sanitizer", [row], complete=True, tool=tool)
    return "ok" if proc.returncode == 0 else f"failed: {summary or f'exit {proc.returncode}'}"


def _benchmark_progress(ctx: PartContext, name: str):
    from benchmarks.common import Progress

    def on_update(rows: list[dict], not_run: list[str]) -> None:
        ctx.write(name, rows, complete=False, not_run=not_run)
    return Progress(deadline=ctx.deadline, on_update=on_update)


def _finish(ctx: PartContext, name: str, progress) -> str:
    ctx.write(name, progress.rows, complete=True, not_run=progress.not_run)
    budget_cut = [n for n in progress.not_run if "not run: budget" in n]
    return f"ok ({len(budget_cut)} not run: budget)" if budget_cut else "ok"


def _search(ctx: PartContext, name: str, variants: tuple[str, ...], earlier: list[dict] = ()) -> str:
    import torch

    from benchmarks import run_search_benchmarks as search

    progress = _benchmark_progress(ctx, name)
    if ctx.dry_run:
        models, device, it = search.DRY_RUN_MODELS, torch.device("cpu"), search.DRY_RUN_ITERATIONS
    else:
        models, device, it = search.MODELS, torch.device("cuda"), search.Iterations()
    search.run(models, variants, device, it, progress=progress, earlier=earlier)
    return _finish(ctx, name, progress)


def part_p1(ctx: PartContext) -> str:
    return _search(ctx, "search_step", ("fused", "folded_sdpa", "paper_eager"))


def part_p1_compile(ctx: PartContext) -> str:
    """The torch.compile baseline alone (a cold inductor compile per model), its ratios against P1's fused rows
    of this run."""
    earlier = (ctx.read("search_step") or {}).get("rows", [])
    return _search(ctx, "search_step_compile", ("folded_sdpa_compile",), earlier)


def _slim_part(ctx: PartContext, name: str, bench: Callable) -> str:
    from benchmarks import run_slim_benchmarks as slim

    progress = _benchmark_progress(ctx, name)
    bench(slim.DRY_RUN_SETUP if ctx.dry_run else slim.GPU_SETUP, progress)
    return _finish(ctx, name, progress)


def part_p2(ctx: PartContext) -> str:
    from benchmarks import run_slim_benchmarks as slim
    return _slim_part(ctx, "ragged_attention", slim.bench_ragged_attention)


def part_autotune(ctx: PartContext) -> str:
    """P2's Triton ragged-attention cases with VITSLIM_AUTOTUNE=1 (set in this part's environment): each shape
    key times its candidate tiles once, then the usual timing; the choices go into the results file."""
    from benchmarks import run_slim_benchmarks as slim
    from vitslim_kernels.triton._launch import tuned_configs

    progress = _benchmark_progress(ctx, "ragged_attention_tuned")
    slim.bench_ragged_attention(slim.DRY_RUN_SETUP if ctx.dry_run else slim.GPU_SETUP, progress,
                                implementations=("triton",))
    chosen = [{"kernel": kernel, "key": repr(key), "candidate": index}
              for (kernel, key), index in tuned_configs().items()]
    ctx.write("ragged_attention_tuned", progress.rows, complete=True, not_run=progress.not_run, tuned=chosen)
    return "ok"


def part_p3(ctx: PartContext) -> str:
    from benchmarks import run_slim_benchmarks as slim
    return _slim_part(ctx, "slim_inference", slim.bench_slim_inference)


def part_p4(ctx: PartContext) -> str:
    from benchmarks import run_slim_benchmarks as slim
    return _slim_part(ctx, "retrain_step", slim.bench_retrain_step)


def part_loader(ctx: PartContext) -> str:
    """benchmarks.loader on synthetic ImageNet-like JPEGs: --loader cpu (default) and --loader gpu, workers up
    to every core of the machine, and --loader gpu's decode + augmentation on the GPU."""
    from benchmarks import loader
    from benchmarks.common import available_cores

    cores = available_cores()
    if ctx.dry_run:
        argv = ["--synthetic", "40", "--workers", "1", "--batch-size", "8", "--batches", "2", "--stage-samples", "8"]
    else:
        workers = sorted({w for w in (4, 8, cores - 1) if 0 < w < cores} or {1})
        argv = ["--synthetic", "1200", "--workers", *map(str, workers), "--batch-size", "128", "--batches", "4",
                "--stage-samples", "100"]
    code = loader.main([*argv, "--pipelines", "default", "gpu", "--results-dir", str(ctx.results_dir),
                        *(["--dry-run"] if ctx.dry_run else [])])
    return "ok" if code == 0 else f"failed: benchmarks.loader exited {code}"


def part_swin(ctx: PartContext) -> str:
    from benchmarks import run_swin_benchmarks as swin

    progress = _benchmark_progress(ctx, "swin")
    swin.run(swin.DRY_RUN_SETUP if ctx.dry_run else swin.GPU_SETUP, progress)
    return _finish(ctx, "swin", progress)


PART_FUNCTIONS: dict[str, Callable[[PartContext], str]] = {
    "limits": part_limits, "build": part_build, "selftest": part_selftest, "tests": part_tests,
    "sanitizer": part_sanitizer, "P1": part_p1, "P2": part_p2, "P3": part_p3, "P4": part_p4,
    "P1-compile": part_p1_compile, "autotune": part_autotune, "loader": part_loader, "swin": part_swin}


def run_part(name: str, ctx: PartContext) -> int:
    """The body of a part's child process: run it, print its status line, exit 1 if it failed."""
    try:
        status = PART_FUNCTIONS[name](ctx)
    except Exception as error:  # noqa: BLE001 (the parent reports it; the traceback is in the part's log)
        import traceback
        traceback.print_exc()
        status = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    print(f"{STATUS_PREFIX}{status}", flush=True)
    return 1 if status.startswith("failed") else 0


# -- the orchestration ----------------------------------------------------------------------------------
class Stopped(Exception):
    """SIGTERM or SIGINT arrived (the call's time limit, or Ctrl-C): finish the files and stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_early_signal: list[int] = []  # a signal that arrived before the orchestration started (while torch imported)


def _stop_early(signum, frame) -> None:
    _early_signal.append(signum)


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def _child_env(part: Part, dry_run: bool, results_dir: Path, commit: str | None) -> dict:
    from benchmarks.common import COMMIT_ENV, LIMITS_ENV

    env = dict(os.environ, VITSLIM_STRICT_KERNELS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
    if (results_dir / "limits.json").exists():
        env[LIMITS_ENV] = str(results_dir / "limits.json")
    if commit:
        env[COMMIT_ENV] = commit
    if dry_run and part.name in ("selftest", "P1", "P2", "autotune", "P3", "P4", "P1-compile", "swin"):
        env["TRITON_INTERPRET"] = "1"  # the CPU runs the Triton kernels in the interpreter
    if part.name == "autotune":
        env["VITSLIM_AUTOTUNE"] = "1"
    return env


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(part: Part, run: Run, limit_s: float) -> dict:
    """Run one part in a child process (its own process group) with a hard limit of limit_s; its output goes to
    the console and to logs/<part>.log. Returns {"part", "what", "status", "seconds", "limit_s", "log"}; a
    signal arriving meanwhile kills the child and propagates (Stopped) with the entry in run.current."""
    soft_deadline = time.time() + max(0.0, limit_s - SOFT_MARGIN_S[run.dry_run])
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run-part", part.name, "--results-dir",
           str(run.results_dir), "--deadline", f"{soft_deadline:.3f}"] + (["--dry-run"] if run.dry_run else [])
    log_path = run.results_dir / "logs" / f"{part.name}.log"
    start = time.perf_counter()
    status = None
    entry = {"part": part.name, "what": part.what, "status": "running", "seconds": 0.0, "limit_s": limit_s,
             "log": f"logs/{part.name}.log"}
    run.current = entry
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(part, run.dry_run, run.results_dir, run.commit),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def tee() -> None:
            nonlocal status
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith(STATUS_PREFIX):
                    status = line[len(STATUS_PREFIX):].strip()
                print(f"  [{part.name}] {line}", end="", flush=True)
        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            status = f"timeout: killed at its {limit_s:.0f} s limit (what it wrote before stands)"
        except Stopped as stop:
            _kill(proc)
            entry.update(status=f"stopped: {stop} arrived while it ran (what it wrote before stands)",
                         seconds=time.perf_counter() - start)
            raise
        finally:
            if proc.poll() is None:
                _kill(proc)
        reader.join(timeout=5)
    if status is None:
        status = f"failed: exited {proc.returncode} without a status (see logs/{part.name}.log)"
    entry.update(status=status, seconds=time.perf_counter() - start)
    run.current = None
    return entry


@dataclass
class Run:
    """One gpu_check run: its folder, what it was asked, and its record (gpu_check.json's "rows" are the parts)."""
    results_dir: Path
    budget_s: float
    dry_run: bool
    parts: tuple[str, ...]
    commit: str | None
    out: Path | None = None
    current: dict | None = None   # the entry of the part running now

    def __post_init__(self) -> None:
        self.start = time.time()
        self.entries: dict[str, dict] = {}
        self.stopped: str | None = None
        self.finished = False
        earlier = _load(self.results_dir, "gpu_check")
        if earlier:  # --continue: the parts of the earlier call(s) stand unless run again
            self.entries = {e["part"]: e for e in earlier.get("rows", [])}
            self.used_before_s = float(earlier.get("used_s") or 0.0) + float(earlier.get("used_before_s") or 0.0)
        else:
            self.used_before_s = 0.0

    def record(self) -> dict:
        from benchmarks.common import provenance
        rows = [self.entries[name] for name in PART_NAMES if name in self.entries]
        return {**provenance(), "commit": self.commit, "dry_run": self.dry_run, "budget_s": self.budget_s,
                "used_s": time.time() - self.start, "used_before_s": self.used_before_s, "parts_asked": self.parts,
                "finished": self.finished, "stopped": self.stopped, "rows": rows}


def orchestrate(results_dir: Path, budget_s: float, dry_run: bool, parts: tuple[str, ...], commit: str | None = None
                ) -> int:
    """Run `parts` (in PARTS order) into results_dir within budget_s; refresh the three $OUT files after every
    part, on SIGTERM/SIGINT and at the end. Returns the exit status (module docstring)."""
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    run = Run(results_dir, budget_s, dry_run, parts, commit, out)
    deadline = run.start + budget_s
    (results_dir / "logs").mkdir(parents=True, exist_ok=True)
    mode = "dry run (CPU, tiny shapes, interpreter)" if dry_run else "GPU"
    print(f"gpu_check: {mode}, budget {budget_s:.0f} s, results in {results_dir}"
          + (f", the three files in {out}" if out else ""), flush=True)

    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        if _early_signal:
            raise Stopped(_early_signal[0])
        for part in PARTS:
            if part.name not in parts:
                continue
            left = deadline - time.time() - SUMMARY_RESERVE_S[dry_run]
            limit = min(part.dry_slice_s if dry_run else part.slice_s, left)
            if limit < MIN_START_S[dry_run]:
                entry = {"part": part.name, "what": part.what, "status": "not run: budget", "seconds": 0.0,
                         "limit_s": max(0.0, limit)}
            else:
                print(f"gpu_check: {part.name} ({part.what}), limit {limit:.0f} s", flush=True)
                entry = run_child(part, run, limit)
            print(f"gpu_check: {part.name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
            run.entries[part.name] = entry
            publish(run)
        run.finished = True
    except Stopped as stop:
        run.stopped = str(stop)
        if run.current is not None:
            run.entries[run.current["part"]] = run.current
        for name in parts:
            run.entries.setdefault(name, {"part": name, "what": PARTS_BY_NAME[name].what, "seconds": 0.0,
                                          "limit_s": 0.0, "status": f"not run: stopped by {stop}"})
        print(f"gpu_check: stopped by {stop}; writing what it has", flush=True)
    finally:
        for sig in previous:  # a second signal must not cut the last write short
            signal.signal(sig, signal.SIG_IGN)
        for name in parts:  # e.g. an unexpected error: every part asked for has an entry
            run.entries.setdefault(name, {"part": name, "what": PARTS_BY_NAME[name].what, "seconds": 0.0,
                                          "limit_s": 0.0, "status": "not run: the orchestration ended early"})
        summary = publish(run)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary, flush=True)
    failed = [name for name in parts if is_correctness_failure(PARTS_BY_NAME[name], run.entries[name]["status"])]
    crashed = [name for name in parts if run.entries[name]["status"].startswith("failed")]
    print(f"gpu_check: done in {time.time() - run.start:.0f} s of {budget_s:.0f} s"
          + (f"; FAILED: {', '.join(dict.fromkeys(failed + crashed))}" if failed or crashed else "")
          + (f"; the three files are in {out}" if out else ""), flush=True)
    if run.stopped:
        return 128 + signal.Signals[run.stopped].value
    return 1 if failed or crashed else 0


def publish(run: Run) -> str:
    """Write gpu_check.json (the record and every results file's content), SUMMARY.md and gpu_check.tgz into the
    run's folder and, when $OUT is set, the same three files into $OUT (each atomically). Returns the summary.
    Never raises: a broken summary still leaves the record and the archive."""
    record = run.record()
    results = {}
    for path in sorted(run.results_dir.glob("*.json")):
        if path.name != "gpu_check.json":
            data = _load(run.results_dir, path.stem)
            if data is not None:
                results[path.stem] = data
    combined = json.dumps({**record, "results": results}, indent=1, default=str) + "\n"
    _atomic_text(run.results_dir / "gpu_check.json", combined)
    try:
        summary = summarise(run.results_dir, record)
    except Exception as error:  # noqa: BLE001 (the record and the archive must still be written)
        import traceback
        summary = ("# GPU check\n\nSUMMARY.md could not be generated: "
                   f"{type(error).__name__}: {error}\n\n```\n{traceback.format_exc()[-3000:]}```\n\n"
                   + "\n".join(parts_table(record)) + "\n")
    _atomic_text(run.results_dir / "SUMMARY.md", summary)
    archive = run.results_dir / "gpu_check.tgz"
    try:
        _atomic_bytes(archive, results_archive(run.results_dir))
    except OSError as error:
        print(f"gpu_check: could not write {archive}: {error}", flush=True)
    if run.out is not None:
        run.out.mkdir(parents=True, exist_ok=True)
        for name in OUT_FILES:
            source = run.results_dir / name
            if source.exists():
                _atomic_bytes(run.out / name, source.read_bytes())
    return summary


def results_archive(results_dir: Path, target: int = TGZ_TARGET_BYTES) -> bytes:
    """A .tgz of the run's JSON, text and logs (not the archive itself): each file whole, or its last `cap` bytes
    when longer (a log's end says most); cap halves until the archive fits `target`."""
    files = sorted(p for p in results_dir.rglob("*") if p.is_file() and p.name != "gpu_check.tgz"
                   and p.suffix in (".json", ".md", ".txt", ".log", ".xml"))
    cap = 4 << 20
    while True:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in files:
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if len(data) > cap:
                    data = b"[... cut: the first %d bytes ...]\n" % (len(data) - cap) + data[-cap:]
                info = tarfile.TarInfo(f"gpu_check/{path.relative_to(results_dir)}")
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        if buffer.tell() <= target or cap < 4096:
            return buffer.getvalue()
        cap //= 2


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode())


# -- SUMMARY.md and the README table ----------------------------------------------------------------------
def _load(results_dir: Path, name: str) -> dict | None:
    """results_dir/<name>.json, or None when it is missing or unreadable (a part killed mid-way leaves the last
    complete file: they are written atomically)."""
    try:
        return json.loads((results_dir / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class TargetRow:
    id: str
    what: str
    measured: float | None     # the ratio measured
    target: float | None       # the ratio it must reach (or, for peak memory, not exceed)
    at_most: bool = False

    @property
    def holds(self) -> str:
        if self.measured is not None and self.target is None:
            return "-"  # reported beside the targets, no target of its own
        if self.measured is None or self.target is None:
            return "not measured"
        ok = self.measured <= self.target if self.at_most else self.measured >= self.target
        return "yes" if ok else "no"


def target_rows(results_dir: Path) -> tuple[list[TargetRow], list[str]]:
    """Every docs/design.md section 6 target with its measured ratio from the results files, and what was not run."""
    rows: list[TargetRow] = []
    not_run: list[str] = []
    search, compiled = _load(results_dir, "search_step"), _load(results_dir, "search_step_compile")
    if search or compiled:
        summaries: dict[tuple, dict] = {}
        for data, compile_file in ((search, False), (compiled, True)):
            not_run += (data or {}).get("not_run", [])
            for r in (data or {}).get("rows", []):
                if r.get("bench") != "summary" or r.get("of") != "search_step":
                    continue
                merged = summaries.setdefault((r["model"], r["batch"]), {"targets": r.get("targets", {})})
                # each ratio from the file that measured its baseline: the compiled one from search_step_compile
                merged.update({k: v for k, v in r.items() if k.startswith(("speedup_vs_", "peak_mem_ratio"))
                               and ("compile" in k) == compile_file})
        for (model, batch), r in summaries.items():
            for key, goal in r["targets"].items():
                what = key.replace("speedup_vs_", "fused vs ").replace("peak_mem_ratio_vs_", "peak memory / ")
                rows.append(TargetRow("P1", f"{what}, {model} bs {batch}", r.get(key), goal,
                                      at_most=key.startswith("peak")))
    else:
        rows.append(TargetRow("P1", "search step", None, None))
    ragged = _load(results_dir, "ragged_attention")
    if ragged:
        not_run += ragged.get("not_run", [])
        groups: dict[tuple, dict] = {}
        for r in ragged["rows"]:
            key = (r["model"], r["batch"], r["mode"])
            if r["variant"] != "ragged" or r.get("dispatch_default"):
                groups.setdefault(key, {})[r["variant"]] = r["median_ms"]
        for (model, batch, mode), times in groups.items():
            for baseline, goal in (("padded_sdpa", 1.3), ("grouped_sdpa", 1.0)):
                ratio = times[baseline] / times["ragged"] if "ragged" in times and baseline in times else None
                rows.append(TargetRow("P2", f"ragged vs {baseline}, {mode}, {model} B {batch}", ratio, goal))
    else:
        rows.append(TargetRow("P2", "ragged attention", None, None))
    inference = _load(results_dir, "slim_inference")
    if inference:
        not_run += inference.get("not_run", [])
        batches = sorted({r["batch"] for r in inference["rows"]}, reverse=True)
        for r in inference["rows"]:
            if r["variant"] != "summary":
                continue
            if r["batch"] == batches[0]:
                rows.append(TargetRow("P3", f"slim vs dense throughput, bs {r['batch']} (target 0.9 x FLOPs ratio "
                                            f"{r['flops_ratio_vs_dense']:.2f})", r["best_speedup_vs_dense"],
                                      0.9 * r["flops_ratio_vs_dense"]))
            if r["batch"] == 1:
                rows.append(TargetRow("P3", "slim vs dense latency, bs 1 (no loss)", r["best_speedup_vs_dense"], 1.0))
            if "speedup_vs_dense_compile" in r:
                rows.append(TargetRow("P3", f"slim vs torch.compile'd dense, bs {r['batch']}",
                                      r["speedup_vs_dense_compile"], None))
    else:
        rows.append(TargetRow("P3", "slim inference", None, None))
    retrain = _load(results_dir, "retrain_step")
    if retrain:
        not_run += retrain.get("not_run", [])
        slim = next((r for r in retrain["rows"] if r["variant"] == "slim"), None)
        flops_ratio = slim.get("flops_ratio_vs_dense") if slim else None
        rows.append(TargetRow("P4", f"slim vs dense retrain step (target 0.9 x FLOPs ratio"
                                    f"{f' {flops_ratio:.2f}' if flops_ratio else ''})",
                              slim.get("speedup_vs_dense") if slim else None,
                              0.9 * flops_ratio if flops_ratio else None))
        rows.append(TargetRow("P4", "slim vs the paper's masked retrain step",
                              slim.get("speedup_vs_paper_masked") if slim else None, 3.0))
        if slim and "speedup_vs_dense_compile" in slim:
            rows.append(TargetRow("P4", "slim vs torch.compile'd dense retrain step", slim["speedup_vs_dense_compile"],
                                  None))
    else:
        rows.append(TargetRow("P4", "retrain step", None, None))
    return rows, not_run


def _roofline_predictions(workload: str, batch: int, limits: dict | None = None) -> dict[str, float]:
    """Predicted ms per Triton kernel (ours) of the committed roofline model, for the fused / slim path: at the
    `limits` measured in this run (max(FLOPs / matmul rate, bytes / copy rate) of each kernel's totals) when given,
    else at the limits the model was computed for."""
    try:
        roofline = json.loads((RESULTS / "roofline.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    measured = (limits or {}).get("measured")
    for comparison in roofline.get("comparisons", []):
        if workload in comparison["what"] and comparison["batch"] == batch:
            path = next(iter(comparison["paths"].values()))  # the first path is ours (fused / slim)
            if not measured:
                return {k["kernel"]: k["predicted_ms"] for k in path["kernels"] if k["kind"] == "triton"}
            peak, bandwidth = measured["bf16_matmul_tflops"] * 1e12, measured["copy_tb_per_s"] * 1e12
            return {k["kernel"]: 1e3 * max(k["flops"] / peak, k["bytes"] / bandwidth)
                    for k in path["kernels"] if k["kind"] == "triton"}
    return {}


def kernel_rows(results_dir: Path) -> list[tuple[str, str, float | None, float]]:
    """(workload, kernel, measured ms per step or None, predicted ms at this run's measured limits) for every
    Triton kernel of the roofline."""
    limits = (_load(results_dir, "limits") or {}).get("limits")
    if limits and limits.get("device") == "cpu":
        limits = None  # a dry run's tiny CPU timings: the roofline's own limits instead
    out = []
    for workload, name, pick, batch in (
            ("search step", "search_step", lambda r: r.get("bench") == "search_step" and r.get("variant") == "fused"
             and r.get("model") == "deit_small_patch16_224" and r.get("batch") == 256, 256),
            ("inference", "slim_inference", lambda r: r.get("variant") == "slim" and r.get("batch") == 256, 256)):
        predicted = _roofline_predictions(workload, batch, limits)
        data = _load(results_dir, name)
        row = next((r for r in data["rows"] if pick(r)), None) if data else None
        measured_by_kernel = (row or {}).get("kernel_ms") or {}
        for kernel, ms in predicted.items():
            hits = [v["ms"] for k, v in measured_by_kernel.items() if k.lstrip("_").startswith(kernel)]
            out.append((f"DeiT-S {workload} bs {batch}", kernel, sum(hits) if hits else None, ms))
    return out


def target_table(targets: list[TargetRow], dry_run: bool) -> list[str]:
    """The markdown table of the targets; a dry run's ratios are CPU timings of tiny shapes and judge nothing."""
    lines = ["| id | what | measured | target | holds |", "| --- | --- | ---: | ---: | --- |"]
    for t in targets:
        bound = "-" if t.target is None else f"{'<=' if t.at_most else '>='} {t.target:.2f}"
        holds = "(dry run)" if dry_run and t.measured is not None else t.holds
        lines.append(f"| {t.id} | {t.what} | {_fmt(t.measured, '.3g', 'x')} | {bound} | {holds} |")
    return lines


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def parts_table(record: dict) -> list[str]:
    lines = ["| part | what | status | seconds | limit (s) | expected on an H100, cold (s) |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for e in record["rows"]:
        part = PARTS_BY_NAME.get(e["part"])
        lines.append(f"| {e['part']} | {e['what']} | {e['status']} | {e['seconds']:.1f} | {e['limit_s']:.0f} | "
                     f"{part.expected_s:.0f} |" if part else f"| {e['part']} | | {e['status']} | | | |")
    return lines


def limits_lines(results_dir: Path) -> list[str]:
    data = _load(results_dir, "limits")
    if not data or not data.get("limits"):
        return ["Not measured in this run: percentages in the results files are of limits measured by each part."]
    limits = data["limits"]
    m, spec, earlier = limits["measured"], limits.get("spec_sheet") or {}, limits.get("earlier_reading") or {}
    return ["| limit | measured now | earlier reading here | spec sheet |", "| --- | ---: | ---: | ---: |",
            f"| bf16 matmul (TFLOP/s) | {m['bf16_matmul_tflops']:.1f} | "
            f"{_fmt(earlier.get('bf16_matmul_tflops'), '.0f')} | {_fmt(spec.get('bf16_dense_tflops'), '.1f')} |",
            f"| device-to-device copy, read + write (TB/s) | {m['copy_tb_per_s']:.3f} | "
            f"{_fmt(earlier.get('copy_tb_per_s'), '.1f')} | {_fmt(spec.get('memory_tb_per_s'), '.2f')} |",
            "", f"{m['how']} on {limits['device']}; every percentage of this run refers to the measured row."]


def summarise(results_dir: Path, record: dict) -> str:
    """SUMMARY.md of a run: its parts, correctness, the targets, what did not run, limits, kernels, loader."""
    dry = record["dry_run"]
    failed = [e["part"] for e in record["rows"] if e["part"] in PARTS_BY_NAME
              and is_correctness_failure(PARTS_BY_NAME[e["part"]], e["status"])]
    dry_note = " (DRY RUN: CPU, tiny shapes, interpreter; no number here measures a target)" if dry else ""
    lines = [f"# GPU check{dry_note}",
             "",
             f"Device {record.get('device')} (driver {record.get('driver')}), torch {record.get('torch')}, triton "
             f"{record.get('triton')}, CUDA {record.get('cuda')}, commit {record.get('commit')}, {record.get('date')}. "
             f"Budget: {record.get('used_s', 0):.0f} s used of {record['budget_s']:.0f} s"
             + (f" (and {record['used_before_s']:.0f} s by earlier calls of this run)" if record.get("used_before_s")
                else "") + ".",
             ""]
    if record.get("stopped"):
        lines += [f"**Stopped by {record['stopped']}** before it finished: what is below is what it had.", ""]
    lines += [f"**Correctness: FAILED: {', '.join(failed)}** (see the parts below)." if failed else
              "Correctness: every correctness part that ran passed." if any(
                  PARTS_BY_NAME[e['part']].correctness for e in record["rows"] if e["part"] in PARTS_BY_NAME)
              else "Correctness: no correctness part was asked for.", ""]
    lines += ["## Parts", ""] + parts_table(record)
    not_asked = [name for name in PART_NAMES if name not in {e["part"] for e in record["rows"]}]
    if not_asked:
        lines += ["", f"Not asked for in this run: {', '.join(not_asked)}."]
    lines += ["", "## Correctness", ""]
    tests = _load(results_dir, "gpu_tests")
    if tests and tests["rows"]:
        t = tests["rows"][0]
        lines.append(f"- GPU tests (`pytest -m \"{TEST_MARKERS}\"`): {t.get('passed', 0)} passed, {t.get('failed', 0)} "
                     f"failed, {t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped of {t.get('collected')} "
                     f"collected" + (f"; failed: {', '.join(t['failures'])}" if t.get("failures") else "")
                     + ("" if tests.get("complete") else " (cut short: "
                        + ("; ".join(tests.get("not_run", [])) or "the part was killed") + ")"))
    else:
        lines.append("- GPU tests: not run")
    selftest = _load(results_dir, "selftest")
    if selftest and selftest["rows"]:
        checked = [r for r in selftest["rows"] if not r.get("skipped")]
        bad = [f"{r['name']} {r['dtype']}" for r in checked if not r["passed"]]
        lines.append(f"- selftest ({selftest.get('where', '')}): {len(checked) - len(bad)} of {len(checked)} "
                     f"passed" + (f"; FAILED: {', '.join(bad)}" if bad else "")
                     + ("" if selftest.get("complete") else " (cut short)"))
    else:
        lines.append(f"- selftest: {(selftest or {}).get('status', 'not run')}")
    sanitizer = _load(results_dir, "sanitizer")
    if sanitizer and sanitizer["rows"] and "status" not in sanitizer:
        s = sanitizer["rows"][0]
        exit_status = f"exit {s['rc']}"
        lines.append(f"- compute-sanitizer memcheck (caching allocator off): {s['error_summary'] or exit_status}")
    else:
        lines.append(f"- compute-sanitizer: {(sanitizer or {}).get('status', 'not run')}")
    targets, not_run = target_rows(results_dir)
    lines += ["", "## Targets (docs/design.md section 6)", ""] + target_table(targets, dry)
    for name in ("search_step", "search_step_compile"):
        for r in (_load(results_dir, name) or {}).get("rows", []):
            if r.get("bench") == "search_step" and r.get("variant") == "folded_sdpa_compile":
                lines.append(f"\ntorch.compile of {r['model']} bs {r['batch']}: first two steps (compilation) took "
                             f"{r['first_calls_s']:.1f} s, left out of its median ({r['median_ms']:.2f} ms).")
    backends = sdpa_backend_lines(results_dir)
    if backends:
        lines += ["", "SDPA backend of the baselines: " + "; ".join(backends) + "."]
    not_run += [f"{e['part']}: {e['status']}" for e in record["rows"] if e["status"].startswith("not run")]
    if not_run:
        lines += ["", "## Not run", ""] + [f"- {n}" for n in not_run]
    lines += ["", "## Device limits (measured at the start of this run)", ""] + limits_lines(results_dir)
    lines += (["", "## Autotuned attention tiles (VITSLIM_AUTOTUNE=1 against the defaults)", ""]
              + autotune_lines(results_dir))
    lines += ["", "## Input pipeline (benchmarks.loader, synthetic ImageNet-like JPEGs)", ""]
    lines += loader_lines(results_dir, record.get("device"))
    kernels = kernel_rows(results_dir)
    lines += ["", "## Measured vs the roofline model (our Triton kernels, ms per step)", ""]
    if kernels:
        lines += ["| workload | kernel | measured | predicted at this run's limits | measured / predicted |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for workload, kernel, measured, predicted in kernels:
            ratio = measured / predicted if measured is not None and predicted > 0 else None
            lines.append(f"| {workload} | {kernel} | {_fmt(measured, '.3f')} | {predicted:.3f} | {_fmt(ratio)} |")
        if all(m is None for _, _, m, _ in kernels):
            lines += ["", "Nothing measured per kernel (the profiler runs on a GPU only, after the part's timings)."]
    else:
        lines.append("No roofline model in benchmarks/results/roofline.json (python -m benchmarks.roofline).")
    return "\n".join(lines) + "\n"


def sdpa_backend_lines(results_dir: Path) -> list[str]:
    """"<file> <variant>: <backend>" for each distinct SDPA backend a baseline row recorded."""
    seen: dict[str, str] = {}
    for name in ("search_step", "search_step_compile", "ragged_attention", "slim_inference", "retrain_step"):
        for r in (_load(results_dir, name) or {}).get("rows", []):
            if r.get("sdpa_backend"):
                seen.setdefault(f"{name} {r.get('variant')}", r["sdpa_backend"])
    return [f"{k}: {v}" for k, v in seen.items()]


def autotune_lines(results_dir: Path) -> list[str]:
    """Per P2 Triton case: the default tiles' median, the tuned one's, their ratio; and what was chosen."""
    tuned, default = _load(results_dir, "ragged_attention_tuned"), _load(results_dir, "ragged_attention")
    if not tuned or not tuned.get("rows"):
        return ["Not run."]

    def case(r: dict) -> tuple:
        return r["model"], r["batch"], r["mode"]
    defaults = {case(r): r["median_ms"] for r in (default or {}).get("rows", [])
                if r.get("variant") == "ragged" and r.get("implementation") == "triton"}
    lines = ["| model | batch | mode | default tiles (ms) | tuned (ms) | tuned / default |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in tuned["rows"]:
        before = defaults.get(case(r))
        ratio = r["median_ms"] / before if before else None
        lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {_fmt(before, '.3f')} | {r['median_ms']:.3f} | "
                     f"{_fmt(ratio)} |")
    picks = [f"{t['kernel']} candidate {t['candidate']}" for t in tuned.get("tuned", [])]
    lines += ["", "Chosen (index into the kernel's list; 0 = the default): "
              + (", ".join(picks) or "nothing tuned (no GPU)")]
    return lines


def loader_lines(results_dir: Path, device: str | None) -> list[str]:
    """Images/s per pipeline and worker count, per core, and --loader gpu's device half; only a loader.json of
    this run's device (never one measured elsewhere)."""
    result = _load(results_dir, "loader")
    if result is None:
        return ["Not run."]
    if result.get("device") != device:
        return [f"Not run on this device (the loader.json there was measured on {result.get('device')})."]
    lines = [f"{result.get('cores')} cores, batch {result.get('batch_size')}.", "",
             "| pipeline | workers | images/s | per worker |", "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:.0f} | "
                     f"{r['images_per_s_per_worker']:.0f} |")
    for label, pipeline in result.get("pipelines", {}).items():
        side = pipeline.get("device_side")
        if side:
            lines.append("")
            lines.append(f"{label}, device half on {side['device']} ({side['decoder']}): " + ", ".join(
                f"{what} {rate:.0f} images/s" for what, rate in side["images_per_s"].items()))
    return lines


def readme_table(results_dir: Path) -> str:
    """The README's GPU section body, from a run's (or benchmarks/results') files."""
    record = _load(results_dir, "gpu_check")
    if record is None:
        return ("Not yet run on a GPU: `make gpu-check` on the GPU machine measures every target below and "
                "regenerates this table.\n")
    targets, not_run = target_rows(results_dir)
    lines = []
    if record.get("dry_run"):
        lines.append("**Dry run** (CPU, tiny shapes, Triton's interpreter): the plumbing, not a measurement.\n")
    lines += target_table(targets, record.get("dry_run", False))
    lines.append("")
    lines.append(f"Generated by `python -m benchmarks.gpu_check` on {record.get('device')} "
                 f"(driver {record.get('driver')}; torch {record.get('torch')}, triton {record.get('triton')}, CUDA "
                 f"{record.get('cuda')}; commit {record.get('commit')}, {record.get('date')})"
                 + (f"; not run: {len(not_run)} measurements (see SUMMARY.md)" if not_run else "") + ".")
    return "\n".join(lines) + "\n"


def write_readme_table(results_dir: Path, readme: Path) -> None:
    """Replace the text between the README's gpu-check markers with readme_table(results_dir)."""
    from benchmarks.common import between_markers
    readme.write_text(between_markers(readme.read_text(), README_BEGIN, README_END, readme_table(results_dir)))


# -- publishing a finished run ----------------------------------------------------------------------------
def publish_results(source: Path, results: Path = RESULTS, readme: Path = README) -> list[Path]:
    """Copy a finished GPU run's results files (a run folder, or the gpu_check.tgz a lent machine brought back)
    into `results` (benchmarks/results) and regenerate the README's GPU table from them. Refuses a dry run, a run
    that was stopped before it finished, and anything that is not a gpu_check run. Returns the files written."""
    with tempfile.TemporaryDirectory(prefix="vitslim-publish-") as tmp:
        run_dir = source
        if source.is_file():
            run_dir = _extract_archive(source, Path(tmp))
        record = _load(run_dir, "gpu_check")
        if record is None or "rows" not in record:
            raise ValueError(f"{source} is not a gpu_check run (no readable gpu_check.json)")
        if record.get("dry_run"):
            raise ValueError(f"{source} is a dry run: its timings are CPU plumbing checks, never published")
        if not record.get("finished"):
            raise ValueError(f"{source} did not finish (stopped: {record.get('stopped')}): run the missing parts with "
                             "--continue, then publish")
        names = [p.results for p in PARTS if p.results] + ["gpu_check.json", "SUMMARY.md"]
        results.mkdir(parents=True, exist_ok=True)
        written = []
        for name in names:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, results / name)
                written.append(results / name)
        write_readme_table(results, readme)
    return written


def _extract_archive(archive: Path, into: Path) -> Path:
    """The run folder inside a gpu_check.tgz: regular files only, no path leaving `into`."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if not member.isfile() or not str(target).startswith(str(into.resolve()) + os.sep):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return into / "gpu_check"


# -- the command line -----------------------------------------------------------------------------------
def _newest_run(dry_run: bool) -> Path | None:
    """The newest run folder under build/gpu-check of this kind (dry or GPU), if any."""
    runs = sorted((p for p in RUNS.glob("*-dry" if dry_run else "*-gpu") if (p / "gpu_check.json").exists()),
                  key=lambda p: p.name)
    return runs[-1] if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole command, build included (default {DEFAULT_BUDGET_S:.0f}: a "
                             f"lent machine's 600 s call with margin)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same orchestration on the CPU: no build, tiny shapes, Triton's interpreter")
    parser.add_argument("--results-dir", type=Path,
                        help="the run's folder (default: a new build/gpu-check/<date>-<time>-gpu or -dry); must be "
                             "new or empty, except with --continue")
    parser.add_argument("--continue", dest="continue_run", action="store_true",
                        help="add the --parts to an earlier run (--results-dir, default the newest of this kind) "
                             "of the same device and commit: a second call on the still-warm machine")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES), metavar="PART",
                        help=f"the parts to run, of {', '.join(PART_NAMES)} (default: all, in that order)")
    parser.add_argument("--commit", help="the commit this checkout is (recorded with every result; needed where "
                                         ".git did not travel, as on a lent machine)")
    parser.add_argument("--publish", type=Path, metavar="RUN",
                        help="copy a finished GPU run's results (its folder or its gpu_check.tgz) into "
                             "benchmarks/results and regenerate the README's GPU table")
    parser.add_argument("--readme", action="store_true",
                        help="only regenerate the README's GPU table from benchmarks/results")
    parser.add_argument("--run-part", choices=PART_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    previous = {}
    if not args.run_part and not args.publish and not args.readme:
        # from here on a stop still leaves the three files (orchestrate reads _early_signal first)
        previous = {sig: signal.signal(sig, _stop_early) for sig in STOP_SIGNALS}
    try:
        return _main(parser, args)
    finally:  # an in-process caller (the tests) gets its own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _early_signal.clear()


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.run_part:
        ctx = PartContext(args.results_dir, args.dry_run, args.deadline or float("inf"))
        return run_part(args.run_part, ctx)
    if args.publish:
        if not args.publish.exists():
            parser.error(f"--publish: {args.publish} does not exist (a run folder or a gpu_check.tgz)")
        try:
            written = publish_results(args.publish)
        except (ValueError, OSError, tarfile.TarError) as error:
            parser.error(f"--publish: {error}")
        print(f"published {len(written)} files into {RESULTS} and regenerated the GPU table of {README}")
        return 0
    if args.readme:
        write_readme_table(RESULTS, README)
        print(f"regenerated the GPU table of {README} from {RESULTS}")
        return 0
    import torch  # (after the cheap paths: the parts import it themselves)

    from benchmarks.common import COMMIT_ENV, git_commit, provenance

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible: `make gpu-check` runs on the GPU machine "
                     "(--dry-run runs its orchestration on this CPU)")
    if args.commit:
        os.environ[COMMIT_ENV] = args.commit  # this process's provenance, and the children's
    commit = git_commit()
    kind = "dry" if args.dry_run else "gpu"
    results_dir = args.results_dir
    if results_dir is not None and (results_dir.resolve() == RESULTS.resolve()
                                    or RESULTS.resolve() in results_dir.resolve().parents):
        parser.error(f"a run never writes into {RESULTS} (only --publish does, from a finished run); "
                     f"give another --results-dir")
    if args.continue_run:
        results_dir = results_dir or _newest_run(args.dry_run)
        earlier = _load(results_dir, "gpu_check") if results_dir else None
        if earlier is None:
            parser.error(f"--continue: no earlier {kind} run to continue"
                         + (f" in {results_dir}" if results_dir else f" under {RUNS}"))
        here = provenance()["device"]
        if earlier.get("device") != here or earlier.get("commit") != commit:
            parser.error(f"--continue: {results_dir} was run on {earlier.get('device')} at commit "
                         f"{earlier.get('commit')}, this is {here} at {commit}: start a new run instead")
    else:
        if results_dir is None:
            results_dir = RUNS / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"
        if results_dir.exists() and any(results_dir.iterdir()):
            parser.error(f"{results_dir} is not empty: a run writes to a fresh folder (--continue adds to one)")
    results_dir.mkdir(parents=True, exist_ok=True)
    return orchestrate(results_dir, args.budget_s, args.dry_run, tuple(p for p in PART_NAMES if p in args.parts),
                       commit)


if __name__ == "__main__":
    sys.exit(main())
