"""The adaptive speculation policy (actors/router.py) on synthetic load, and its Ray actor shell.

The synthetic replica has a GPU-like step-time law (a fixed cost per step that
amortises over the batch, plus a cost per batched token and per draft node) and
a concave acceptance curve; both are hidden from the policy, which only sees
the reports a real replica would send.
"""
import math

import pytest

from actors.router import LoadReport, PolicyConfig, SpeculationPolicy, StepTimeModel

MAX_BUDGET = 60


def true_tau(k: int) -> float:
    return 1.0 + 2.0 * (1.0 - math.exp(-k / 12.0))  # not the policy's log law


def true_times(batch: int, k: int) -> tuple[float, float]:
    verify = 0.020 + 0.0004 * batch * (1 + k)
    draft = (0.002 + 0.0001 * batch * k) if k else 0.0
    return verify, draft


class SyntheticReplica:
    """Runs ~1 s of decode steps at the current decision and reports like app/server.py does."""

    def __init__(self, drafter="eagle", max_num_seqs=64, kv_total=1000):
        self.drafter, self.healthy = drafter, True
        self.max_num_seqs, self.kv_total = max_num_seqs, kv_total
        self.budget = 0

    def report(self, running: int, waiting: int = 0, kv_used: int | None = None) -> LoadReport:
        batch = max(1, running)
        verify, draft = true_times(batch, self.budget)
        steps = max(1, int(1.0 / (verify + draft)))
        spec = self.budget > 0 and self.healthy
        return LoadReport(
            running=running, waiting=waiting, max_num_seqs=self.max_num_seqs,
            kv_used=kv_used if kv_used is not None else min(self.kv_total, 8 * running), kv_total=self.kv_total,
            drafter=self.drafter, drafter_healthy=self.healthy, max_tree_budget=MAX_BUDGET,
            tree_budget=self.budget if spec else 0,
            spec_seq_steps=steps * batch if spec else 0,
            spec_tokens=round(steps * batch * true_tau(self.budget)) if spec else 0,
            step_times=[(batch, batch * self.budget if spec else 0, verify, draft if spec else 0.0, steps)],
        )


def drive(policy, replica, loads, rid="r0", t0=0.0, probes=None, **kw):
    """One report per second; returns the budgets decided after each report.

    probes: a list that collects the indices of one-report probes (off, to measure).
    """
    out = []
    for i, running in enumerate(loads):
        d = policy.observe(rid, replica.report(running, **kw), now=t0 + i)
        replica.budget = d.tree_budget
        assert d.speculate == (d.tree_budget > 0)
        if probes is not None and "probing" in d.reason:
            probes.append(i)
        out.append(d.tree_budget)
    return out


def decisions(budgets, probes):
    """The budgets without the one-report probes."""
    return [b for i, b in enumerate(budgets) if i not in probes]


def changes(budgets):
    return sum(a != b for a, b in zip(budgets, budgets[1:]))


def test_backs_off_under_rising_load_and_returns_when_it_falls():
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    p_low, p_rising, p_falling = [], [], []
    low = drive(policy, rep, [1] * 10 + [2] * 5, probes=p_low)
    assert low[-1] > 0, "an idle replica with a good drafter speculates"
    rising = drive(policy, rep, [4] * 6 + [8] * 6 + [16] * 8 + [32] * 8 + [64] * 10, t0=100, probes=p_rising)
    assert rising[-1] == 0, f"a saturated replica stops speculating: {rising}"
    chosen = decisions(rising, p_rising)
    assert all(b <= a for a, b in zip(chosen, chosen[1:])), f"the tree only shrinks as load rises: {rising}"
    falling = drive(policy, rep, [16] * 6 + [2] * 6 + [1] * 12, t0=200, probes=p_falling)
    assert falling[-1] > 0, f"speculation comes back when load falls: {falling}"
    # Probes (one report each, measuring a budget next to the current one) are few, and
    # the decisions themselves change rarely.
    assert len(p_low + p_rising + p_falling) <= 10, (low, rising, falling)
    assert changes(decisions(low, p_low) + chosen + decisions(falling, p_falling)) <= 10


