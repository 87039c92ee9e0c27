"""`make gpu-check`: everything the project must show on a GPU, in one command that fits a lent machine's time.

    python -m benchmarks.gpu_check [--budget-s 420] [--dry-run] [--results-dir DIR] [--parts NAME ...]
    python -m benchmarks.gpu_check --readme [--results-dir DIR]   # only regenerate the README's GPU table

Parts, in order of importance; each runs in its own process under a hard time limit, its slice (time a part does
not use passes on to the next), and writes its JSON as it goes, so a part cut short keeps what it measured:
  build      pip install --no-build-isolation --no-deps -e . (MAX_JOBS = the CPU count), then
             `python -m vitslim_kernels.info` (info.txt)
  tests      pytest -m gpu: every kernel in fp32/bf16/fp16 against the reference with the 2x rule, outputs and all
             gradients, NaN-poisoned outputs, odd shapes (gpu_tests.json; kernels strict: a failing kernel fails)
  selftest   vitslim_kernels.selftest: each Triton and CUDA kernel launched once against the float64 reference
  sanitizer  compute-sanitizer --tool memcheck over the float32 selftest (one small launch of each kernel), where
             the tool exists
  P1         search step (search_step.json): DeiT-S bs 256 fused, folded SDPA, paper eager, folded SDPA +
             torch.compile (compile time reported, not in the medians), then DeiT-B bs 128 while time remains
  P2         ragged attention (ragged_attention.json): fwd and fwd+bwd against padded and grouped SDPA, widths of a
             plan-like 70% plan (wide early blocks, narrow late ones, pruned heads)
  P3         slim inference (slim_inference.json): DeiT-S 70/70/70 at bs 256 and 1, with and without CUDA graphs
  P4         retrain step (retrain_step.json): slim vs dense vs the paper's masked retrain
  loader     benchmarks.loader (loader.json) on 1,200 synthetic ImageNet-like JPEGs: --loader cpu and --loader gpu
             with 4, 8 and all-but-one workers, and --loader gpu's decode + augmentation on the GPU
Then, in this process: gpu_check.json (each part's status, seconds and slice; the budget used), SUMMARY.md (each
DESIGN.md target: measured ratio, target, holds or not; measured / predicted per kernel against the roofline
model, benchmarks/results/roofline.json), the README's GPU table regenerated from those files, and a copy of
DIR in $OUT when that is set.

Exit status 1 when a correctness check failed (a GPU test, the selftest, the sanitizer, the build, or a part that
crashed), else 0: a part cut short by the budget is reported in SUMMARY.md as not run, never a silent gap.

--dry-run runs the same orchestration on this CPU: no build, tiny shapes, Triton's interpreter, timings that
check the plumbing and mean nothing. Its files go to --results-dir (default: a new temporary folder), never to
benchmarks/results, and its README table to DIR/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
DEFAULT_BUDGET_S = 420.0


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    slice_s: float        # its hard limit on the GPU machine (less if the budget has less left)
    dry_slice_s: float    # the same for --dry-run
    results: str | None   # the JSON file it writes, if any
    correctness: bool     # whether its failure is a correctness failure (exit status 1)


PARTS = (
    Part("build", "build the CUDA extension, vitslim_kernels.info", 120, 30, "build.json", True),
    Part("tests", "pytest -m gpu", 90, 45, "gpu_tests.json", True),
    Part("selftest", "each kernel once against the reference", 30, 40, "selftest.json", True),
    Part("sanitizer", "compute-sanitizer memcheck on the selftest", 45, 10, "sanitizer.json", True),
    Part("P1", "search step", 100, 75, "search_step.json", False),
    Part("P2", "ragged attention", 35, 40, "ragged_attention.json", False),
    Part("autotune", "P2's Triton cases again with VITSLIM_AUTOTUNE=1", 30, 25, "ragged_attention_tuned.json", False),
    Part("P3", "slim inference", 25, 40, "slim_inference.json", False),
    Part("P4", "retrain step", 25, 40, "retrain_step.json", False),
    Part("loader", "input pipeline: loader workers on this machine's cores, --loader gpu's device half", 60, 40,
         "loader.json", False),
)
PART_NAMES = tuple(p.name for p in PARTS)
SUMMARY_RESERVE_S = {False: 10.0, True: 2.0}  # kept for the summary, README and copy (GPU, dry run)
MIN_START_S = {False: 15.0, True: 1.0}       # a part starts only with at least this much of its slice left
SOFT_MARGIN_S = {False: 8.0, True: 0.5}      # a part stops starting new measurements this long before its limit
STATUS_PREFIX = "gpu_check part status: "


# -- the parts (each runs in a child process: python -m benchmarks.gpu_check --run-part NAME ...) ----------
@dataclass(frozen=True)
class PartContext:
    results_dir: Path
    dry_run: bool
    deadline: float       # time.time() after which no new measurement starts

    def write(self, name: str, rows: list[dict], **extra) -> Path:
        from benchmarks.common import write_results
        return write_results(name, rows, self.results_dir, dry_run=self.dry_run, **extra)


def part_build(ctx: PartContext) -> str:
    record: dict = {}
    if ctx.dry_run:
        record["pip"] = {"status": "not run: dry run (the project is already installed here)"}
    else:
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1))
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        record["pip"] = {"command": " ".join(cmd[1:]), "rc": proc.returncode, "max_jobs": env["MAX_JOBS"],
                         "seconds": time.perf_counter() - start}
        if proc.returncode != 0:
            ctx.write("build", [record], complete=True)
            return f"failed: pip install exited {proc.returncode}"
    # A fresh process, so the extension just built is the one loaded.
    info = subprocess.run([sys.executable, "-m", "vitslim_kernels.info"], cwd=ROOT, capture_output=True, text=True)
    print(info.stdout, end="")
    (ctx.results_dir / "info.txt").write_text(info.stdout + info.stderr)
    record["info"] = {"rc": info.returncode, "extension": next(
        (line for line in info.stdout.splitlines() if line.startswith("extension")), None)}
    ctx.write("build", [record], complete=True)
    return "ok" if info.returncode == 0 else f"failed: vitslim_kernels.info exited {info.returncode}"


def _test_buckets(files: dict[str, int], k: int) -> list[list[str]]:
    """The test files in at most k groups of about equal test counts (largest first into the smallest group)."""
    buckets: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, min(k, len(files))))]
    for name, count in sorted(files.items(), key=lambda kv: (-kv[1], kv[0])):
        total, names = min(buckets, key=lambda b: b[0])
        buckets.remove((total, names))
        buckets.append((total + count, names + [name]))
    return [names for _, names in buckets if names]


def part_tests(ctx: PartContext) -> str:
    """pytest -m gpu, the test files split over up to 4 concurrent processes: the GPU tests spend most of their
    time compiling Triton kernels and starting compute-sanitizer, which run on the CPU cores, not the GPU."""
    import xml.etree.ElementTree as ET

    env = dict(os.environ, VITSLIM_STRICT_KERNELS="1")
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
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
    buckets = _test_buckets(files, min(4, max(1, (os.cpu_count() or 1) // 2)))
    procs = []
    for i, bucket in enumerate(buckets):
        log = open(ctx.results_dir / "logs" / f"tests_{i}.log", "w")
        cmd = base + [f"--junitxml={ctx.results_dir / f'gpu_tests_{i}.xml'}"] + bucket
        print(f"tests: {' '.join(cmd[1:])}", flush=True)
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, i))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, rcs = [], []
    for proc, log, i in procs:
        rcs.append(proc.wait())
        log.close()
        tail = (ctx.results_dir / "logs" / f"tests_{i}.log").read_text().strip().splitlines()[-1:]
        print(f"tests [{i}]: {tail[0] if tail else ''}", flush=True)
        junit = ctx.results_dir / f"gpu_tests_{i}.xml"
        if not junit.exists():
            continue
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
            counts[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]] += 1
            if outcome in ("failure", "error"):
                failures.append(f"{case.get('classname')}::{case.get('name')}")
    row = {"command": " ".join(base[1:] + ["tests"]), "collected": sum(files.values()), "processes": len(buckets),
           "rc": max(rcs, default=0), "seconds": time.perf_counter() - start, **counts, "failures": failures}
    ctx.write("gpu_tests", [row], complete=True)
    if any(rc not in (0, 5) for rc in rcs):  # 5: nothing collected
        return f"failed: {counts['failed']} failed, {counts['errors']} errors (logs/tests_*.log)"
    return "ok"


def part_selftest(ctx: PartContext) -> str:
    from dataclasses import asdict

    from vitslim_kernels import selftest

    device, where = selftest.selftest_device()
    if device is None:
        ctx.write("selftest", [], complete=True, status=f"not run: {where}")
        return f"not run: {where}"
    rows: list[dict] = []
    for name, kernels, implementation, fn in selftest.CASES:  # one case at a time: the file grows as they pass
        for dtype in selftest._dtypes(device):
            for check in selftest.run(device, [dtype], cases=[(name, kernels, implementation, fn)]):
                print(selftest.format_check(check), flush=True)
                rows.append(asdict(check))
                ctx.write("selftest", rows, complete=False, where=where)
    ctx.write("selftest", rows, complete=True, where=where)
    failed = [f"{r['name']} {r['dtype']}" for r in rows if not r["passed"]]
    return f"failed: {', '.join(failed)}" if failed else "ok"


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
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    output = (proc.stdout + proc.stderr).splitlines()
    summary = next((line.strip("= ") for line in output if "ERROR SUMMARY" in line), None)
    unsupported = next((line.strip("= ") for line in output if "Device not supported" in line), None)
    row = {"command": " ".join(cmd), "rc": proc.returncode, "error_summary": summary,
           "seconds": time.perf_counter() - start}
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
    budget_cut = [n for n in progress.not_run if n.endswith("not run: budget")]
    return f"ok ({len(budget_cut)} not run: budget)" if budget_cut else "ok"


def part_p1(ctx: PartContext) -> str:
    import torch

    from benchmarks import run_search_benchmarks as search

    progress = _benchmark_progress(ctx, "search_step")
    order = ("fused", "folded_sdpa", "paper_eager", "folded_sdpa_compile")  # the compiled baseline costs most
    if ctx.dry_run:
        models, device, it = search.DRY_RUN_MODELS, torch.device("cpu"), search.DRY_RUN_ITERATIONS
    else:
        models, device, it = search.MODELS, torch.device("cuda"), search.Iterations()
    search.run(models, order, device, it, progress=progress)
    return _finish(ctx, "search_step", progress)


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
    from vitslim_kernels.triton._common import tuned_configs

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


PART_FUNCTIONS: dict[str, Callable[[PartContext], str]] = {
    "build": part_build, "tests": part_tests, "selftest": part_selftest, "sanitizer": part_sanitizer,
    "P1": part_p1, "P2": part_p2, "autotune": part_autotune, "P3": part_p3, "P4": part_p4, "loader": part_loader}


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
def _child_env(part: Part, dry_run: bool) -> dict:
    env = dict(os.environ, VITSLIM_STRICT_KERNELS="1", PYTHONUNBUFFERED="1")
    if dry_run and part.name in ("selftest", "P1", "P2", "autotune", "P3", "P4"):
        env["TRITON_INTERPRET"] = "1"  # the CPU runs the Triton kernels in the interpreter
    if part.name == "autotune":
        env["VITSLIM_AUTOTUNE"] = "1"
    return env


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(part: Part, results_dir: Path, dry_run: bool, limit_s: float, log_dir: Path) -> dict:
    """Run one part in a child process with a hard limit of limit_s; its output goes to the console and to
    logs/<part>.log. Returns {"part", "status", "seconds", "limit_s"}."""
    soft_deadline = time.time() + max(0.0, limit_s - SOFT_MARGIN_S[dry_run])
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run-part", part.name, "--results-dir", str(results_dir),
           "--deadline", f"{soft_deadline:.3f}"] + (["--dry-run"] if dry_run else [])
    log_path = log_dir / f"{part.name}.log"
    start = time.perf_counter()
    status = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(part, dry_run), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def tee() -> None:
            nonlocal status
            for line in proc.stdout:
                log.write(line)
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
        reader.join(timeout=5)
    if status is None:
        status = f"failed: exited {proc.returncode} without a status (see logs/{part.name}.log)"
    return {"part": part.name, "what": part.what, "status": status, "seconds": time.perf_counter() - start,
            "limit_s": limit_s, "log": f"logs/{part.name}.log"}


def orchestrate(results_dir: Path, budget_s: float, dry_run: bool, parts: tuple[str, ...],
                readme: Path) -> int:
    start = time.time()
    deadline = start + budget_s
    log_dir = results_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    mode = "dry run (CPU, tiny shapes, interpreter)" if dry_run else "GPU"
    print(f"gpu_check: {mode}, budget {budget_s:.0f} s, results in {results_dir}", flush=True)
    record: dict = {"dry_run": dry_run, "budget_s": budget_s, "parts": []}
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
            entry = run_child(part, results_dir, dry_run, limit, log_dir)
        print(f"gpu_check: {part.name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
        record["parts"].append(entry)
        record["used_s"] = time.time() - start
        write_record(results_dir, record)
    summary = summarise(results_dir, record)
    (results_dir / "SUMMARY.md").write_text(summary)
    write_readme_table(results_dir, readme)
    record["used_s"] = time.time() - start
    write_record(results_dir, record)
    out = os.environ.get("OUT")
    if out:
        shutil.copytree(results_dir, Path(out) / "gpu_check", dirs_exist_ok=True)
        print(f"gpu_check: copied {results_dir} to {out}/gpu_check", flush=True)
    print(summary, flush=True)
    failed = [e["part"] for e in record["parts"] if e["status"].startswith("failed")]
    print(f"gpu_check: done in {record['used_s']:.0f} s of {budget_s:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def write_record(results_dir: Path, record: dict) -> None:
    from benchmarks.common import write_results
    write_results("gpu_check", record["parts"], results_dir, dry_run=record["dry_run"],
                  budget_s=record["budget_s"], used_s=record.get("used_s"))


# -- SUMMARY.md and the README table ----------------------------------------------------------------------
def _load(results_dir: Path, name: str) -> dict | None:
    from benchmarks.common import read_results
    return read_results(results_dir / f"{name}.json")


@dataclass(frozen=True)
class TargetRow:
    id: str
    what: str
    measured: float | None     # the ratio measured
    target: float | None       # the ratio it must reach (or, for peak memory, not exceed)
    at_most: bool = False

    @property
    def holds(self) -> str:
        if self.measured is None or self.target is None:
            return "not measured"
        ok = self.measured <= self.target if self.at_most else self.measured >= self.target
        return "yes" if ok else "no"


def target_rows(results_dir: Path) -> tuple[list[TargetRow], list[str]]:
    """Every DESIGN.md section 6 target with its measured ratio from the results files, and what was not run."""
    rows: list[TargetRow] = []
    not_run: list[str] = []
    search = _load(results_dir, "search_step")
    if search:
        not_run += search.get("not_run", [])
        for r in search["rows"]:
            if r.get("bench") != "summary" or r.get("of") != "search_step":
                continue
            label = f"{r['model']} bs {r['batch']}"
            for key, goal in r.get("targets", {}).items():
                what = key.replace("speedup_vs_", "fused vs ").replace("peak_mem_ratio_vs_", "peak memory / ")
                rows.append(TargetRow("P1", f"{what}, {label}", r.get(key), goal, at_most=key.startswith("peak")))
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
    else:
        rows.append(TargetRow("P4", "retrain step", None, None))
    return rows, not_run


def _roofline_predictions(workload: str, batch: int) -> dict[str, float]:
    """Predicted ms per Triton kernel (ours) of the committed roofline model, for the fused / slim path."""
    try:
        roofline = json.loads((RESULTS / "roofline.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    for comparison in roofline.get("comparisons", []):
        if workload in comparison["what"] and comparison["batch"] == batch:
            path = next(iter(comparison["paths"].values()))  # the first path is ours (fused / slim)
            return {k["kernel"]: k["predicted_ms"] for k in path["kernels"] if k["kind"] == "triton"}
    return {}


def kernel_rows(results_dir: Path) -> list[tuple[str, str, float | None, float]]:
    """(workload, kernel, measured ms per step or None, predicted ms) for every Triton kernel of the roofline."""
    out = []
    for workload, name, pick, batch in (
            ("search step", "search_step", lambda r: r.get("bench") == "search_step" and r.get("variant") == "fused"
             and r.get("model") == "deit_small_patch16_224" and r.get("batch") == 256, 256),
            ("inference", "slim_inference", lambda r: r.get("variant") == "slim" and r.get("batch") == 256, 256)):
        predicted = _roofline_predictions(workload, batch)
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


def summarise(results_dir: Path, record: dict) -> str:
    env = _load(results_dir, "gpu_check") or {}
    lines = [f"# GPU check{' (DRY RUN: CPU, tiny shapes, interpreter; no number here measures a target)' if record['dry_run'] else ''}",
             "",
             f"Device {env.get('device')} (driver {env.get('driver')}), torch {env.get('torch')}, triton "
             f"{env.get('triton')}, CUDA {env.get('cuda')}, commit {env.get('commit')}, {env.get('date')}. "
             f"Budget: {record.get('used_s', 0):.0f} s used of {record['budget_s']:.0f} s.",
             "", "## Parts", "", "| part | what | status | seconds | limit (s) |", "| --- | --- | --- | ---: | ---: |"]
    for e in record["parts"]:
        lines.append(f"| {e['part']} | {e['what']} | {e['status']} | {e['seconds']:.1f} | {e['limit_s']:.0f} |")
    lines += ["", "## Correctness", ""]
    tests = _load(results_dir, "gpu_tests")
    if tests and tests["rows"]:
        t = tests["rows"][0]
        lines.append(f"- GPU tests (`pytest -m gpu`): {t['passed']} passed, {t['failed']} failed, {t['errors']} "
                     f"errors, {t['skipped']} skipped" + (f"; failed: {', '.join(t['failures'])}" if t["failures"] else ""))
    else:
        lines.append("- GPU tests: not run")
    selftest = _load(results_dir, "selftest")
    if selftest and selftest["rows"]:
        checked = [r for r in selftest["rows"] if not r.get("skipped")]
        failed = [f"{r['name']} {r['dtype']}" for r in checked if not r["passed"]]
        lines.append(f"- selftest ({selftest.get('where', '')}): {len(checked) - len(failed)} of {len(checked)} "
                     f"passed" + (f"; FAILED: {', '.join(failed)}" if failed else "")
                     + ("" if selftest.get("complete") else " (cut short)"))
    else:
        lines.append(f"- selftest: {(selftest or {}).get('status', 'not run')}")
    sanitizer = _load(results_dir, "sanitizer")
    if sanitizer and sanitizer["rows"] and "status" not in sanitizer:
        s = sanitizer["rows"][0]
        exit_status = f"exit {s['rc']}"
        lines.append(f"- compute-sanitizer memcheck: {s['error_summary'] or exit_status}")
    else:
        lines.append(f"- compute-sanitizer: {(sanitizer or {}).get('status', 'not run')}")
    targets, not_run = target_rows(results_dir)
    lines += ["", "## Targets (DESIGN.md section 6)", ""] + target_table(targets, record["dry_run"])
    search = _load(results_dir, "search_step")
    compiled = [r for r in (search or {}).get("rows", []) if r.get("bench") == "search_step"
                and r.get("variant") == "folded_sdpa_compile"]
    for r in compiled:
        lines.append(f"\ntorch.compile of {r['model']} bs {r['batch']}: first two steps (compilation) took "
                     f"{r['first_calls_s']:.1f} s, left out of its median ({r['median_ms']:.2f} ms).")
    if not_run:
        lines += ["", "Not run:", ""] + [f"- {n}" for n in not_run]
    lines += (["", "## Autotuned attention tiles (VITSLIM_AUTOTUNE=1 against the defaults)", ""]
              + autotune_lines(results_dir))
    lines += ["", "## Input pipeline (benchmarks.loader, synthetic ImageNet-like JPEGs)", ""] + loader_lines(results_dir)
    kernels = kernel_rows(results_dir)
    lines += ["", "## Measured vs the roofline model (our Triton kernels, ms per step)", ""]
    if kernels:
        lines += ["| workload | kernel | measured | predicted at the limits | measured / predicted |",
                  "| --- | --- | ---: | ---: | ---: |"]
        for workload, kernel, measured, predicted in kernels:
            ratio = measured / predicted if measured is not None and predicted > 0 else None
            lines.append(f"| {workload} | {kernel} | {_fmt(measured, '.3f')} | {predicted:.3f} | {_fmt(ratio)} |")
        if all(m is None for _, _, m, _ in kernels):
            lines += ["", "Nothing measured per kernel (the profiler runs on a GPU only)."]
    else:
        lines.append("No roofline model in benchmarks/results/roofline.json (python -m benchmarks.roofline).")
    return "\n".join(lines) + "\n"


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


def loader_lines(results_dir: Path) -> list[str]:
    """Images/s per pipeline and worker count, per core, and --loader gpu's device half."""
    result = _load(results_dir, "loader")
    if result is None:
        return ["Not run."]
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
    """The README's GPU section body, from the results files of results_dir."""
    record = _load(results_dir, "gpu_check")
    if record is None:
        return ("Not yet run on a GPU: `make gpu-check` on the GPU machine measures the targets above and "
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
    readme.write_text(between_markers(README.read_text(), README_BEGIN, README_END, readme_table(results_dir)))


# -- the command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole command, build included (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same orchestration on the CPU: no build, tiny shapes, Triton's interpreter")
    parser.add_argument("--results-dir", type=Path,
                        help="where the files go (default benchmarks/results; a dry run: a new temporary folder)")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES), metavar="PART",
                        help=f"the parts to run, of {', '.join(PART_NAMES)} (default: all, in that order)")
    parser.add_argument("--readme", action="store_true",
                        help="only regenerate the README's GPU table from the files in --results-dir")
    parser.add_argument("--run-part", choices=PART_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.run_part:
        ctx = PartContext(args.results_dir, args.dry_run, args.deadline or float("inf"))
        return run_part(args.run_part, ctx)
    if args.readme:
        write_readme_table(args.results_dir or RESULTS, README)
        print(f"regenerated the GPU table of {README} from {args.results_dir or RESULTS}")
        return 0
    if args.dry_run:
        if args.results_dir is not None and args.results_dir.resolve() == RESULTS.resolve():
            parser.error(f"a dry run never writes to {RESULTS}; give another --results-dir")
        results_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="vitslim-gpu-check-"))
        readme = results_dir / "README.md"
    else:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU visible: `make gpu-check` runs on the GPU machine "
                         "(--dry-run runs its orchestration on this CPU)")
        results_dir, readme = args.results_dir or RESULTS, README
    results_dir.mkdir(parents=True, exist_ok=True)
    return orchestrate(results_dir, args.budget_s, args.dry_run, tuple(args.parts), readme)


if __name__ == "__main__":
    sys.exit(main())
