"""Adaptive speculation: per replica, whether to speculate and how large a tree to draft.

Speculation is a latency tool. It spends target compute on draft nodes that
may be rejected and KV memory on their scratch slots, so it pays when a replica
is lightly loaded and costs throughput when the batch is large. Following
SmartSpec (arXiv 2406.14066), the policy picks the tree budget ``k`` that
maximises *goodput*, accepted tokens per second over the batch::

    goodput(k) = B * tau(k) / T(B, k)

    B       effective batch: running + waiting requests, at most max_num_seqs
    tau(k)  mean tokens committed per sequence per step with budget k (bonus
            included; tau(0) = 1), measured per replica as an EMA per budget,
            interpolated as 1 + (tau(m) - 1) * log(1 + k) / log(1 + m) from the
            nearest measured budget m (a prior before any measurement)
    T(B,k)  step time: the measured mean of the replica's recent steps at batch B
            with ~k nodes per sequence when it has run them; elsewhere a fitted line
            (verify = a + b * (batch tokens = B * (1 + k)), draft = d0 + d1 * (B * k))
            scaled by its error at the nearest batch measured with budget k

then backs off under KV pressure (the largest allowed tree shrinks linearly to
0 as KV utilisation goes from ``kv_soft`` to ``kv_hard``) and never lets a
replica without a healthy drafter speculate.

A step's cost is not linear in its tokens everywhere (on a CPU a 9-token verify
costs ~1.2x a one-token step and a 17-token one ~1.5x; on a GPU both ~1x), so
the policy learns by measuring: when no tree, or a budget next to the current
one, has never run at this batch size and its estimate is too close to call, it
is *probed* for one report and the decision returns to where it was (each
budget once per batch bucket 1, 2, 3-4, 5-8, ... per replica). A tree must
beat no tree by ``min_gain``: speculation adds latency variance and KV use.
Changes that are not forced (drafter gone, KV cap) need hysteresis: a larger
budget must beat the current one by ``hysteresis`` (a smaller one just has to
be better) for ``hold_reports`` reports in a row and at least ``min_dwell_s``
after the last change, so decisions do not flap.

``SpeculationPolicy`` is plain Python (no ray) and unit-tested on synthetic
reports; ``Router`` is the thin Ray actor around it (one named actor per Serve
application). Replicas report about once a second (``LoadReport``) and get the
current ``Decision`` back in the reply, so nothing waits on the router per step.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class LoadReport:
    """What a replica sends about once a second."""

    running: int = 0
    waiting: int = 0
    max_num_seqs: int = 16
    kv_used: int = 0
    kv_total: int = 1
    drafter: str | None = None  # drafter kind ("eagle", "eagle3", "medusa") or None
    drafter_format: str | None = None  # the checkpoint format it was loaded from (engine/drafters/registry.py)
    drafter_healthy: bool = False
    max_tree_budget: int = 0  # the replica's configured (largest) budget
    tree_budget: int = 0  # the budget applied since the last report (0 = off)
    speculating: bool = False  # whether the replica speculates now
    acceptance_ema: float | None = None  # replica-side EMA of tokens/seq/step while speculating
    spec_seq_steps: int = 0  # sequence-steps that verified a tree since the last report
    spec_tokens: int = 0  # tokens committed by those sequence-steps
    # (batch_size, tree_nodes, verify_s, draft_s, count): mean decode step times since the last report
    step_times: list = field(default_factory=list)
    policy_applied: bool = True  # False: the replica runs a static policy and only reports

    @classmethod
    def from_dict(cls, d: dict) -> "LoadReport":
        """Raises ValueError on a field this report does not have (a replica and router out of step)."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"LoadReport has no field(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class Decision:
    speculate: bool
    tree_budget: int  # 0 when speculate is False
    reason: str
    goodput: dict = field(default_factory=dict)  # candidate budget -> estimated tokens/s
    changed_at: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PolicyConfig:
    budget_fractions: tuple = (0.0, 0.125, 0.25, 0.5, 1.0)  # candidates, as fractions of the replica's max
    hysteresis: float = 0.10
    hold_reports: int = 3
    probe_margin: float = 0.25  # probe a budget whose estimate is within this of the current and the best
    min_gain: float = 0.05  # a tree must beat no tree by this much
    min_dwell_s: float = 3.0
    kv_soft: float = 0.70
    kv_hard: float = 0.90
    acceptance_prior: float = 2.5  # tau at the largest budget before any measurement
    acceptance_alpha: float = 0.3  # EMA weight of a new report
    acceptance_ttl_s: float = 300.0  # forget a budget's acceptance after this long (re-probe)
    window: int = 512  # step-time samples kept per replica
    stale_s: float = 15.0  # replicas silent this long are dropped from the view


class StepTimeModel:
    """Decode step times from (B, nodes, verify, draft, n) samples: measured where seen, fitted elsewhere.

    ``step_time(B, k)`` is the measured mean step time (verify + draft) of the most
    recent steps that ran batch B with about k nodes per sequence, when there are
    any: a step's cost is not linear in its tokens on every machine (on CPU a
    17-token verify costs ~1.5x a one-token step, on a GPU nearly 1x), so a
    measurement beats any law. Elsewhere a weighted least-squares line
    (verify = a + b * batch tokens, draft = d0 + d1 * nodes) extrapolates, scaled by
    how far off the line was at the nearest batch measured with the same k.
    """

    recent = 32  # samples of one (batch, budget) that make its measured mean

    def __init__(self, window: int):
        self.samples: deque = deque(maxlen=window)

    def add(self, samples) -> None:
        for b, nodes, verify, draft, n in samples:
            if b > 0 and n > 0 and verify >= 0:
                self.samples.append((float(b), float(nodes), float(verify), float(draft), float(n)))

    @staticmethod
    def _fit(points) -> tuple[float, float] | None:
        """points: (x, y, w) -> (intercept, slope), both >= 0; None without data."""
        sw = sum(w for _, _, w in points)
        if sw <= 0:
            return None
        mx = sum(x * w for x, _, w in points) / sw
        my = sum(y * w for _, y, w in points) / sw
        sxx = sum(w * (x - mx) ** 2 for x, _, w in points)
        if sxx < 1e-9 * sw or max(x for x, _, _ in points) - min(x for x, _, _ in points) < 1:
            return my, 0.0  # one batch size seen so far: no evidence that tokens cost time
        slope = max(0.0, sum(w * (x - mx) * (y - my) for x, y, w in points) / sxx)
        return max(0.0, my - slope * mx), slope

    def token_spread(self) -> float:
        """Range of batch-token counts seen: 0 means the per-token cost cannot be told from the fixed cost."""
        xs = [b + nodes for b, nodes, _, _, _ in self.samples]
        return max(xs) - min(xs) if xs else 0.0

    def params(self) -> dict | None:
        verify = self._fit([(b + nodes, v, n) for b, nodes, v, _, n in self.samples])
        if verify is None:
            return None
        drafted = [(nodes, d, n) for _, nodes, _, d, n in self.samples if nodes > 0]
        draft = self._fit(drafted) or (0.0, 0.0)
        return {"a": verify[0], "b": verify[1], "d0": draft[0], "d1": draft[1]}

    def measured(self, batch: int, budget: int) -> float | None:
        """Mean step time of the latest steps at this batch with ~budget nodes per sequence, or None."""
        got, weight, total = 0, 0.0, 0.0
        for b, nodes, v, d, n in reversed(self.samples):
            if b == batch and round(nodes / b) == budget:
                weight, total, got = weight + n, total + n * (v + d), got + 1
                if got == self.recent:
                    break
        return total / weight if weight else None

    def fitted(self, batch: int, budget: int, p: dict | None = None) -> float | None:
        p = p or self.params()
        if p is None:
            return None
        t = p["a"] + p["b"] * batch * (1 + budget)
        if budget > 0:
            t += p["d0"] + p["d1"] * batch * budget
        return max(t, 1e-6)

    def step_time(self, batch: int, budget: int) -> float | None:
        seen = self.measured(batch, budget)
        if seen is not None:
            return seen
        p = self.params()
        fit = self.fitted(batch, budget, p)
        if fit is None:
            return None
        # Correct the line by its error at the nearest batch measured with this budget.
        batches = {int(b) for b, nodes, _, _, _ in self.samples if round(nodes / b) == budget}
        if batches:
            near = min(batches, key=lambda b: (abs(math.log(b / batch)), b))
            fit *= self.measured(near, budget) / self.fitted(near, budget, p)
        return fit

@dataclass
class _ReplicaState:
    model: StepTimeModel
    acceptance: dict = field(default_factory=dict)  # budget -> (ema tau, updated_at)
    decision: Decision | None = None
    last_change: float = -math.inf
    streak: int = 0
    probed: set = field(default_factory=set)  # (batch bucket, budget) pairs probed
    probe_return: tuple | None = None  # (decision, last_change) a one-report probe interrupted
    report: LoadReport | None = None
    seen_at: float = 0.0


class SpeculationPolicy:
    """Per-replica speculation decisions from load reports (no ray; time is passed in)."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        self.replicas: dict[str, _ReplicaState] = {}

    # ------------------------------------------------------------------ estimates

    def candidates(self, max_budget: int) -> list[int]:
        return sorted({int(round(f * max_budget)) for f in self.config.budget_fractions} | {0})

    def tau(self, st: _ReplicaState, budget: int, max_budget: int, now: float) -> float:
        if budget <= 0:
            return 1.0
        fresh = {k: v for k, (v, t) in st.acceptance.items() if now - t <= self.config.acceptance_ttl_s}
        g = lambda k: math.log1p(k)  # noqa: E731  (concave: a tree's extra nodes help less and less)
        if fresh:
            m = min(fresh, key=lambda k: (abs(math.log1p(k) - math.log1p(budget)), k))
            return 1.0 + max(0.0, fresh[m] - 1.0) * g(budget) / g(m)
        return 1.0 + (self.config.acceptance_prior - 1.0) * g(budget) / g(max(max_budget, 1))

    def goodput(self, st: _ReplicaState, batch: int, budget: int, max_budget: int, now: float) -> float:
        t = st.model.step_time(batch, budget)
        if t is None:
            t = 1.0  # no timing yet: every budget costs the same, acceptance decides
        return batch * self.tau(st, budget, max_budget, now) / t

    def kv_cap(self, r: LoadReport) -> int:
        """Largest budget KV pressure allows."""
        util = r.kv_used / max(r.kv_total, 1)
        c = self.config
        frac = min(1.0, max(0.0, (c.kv_hard - util) / (c.kv_hard - c.kv_soft)))
        return int(r.max_tree_budget * frac)

    # ------------------------------------------------------------------ decisions

    def observe(self, replica_id: str, report: LoadReport | dict, now: float | None = None) -> Decision:
        """Fold one report into the replica's state and return its (possibly unchanged) decision."""
        now = time.monotonic() if now is None else now
        r = report if isinstance(report, LoadReport) else LoadReport.from_dict(report)
        st = self.replicas.get(replica_id)
        if st is None:
            st = self.replicas[replica_id] = _ReplicaState(StepTimeModel(self.config.window))
        st.report, st.seen_at = r, now
        st.model.add(r.step_times)
        if r.tree_budget > 0 and r.spec_seq_steps > 0:
            tau = r.spec_tokens / r.spec_seq_steps
            old = st.acceptance.get(r.tree_budget)
            a = self.config.acceptance_alpha
            st.acceptance[r.tree_budget] = (tau if old is None else (1 - a) * old[0] + a * tau, now)
        self._forget_stale(now)

        if not (r.drafter and r.drafter_healthy and r.max_tree_budget > 0):
            why = "no drafter" if not r.drafter else ("drafter unhealthy" if not r.drafter_healthy else "budget 0")
            return self._set(st, 0, why, {}, now)

        batch = max(1, min(r.running + r.waiting, r.max_num_seqs))
        cap = self.kv_cap(r)
        allowed = [k for k in self.candidates(r.max_tree_budget) if k <= cap]
        scores = {k: self.goodput(st, batch, k, r.max_tree_budget, now) for k in self.candidates(r.max_tree_budget)}
        # A tree must beat no tree by min_gain: speculation adds latency variance (requests
        # finish out of step) and KV use, so a tie goes to plain decoding.
        gain = {k: 1.0 if k == 0 else 1.0 - self.config.min_gain for k in scores}
        best = max(allowed, key=lambda k: (scores[k] * gain[k], -k))
        cur = st.decision.tree_budget if st.decision else None
        if cur is None:
            return self._set(st, best, self._why(best, batch, r), scores, now)
        if st.probe_return is not None:
            # The probe (one report) is measured: go back to the decision it interrupted,
            # as if it had never changed; the measurement now informs the estimates.
            (back, changed), st.probe_return = st.probe_return, None
            st.decision, st.last_change = back, changed
            cur = back.tree_budget
        probe = self._probe(st, batch, cur, cap, scores) if cur <= cap else None
        if probe is not None:
            st.probed.add((_bucket(batch), probe))
            st.probe_return = (st.decision, st.last_change)
            st.decision = Decision(probe > 0, probe, f"batch {batch}: probing the step cost with budget {probe}",
                                   scores, now)
            return st.decision
        if cur > cap:  # KV pressure: shrink now, no hysteresis
            return self._set(st, best, f"KV {r.kv_used}/{r.kv_total} caps the tree at {cap}", scores, now)
        # A larger tree must win by the hysteresis margin; a smaller one (or none, with the
        # min_gain preference) only has to be estimated better: on near-ties the smaller
        # tree costs less KV and adds less latency variance, and the asymmetry alone keeps
        # near-ties from flapping.
        if best > cur:
            wins = scores[best] > scores[cur] * (1 + self.config.hysteresis)
        else:
            wins = scores[best] * gain[best] > scores[cur] * gain[cur]
        if best != cur and wins:
            st.streak += 1
            if st.streak >= self.config.hold_reports and now - st.last_change >= self.config.min_dwell_s:
                return self._set(st, best, self._why(best, batch, r), scores, now)
            reason = (f"batch {batch}, KV {r.kv_used}/{r.kv_total}: budget {best} would win, "
                      f"holding {cur} ({st.streak}/{self.config.hold_reports} reports)")
        else:
            st.streak = 0
            reason = self._why(cur, batch, r) if best == cur else (
                f"batch {batch}, KV {r.kv_used}/{r.kv_total}: keeping {cur}, budget {best} is within hysteresis")
        # The reason describes this report, not the one that made the last change.
        st.decision.goodput, st.decision.reason = scores, reason
        return st.decision

    def _probe(self, st: _ReplicaState, batch: int, cur: int, cap: int, scores: dict) -> int | None:
        """A budget worth measuring for one report at this batch size, or None.

        Estimates away from what was measured are extrapolations, and a wrong step-time
        law can hide the best budget forever. So, like a hill climb on measured
        goodput, try no tree and the budgets next to the current one when their
        estimate is within ``probe_margin`` of the current one and of the best one
        (or, for no tree, when the fit cannot be trusted: one step size seen). Each
        budget is probed once per batch bucket (1, 2, 3-4, 5-8, ...) per replica;
        later reports use the measurements.
        """
        cands = sorted(scores)
        i = cands.index(cur) if cur in cands else 0
        margin = 1 + self.config.probe_margin
        for k in dict.fromkeys([0] + cands[max(0, i - 1): i] + cands[i + 1: i + 2]):
            if k == cur or k > cap or (_bucket(batch), k) in st.probed or st.model.measured(batch, k) is not None:
                continue
            if k == 0 and st.model.token_spread() < 1:
                return k
            close = scores[cur] / margin <= scores[k] <= scores[cur] * margin  # cannot tell them apart
            if close and scores[k] * margin >= max(scores.values()):  # and it could be the best
                return k
        return None

    @staticmethod
    def _why(budget: int, batch: int, r: LoadReport) -> str:
        kv = f"KV {r.kv_used}/{r.kv_total}"
        if budget == 0:
            return f"batch {batch}, {kv}: speculation costs more than it accepts"
        return f"batch {batch}, {kv}: budget {budget} maximises goodput"

    def _set(self, st: _ReplicaState, budget: int, reason: str, scores: dict, now: float) -> Decision:
        st.streak = 0
        st.probe_return = None  # a real decision ends any probe
        if st.decision is None or st.decision.tree_budget != budget:
            st.decision = Decision(budget > 0, budget, reason, scores, now)
            st.last_change = now
        else:
            st.decision.goodput, st.decision.reason = scores, reason
        return st.decision

    def _forget_stale(self, now: float) -> None:
        for rid in [rid for rid, s in self.replicas.items() if now - s.seen_at > self.config.stale_s]:
            del self.replicas[rid]

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def view(self, now: float | None = None) -> dict:
        """replica id -> decision, last report and fitted model: what /v1/speculation shows."""
        now = time.monotonic() if now is None else now
        out = {}
        for rid, s in self.replicas.items():
            out[rid] = {
                "decision": s.decision.as_dict() if s.decision else None,
                "load": {k: v for k, v in asdict(s.report).items() if k != "step_times"} if s.report else None,
                "step_time_model": s.model.params(),
                "acceptance": {k: v for k, (v, _) in s.acceptance.items()},
                "age_s": round(now - s.seen_at, 3),  # since the last report
                "unchanged_for_s": round(now - s.last_change, 3) if s.decision else None,
            }
        return out


def _bucket(batch: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ... share a bucket: probes are not repeated for every size."""
    return max(0, math.ceil(math.log2(max(batch, 1))))


class Router:
    """Ray actor shell around SpeculationPolicy: one per Serve application, named ``router_name(app)``."""

    def __init__(self, config: dict | None = None):
        self.policy = SpeculationPolicy(PolicyConfig(**(config or {})))

    def report(self, replica_id: str, report: LoadReport | dict) -> dict:
        return self.policy.observe(replica_id, report).as_dict()

    def forget(self, replica_id: str) -> None:
        self.policy.forget(replica_id)

    def view(self) -> dict:
        return self.policy.view()


def router_name(app_name: str) -> str:
    return f"treespec-router:{app_name or 'default'}"


def get_or_create_router(app_name: str, config: dict | None = None):
    """The application's router actor, created on first use (by whichever replica comes first).

    Not detached: it lives as long as the replica that created it; if that replica goes away
    the others re-create it on their next report (its state rebuilds from reports in seconds).
    """
    import ray

    actor = ray.remote(Router).options(
        name=router_name(app_name), get_if_exists=True, num_cpus=0, max_restarts=-1, lifetime=None,
    )
    return actor.remote(config)


def find_router(app_name: str):
    """The router actor if it exists, else None (the ingress never creates it)."""
    import ray

    try:
        return ray.get_actor(router_name(app_name))
    except ValueError:
        return None