def test_goodput_choice_matches_the_true_optimum_once_the_model_is_fitted():
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    drive(policy, rep, [1, 2, 4, 8, 16, 32, 64, 32, 16, 8, 4, 2, 1] * 2)
    st = policy.replicas["r0"]
    p = st.model.params()
    assert p["a"] == pytest.approx(0.020, rel=0.05) and p["b"] == pytest.approx(0.0004, rel=0.05)
    for batch in (1, 4, 64):
        truth = {k: batch * true_tau(k) / sum(true_times(batch, k)) for k in policy.candidates(MAX_BUDGET)}
        est = {k: policy.goodput(st, batch, k, MAX_BUDGET, now=30) for k in truth}
        chosen = max(est, key=est.get)
        # The estimated best budget is (nearly) as good as the true best, measured by the true law.
        assert truth[chosen] >= 0.9 * max(truth.values()), (batch, chosen, truth)


def test_no_flapping_near_the_threshold():
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    drive(policy, rep, [1, 2, 4, 8, 16, 32, 16, 8, 4, 2, 1])  # fit the step-time model
    # Load jitters around the batch size where speculation stops paying.
    jitter = [3, 4, 5, 6, 7, 6, 5, 4] * 8
    probes = []
    budgets = drive(policy, rep, jitter, t0=100, probes=probes)
    assert len(probes) <= 3 * 5, probes  # at most each neighbour budget once per batch size
    budgets = decisions(budgets, probes)
    assert changes(budgets) <= 3, budgets
    # Without hysteresis the same load would flap.
    eager = SpeculationPolicy(PolicyConfig(hysteresis=0.0, hold_reports=1, min_dwell_s=0.0))
    rep2 = SyntheticReplica()
    drive(eager, rep2, [1, 2, 4, 8, 16, 32, 16, 8, 4, 2, 1])
    assert changes(drive(eager, rep2, jitter, t0=100)) > changes(budgets)


def test_replica_without_a_healthy_drafter_never_speculates():
    policy = SpeculationPolicy()
    none = SyntheticReplica(drafter=None)
    assert set(drive(policy, none, [1] * 20, rid="plain")) == {0}
    rep = SyntheticReplica()
    assert drive(policy, rep, [1] * 5, rid="r1")[-1] > 0
    rep.healthy = False  # drafter actor died: the very next decision is off, whatever the hysteresis
    budgets = drive(policy, rep, [1] * 20, rid="r1", t0=5)
    assert set(budgets) == {0}
    d = policy.replicas["r1"].decision
    assert "unhealthy" in d.reason and not d.speculate


def test_kv_pressure_shrinks_the_tree_at_once():
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    assert drive(policy, rep, [1] * 5)[-1] > 0
    budgets = drive(policy, rep, [1] * 5, t0=10, kv_used=950)  # 95% of the cache in use
    assert budgets[0] == 0 and set(budgets) == {0}
    mid = drive(policy, rep, [1] * 10, t0=20, kv_used=800)  # between kv_soft and kv_hard: capped
    assert max(mid) <= policy.kv_cap(rep.report(1, kv_used=800)) < MAX_BUDGET


def test_step_time_model_degenerate_and_stale():
    m = StepTimeModel(16)
    assert m.params() is None and m.step_time(4, 8) is None
    m.add([(1, 0, 0.03, 0.0, 10)])
    assert m.params()["b"] == 0.0 and m.step_time(8, 0) == pytest.approx(0.03)
    policy = SpeculationPolicy(PolicyConfig(stale_s=5))
    policy.observe("gone", LoadReport(), now=0)
    policy.observe("alive", LoadReport(), now=10)
    assert set(policy.view(now=10)) == {"alive"}


def test_router_actor_shell():
    import ray
    from actors.router import find_router, get_or_create_router

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        assert find_router("t") is None
        r = get_or_create_router("t")
        again = get_or_create_router("t")
        rep = SyntheticReplica()
        d = ray.get(r.report.remote("x", rep.report(1).__dict__))
        assert d["speculate"] and d["tree_budget"] > 0
        assert ray.get(again.view.remote())["x"]["decision"]["tree_budget"] == d["tree_budget"]
        assert find_router("t") is not None
    finally:
        ray.shutdown()


