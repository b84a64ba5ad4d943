"""LLMServer: the Serve deployment that owns one engine per replica.

Data flow inside a replica::

    Ingress --(dict payload, handle stream)--> LLMServer.generate (asyncio, one per request)
        -> EngineLoop.submit: engine.add_request, an asyncio.Queue for the request
        EngineLoop thread: engine.step() in a loop -> Update per request -> its queue
        <- generate: the engine's text deltas -> "start" / "delta" / "end" / "error" events

"start" comes once the request is admitted and its first token exists, so a
request that cannot be admitted in time (queue or KV memory full) still gets
its 429/503 as an HTTP status, streaming or not.

The engine runs in a background thread and never blocks the replica's event
loop. A request whose caller goes away (client disconnect -> Serve cancels the
handle call) is aborted in ``generate``'s ``finally``, which frees its KV blocks
at the next step. The speculation policy comes from the application's Router
actor, polled by a reporter thread about once a second and applied between
steps (``set_policy``). The replica touches its engine only through the engine's
front door (``engine.engine.ENGINE_API``): an in-process LLMEngine, or the Ray
``Replica`` of actors/replica.py, which offers the same calls.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass

from ray import serve

from actors.router import LoadReport
from app.config import AppConfig
from app.metrics import ReplicaGauges
from app.protocol import APIError
from app.tracing import Tracing, extract, wall_ns

log = logging.getLogger("ray.serve")


# ---------------------------------------------------------------------------------------- engine


def build_driver(cfg: AppConfig):
    """What the engine loop steps: an in-process LLMEngine (tp == 1, the default on a laptop), or
    with tp > 1 (or executor=ray) the Ray replica of actors/replica.py, one TP shard actor per rank
    and the drafter as an actor. Both offer the engine's front door (ENGINE_API)."""
    if cfg.use_ray_executor:
        from actors.replica import Replica

        return Replica(cfg.engine, executor_options={"cpus_per_rank": cfg.cpus_per_rank,
                                                     "drafter_cpus": cfg.cpus_per_rank,
                                                     "feature_transport": cfg.feature_transport,
                                                     "num_threads": cfg.torch_threads})
    from engine.build import build_engine

    return build_engine(cfg.engine)


@dataclass
class Update:
    """What the engine thread hands to one request's queue after a step."""

    new_token_ids: list
    new_text: str  # the engine's detokenized text (stop strings already cut)
    finished: bool
    finish_reason: str | None
    step_kind: str
    step_start: float  # perf_counter
    step_end: float
    batch_size: int
    tree_budget: int  # in force for this step (0 = no speculation)
    stats: dict | None = None  # on finish: the sequence's SeqStats
    error: str | None = None  # finish_reason "error" from a failure of this request alone


