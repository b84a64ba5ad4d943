"""Replica: one serving replica = LLMEngine + RayExecutor (TP shards) + drafter actor.

The object the serving app holds. It drives the engine and recovers from the
failure of its actors, with every wait bounded:

- The drafter dies, raises or times out: the engine's drafter proxy raises, the
  engine serves the same requests on without speculation, and ``step()`` brings
  up a new drafter actor in the background (at most every ``restore_interval_s``)
  and installs it once loaded. Requests running at that point finish without
  speculation; new ones speculate again.
- A target shard dies or a step times out: ``step()`` returns every unfinished
  request finished with ``finish_reason == "error"`` (the reason is in
  ``last_error``), tears the placement group down, and the next ``step()``
  builds a new one with new shards (and drafter) before serving new requests.

Use from one driving thread::

    replica = Replica(EngineConfig(tp=3))
    rid = replica.add_request(prompt_ids, SamplingParams(max_tokens=64))  # thread-safe
    while replica.has_unfinished():
        for out in replica.step():
            ...  # stream out.new_token_ids; out.finished / out.finish_reason
    replica.shutdown()

or ``replica.generate(prompts, params)`` to run a batch to completion.
``metrics()`` reports the state of the drafter and of the shards.
"""
from __future__ import annotations

import logging
import time

import ray

from actors.drafter import (
    DrafterFailure,
    RayDrafterProxy,
    engine_drafter_factory,
    kill_drafter,
    start_drafter,
    wait_ready,
)
from actors.executor import RayExecutor, ShardFailure
from engine.build import load_tokenizer
from engine.config import EngineConfig
from engine.engine import EngineLoad, LLMEngine, RequestOutput, StepStats
from engine.sampling import SamplingParams
from engine.weights import resolve_model

log = logging.getLogger(__name__)

_MISSING = object()


