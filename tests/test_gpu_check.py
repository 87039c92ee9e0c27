"""`python -m benchmarks.gpu_check` (make gpu-check): the whole GPU check's orchestration as a dry run on the CPU
(every part, every file and field, the README table), a run cut short by its budget, and the target arithmetic of
SUMMARY.md on hand-made results."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = {"device", "driver", "python", "torch", "triton", "cuda", "commit", "date"}


def run_dry(results_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--results-dir",
                           str(results_dir), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    results = gpu_check.RESULTS
    before = {p.name: p.stat().st_mtime for p in results.iterdir()} if results.exists() else {}
    readme_before = gpu_check.README.read_text()
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_dry(out)
    after = {p.name: p.stat().st_mtime for p in results.iterdir()} if results.exists() else {}
    return out, proc, before == after and readme_before == gpu_check.README.read_text()


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_dry_run_passes_every_part(dry_run):
    out, proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    record = load(out / "gpu_check.json")
    status = {r["part"]: r["status"] for r in record["rows"]}
    assert list(status) == list(gpu_check.PART_NAMES)
    assert status.pop("sanitizer") == "not run: dry run: no GPU"
    assert all(s == "ok" for s in status.values()), status
    assert record["dry_run"] is True and 0 < record["used_s"] <= record["budget_s"]
    assert all((out / r["log"]).exists() for r in record["rows"])


def test_dry_run_writes_every_file_with_its_fields(dry_run):
    out, _, _ = dry_run
    for part in gpu_check.PARTS:
        data = load(out / part.results)
        assert PROVENANCE <= set(data), (part.results, set(data))
        assert data["dry_run"] is True and data.get("complete", True) is True, part.results
    search = load(out / "search_step.json")["rows"]
    assert {r["variant"] for r in search if r["bench"] == "search_step"} == set(
        ("fused", "folded_sdpa", "paper_eager", "folded_sdpa_compile"))
    (summary,) = [r for r in search if r["bench"] == "summary" and r["of"] == "search_step"]
    speedups = [k for k in summary["targets"] if k.startswith("speedup")]  # (peak memory: CUDA only)
    assert len(speedups) == 3 and all(summary[k] > 0 for k in speedups)
    ragged = load(out / "ragged_attention.json")["rows"]
    assert {(r["mode"], r["variant"]) for r in ragged} == {(m, v) for m in ("fwd", "fwd_bwd")
                                                          for v in ("ragged", "padded_sdpa", "grouped_sdpa")}
    inference = load(out / "slim_inference.json")
    assert {r["variant"] for r in inference["rows"]} == {"dense", "slim", "summary"}
    assert inference["not_run"] == ["P3 dense_cuda_graphs, slim_cuda_graphs: not run: CUDA graphs need a GPU"]
    retrain = {r["variant"]: r for r in load(out / "retrain_step.json")["rows"]}
    assert set(retrain) == {"dense", "slim", "paper_masked"}
    assert retrain["slim"]["flops_ratio_vs_dense"] > 1 and retrain["slim"]["speedup_vs_paper_masked"] > 0
    selftest = load(out / "selftest.json")["rows"]
    assert selftest and all(r["passed"] for r in selftest)
    (tests,) = load(out / "gpu_tests.json")["rows"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0  # -m gpu collects; no GPU: skips
    assert "extension vitslim_kernels._C" in (out / "info.txt").read_text()


def test_dry_run_writes_the_summary_and_regenerates_the_readme_table(dry_run):
    out, _, untouched = dry_run
    summary = (out / "SUMMARY.md").read_text()
    assert "DRY RUN" in summary
    for heading in ("## Parts", "## Correctness", "## Targets (DESIGN.md section 6)", "## Measured vs the roofline"):
        assert heading in summary
    for target in ("| P1 | fused vs paper_eager", "| P2 | ragged vs padded_sdpa", "| P3 | slim vs dense throughput",
                   "| P4 | slim vs the paper's masked retrain"):
        assert target in summary, target
    readme, original = (out / "README.md").read_text(), gpu_check.README.read_text()
    begin, end = readme.index(gpu_check.README_BEGIN), readme.index(gpu_check.README_END)
    assert "**Dry run**" in readme[begin:end] and "| P4 |" in readme[begin:end]
    assert readme[:begin] == original[:original.index(gpu_check.README_BEGIN)]
    assert readme[end:] == original[original.index(gpu_check.README_END):]
    assert untouched, "a dry run wrote to benchmarks/results or README.md"


def test_a_run_cut_short_by_its_budget_exits_cleanly_and_says_what_did_not_run(tmp_path):
    proc = run_dry(tmp_path, "--budget-s", "5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    record = load(tmp_path / "gpu_check.json")
    status = [r["status"] for r in record["rows"]]
    assert len(status) == len(gpu_check.PARTS) and status[-1] == "not run: budget"
    assert all(s == "ok" or s.startswith(("timeout", "not run: budget")) for s in status), status
    assert record["used_s"] < 5 + 10
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert summary.count("not run: budget") >= status.count("not run: budget")
    assert "| P1 | search step | - | - | not measured |" in summary


def test_a_dry_run_refuses_to_write_to_benchmarks_results(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--dry-run", "--results-dir", str(gpu_check.RESULTS)])
    assert exit_.value.code == 2 and "never writes to" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_the_gpu_run_says_there_is_no_gpu(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([])
    assert exit_.value.code == 2 and "no CUDA GPU visible" in capsys.readouterr().err


def test_a_bad_budget_is_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--budget-s", "-3"])
    assert "--budget-s must be a positive number of seconds, got -3.0" in capsys.readouterr().err


def test_a_crashing_part_is_a_failure_and_the_exit_status_says_so(tmp_path, monkeypatch, capsys):
    def crash(ctx):
        raise RuntimeError("kernel exploded")
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "P2", crash)
    assert gpu_check.run_part("P2", gpu_check.PartContext(tmp_path, True, float("inf"))) == 1
    assert f"{gpu_check.STATUS_PREFIX}failed: RuntimeError: kernel exploded" in capsys.readouterr().out

    def fake_child(part, results_dir, dry_run, limit_s, log_dir):
        status = "failed: 2 failed, 0 errors" if part.name == "tests" else "ok"
        return {"part": part.name, "what": part.what, "status": status, "seconds": 0.1, "limit_s": limit_s,
                "log": ""}
    monkeypatch.setattr(gpu_check, "run_child", fake_child)
    readme = tmp_path / "README.md"
    assert gpu_check.orchestrate(tmp_path, 60, True, gpu_check.PART_NAMES, readme) == 1
    assert "FAILED: tests" in capsys.readouterr().out


def _write(results_dir: Path, name: str, rows: list[dict], **extra) -> None:
    (results_dir / f"{name}.json").write_text(json.dumps({"rows": rows, **extra}))


def test_targets_are_judged_from_the_measured_ratios(tmp_path):
    _write(tmp_path, "search_step", [
        {"bench": "summary", "of": "search_step", "model": "deit_small_patch16_224", "batch": 256,
         "speedup_vs_paper_eager": 3.2, "speedup_vs_folded_sdpa": 1.1, "peak_mem_ratio_vs_paper_eager": 0.4,
         "targets": {"speedup_vs_paper_eager": 3.0, "speedup_vs_folded_sdpa": 1.25,
                     "speedup_vs_folded_sdpa_compile": 1.05, "peak_mem_ratio_vs_paper_eager": 0.5}}],
        not_run=["P1 deit_base_patch16_224 bs128 fused: not run: budget"])
    base = {"model": "deit_small", "batch": 256, "mode": "fwd"}
    _write(tmp_path, "ragged_attention", [
        {**base, "variant": "ragged", "implementation": "triton", "dispatch_default": True, "median_ms": 1.0},
        {**base, "variant": "ragged", "implementation": "cuda", "dispatch_default": False, "median_ms": 9.0},
        {**base, "variant": "padded_sdpa", "median_ms": 1.2}, {**base, "variant": "grouped_sdpa", "median_ms": 1.5}])
    _write(tmp_path, "slim_inference", [
        {"batch": 256, "variant": "summary", "best_speedup_vs_dense": 1.5, "flops_ratio_vs_dense": 1.6},
        {"batch": 1, "variant": "summary", "best_speedup_vs_dense": 0.95, "flops_ratio_vs_dense": 1.6}])
    _write(tmp_path, "retrain_step", [{"variant": "slim", "speedup_vs_dense": 1.2, "flops_ratio_vs_dense": 1.6,
                                      "speedup_vs_paper_masked": 3.5}])
    rows, not_run = gpu_check.target_rows(tmp_path)
    holds = {(r.id, r.what.split(",")[0].split(" (")[0]): r.holds for r in rows}
    assert holds == {
        ("P1", "fused vs paper_eager"): "yes", ("P1", "fused vs folded_sdpa"): "no",
        ("P1", "fused vs folded_sdpa_compile"): "not measured", ("P1", "peak memory / paper_eager"): "yes",
        ("P2", "ragged vs padded_sdpa"): "no", ("P2", "ragged vs grouped_sdpa"): "yes",  # 1.2x, 1.5x
        ("P3", "slim vs dense throughput"): "yes", ("P3", "slim vs dense latency"): "no",
        ("P4", "slim vs dense retrain step"): "no", ("P4", "slim vs the paper's masked retrain step"): "yes"}
    assert not_run == ["P1 deit_base_patch16_224 bs128 fused: not run: budget"]


def test_measured_kernel_times_meet_the_roofline_predictions_by_name(tmp_path):
    predicted = gpu_check._roofline_predictions("search step", 256)
    if not predicted:
        pytest.skip("no benchmarks/results/roofline.json")
    kernel = next(iter(predicted))
    _write(tmp_path, "search_step", [{"bench": "search_step", "variant": "fused", "model": "deit_small_patch16_224",
                                     "batch": 256, "kernel_ms": {f"_{kernel}": {"ms": 2.5, "launches": 12}}}])
    rows = {k: (m, p) for w, k, m, p in gpu_check.kernel_rows(tmp_path) if "search" in w}
    assert rows[kernel] == (2.5, predicted[kernel])
    assert all(m is None for k, (m, _) in rows.items() if k != kernel)


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