class EngineLoop:
    """Steps the engine in a thread; routes outputs to per-request asyncio queues; measures steps."""

    def __init__(self, driver):
        self.driver = driver
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._policy: tuple[bool, int] | None = None
        self._measured = None  # the driver's last StepStats already measured
        self.error: BaseException | None = None
        self._reset_window()
        self.acceptance_ema: float | None = None
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------- called from the event loop

    def submit(self, request_id: str, prompt_ids: list[int], params, speculation: str | None) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.streams[request_id] = (asyncio.get_running_loop(), q)
        try:
            self.driver.add_request(prompt_ids, params, request_id, speculation)
        except BaseException:
            with self._lock:
                self.streams.pop(request_id, None)
            raise
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        self.driver.abort(request_id)
        self._wake.set()

    def is_running(self, request_id: str) -> bool:
        """Admitted into the running batch (not waiting for KV blocks or a batch slot)."""
        return self.driver.is_admitted(request_id)

    @property
    def active(self) -> int:
        return len(self.streams)

    def set_policy(self, speculate: bool, tree_budget: int) -> None:
        self._policy = (speculate, tree_budget)
        self._wake.set()

    def load(self) -> LoadReport:
        """The report for the router; resets the per-interval measurements."""
        engine = self.driver.load_report()
        with self._lock:
            window = self._window
            self._reset_window()
        return LoadReport(
            **{**asdict(engine),
               # requests not yet drained into the scheduler count as waiting too
               "waiting": max(engine.waiting, self.active - engine.running),
               "tree_budget": window["budget"]},
            speculating=engine.tree_budget > 0,
            acceptance_ema=self.acceptance_ema,
            spec_seq_steps=window["spec_seq_steps"],
            spec_tokens=window["spec_tokens"],
            step_times=[(b, n, v / c, d / c, c) for (b, n), (v, d, c) in window["steps"].items()],
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=10)

    # ---------------------------------------------------------------- the engine thread

    def _reset_window(self) -> None:
        self._window = {"steps": {}, "spec_seq_steps": 0, "spec_tokens": 0, "budget": self.budget_in_force()}

    def budget_in_force(self) -> int:
        return self.driver.tree_budget_in_force

    def _apply_policy(self) -> None:
        policy, self._policy = self._policy, None
        if policy is None:
            return
        before = self.budget_in_force()
        self.driver.set_policy(*policy)
        if self.budget_in_force() != before:
            with self._lock:  # acceptance is measured per budget
                self._window.update(spec_seq_steps=0, spec_tokens=0, budget=self.budget_in_force())

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_policy()
                if not self.driver.has_unfinished():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                budget = self.budget_in_force()
                t0 = time.perf_counter()
                outputs = self.driver.step()
                t1 = time.perf_counter()
                st = self.driver.last_step
                st, self._measured = (None if st is self._measured else st), st  # each step once
                self._measure(st)
                for out in outputs:
                    self._deliver(out, st, t0, t1, budget)
        except BaseException as exc:  # the replica is broken: fail every request, health check fails
            log.exception("engine loop died")
            self.error = exc
            with self._lock:
                streams, self.streams = self.streams, {}
            for loop, q in streams.values():
                loop.call_soon_threadsafe(q.put_nowait, exc)

    def _measure(self, st) -> None:
        if st is None or st.kind != "decode" or st.batch_size == 0:
            return
        with self._lock:
            w = self._window
            key = (st.batch_size, st.tree_nodes)
            v, d, c = w["steps"].get(key, (0.0, 0.0, 0))
            w["steps"][key] = (v + st.verify_time, d + st.draft_time, c + 1)
            if st.tree_nodes > 0:
                w["spec_seq_steps"] += st.batch_size
                w["spec_tokens"] += st.tokens
                tau = st.tokens / st.batch_size
                self.acceptance_ema = tau if self.acceptance_ema is None else 0.9 * self.acceptance_ema + 0.1 * tau

    def _deliver(self, out, st, t0: float, t1: float, budget: int) -> None:
        with self._lock:
            target = self.streams.get(out.request_id)
            if target is not None and out.finished:
                del self.streams[out.request_id]
        if target is None:
            return
        stats = None
        if out.finished and out.seq is not None:
            s = out.seq.stats
            stats = {"arrival": s.arrival, "first_token": s.first_token, "finished": s.finished,
                     "verify_steps": s.verify_steps, "committed": s.committed, "drafted": s.drafted,
                     "mean_accepted": s.mean_accepted, "draft_time": s.draft_time, "verify_time": s.verify_time}
        upd = Update(list(out.new_token_ids), out.new_text, out.finished, out.finish_reason, st.kind if st else "?", t0, t1,
                     st.batch_size if st else 0, budget, stats, getattr(out.seq, "error", None))
        loop, q = target
        loop.call_soon_threadsafe(q.put_nowait, upd)


# ---------------------------------------------------------------------------------------- deployment


