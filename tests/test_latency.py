"""Latency targets: the device's latency table (measured, fitted, cached) and plan_for(latency_ms=...). The
search over plans is pinned with a stand-in timer whose "milliseconds" are an exact function of the slim model's
MACs, so the fit must be exact and the plan the first along the mix within the target; one test times for real."""
import json

import pytest
import torch

import vitslim
from vitslim import latency
from vitslim.latency import NoisyTableError, _fit_non_negative, latency_table
from vitslim.planning import TargetError, plan_for

from .tiny_models import make_swin, make_vit, randomize_gates


@pytest.fixture
def model():
    m = vitslim.make_searchable(make_vit(dtype=torch.float32))
    randomize_gates(m)
    return m


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(latency, "GRID", (0.5, 1.0))


def fake_ms(net, batch_size, device, **_):
    """A stand-in timer: 0.2 ms plus 1 ms per million MACs of the batch."""
    return 0.2 + vitslim.count_flops(net, batch_size) * 1e-6


def test_the_fit_recovers_known_costs_and_never_goes_negative():
    rows = [[1.0, t, t * w, t * m, t * t * w] for t in (5, 9, 17) for w in (4, 8, 16) for m in (8, 32)]
    truth = [0.3, 0.0, 2e-3, 5e-4, 1e-5]
    ms = [sum(c * f for c, f in zip(truth, row)) for row in rows]
    assert _fit_non_negative(rows, ms) == pytest.approx(truth, rel=1e-6, abs=1e-12)
    tilted = [y - 1e-3 * row[1] for y, row in zip(ms, rows)]  # a negative per-token cost is not a cost
    assert all(c >= 0 for c in _fit_non_negative(rows, tilted))


def test_the_table_is_measured_once_and_cached_per_batch_size(model, small_grid, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_forward_ms", fake_ms)
    table = latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False)
    assert len(table.samples) == 8 and table.max_fit_error < 1e-9  # fake_ms is linear in the features
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["batch_size"] == 2

    def no_measuring(*a, **k):
        raise AssertionError("measured again although the table is cached")
    monkeypatch.setattr(latency, "measure_table", no_measuring)
    again = latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path)
    assert again.coefficients == table.coefficients
    with pytest.raises(LookupError, match="no latency table for cpu.* at batch 3"):
        latency_table(model, torch.device("cpu"), 3, cache_dir=tmp_path, measure=False)


def test_a_latency_target_gives_the_first_plan_within_it(model, small_grid, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_forward_ms", fake_ms)
    dense_ms = fake_ms(vitslim.slim(model, vitslim.threshold(model, 1.0, 1.0, 1.0)), 2, None)
    goal = 0.6 * dense_ms
    plan = plan_for(model, latency_ms=goal, batch_size=2, cache_dir=tmp_path)
    t = plan.target
    measured = fake_ms(vitslim.slim(model, plan), 2, None)
    assert t["predicted_ms"] == pytest.approx(measured, rel=1e-9) and t["measured_ms"] == pytest.approx(measured)
    assert measured <= goal and t["dense_predicted_ms"] == pytest.approx(dense_ms, rel=1e-9)
    # One step earlier along the mix (one more MLP unit kept) is over the target.
    counts = vitslim.planning.gate_ranking(model).counts()
    fraction = (t["step"] - 1 + 0.5) / counts["mlp"]
    before = vitslim.threshold(model, *(1 - fraction,) * 3)
    assert fake_ms(vitslim.slim(model, before), 2, None) > goal


def test_a_latency_target_without_a_table_and_no_measuring_is_one_line(model, tmp_path):
    with pytest.raises(TargetError, match=r"no latency table for cpu.*measure one first"):
        plan_for(model, latency_ms=1.0, measure=False, cache_dir=tmp_path)


def test_a_noisy_table_is_refused_not_cached_and_remeasure_measures_again(model, small_grid, tmp_path,
                                                                          monkeypatch):
    calls = []

    def noisy_ms(net, batch_size, device, **_):  # every other timing 30x slower: another job on the machine
        calls.append(torch.get_num_threads())
        return fake_ms(net, batch_size, device) * (30.0 if len(calls) % 2 else 1.0)
    monkeypatch.setattr(latency, "time_forward_ms", noisy_ms)
    with pytest.raises(NoisyTableError, match=r"not cached: its fit misses a sample by \d+% \(bound 50%; samples "
                                              r".*too noisy to trust.*--remeasure"):
        latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [] and len(calls) > 8  # the worst samples were timed a second time
    assert set(calls) == {torch.get_num_threads()}
    with pytest.raises(TargetError, match="too noisy to trust"):  # through plan_for: one line, no plan
        plan_for(model, latency_ms=1.0, batch_size=2, cache_dir=tmp_path)
    monkeypatch.setattr(latency, "time_forward_ms", fake_ms)
    table = latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False)
    assert table.key["threads"] == torch.get_num_threads() and len(list(tmp_path.iterdir())) == 1
    measured = []
    monkeypatch.setattr(latency, "time_forward_ms", lambda *a, **k: measured.append(1) or fake_ms(*a, **k))
    latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False)
    assert measured == []  # cached
    latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False, remeasure=True)
    assert len(measured) == 8


