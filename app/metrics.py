"""Prometheus metrics.

Two paths, same names:

- ``GET /metrics`` on the ingress: this ingress replica's request metrics
  (requests, tokens in and out, time to first token, time per output token,
  accepted tokens per step) plus per-replica engine gauges (speculation mode
  and tree budget, queue depth, running requests, KV blocks, acceptance EMA,
  drafter health) taken from the router's latest reports, so one scrape sees
  every LLM replica.
- ``ray.util.metrics``: the same request metrics, and the engine gauges set by
  each LLM replica itself, exported by Ray's metrics agent on every node (with
  Ray's ``ray_`` prefix) for a Prometheus that scrapes the cluster.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ACCEPT_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)

# name -> (help, field of the router's load/decision view)
REPLICA_GAUGES = {
    "treespec_replica_speculate": ("1 when the replica speculates", ("load", "speculating")),
    "treespec_replica_tree_budget": ("draft tree budget in force (0 = off)", ("load", "tree_budget")),
    "treespec_replica_router_tree_budget": ("tree budget the router decided for the replica",
                                            ("decision", "tree_budget")),
    "treespec_replica_running": ("requests in the running batch", ("load", "running")),
    "treespec_replica_queue_depth": ("requests waiting for admission", ("load", "waiting")),
    "treespec_replica_kv_blocks_used": ("KV cache blocks in use", ("load", "kv_used")),
    "treespec_replica_kv_blocks_total": ("KV cache blocks", ("load", "kv_total")),
    "treespec_replica_mean_accepted_tokens": ("EMA of tokens committed per sequence per speculative step",
                                              ("load", "acceptance_ema")),
    "treespec_replica_drafter_healthy": ("1 when the replica's drafter works", ("load", "drafter_healthy")),
}


class _RayMirror:
    """ray.util.metrics twins of the prometheus_client metrics (absent outside a Ray worker)."""

    def __init__(self):
        self.metrics = {}
        try:
            import ray
            from ray.util import metrics as rm

            if not ray.is_initialized():
                return
            self.rm = rm
        except Exception:  # pragma: no cover - ray is a dependency; be quiet if its metrics are unavailable
            return

    def get(self, kind: str, name: str, help: str, tags: tuple, **kw):
        if not hasattr(self, "rm"):
            return None
        if name not in self.metrics:
            cls = {"counter": self.rm.Counter, "histogram": self.rm.Histogram, "gauge": self.rm.Gauge}[kind]
            self.metrics[name] = cls(name, description=help, tag_keys=tags, **kw)
        return self.metrics[name]


class RequestMetrics:
    """Request-level metrics, recorded by the ingress."""

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("treespec_requests", "HTTP requests by route and status", ["model", "route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("treespec_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("treespec_completion_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("treespec_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("treespec_time_per_output_token_seconds", "time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.accepted = Histogram("treespec_mean_accepted_tokens", "per request: tokens committed per decode step",
                                  ["model"], buckets=ACCEPT_BUCKETS, registry=r)
        self._view: dict = {}
        r.register(_ReplicaCollector(self))
        self.ray = _RayMirror()

    def _ray(self, kind, name, help, tags, **kw):
        return self.ray.get(kind, name, help, tags, **kw)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(self.model, route, str(status)).inc()
        m = self._ray("counter", "treespec_requests", "HTTP requests", ("model", "route", "status"))
        if m:
            m.inc(1, {"model": self.model, "route": route, "status": str(status)})

    def finished(self, prompt_tokens: int, completion_tokens: int, ttft: float | None, tpot: float | None,
                 mean_accepted: float | None) -> None:
        tags = {"model": self.model}
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.completion_tokens.labels(self.model).inc(completion_tokens)
        for m, v in ((self._ray("counter", "treespec_prompt_tokens", "prompt tokens", ("model",)), prompt_tokens),
                     (self._ray("counter", "treespec_completion_tokens", "generated tokens", ("model",)),
                      completion_tokens)):
            if m and v:
                m.inc(v, tags)
        for hist, name, buckets, v in ((self.ttft, "treespec_time_to_first_token_seconds", TTFT_BUCKETS, ttft),
                                       (self.tpot, "treespec_time_per_output_token_seconds", TPOT_BUCKETS, tpot),
                                       (self.accepted, "treespec_mean_accepted_tokens", ACCEPT_BUCKETS,
                                        mean_accepted)):
            if v is None:
                continue
            hist.labels(self.model).observe(v)
            m = self._ray("histogram", name, hist._documentation, ("model",), boundaries=list(buckets))
            if m:
                m.observe(v, tags)

    def render(self, router_view: dict | None) -> bytes:
        self._view = router_view or {}
        return generate_latest(self.registry)


class _ReplicaCollector:
    """Per-replica gauges from the router's view (collected at scrape time)."""

    def __init__(self, owner: RequestMetrics):
        self.owner = owner

    def collect(self):
        for name, (help, (part, key)) in REPLICA_GAUGES.items():
            g = GaugeMetricFamily(name, help, labels=["model", "replica"])
            for rid, v in sorted(self.owner._view.items()):
                value = (v.get(part) or {}).get(key)
                if value is not None:
                    g.add_metric([self.owner.model, rid], float(value))
            yield g


class ReplicaGauges:
    """The engine gauges an LLM replica sets in ray.util.metrics after each report."""

    def __init__(self, model: str, replica: str):
        self.tags = {"model": model, "replica": replica}
        self.ray = _RayMirror()

    def set(self, load: dict, decision: dict | None) -> None:
        view = {"load": load, "decision": decision or {}}
        for name, (help, (part, key)) in REPLICA_GAUGES.items():
            value = view[part].get(key)
            m = self.ray.get("gauge", name, help, ("model", "replica"))
            if m is not None and value is not None:
                m.set(float(value), self.tags)
