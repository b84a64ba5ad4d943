"""The drafter as a Ray actor, and the proxy the engine calls instead of a local drafter.

``Drafter`` (the actor) is a thin shell around an ``engine.drafters.base.Drafter``
object built inside it by a picklable zero-argument factory; it runs in bundle 0
of its replica's placement group, next to rank 0 of the target.

``RayDrafterProxy`` implements the engine's Drafter interface by calling that
actor. ``on_prefill``/``on_verified``/``release`` are sent without waiting (one
caller's calls to an actor run in order); only ``propose`` waits, together with
the calls sent before it, all within ``timeout_s``. Any error, death or timeout
raises ``DrafterFailure``: the engine then serves without speculation
(``LLMEngine.on_drafter_failure``) and the owner (actors/replica.py) brings a new
drafter actor up and installs a new proxy with ``LLMEngine.set_drafter``.

A proxy only asks the actor about requests it saw prefilled; others (requests
already running when the drafter was replaced) get empty trees, so a fresh
drafter never sees a request id it has no state for.

Features arrive either as host tensors (sent along with each call) or, with a
direct transport (actors/executor.py ``connect_drafter``), as ``RemoteFeatures``
slices of one tensor left on rank 0: the proxy then gathers the step's
on_prefill/on_verified calls into one ``apply`` call whose argument is that
tensor's ref, so Ray moves it once, from rank 0 straight into this actor.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import ray
import torch

from actors.executor import brief
from actors.shard import RemoteFeatures, local_device, pack_tensor, unpack_tensor
from engine.config import EngineConfig
from engine.drafters.base import Drafter as DrafterBase
from engine.drafters.base import DraftTree

log = logging.getLogger(__name__)


class DrafterFailure(RuntimeError):
    """The drafter actor died, raised or did not answer in time."""


@ray.remote(max_restarts=0, max_task_retries=0, enable_tensor_transport=True)
class Drafter:
    """Hosts one engine drafter; its methods mirror engine.drafters.base.Drafter."""

    def __init__(self, factory, num_threads: int = 1):
        """factory: picklable, () -> engine.drafters.base.Drafter (built on this node)."""
        torch.set_num_threads(num_threads)
        self.drafter = factory()

    def info(self) -> str:
        """The drafter's kind; answering at all means it is loaded."""
        return self.drafter.kind

    # Tensors cross as pack_tensor pairs (zero-copy numpy), like the shards' inputs and outputs.

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.drafter.on_prefill(request_id, token_ids, unpack_tensor(hidden), next_token)

    def propose(self, request_ids, budgets):
        return [_pack_tree(t) for t in self.drafter.propose(request_ids, budgets)]

    def on_verified(self, request_id, accepted, hidden, next_token):
        self.drafter.on_verified(request_id, accepted, unpack_tensor(hidden), next_token)

    def release(self, request_id):
        self.drafter.release(request_id)

    def apply(self, features: torch.Tensor, calls: list[tuple]) -> None:
        """features: one step's feature rows, received from rank 0 by Ray Direct Transport.
        calls: (method, request_id, token_ids, start, stop, next_token), in the engine's order;
        method "on_prefill" or "on_verified" gets features[start:stop]."""
        for method, request_id, token_ids, start, stop, next_token in calls:
            getattr(self.drafter, method)(request_id, token_ids, features[start:stop], next_token)

    def pid(self) -> int:
        return os.getpid()