def test_a_plan_whose_measured_latency_misses_its_prediction_says_so(model, small_grid, tmp_path, monkeypatch):
    from vitslim.cli.plan import _costs_line
    monkeypatch.setattr(latency, "time_forward_ms", fake_ms)
    latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False)  # cached on a quiet machine
    monkeypatch.setattr(latency, "time_forward_ms", lambda *a, **k: 3 * fake_ms(*a, **k))  # now the machine is busy
    dense_ms = fake_ms(vitslim.slim(model, vitslim.threshold(model, 1.0, 1.0, 1.0)), 2, None)
    plan = plan_for(model, latency_ms=0.6 * dense_ms, batch_size=2, cache_dir=tmp_path)
    assert plan.target["prediction_error"] == pytest.approx(2.0, rel=1e-6)
    line = _costs_line({"plan": plan, **vitslim.planning.PlanCost(model, plan_arch(model))(plan)},
                       vitslim.planning.PlanCost(model, plan_arch(model)).dense)
    assert "warning: the measured latency is 200% off the table's prediction (bound 50%)" in line
    assert "--remeasure" in line


def test_a_swin_table_times_widths_only_and_plans_a_latency_target(small_grid, tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_forward_ms", fake_ms)
    model = vitslim.make_searchable(make_swin())
    randomize_gates(model)
    table = latency_table(model, torch.device("cpu"), 2, cache_dir=tmp_path, progress=False)
    # no token gates: every block keeps its tokens, so the grid is widths x units; fake_ms is linear in the features
    assert len(table.samples) == 4 and {s["tokens"] for s in table.samples} == {1.0} and table.max_fit_error < 1e-9
    dense_ms = table.predict_ms(vitslim.threshold(model, 1.0, 1.0))
    plan = plan_for(model, latency_ms=0.7 * dense_ms, batch_size=2, cache_dir=tmp_path)
    assert plan.target["predicted_ms"] <= 0.7 * dense_ms and plan.budgets["tokens"] == 1.0
    assert plan.target["measured_ms"] == pytest.approx(fake_ms(vitslim.slim(model, plan), 2, None))


def plan_arch(model):
    return vitslim.planning.gate_ranking(model).arch


def test_real_timing_on_this_cpu(small_grid, tmp_path, monkeypatch):
    # CI's machine runs other jobs: the fit-error bound is for the tests above, with stand-in timers.
    monkeypatch.setattr(latency, "MAX_FIT_ERROR", float("inf"))
    # Big enough that the work, not per-layer overhead, sets the time: 64 tokens of width 192, batch 8.
    model = vitslim.make_searchable(make_vit(dtype=torch.float32, img_size=64, embed_dim=192, depth=2,
                                             num_heads=3))
    randomize_gates(model)
    table = latency_table(model, torch.device("cpu"), 8, cache_dir=tmp_path, progress=False)
    assert all(s["ms"] > 0 for s in table.samples) and all(c >= 0 for c in table.coefficients)
    lo = table.predict_ms(vitslim.threshold(model, 0.05, 0.05, 0.05))
    hi = table.predict_ms(vitslim.threshold(model, 1.0, 1.0, 1.0))
    assert lo < 0.8 * hi, table.samples  # a quarter of the widths and tokens costs less
    plan = plan_for(model, latency_ms=(lo + hi) / 2, batch_size=8, cache_dir=tmp_path)
    assert plan.target["predicted_ms"] <= (lo + hi) / 2 and plan.target["measured_ms"] > 0