class Replica:
    """config: the replica's EngineConfig.
    drafter_factory: picklable () -> engine Drafter, built inside the drafter actor;
        default: the drafter ``config.drafter`` names (None when it is "off").
    executor_options: keyword arguments of RayExecutor (cpus_per_rank, step_timeout_s, ...).
    drafter_timeout_s: bound on one propose call; drafter_load_timeout_s: on loading it.
    drafter_required: raise DrafterFailure when the drafter cannot load at start (a
        misconfiguration), instead of serving without speculation.
    restore_interval_s: least time between two attempts to bring the drafter back
        (doubling after each failed attempt, up to 10 minutes).
    rebuild_interval_s: least time between two attempts to rebuild lost shards.
    """

    def __init__(self, config: EngineConfig, *, drafter_factory=_MISSING, tokenizer=None,
                 executor_options: dict | None = None, drafter_timeout_s: float = 5.0,
                 drafter_load_timeout_s: float = 300.0, drafter_required: bool = False,
                 restore_interval_s: float = 5.0, rebuild_interval_s: float = 5.0):
        self.config = config = config.resolve()
        self.executor_options = dict(executor_options or {})
        self.drafter_factory = engine_drafter_factory(config) if drafter_factory is _MISSING else drafter_factory
        self.drafter_timeout_s = drafter_timeout_s
        self.drafter_load_timeout_s = drafter_load_timeout_s
        self.restore_interval_s = restore_interval_s
        self.rebuild_interval_s = rebuild_interval_s
        self.counters = {"drafter_failures": 0, "drafter_restores": 0, "shard_failures": 0, "rebuilds": 0}
        self.last_error: str | None = None
        self._drafter = None  # the actor behind the engine's current proxy
        self.feature_transport = "none"  # how its features travel (RayExecutor.connect_drafter)
        self._restoring = None  # (actor, ready_ref, started) while a new drafter loads
        self._next_restore = 0.0
        self._restore_failures = 0  # in a row; spaces the attempts out exponentially
        self._broken = False  # shards lost, rebuild due
        self._next_rebuild = 0.0

        executor = RayExecutor(config, **self.executor_options)
        try:
            if tokenizer is None:
                tokenizer = load_tokenizer(resolve_model(config.model))
            self.engine = LLMEngine(config, executor=executor, tokenizer=tokenizer)
            if self.drafter_factory is not None:
                actor, ready = self._spawn_drafter()
                try:
                    self._install_drafter(actor, wait_ready(ready, drafter_load_timeout_s))
                except DrafterFailure as exc:  # optional at run time: serve without it
                    kill_drafter(actor)
                    if drafter_required:
                        raise
                    self._drafter_down(str(exc))
        except BaseException:
            executor.shutdown()
            raise

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    speculation: str | None = None) -> str:
        """Thread-safe; raises engine.engine.RequestError for requests that can never run."""
        return self.engine.add_request(prompt, params, request_id, speculation)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    # The rest of the engine's front door (engine.engine.ENGINE_API), for the serving app.

    def is_admitted(self, request_id: str) -> bool:
        return self.engine.is_admitted(request_id)

    def set_policy(self, speculate: bool, tree_budget: int) -> None:
        self.engine.set_policy(speculate, tree_budget)

    @property
    def tree_budget_in_force(self) -> int:
        return self.engine.tree_budget_in_force

    def load_report(self) -> EngineLoad:
        return self.engine.load_report()

    @property
    def last_step(self) -> StepStats | None:
        return self.engine.last_step

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.engine.tokenize_chat(messages)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """One engine step, with recovery around it. Never raises ShardFailure/DrafterFailure."""
        if self._broken and not self._rebuild():
            # No shards to run on: refuse what is queued rather than let it wait unboundedly.
            return self.engine.fail_all("error")
        self.tend_drafter()
        try:
            outputs = self.engine.step()
        except ShardFailure as exc:
            return self._on_shard_failure(exc)
        self._notice_drafter_failure()
        return outputs

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts (token lists or text) to completion; outputs in prompt order.

        Requests lost to a shard failure come back with finish_reason "error".
        """
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # ------------------------------------------------------------------ shards

    def _on_shard_failure(self, exc: ShardFailure) -> list[RequestOutput]:
        self.counters["shard_failures"] += 1
        self.last_error = f"replica lost its target shards: {exc}"
        log.error("%s; failing the requests in flight and rebuilding", self.last_error)
        outputs = self.engine.fail_all("error")
        self._stop_actors()
        self._broken = True
        self._next_rebuild = 0.0  # first rebuild right away (at the next step)
        return outputs

    def _stop_actors(self) -> None:
        self._remove_drafter()
        if self._restoring is not None:
            kill_drafter(self._restoring[0])
            self._restoring = None
        self.engine.executor.shutdown()

    def _rebuild(self) -> bool:
        """New placement group and shards; True when the replica can serve again."""
        if time.monotonic() < self._next_rebuild:
            return False
        t0 = time.perf_counter()
        try:
            executor = RayExecutor(self.config, **self.executor_options)
            try:
                executor.allocate_kv(self.engine.allocator.num_blocks, self.config.block_size)
            except BaseException:
                executor.shutdown()
                raise
        except Exception as exc:
            self.last_error = f"rebuilding the replica failed: {exc}"
            log.error(self.last_error)
            self._next_rebuild = time.monotonic() + self.rebuild_interval_s
            return False
        self.engine.executor = executor
        self._broken = False
        self.counters["rebuilds"] += 1
        self._next_restore = 0.0  # the drafter comes back in the background
        log.info("replica rebuilt in %.1fs", time.perf_counter() - t0)
        return True

    # ------------------------------------------------------------------ drafter

    def _spawn_drafter(self):
        ex = self.engine.executor
        return start_drafter(self.drafter_factory, ex.pg, ex.drafter_cpus, ex.drafter_gpus)

    def _install_drafter(self, actor, kind: str) -> None:
        self._drafter = actor
        self.feature_transport = self.engine.executor.connect_drafter(actor)
        proxy = RayDrafterProxy(actor, kind, self.drafter_timeout_s)
        proxy.format = self._draft_format()
        self.engine.set_drafter(proxy)

    def _draft_format(self) -> str:
        from engine.drafters.loading import draft_format

        try:
            return draft_format(self.config)
        except (ValueError, FileNotFoundError):  # a drafter factory of its own: no directory behind it
            return "none"

    def _remove_drafter(self) -> None:
        self.engine.set_drafter(None)
        self.engine.executor.disconnect_drafter()
        kill_drafter(self._drafter)
        self._drafter, self.feature_transport = None, "none"

    def _drafter_down(self, reason: str) -> None:
        self.counters["drafter_failures"] += 1
        self.last_error = reason
        # A drafter that cannot load at all must not respawn every few seconds forever.
        wait = min(self.restore_interval_s * 2 ** self._restore_failures, 600.0)
        self._restore_failures += 1
        log.warning("drafter down (%s); serving without speculation, next try in %.0fs", reason, wait)
        self._next_restore = time.monotonic() + wait

    def _notice_drafter_failure(self) -> None:
        """After a step: did the engine just give up on its drafter?"""
        if self._drafter is not None and not self.engine.drafter_healthy:
            proxy = self.engine.drafter
            self._remove_drafter()  # dead, stuck or broken: a new one replaces it
            self._drafter_down(getattr(proxy, "failed", None) or "the drafter raised")

    def tend_drafter(self) -> None:
        """Bring a lost drafter back without blocking: spawn a new actor when one is due,
        install it once loaded. ``step()`` calls it; an idle owner may call it too."""
        if self.drafter_factory is None or self._drafter is not None:
            return
        now = time.monotonic()
        if self._restoring is None:
            if now >= self._next_restore:
                actor, ready = self._spawn_drafter()
                self._restoring = (actor, ready, now)
            return
        actor, ready, started = self._restoring
        done, _ = ray.wait([ready], timeout=0)
        if done:
            self._restoring = None
            try:
                kind = wait_ready(ready, self.drafter_timeout_s)
            except DrafterFailure as exc:
                kill_drafter(actor)
                self._drafter_down(str(exc))
                return
            self._install_drafter(actor, kind)
            self.counters["drafter_restores"] += 1
            self._restore_failures = 0
            log.info("drafter %s is back; speculation on for new requests", kind)
        elif now - started > self.drafter_load_timeout_s:
            self._restoring = None
            kill_drafter(actor)
            self._drafter_down(f"drafter did not load within {self.drafter_load_timeout_s:g}s")

    # ------------------------------------------------------------------ reporting

    def metrics(self) -> dict:
        """Plain numbers and strings, for the app's metrics endpoint and the router."""
        if self.drafter_factory is None:
            drafter = "none"
        elif self._drafter is not None and self.engine.drafter_healthy:
            drafter = "ok"
        else:
            drafter = "restoring" if self._restoring is not None else "down"
        load = self.engine.load_report()
        return {
            "tp": self.config.tp,
            "shards": "rebuilding" if self._broken else "ok",
            "drafter": drafter,
            "feature_transport": self.feature_transport,
            "speculating": load.tree_budget > 0,
            **self.counters,
            "last_error": self.last_error,
            "running": load.running,
            "waiting": load.waiting,
            "kv_blocks_used": load.kv_used,
            "kv_blocks_total": load.kv_total,
        }

    def shutdown(self) -> None:
        self._stop_actors()