@serve.deployment(name="LLMServer", health_check_period_s=10, graceful_shutdown_timeout_s=5)
class LLMServer:
    def __init__(self, config: dict):
        self.cfg = cfg = AppConfig.from_dict(config)
        import torch

        if cfg.engine.device == "cpu":
            torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.replica_id = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or str(ctx.replica_tag)
        t0 = time.perf_counter()
        self.driver = build_driver(cfg)
        self.loop = EngineLoop(self.driver)
        self.tokenizer = self.driver.tokenizer
        load = self.driver.load_report()
        log.info("LLMServer %s: %s loaded in %.1fs (drafter %s, %d KV blocks)", self.replica_id, cfg.model_name,
                 time.perf_counter() - t0, load.drafter, load.kv_total)
        self.tracing = Tracing("treespec-llm-server", cfg.otlp_endpoint, cfg.trace_export_delay_ms,
                               {"service.instance.id": self.replica_id})
        self.gauges = ReplicaGauges(cfg.model_name, self.replica_id)
        self.decision: dict | None = None
        self._router = None
        self._stop = threading.Event()
        self.reporter = threading.Thread(target=self._report_loop, name="router-reporter", daemon=True)
        self.reporter.start()

    # ---------------------------------------------------------------- router

    def _report_loop(self) -> None:
        import ray

        from actors.router import get_or_create_router

        while not self._stop.wait(self.cfg.report_interval_s):
            # With router=false the replica still reports (for /v1/speculation and /metrics) but ignores
            # the advice: it speculates whenever its drafter is healthy.
            load = self.loop.load()
            load.policy_applied = self.cfg.router
            try:
                if self._router is None:
                    self._router = get_or_create_router(self.app_name)
                self.decision = ray.get(self._router.report.remote(self.replica_id, load), timeout=10)
                if self.cfg.router:
                    self.loop.set_policy(self.decision["speculate"], self.decision["tree_budget"])
            except Exception as exc:  # router gone or slow: keep the last policy, re-create next time
                log.warning("speculation router unavailable (%s); keeping the current policy", exc)
                self._router = None
            self.gauges.set(asdict(load), self.decision)

    # ---------------------------------------------------------------- requests

    def _prompt_ids(self, req: dict) -> list[int]:
        if "messages" in req:
            try:
                return list(self.driver.tokenize_chat(req["messages"]))
            except Exception as exc:  # a template that rejects the conversation (roles, order)
                raise APIError(400, f"messages: the chat template rejected them: {exc}", param="messages") from None
        prompt = req["prompt"]
        if isinstance(prompt, str):
            try:
                return list(self.tokenizer.encode(prompt))
            except Exception as exc:  # e.g. a lone UTF-16 surrogate the tokenizer cannot encode
                raise APIError(400, f"prompt: cannot be tokenized ({exc})", param="prompt") from None
        return list(prompt)

    def _admit(self, req: dict):
        """Validate and submit; returns (prompt_ids, params, queue) or raises APIError."""
        from engine.engine import RequestError
        from engine.sampling import SamplingParams

        prompt_ids = self._prompt_ids(req)
        ctx_len = self.cfg.engine.max_model_len
        which = "messages" if "messages" in req else "prompt"
        if len(prompt_ids) >= ctx_len:
            raise APIError(400, f"This model's maximum context length is {ctx_len} tokens; the {which} has "
                                f"{len(prompt_ids)} tokens.", param=which, code="context_length_exceeded")
        max_tokens = req.get("max_tokens")
        if max_tokens is not None and len(prompt_ids) + max_tokens > ctx_len:
            raise APIError(400, f"This model's maximum context length is {ctx_len} tokens; you requested "
                                f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the {which}, {max_tokens} "
                                f"for the completion).", param="max_tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(req.get("default_max_tokens") or ctx_len, ctx_len - len(prompt_ids))
        try:
            params = SamplingParams(**{**req["sampling"], "max_tokens": max_tokens})
        except (TypeError, ValueError) as exc:
            raise APIError(400, str(exc)) from None
        cap = self.cfg.engine.max_num_seqs + self.cfg.max_waiting
        if self.loop.active >= cap:
            raise APIError(429, f"this replica has {self.loop.active} requests in flight (limit {cap}); retry later",
                           type="rate_limit_error", code="queue_full", retry_after=1)
        if self.loop.error is not None:
            raise APIError(503, "the engine of this replica failed; retry", type="server_error",
                           code="replica_unavailable", retry_after=1)
        speculation = req.get("speculation") or "auto"
        try:
            q = self.loop.submit(req["request_id"], prompt_ids, params, None if speculation == "auto" else speculation)
        except RequestError as exc:
            raise APIError(400, str(exc), param=which) from None
        return prompt_ids, params, q

    async def generate(self, req: dict):
        """Stream events for one request (see the module docstring). Called with handle.options(stream=True).

        req: request_id, messages | prompt, sampling (SamplingParams fields), max_tokens (None = up to
        the context), default_max_tokens, speculation, trace (W3C carrier).
        """
        tracer = self.tracing.tracer
        rid = req["request_id"]
        span = tracer.start_span("llm.request", context=extract(req.get("trace")), attributes={
            "treespec.request_id": rid, "treespec.replica": self.replica_id,
            "treespec.speculation.requested": req.get("speculation") or "auto"})
        arrival = time.perf_counter()
        try:
            prompt_ids, params, q = self._admit(req)
        except APIError as exc:
            span.set_attribute("treespec.error", exc.message)
            span.set_status(_error_status(exc.message))
            span.end()
            yield {"event": "error", **exc.to_dict()}
            return

        span.set_attributes({"treespec.prompt_tokens": len(prompt_ids), "treespec.max_tokens": params.max_tokens,
                             "treespec.temperature": params.temperature})
        self._policy_span(span, arrival)

        done, n_out, first, last = False, 0, None, None
        deadline = time.monotonic() + self.cfg.queue_timeout_s
        try:
            while True:
                timeout = None if first or deadline == math.inf else max(0.0, deadline - time.monotonic())
                try:
                    upd = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    if self.loop.is_running(rid):  # admitted, its prefill is under way: not a queue timeout
                        deadline = math.inf
                        continue
                    exc = APIError(503, f"not admitted within {self.cfg.queue_timeout_s:g}s (KV cache or batch "
                                        f"slots full); retry later", type="server_error", code="no_capacity",
                                   retry_after=2)
                    yield {"event": "error", **exc.to_dict()}
                    return
                if isinstance(upd, BaseException):
                    exc = APIError(503, f"the engine failed: {upd}", type="server_error",
                                   code="replica_unavailable", retry_after=1)
                    yield {"event": "error", **exc.to_dict()}
                    return
                if first is None:
                    first = upd
                    # One perf -> wall mapping for all of this request's phase spans, so a
                    # boundary they share (queue end = prefill start, prefill end = decode
                    # start) gets the same timestamp in both.
                    clock = (time.perf_counter(), time.time_ns())
                    self._phase_span(span, "llm.queue", arrival, upd.step_start, {}, clock)
                    self._phase_span(span, "llm.prefill", upd.step_start, upd.step_end, {
                        "treespec.batch_size": upd.batch_size, "treespec.prompt_tokens": len(prompt_ids)}, clock)
                    if upd.finish_reason not in ("error", "abort"):
                        # Only now, admitted and prefilled, does the caller commit to a 200 (and SSE headers):
                        # a request that cannot be admitted still gets its 503 as an HTTP status.
                        yield {"event": "start", "prompt_tokens": len(prompt_ids), "replica": self.replica_id}
                last = upd
                n_out += len(upd.new_token_ids)
                text, reason, done = upd.new_text, upd.finish_reason, upd.finished
                if reason == "error" and upd.finished and upd.error:
                    # A bug hit this request alone (the replica serves on): not worth a retry, so not a 503.
                    exc = APIError(500, f"the engine failed on this request ({upd.error})", type="server_error",
                                   code="engine_error")
                    yield {"event": "error", **exc.to_dict()}
                    return
                if reason in ("error", "abort") and upd.finished:
                    exc = APIError(503, f"the request was ended by the replica ({reason}); retry",
                                   type="server_error", code="replica_unavailable", retry_after=1)
                    yield {"event": "error", **exc.to_dict()}
                    return
                if text or done:
                    yield {"event": "delta", "text": text, "tokens": len(upd.new_token_ids)}
                if done:
                    stats = upd.stats or {}
                    yield {"event": "end", "finish_reason": "length" if reason == "length" else "stop",
                           "prompt_tokens": len(prompt_ids), "completion_tokens": n_out,
                           "speculation": {"tree_budget": upd.tree_budget,
                                           "mean_accepted_tokens": round(stats.get("mean_accepted", 0.0), 3),
                                           "draft_nodes": stats.get("drafted", 0),
                                           "decode_steps": stats.get("verify_steps", 0)},
                           "engine_ttft_s": (stats["first_token"] - stats["arrival"])
                           if stats.get("first_token") else None}
                    return
        finally:
            if not done:
                self.loop.abort(rid)  # caller gone (disconnect, cancel) or error: free the KV blocks
            if first is not None:
                end = last.step_end if last is not None else time.perf_counter()
                stats = (last.stats if last is not None else None) or {}
                self._phase_span(span, "llm.decode", first.step_end, end, {
                    "treespec.completion_tokens": n_out,
                    "treespec.decode_steps": stats.get("verify_steps", 0),
                    "treespec.mean_accepted_tokens": stats.get("mean_accepted", 0.0),
                    "treespec.draft_nodes": stats.get("drafted", 0),
                    "treespec.mean_tree_size": stats.get("drafted", 0) / max(1, stats.get("verify_steps", 0)),
                    "treespec.tree_budget": last.tree_budget if last else 0,
                    "treespec.speculation.mode": self._mode(last.tree_budget if last else 0),
                    "treespec.finish_reason": (last.finish_reason if last and last.finished else None)
                    or ("stop" if done else "cancelled"),
                }, clock)
            span.set_attribute("treespec.completion_tokens", n_out)
            if not done:
                span.set_attribute("treespec.cancelled", True)
            span.end()

    def _mode(self, budget: int) -> str:
        kind = self.driver.load_report().drafter
        return kind if budget > 0 and kind else "off"

    def _policy_span(self, parent, at: float) -> None:
        d = self.decision or {}
        load = self.driver.load_report()
        self._phase_span(parent, "speculation.policy", at, at, {
            "treespec.speculation.mode": self._mode(load.tree_budget),
            "treespec.tree_budget": load.tree_budget,
            "treespec.drafter_healthy": load.drafter_healthy,
            "treespec.router": bool(self.cfg.router and d),
            "treespec.router.reason": d.get("reason", "static (no router decision yet)"),
        })

    def _phase_span(self, parent, name: str, start: float, end: float, attrs: dict,
                    clock: tuple[float, int] | None = None) -> None:
        """A child span of parent from perf_counter readings; clock: (perf_counter, time_ns)
        read together, to map several spans' times the same way (default: read now)."""
        if not self.tracing.enabled:
            return
        from opentelemetry import trace

        now_perf, now_ns = clock or (time.perf_counter(), time.time_ns())
        s = self.tracing.tracer.start_span(name, context=trace.set_span_in_context(parent), attributes=attrs,
                                           start_time=wall_ns(start, now_perf, now_ns))
        s.end(end_time=wall_ns(max(end, start), now_perf, now_ns))

    # ---------------------------------------------------------------- management

    def check_health(self) -> None:
        if self.loop.error is not None or not self.loop.thread.is_alive():
            raise RuntimeError(f"engine loop stopped: {self.loop.error}")

    def status(self) -> dict:
        """This replica's state (for tests and operators)."""
        load = self.driver.load_report()
        return {"replica": self.replica_id, "active": self.loop.active, **asdict(load), "decision": self.decision}

    def __del__(self):
        try:
            self._stop.set()
            self.loop.stop()
            if self._router is not None:
                self._router.forget.remote(self.replica_id)
            self.tracing.shutdown()
            shutdown = getattr(self.driver, "shutdown", None)
            if shutdown:
                shutdown()
        except Exception:
            pass


def _error_status(message: str):
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode.ERROR, message)