class RayDrafterProxy(DrafterBase):
    """The engine-side Drafter that forwards to a ``Drafter`` actor.

    actor: a ready ``Drafter`` handle; kind: its drafter kind.
    timeout_s: bound on one propose (with the calls queued before it).
    max_pending: unanswered fire-and-forget calls kept before waiting on them.
    """

    def __init__(self, actor, kind: str, timeout_s: float = 5.0, max_pending: int = 256):
        self.actor, self.kind = actor, kind
        self.timeout_s, self.max_pending = timeout_s, max_pending
        self.failed: str | None = None
        self._pending: list = []
        self._known: set[str] = set()
        self._batch_ref = None  # the RemoteFeatures ref of the calls gathered in _batch
        self._batch: list[tuple] = []

    # ------------------------------------------------------------------ Drafter

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self._check()
        self._known.add(request_id)
        if isinstance(hidden, RemoteFeatures):
            return self._gather("on_prefill", request_id, token_ids, hidden, next_token)
        self._flush()
        self._send(self.actor.on_prefill.remote(request_id, list(token_ids), pack_tensor(hidden), int(next_token)))

    def propose(self, request_ids, budgets):
        self._check()
        self._flush()
        trees = [DraftTree([], []) for _ in request_ids]
        ask = [i for i, r in enumerate(request_ids) if r in self._known]
        if ask:
            ref = self.actor.propose.remote([request_ids[i] for i in ask], [budgets[i] for i in ask])
            pending, self._pending = self._pending, []
            drafted = self._wait(pending + [ref], "propose")[-1]
            for i, tree in zip(ask, drafted):
                trees[i] = _unpack_tree(tree)
        return trees

    def on_verified(self, request_id, accepted, hidden, next_token):
        self._check()
        if request_id not in self._known:
            return
        if isinstance(hidden, RemoteFeatures):
            return self._gather("on_verified", request_id, accepted, hidden, next_token)
        self._flush()
        self._send(self.actor.on_verified.remote(request_id, list(accepted), pack_tensor(hidden), int(next_token)))

    def release(self, request_id):
        self._check()
        self._flush()
        if request_id in self._known:
            self._known.discard(request_id)
            self._send(self.actor.release.remote(request_id))

    # ------------------------------------------------------------------ plumbing

    def _check(self):
        if self.failed:
            raise DrafterFailure(self.failed)

    def _gather(self, method: str, request_id: str, token_ids, hidden: RemoteFeatures, next_token: int) -> None:
        if hidden.ref is not self._batch_ref:
            self._flush()
            self._batch_ref = hidden.ref
        self._batch.append((method, request_id, list(token_ids), hidden.start, hidden.stop, int(next_token)))

    def _flush(self) -> None:
        """Send the gathered calls as one ``apply`` (before any other call: order matters)."""
        if self._batch:
            batch, ref = self._batch, self._batch_ref
            self._batch, self._batch_ref = [], None
            self._send(self.actor.apply.remote(ref, batch))

    def _send(self, ref) -> None:
        self._pending.append(ref)
        if len(self._pending) > self.max_pending:  # speculation off for long: don't pile up refs
            pending, self._pending = self._pending, []
            self._wait(pending, "drafter calls")

    def _wait(self, refs: list, what: str) -> list:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if len(ready) < len(refs):
            self.failed = f"drafter {what} timed out after {self.timeout_s:g}s"
            raise DrafterFailure(self.failed)
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except Exception as exc:  # RayActorError (dead), RayTaskError (raised), GetTimeoutError
            self.failed = f"drafter {what} failed: {brief(exc)}"
            raise DrafterFailure(self.failed) from exc


def _pack_tree(tree: DraftTree) -> DraftTree:
    if tree.draft_probs is None:
        return tree
    probs = [None if p is None else pack_tensor(p) for p in tree.draft_probs]
    return DraftTree(tree.tokens, tree.parents, probs)


def _unpack_tree(tree: DraftTree) -> DraftTree:
    if tree.draft_probs is None:
        return tree
    probs = [None if p is None else unpack_tensor(p) for p in tree.draft_probs]
    return DraftTree(tree.tokens, tree.parents, probs)


# ---------------------------------------------------------------------- building


def start_drafter(factory, pg=None, num_cpus: float = 1.0, num_gpus: float = 0.0, num_threads: int = 1):
    """Create a Drafter actor (in bundle 0 of ``pg`` when given); returns (actor, ready_ref).

    ``ready_ref`` resolves to the drafter's kind once it is loaded; the caller decides
    how long to wait for it.
    """
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    actor = Drafter.options(**options).remote(factory, num_threads)
    return actor, actor.info.remote()


def kill_drafter(actor) -> None:
    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass


def engine_drafter_factory(config: EngineConfig):
    """The factory of the drafter ``config.drafter`` names (a resolved config), or None for "off"."""
    if config.drafter == "off" or config.tree_budget == 0:
        return None
    return functools.partial(build_engine_drafter, config)


def build_engine_drafter(config: EngineConfig) -> DrafterBase:
    """Build the engine drafter of ``config.drafter`` (runs inside the actor).

    The actor holds no target weights, so the drafter reads the target's embedding and
    lm_head from the checkpoint itself.
    """
    from engine.drafters.loading import load_drafter
    from engine.weights import resolve_model

    config = dataclasses.replace(config, device=local_device(config.device))  # this actor's own GPU, if any
    return load_drafter(config, resolve_model(config.model), executor=None, seed=config.seed)


def wait_ready(ready_ref, timeout_s: float) -> str:
    """The drafter's kind, or DrafterFailure if it did not load within timeout_s."""
    t0 = time.monotonic()
    ready, _ = ray.wait([ready_ref], timeout=timeout_s)
    if not ready:
        raise DrafterFailure(f"drafter did not load within {timeout_s:g}s")
    try:
        return ray.get(ready_ref, timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
    except Exception as exc:
        raise DrafterFailure(f"drafter failed to load: {brief(exc)}") from exc
