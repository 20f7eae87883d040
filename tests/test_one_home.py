"""One formula, one home: every module that uses one of the lab's formulas imports it from its home
instead of writing it again (docs/architecture.md). Each test names the formula; the object a user
module holds must be the home's own, and where a formula could be re-typed inline, the user module's
syntax tree must not hold it.

Homes: tau (core.trace.mean_tau), 1 - TV and the offline tau (core.trace), prefix survival
(core.calibration.survival), Algorithm 1's admission walk (core.scheduler.walk), the round rate and
its running mean (core.scheduler.RoundRate, running_mean), every profiler (model.timing).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch

import labkit.core.calibration as calibration
import labkit.core.scheduler as scheduler
import labkit.core.stats as stats
import labkit.core.trace as trace
import labkit.decode.engine as engine
import labkit.drafters.scheduled as scheduled
import labkit.lab.scheduler_views as scheduler_views
import labkit.measure.diagnostics as diagnostics
import labkit.model.timing as timing
import labkit.pipeline.train as train

PACKAGE = Path(__file__).resolve().parents[1] / "labkit"


def test_acceptance_as_one_minus_tv_has_one_home():
    p_d = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    p_t = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.2, 0.5]])  # the second row puts 0.1 outside a cut vocabulary
    assert torch.allclose(trace.expected_acceptance(p_d, p_t), torch.tensor([0.9, 0.9]))  # sum of min(p_t, p_d)
    assert abs(stats.acceptance_rate(p_t[0], p_d[0]) - float(torch.minimum(p_t[0], p_d[0]).sum())) < 1e-6
    assert diagnostics.expected_acceptance is trace.expected_acceptance
    assert train.l1_to_target is trace.l1_to_target and train.acceptance_from_l1 is trace.acceptance_from_l1


def test_the_offline_tau_has_one_home():
    accept = torch.tensor([[[1.0, 0.5, 1.0]]])
    valid = torch.tensor([[[True, True, False]]])
    assert float(trace.offline_tau(accept, valid)) == 1 + 1.0 + 0.5
    assert diagnostics.offline_tau is trace.offline_tau and train.offline_tau is trace.offline_tau


def test_prefix_survival_has_one_home():
    conf = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.2, 0.5]], dtype=torch.float64)
    assert scheduler.survival is calibration.survival and scheduler_views.survival is calibration.survival
    assert calibration.survival(conf, [2, 3]).tolist() == [[0.5, 0.25, 0.0], [1.0, 0.2, 0.1]]


def test_the_admission_walk_has_one_home():
    assert scheduler_views.core_walk is scheduler.admission_walk
    for module in (scheduler, scheduler_views):
        names = {n.name for n in ast.walk(ast.parse(inspect.getsource(module))) if isinstance(n, ast.FunctionDef)}
        assert not names & {"_search", "_global_best"}, module.__name__


def test_the_round_rate_and_its_running_mean_have_one_home():
    assert engine.RoundRate is scheduler.RoundRate and scheduled.RoundRate is scheduler.RoundRate
    assert engine.running_mean is scheduler.running_mean and scheduled.running_mean is scheduler.running_mean
    assert scheduler.running_mean(None, 3.0) == 3.0
    assert abs(scheduler.running_mean(1.0, 2.0) - (1.0 + scheduler.DRAFT_EMA)) < 1e-12
    for module in (engine, scheduled):  # no moving-average weight written as a literal
        floats = {n.value for n in ast.walk(ast.parse(inspect.getsource(module)))
                  if isinstance(n, ast.Constant) and isinstance(n.value, float)}
        assert not floats & {0.8, 0.2}, module.__name__


PROFILERS = {"forward_cost", "memory_bandwidth_gbs", "time_step", "profile_cost_table", "profile_fastest",
             "profile_sps", "verify_table", "timed_runs", "timed_call", "sync_device"}


def test_every_profiler_is_defined_in_model_timing_only():
    for path in PACKAGE.rglob("*.py"):
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        if path.name == "timing.py":
            assert PROFILERS <= defined
        else:
            assert not defined & PROFILERS, f"{path.relative_to(PACKAGE)} defines {defined & PROFILERS}"
    assert engine.profile_cost_table is timing.profile_cost_table