def test_reason_describes_the_latest_report():
    """The decision's reason follows the load even while the budget itself is held."""
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    drive(policy, rep, [1] * 10)
    first = policy.observe("r0", rep.report(1), now=10).reason
    assert first.startswith("batch 1,")
    d = policy.observe("r0", rep.report(40), now=11)  # load jumps: a change needs hold_reports reports
    assert d.reason.startswith("batch 40,") and d.reason != first


def test_probes_the_step_cost_and_stops_speculating_when_tokens_are_expensive(monkeypatch):
    """CPU-like law (every verified token costs 40% of a one-token step): off must win at batch 1.

    Before any tree-free step is measured, all steps verify the same token count and the fit
    cannot see that tokens cost time; the policy must probe without a tree and then stay off.
    """
    import test_router as mod

    monkeypatch.setattr(mod, "true_times", lambda b, k: (0.02 + 0.008 * b * (1 + k), 0.004 if k else 0.0))
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    idle = LoadReport(max_num_seqs=64, kv_total=1000, drafter="eagle", drafter_healthy=True,
                      max_tree_budget=MAX_BUDGET)  # a replica that has not run a step yet
    rep.budget = policy.observe("r0", idle, now=-1.0).tree_budget
    assert rep.budget > 0  # no timing yet: the acceptance prior says speculate
    budgets = drive(policy, rep, [1] * 30)
    assert budgets[0] == 0  # every step so far had the same size: probe without a tree
    assert budgets[-10:] == [0] * 10  # and stay off: the tree's tokens cost more than they commit
    assert "probing" not in policy.observe("r0", rep.report(1), now=40).reason


def test_measured_step_times_beat_a_wrong_linear_law(monkeypatch):
    """CPU-like law with a knee: a step costs the same up to ~5 batched tokens, then ~4%
    of a one-token step per token, and drafting has a fixed cost. No line through the
    pooled samples predicts every (batch, budget); the policy must choose by what it
    measured, within 5% of the true best goodput, at each load it settles at.
    """
    import test_router as mod

    def knee(b, k):
        x = b * (1 + k)
        return 0.023 + 0.001 * max(0, x - 5), (0.003 + 0.0003 * b * k) if k else 0.0

    monkeypatch.setattr(mod, "true_times", knee)
    monkeypatch.setattr(mod, "true_tau", lambda k: 1.0 + 0.9 * (1.0 - math.exp(-k / 4.0)))
    monkeypatch.setattr(mod, "MAX_BUDGET", 8)
    policy, rep = SpeculationPolicy(), SyntheticReplica()
    t = 0.0
    for batch in (1, 2, 4, 2, 1):
        budgets = drive(policy, rep, [batch] * 40, t0=t)
        t += 40
        truth = {k: batch * mod.true_tau(k) / sum(knee(batch, k)) for k in policy.candidates(8)}
        settled = budgets[-1]
        assert budgets[-10:] == [settled] * 10, (batch, budgets)
        assert truth[settled] >= 0.95 * max(truth.values()), (batch, settled, truth)


def test_a_tree_that_barely_pays_is_turned_off(monkeypatch):
    """Every budget commits 2% more tokens per second than plain decoding: within min_gain
    (5%), so the policy decodes plainly (a tree adds latency variance and KV use); at 20%
    it speculates."""
    import test_router as mod

    for edge, speculates in ((1.02, False), (1.20, True)):
        monkeypatch.setattr(mod, "true_times",
                            lambda b, k, e=edge: (0.02 * b * mod.true_tau(k) / (e if k else 1.0), 0.0))
        policy, rep = SpeculationPolicy(), SyntheticReplica()
        budgets = drive(policy, rep, [2] * 30)
        assert (budgets[-1] > 0) == speculates, (edge, budgets)
        assert len(set(budgets[-10:])) == 1, budgets
