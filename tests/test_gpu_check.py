"""`python -m benchmarks.gpu_check` (make gpu-check): the whole GPU check's orchestration as a dry run on the CPU
(every part, every file and field), a simulated lease (the three files in $OUT after every part, after a SIGTERM
at several points, never more than a lent machine brings back), runs cut by their budget, --continue and
--publish, and the target arithmetic of SUMMARY.md on hand-made results."""
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = {"device", "driver", "python", "torch", "triton", "cuda", "commit", "date"}
OUT_LIMITS = {"files": 8, "bytes": 16 << 20, "depth": 2}  # what a lent machine brings back of $OUT


def dry_command(results_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--results-dir", str(results_dir), *args]


def run_dry(results_dir: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    env = _env(out)
    return subprocess.run(dry_command(results_dir, *args), cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env=env)


def _env(out: Path | None) -> dict:
    import os
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return env


def tracked_results_state() -> tuple[dict, str]:
    results = gpu_check.RESULTS
    return ({p.name: p.stat().st_mtime for p in results.iterdir()} if results.exists() else {},
            gpu_check.README.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    before = tracked_results_state()
    out = tmp_path_factory.mktemp("gpu_check")
    lease = tmp_path_factory.mktemp("OUT")
    proc = run_dry(out / "run", "--budget-s", "900", out=lease)  # room for a slow machine: every part must run
    return out / "run", proc, lease, before == tracked_results_state()


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_out_comes_back(out: Path) -> dict:
    """$OUT as a lent machine returns it: at most 8 files, none over 16 MiB or more than two folders down; the
    three files; a valid gpu_check.json, returned."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= OUT_LIMITS["files"], files
    assert all(p.stat().st_size <= OUT_LIMITS["bytes"] for p in files)
    assert all(len(p.relative_to(out).parts) <= OUT_LIMITS["depth"] + 1 for p in files)
    assert {p.name for p in files} == set(gpu_check.OUT_FILES), files
    with tarfile.open(out / "gpu_check.tgz", "r:gz") as tar:
        assert "gpu_check/gpu_check.json" in tar.getnames()
    return load(out / "gpu_check.json")


def test_dry_run_passes_every_part(dry_run):
    out, proc, _, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = load(out / "gpu_check.json")
    status = {r["part"]: r["status"] for r in record["rows"]}
    assert list(status) == list(gpu_check.PART_NAMES)
    assert status.pop("sanitizer") == "not run: dry run: no GPU"
    assert all(s == "ok" for s in status.values()), status
    assert record["dry_run"] is True and record["finished"] is True and record["stopped"] is None
    # the selftest under the interpreter: every Triton case, each dtype within its bound or skipped with its reason
    from vitslim_kernels import selftest
    checks = load(out / "selftest.json")["rows"]
    assert {c["name"] for c in checks} >= {name for name, _, impl, _ in selftest.CASES if impl == "triton"}
    assert all(c["passed"] and (c["skipped"] or c["error"] <= c["bound"]) for c in checks), checks
    assert 0 < record["used_s"] <= record["budget_s"]
    assert all((out / r["log"]).exists() for r in record["rows"])


def test_dry_run_brings_back_the_three_files_and_touches_nothing_tracked(dry_run):
    out, _, lease, untouched = dry_run
    combined = assert_out_comes_back(lease)
    assert combined["rows"] == load(out / "gpu_check.json")["rows"]
    assert set(combined["results"]) >= {Path(p.results).stem for p in gpu_check.PARTS if p.results}
    assert (lease / "SUMMARY.md").read_text() == (out / "SUMMARY.md").read_text()
    with tarfile.open(lease / "gpu_check.tgz", "r:gz") as tar:
        names = set(tar.getnames())
    assert {f"gpu_check/{p.results}" for p in gpu_check.PARTS} <= names
    assert {f"gpu_check/logs/{p.name}.log" for p in gpu_check.PARTS} <= names
    assert untouched, "a dry run wrote to benchmarks/results or README.md"


def test_dry_run_writes_every_file_with_its_fields(dry_run):
    out, _, _, _ = dry_run
    for part in gpu_check.PARTS:
        data = load(out / part.results)
        assert PROVENANCE <= set(data), (part.results, set(data))
        assert data["dry_run"] is True and data.get("complete", True) is True, part.results
    search = load(out / "search_step.json")["rows"]
    assert {r["variant"] for r in search if r["bench"] == "search_step"} == {"fused", "folded_sdpa", "paper_eager"}
    assert {r["variant"]: r["sdpa_backend"] for r in search if r["bench"] == "search_step"} == {
        "fused": None, "paper_eager": None, "folded_sdpa": "flash"}
    (summary,) = [r for r in search if r["bench"] == "summary" and r["of"] == "search_step"]
    assert {k for k in summary if k.startswith("speedup")} == {"speedup_vs_paper_eager", "speedup_vs_folded_sdpa"}
    compiled = load(out / "search_step_compile.json")["rows"]
    assert {r["variant"] for r in compiled if r["bench"] == "search_step"} == {"folded_sdpa_compile"}
    (summary,) = [r for r in compiled if r["bench"] == "summary" and r["of"] == "search_step"]
    assert summary["speedup_vs_folded_sdpa_compile"] > 0  # against the fused row P1 measured in this run
    ragged = load(out / "ragged_attention.json")["rows"]
    assert {(r["mode"], r["variant"]) for r in ragged} == {(m, v) for m in ("fwd", "fwd_bwd")
                                                          for v in ("ragged", "padded_sdpa", "grouped_sdpa")}
    assert all(r["sdpa_backend"] for r in ragged if r["variant"] != "ragged")
    assert all(r["packed_qkv"] for r in ragged if r["variant"] == "ragged" and r["mode"] == "fwd_bwd"
               and r["implementation"] == "triton")
    inference = load(out / "slim_inference.json")
    assert {r["variant"] for r in inference["rows"]} == {"dense", "slim", "dense_compile", "summary"}
    assert [r["batch"] for r in inference["rows"] if r["variant"] == "dense_compile"] == [2]  # the largest only
    assert inference["not_run"] == ["P3 dense_cuda_graphs, slim_cuda_graphs: not run: CUDA graphs need a GPU"]
    retrain = {r["variant"]: r for r in load(out / "retrain_step.json")["rows"]}
    assert set(retrain) == {"dense", "slim", "paper_masked", "dense_compile"}
    assert retrain["slim"]["flops_ratio_vs_dense"] > 1 and retrain["slim"]["speedup_vs_paper_masked"] > 0
    assert retrain["slim"]["speedup_vs_dense_compile"] > 0 and retrain["dense_compile"]["first_call_s"] > 0
    assert retrain["dense"]["sdpa_backend"] == "flash" and retrain["slim"]["sdpa_backend"] is None
    swin = load(out / "swin.json")["rows"]
    assert {(r["bench"], r["variant"]) for r in swin} == {
        *(("search_step", v) for v in ("fused", "folded_sdpa", "paper_eager")),
        *(("window_attention", v) for v in ("window", "padded_sdpa", "grouped_sdpa")),
        *((b, v) for b in ("slim_inference", "retrain_step") for v in ("dense", "slim"))}
    fused = next(r for r in swin if r["bench"] == "search_step" and r["variant"] == "fused")
    assert fused["speedup_vs_folded_sdpa"] > 0 and fused["speedup_vs_paper_eager"] > 0
    assert all(r["speedup_vs_padded_sdpa"] > 0 for r in swin if r["variant"] == "window")
    assert all(r["flops_ratio_vs_dense"] > 1 for r in swin if r["variant"] == "slim")
    selftest = load(out / "selftest.json")["rows"]
    assert selftest and all(r["passed"] for r in selftest)
    assert [case[2] for case in gpu_check.selftest_cases()][:2] == ["cuda", "triton"]  # (no GPU here: no row)
    (tests,) = load(out / "gpu_tests.json")["rows"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] == tests["collected"] > 0
    assert len(tests["buckets_done"]) == tests["buckets"] > 1
    limits = load(out / "limits.json")["limits"]
    assert limits["device"] == "cpu" and limits["measured"]["bf16_matmul_tflops"] > 0
    assert "extension vitslim_kernels._C" in (out / "info.txt").read_text()


def test_dry_run_writes_the_summary_and_a_readme_table_on_request(dry_run, tmp_path):
    out, _, _, _ = dry_run
    summary = (out / "SUMMARY.md").read_text()
    assert "DRY RUN" in summary and "Correctness: every correctness part that ran passed." in summary
    for heading in ("## Parts", "## Correctness", "## Targets (docs/design.md section 6)", "## Not run",
                    "## Device limits", "## Measured vs the roofline"):
        assert heading in summary
    for target in ("| P1 | fused vs paper_eager", "| P1 | fused vs folded_sdpa_compile", "| P2 | ragged vs padded_sdpa",
                   "| P3 | slim vs dense throughput", "| P3 | slim vs torch.compile'd dense",
                   "| P4 | slim vs the paper's masked retrain", "| P4 | slim vs torch.compile'd dense"):
        assert target in summary, target
    assert "- sanitizer: not run: dry run: no GPU" in summary
    readme = tmp_path / "README.md"
    shutil.copyfile(gpu_check.README, readme)
    gpu_check.write_readme_table(out, readme)
    text, original = readme.read_text(), gpu_check.README.read_text()
    begin, end = text.index(gpu_check.README_BEGIN), text.index(gpu_check.README_END)
    assert "**Dry run**" in text[begin:end] and "| P4 |" in text[begin:end]
    assert text[:begin] == original[:original.index(gpu_check.README_BEGIN)]
    assert text[end:] == original[original.index(gpu_check.README_END):]


def _kill_when(cmd: list[str], out: Path, trigger: str | float) -> tuple[int, str]:
    """Start cmd, send SIGTERM once `trigger` (a line prefix) is printed or after `trigger` seconds; returns
    (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    if isinstance(trigger, float):
        time.sleep(trigger)
    else:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(trigger):
                time.sleep(1.0)  # into the part
                break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, "".join(lines) + rest


@pytest.mark.parametrize("trigger, running, correctness", [
    (1.0, None, "selftest"),                          # while torch imports, before any part
    ("gpu_check: selftest (", "selftest", "selftest"),  # inside a part
    ("gpu_check: P2 (", "P2", "build"),               # inside a later part, earlier ones (the quicker) finished
])
def test_a_stopped_run_still_brings_back_the_three_files(tmp_path, trigger, running, correctness):
    out = tmp_path / "OUT"
    parts = ["limits", correctness, "P2"]
    code, output = _kill_when(dry_command(tmp_path / "run", "--parts", *parts), out, trigger)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    record = assert_out_comes_back(out)
    assert record["stopped"] == "SIGTERM" and record["finished"] is False
    status = {r["part"]: r["status"] for r in record["rows"]}
    assert list(status) == parts
    if running is not None:
        assert status[running].startswith("stopped: SIGTERM arrived while it ran")
    later = list(status)[list(status).index(running) + 1:] if running else list(status)
    assert all(status[p] == "not run: stopped by SIGTERM" for p in later), status
    if running == "P2":
        assert status["limits"] == status[correctness] == "ok"
    summary = (out / "SUMMARY.md").read_text()
    assert "**Stopped by SIGTERM**" in summary
    assert all(f"- {p}: not run: stopped by SIGTERM" in summary for p in later)  # in its "Not run" list
    # stopped before it passed: a failure
    assert (f"**Correctness: FAILED: {correctness}**" in summary) == (running != "P2")
    leftover = subprocess.run(["pgrep", "-f", f"--results-dir {tmp_path / 'run'}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "a part's process outlived the stop"


def test_a_correctness_part_that_times_out_fails_the_run(tmp_path):
    out = tmp_path / "OUT"
    proc = run_dry(tmp_path / "run", "--parts", "selftest", "--budget-s", "6", out=out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = assert_out_comes_back(out)
    (entry,) = record["rows"]
    assert entry["status"].startswith("timeout: killed at its 4 s limit")
    assert "**Correctness: FAILED: selftest**" in (out / "SUMMARY.md").read_text()
    assert "FAILED: selftest" in proc.stdout


def test_a_run_cut_short_by_its_budget_says_what_did_not_run(tmp_path):
    proc = run_dry(tmp_path / "run", "--budget-s", "5")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]  # the correctness parts were cut
    record = load(tmp_path / "run" / "gpu_check.json")
    status = [r["status"] for r in record["rows"]]
    assert len(status) == len(gpu_check.PARTS) and status[-1] == "not run: budget"
    assert all(s == "ok" or s.startswith(("timeout", "not run: budget")) for s in status), status
    assert record["used_s"] < 5 + 10
    summary = (tmp_path / "run" / "SUMMARY.md").read_text()
    assert summary.count("not run: budget") >= status.count("not run: budget")
    assert "| P1 | search step | - | - | not measured |" in summary
    assert "**Correctness: FAILED: build, selftest, tests, sanitizer**" in summary


def test_continue_adds_parts_to_an_earlier_run_of_the_same_device_and_commit(dry_run, tmp_path):
    out, _, _, _ = dry_run
    again = tmp_path / "run"
    shutil.copytree(out, again)
    first = load(again / "gpu_check.json")
    proc = run_dry(again, "--continue", "--parts", "limits", "--commit", first["commit"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = load(again / "gpu_check.json")
    assert [r["part"] for r in record["rows"]] == list(gpu_check.PART_NAMES)  # the earlier parts stand
    assert record["rows"][1:] == first["rows"][1:] and record["used_before_s"] >= first["used_s"]
    proc = run_dry(again, "--continue", "--parts", "limits", "--commit", "0123abc")
    assert proc.returncode == 2 and "start a new run instead" in proc.stderr
    proc = run_dry(again, "--parts", "limits")
    assert proc.returncode == 2 and "is not empty: a run writes to a fresh folder" in proc.stderr


def test_publish_copies_a_finished_gpu_run_and_refuses_the_rest(dry_run, tmp_path):
    out, _, lease, _ = dry_run
    with pytest.raises(ValueError, match="is a dry run"):
        gpu_check.publish_results(out, tmp_path / "results", tmp_path / "README.md")
    gpu_run = tmp_path / "gpu_run"
    shutil.copytree(out, gpu_run)
    record = load(gpu_run / "gpu_check.json")
    (gpu_run / "gpu_check.json").write_text(json.dumps({**record, "dry_run": False, "device": "NVIDIA H100 80GB HBM3"}))
    readme = tmp_path / "README.md"
    shutil.copyfile(gpu_check.README, readme)
    written = gpu_check.publish_results(gpu_run, tmp_path / "results", readme)
    assert {p.name for p in written} >= {"search_step.json", "retrain_step.json", "gpu_check.json", "SUMMARY.md"}
    table = readme.read_text()
    assert "on NVIDIA H100 80GB HBM3" in table and "**Dry run**" not in table
    # the archive a lent machine brings back publishes the same way
    archive = tmp_path / "gpu_check.tgz"
    archive.write_bytes(gpu_check.results_archive(gpu_run))
    assert {p.name for p in gpu_check.publish_results(archive, tmp_path / "results2", readme)} == {
        p.name for p in written}
    (gpu_run / "gpu_check.json").write_text(json.dumps({**record, "dry_run": False, "finished": False,
                                                        "stopped": "SIGTERM"}))
    with pytest.raises(ValueError, match="did not finish"):
        gpu_check.publish_results(gpu_run, tmp_path / "results3", readme)
    with pytest.raises(ValueError, match="dry run"):
        gpu_check.publish_results(lease / "gpu_check.tgz", tmp_path / "results4", readme)


def test_the_archive_stays_under_what_comes_back(tmp_path):
    import os
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tests_0.log").write_bytes(os.urandom(24 << 20))  # 24 MiB that do not compress
    (tmp_path / "logs" / "tests_1.log").write_bytes(b"x" * 100 + b"the end\n")
    (tmp_path / "search_step.json").write_text("{}")
    data = gpu_check.results_archive(tmp_path)
    assert len(data) <= gpu_check.TGZ_TARGET_BYTES
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert tar.extractfile("gpu_check/logs/tests_1.log").read().endswith(b"the end\n")
        assert tar.extractfile("gpu_check/logs/tests_0.log").read().startswith(b"[... cut: the first")
        assert tar.extractfile("gpu_check/search_step.json").read() == b"{}"


def test_a_run_never_writes_into_benchmarks_results(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--dry-run", "--results-dir", str(gpu_check.RESULTS / "run")])
    assert exit_.value.code == 2 and "never writes into" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_the_gpu_run_says_there_is_no_gpu(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([])
    assert exit_.value.code == 2 and "no CUDA GPU visible" in capsys.readouterr().err


def test_a_bad_budget_is_one_line_and_the_callers_signal_handlers_come_back(capsys):
    before = {sig: signal.getsignal(sig) for sig in gpu_check.STOP_SIGNALS}
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--budget-s", "-3"])
    assert "--budget-s must be a positive number of seconds, got -3.0" in capsys.readouterr().err
    assert {sig: signal.getsignal(sig) for sig in gpu_check.STOP_SIGNALS} == before


def test_a_crashing_part_is_a_failure_and_the_exit_status_says_so(tmp_path, monkeypatch, capsys):
    def crash(ctx):
        raise RuntimeError("kernel exploded")
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "P2", crash)
    assert gpu_check.run_part("P2", gpu_check.PartContext(tmp_path, True, float("inf"))) == 1
    assert f"{gpu_check.STATUS_PREFIX}failed: RuntimeError: kernel exploded" in capsys.readouterr().out

    def fake_child(part, run, limit_s):
        status = "failed: 2 failed, 0 errors" if part.name == "tests" else "ok"
        return {"part": part.name, "what": part.what, "status": status, "seconds": 0.1, "limit_s": limit_s,
                "log": ""}
    monkeypatch.setattr(gpu_check, "run_child", fake_child)
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.orchestrate(tmp_path, 60, True, gpu_check.PART_NAMES) == 1
    assert "FAILED: tests" in capsys.readouterr().out
    assert "**Correctness: FAILED: tests**" in (tmp_path / "SUMMARY.md").read_text()


def _write(results_dir: Path, name: str, rows: list[dict], **extra) -> None:
    (results_dir / f"{name}.json").write_text(json.dumps({"rows": rows, **extra}))


def test_targets_are_judged_from_the_measured_ratios(tmp_path):
    targets = {"speedup_vs_paper_eager": 3.0, "speedup_vs_folded_sdpa": 1.25, "speedup_vs_folded_sdpa_compile": 1.05,
               "peak_mem_ratio_vs_paper_eager": 0.5}
    summary = {"bench": "summary", "of": "search_step", "model": "deit_small_patch16_224", "batch": 256,
               "targets": targets}
    _write(tmp_path, "search_step", [{**summary, "speedup_vs_paper_eager": 3.2, "speedup_vs_folded_sdpa": 1.1,
                                      "peak_mem_ratio_vs_paper_eager": 0.4}],
           not_run=["P1 deit_base_patch16_224 bs128 fused: not run: budget"])
    _write(tmp_path, "search_step_compile", [{**summary, "speedup_vs_paper_eager": 9.9,  # P1's file decides this
                                              "speedup_vs_folded_sdpa_compile": 1.07}])
    base = {"model": "deit_small", "batch": 256, "mode": "fwd"}
    _write(tmp_path, "ragged_attention", [
        {**base, "variant": "ragged", "implementation": "triton", "dispatch_default": True, "median_ms": 1.0},
        {**base, "variant": "ragged", "implementation": "cuda", "dispatch_default": False, "median_ms": 9.0},
        {**base, "variant": "padded_sdpa", "median_ms": 1.2}, {**base, "variant": "grouped_sdpa", "median_ms": 1.5}])
    _write(tmp_path, "slim_inference", [
        {"batch": 256, "variant": "summary", "best_speedup_vs_dense": 1.5, "flops_ratio_vs_dense": 1.6,
         "speedup_vs_dense_compile": 1.3},
        {"batch": 1, "variant": "summary", "best_speedup_vs_dense": 0.95, "flops_ratio_vs_dense": 1.6}])
    _write(tmp_path, "retrain_step", [{"variant": "slim", "speedup_vs_dense": 1.2, "flops_ratio_vs_dense": 1.6,
                                      "speedup_vs_paper_masked": 3.5}])
    rows, not_run = gpu_check.target_rows(tmp_path)
    holds = {(r.id, r.what.split(",")[0].split(" (")[0]): r.holds for r in rows}
    assert holds == {
        ("P1", "fused vs paper_eager"): "yes", ("P1", "fused vs folded_sdpa"): "no",
        ("P1", "fused vs folded_sdpa_compile"): "yes", ("P1", "peak memory / paper_eager"): "yes",
        ("P2", "ragged vs padded_sdpa"): "no", ("P2", "ragged vs grouped_sdpa"): "yes",  # 1.2x, 1.5x
        ("P3", "slim vs dense throughput"): "yes", ("P3", "slim vs dense latency"): "no",
        ("P3", "slim vs torch.compile'd dense"): "-",
        ("P4", "slim vs dense retrain step"): "no", ("P4", "slim vs the paper's masked retrain step"): "yes"}
    assert next(r.measured for r in rows if r.what.startswith("fused vs paper_eager")) == 3.2
    assert not_run == ["P1 deit_base_patch16_224 bs128 fused: not run: budget"]


def test_measured_kernel_times_meet_the_roofline_predictions_at_this_runs_limits(tmp_path):
    predicted = gpu_check._roofline_predictions("search step", 256)
    if not predicted:
        pytest.skip("no benchmarks/results/roofline.json")
    kernel = next(iter(predicted))
    _write(tmp_path, "search_step", [{"bench": "search_step", "variant": "fused", "model": "deit_small_patch16_224",
                                     "batch": 256, "kernel_ms": {f"_{kernel}": {"ms": 2.5, "launches": 12}}}])
    rows = {k: (m, p) for w, k, m, p in gpu_check.kernel_rows(tmp_path) if "search" in w}
    assert rows[kernel] == (2.5, predicted[kernel])  # no limits measured: the roofline's own
    assert all(m is None for k, (m, _) in rows.items() if k != kernel)
    roofline = json.loads((gpu_check.RESULTS / "roofline.json").read_text())
    half = {"bf16_matmul_tflops": roofline["limits"]["peak_tflops"] / 2,
            "copy_tb_per_s": roofline["limits"]["bandwidth_tbs"] / 2}
    _write(tmp_path, "limits", [half], limits={"device": "NVIDIA H100 80GB HBM3", "measured": half})
    rescaled = {k: p for w, k, _, p in gpu_check.kernel_rows(tmp_path) if "search" in w}
    # a bf16 Triton kernel at half the rates takes twice as long (up to the fp32 terms the totals cannot split)
    assert rescaled[kernel] == pytest.approx(2 * predicted[kernel], rel=0.05)


def test_the_loader_lines_report_only_this_devices_loader(tmp_path):
    _write(tmp_path, "loader", [], device="cpu", cores=2, batch_size=8)
    assert gpu_check.loader_lines(tmp_path, "NVIDIA H100 80GB HBM3") == [
        "Not run on this device (the loader.json there was measured on cpu)."]
    assert gpu_check.loader_lines(tmp_path, "cpu")[0] == "2 cores, batch 8."


def test_the_benchmark_plan_is_shaped_like_a_trained_search():
    """P2-P4's DeiT-S plan: wide early blocks, narrow late ones, whole heads pruned, not an even spread."""
    from benchmarks import run_slim_benchmarks as slim
    _, plan = slim.plan_for(slim.ModelConfig("deit_small", "deit_small_patch16_224"))
    widths = slim.head_widths(plan)
    kept = [sum(w) for w in widths]
    assert kept[0] > 300 and kept[-1] < 160 and kept[0] > 2 * kept[-1], kept
    heads = [w for block in widths for w in block]
    assert heads.count(0) >= 4 and max(heads) >= 60 and min(w for w in heads if w) <= 25, widths


def test_gpu_test_files_are_split_evenly():
    buckets = gpu_check._test_buckets({"a": 39, "b": 20, "c": 6, "d": 2}, 3)
    assert sorted(map(sorted, buckets)) == [["a"], ["b"], ["c", "d"]]
    assert gpu_check._test_buckets({"a": 1}, 4) == [["a"]]
    assert gpu_check._test_buckets({}, 4) == []


def test_the_time_plan_fits_a_lent_machines_call():
    """The default budget leaves a 600 s call room for the summary and a slow start; the parts' expected H100
    times, in order, put the torch.compile rows, the loader and the Swin rows last, where the budget cuts first
    (issue 25: the Swin rows are cut first)."""
    assert gpu_check.DEFAULT_BUDGET_S + gpu_check.SUMMARY_RESERVE_S[False] <= 600 - 90
    order = list(gpu_check.PART_NAMES)
    assert order[:5] == ["limits", "build", "selftest", "tests", "sanitizer"]
    assert order.index("P1-compile") > order.index("P4") and order[-2:] == ["loader", "swin"]
