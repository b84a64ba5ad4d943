"""RayExecutor: the engine's executor backed by one TargetShard actor per TP rank.

Same interface as ``engine.executor.InProcessExecutor``, so ``LLMEngine`` runs
unchanged on top of it. One replica = one placement group with one bundle per
rank, STRICT_PACK (all ranks of a replica on one node, so the process group
talks over the node's loopback / NVLink). Bundle 0 also holds the drafter
actor's share (actors/drafter.py), so the drafter sits on the shards' node.

Per step: the ``ModelInput`` and ``SamplingInput`` go to every rank, every rank
runs the forward (the collectives inside keep them in lockstep), rank 0 verifies
and samples on its device and its ``StepOutput`` comes back. With a direct feature
transport the drafter's features are not in it: they stay on rank 0 and the
drafter actor receives them from there (``connect_drafter``, ``RemoteFeatures``).
``move_kv`` is sent
without waiting: Ray runs one caller's calls to an actor in order, so it lands
before the next forward, and any error it raised surfaces at the next ``execute``.

Every wait is bounded. A dead or stuck rank turns into ``ShardFailure`` from
``execute``/``allocate_kv``; the executor is then unusable and the owner
(actors/replica.py) builds a new one.
"""
from __future__ import annotations

import logging
import time
import uuid

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.shard import RemoteFeatures, TargetShard, pack_step, pack_tensor, runner_options, unpack_output
from actors.transport import ray_name
from actors.transport import register as register_transports
from engine.config import EngineConfig, ModelConfig
from engine.executor import Executor
from engine.batch import ModelInput, SamplingInput, StepOutput
from engine.weights import resolve_model

log = logging.getLogger(__name__)

# How the drafter's features travel from rank 0 to the drafter actor. "host": in the
# StepOutput, through this process (Ray inlines small arguments, the object store takes
# large ones). "shm" / "cuda_ipc": Ray Direct Transport from rank 0 straight into the
# drafter (actors/transport.py). auto: cuda_ipc on GPU (the drafter reads the rows in place
# on the GPU it shares with rank 0); host on CPU, where the features are a few KB and the
# direct transfer's extra task round trips cost more than they save (docs/benchmarks.md).
FEATURE_TRANSPORTS = ("auto", "host", "shm", "cuda_ipc")


class ShardFailure(RuntimeError):
    """A target shard died, failed or timed out; this replica's executor is gone."""


class RayExecutor(Executor):
    """TP target shards as Ray actors in one placement group.

    config: the replica's EngineConfig (model, tp, dtype, device).
    cpus_per_rank: CPUs each rank's bundle reserves (logical; may be fractional).
    drafter_cpus / drafter_gpus: the drafter actor's share of bundle 0 (on GPU it shares
        rank 0's device: rank 0 takes 1 - drafter_gpus of it; default 0.1).
    num_threads: torch CPU threads per rank (default: the node's cores / tp).
    step_timeout_s: bound on one forward (and on the process group's collectives).
    start_timeout_s: bound on placing the group and loading the weights.
    feature_transport: one of FEATURE_TRANSPORTS.
    """

    def __init__(self, config: EngineConfig, *, cpus_per_rank: float = 1.0, drafter_cpus: float = 1.0,
                 drafter_gpus: float = 0.1, num_threads: int | None = None, step_timeout_s: float = 120.0,
                 start_timeout_s: float = 600.0, feature_transport: str = "auto"):
        self.engine_config = config = config.resolve()
        self.dtype = config.dtype
        self.tp = config.tp
        self.step_timeout_s = step_timeout_s
        self.gpu = config.device.startswith("cuda")
        self.drafter_cpus, self.drafter_gpus = drafter_cpus, drafter_gpus if self.gpu else 0.0
        self.failed: str | None = None  # why this executor is unusable
        self.shards: list = []
        self._pending: list = []  # unanswered move_kv calls
        self.pg = None
        self.feature_transport = self._check_transport(feature_transport)
        self.direct_features = False  # True while a drafter actor receives them from rank 0
        # Fail on a bad model/tp pairing here, with the model's own numbers, not in an actor.
        self.config = ModelConfig.from_path(resolve_model(config.model))
        config.check_model(self.config)
        try:
            self._start(cpus_per_rank, num_threads, start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, cpus_per_rank, num_threads, timeout_s) -> None:
        t0 = time.perf_counter()
        gpu = {"GPU": 1} if self.gpu else {}
        bundles = [{"CPU": cpus_per_rank, **gpu} for _ in range(self.tp)]
        bundles[0]["CPU"] += self.drafter_cpus
        self.pg = placement_group(bundles, strategy="STRICT_PACK", name=f"replica-{uuid.uuid4().hex[:8]}")
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            raise ShardFailure(
                f"could not place {self.tp} rank bundle(s) {bundles} on one node within {timeout_s:.0f}s; "
                "the cluster lacks the resources"
            )
        cfg = self.engine_config
        for rank in range(self.tp):
            self.shards.append(TargetShard.options(
                num_cpus=cpus_per_rank,
                num_gpus=(1.0 - self.drafter_gpus if rank == 0 else 1.0) if self.gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(cfg.model, cfg.dtype, cfg.device, rank, self.tp, num_threads, runner_options(cfg)))
        address, port = self._call("rendezvous", ranks=[0], timeout_s=timeout_s)[0]
        # The group's own timeout is longer than ours: the driver decides when a step has failed.
        self._call("load", address, port, self.step_timeout_s + 30, timeout_s=timeout_s)
        log.info("tp=%d shards ready in %.1fs", self.tp, time.perf_counter() - t0)

    def _check_transport(self, transport: str) -> str:
        if transport not in FEATURE_TRANSPORTS:
            raise ValueError(f"feature_transport must be one of {', '.join(FEATURE_TRANSPORTS)}, got {transport!r}")
        if transport == "auto":
            transport = "cuda_ipc" if self.gpu else "host"
        if transport != "host":
            if (transport == "cuda_ipc") != self.gpu:
                raise ValueError(f"feature_transport={transport} is for {'GPU' if transport == 'cuda_ipc' else 'CPU'} "
                                 f"replicas; this one runs on {self.engine_config.device}")
            register_transports()  # before the actors exist: they learn the transports at creation
        return transport

    def connect_drafter(self, drafter) -> str:
        """The features of the next steps go to ``drafter`` (an actor in this replica's
        placement group) by ``feature_transport``; returns that transport's name."""
        self.direct_features = self.feature_transport != "host"
        return self.feature_transport

    def disconnect_drafter(self) -> None:
        """The drafter is gone: features come back in the StepOutput (if asked for)."""
        self.direct_features = False

    # ------------------------------------------------------------------ waiting

    def _call(self, method: str, *args, ranks=None, timeout_s: float | None = None) -> list:
        """Call ``method`` on the given ranks (all by default); their results in that order.

        Waits at most timeout_s (default: the step timeout) for them and for the move_kv
        calls still unanswered, and raises ShardFailure as soon as any rank fails, without
        waiting for the others (they may be stuck in a collective with the dead rank).
        """
        if self.failed:
            raise ShardFailure(self.failed)
        ranks = range(self.tp) if ranks is None else ranks
        calls = [(r, getattr(self.shards[r], method).remote(*args)) for r in ranks]
        calls, self._pending = self._pending + calls, []
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        rank_of = {ref: r for r, ref in calls}
        values, pending = {}, [ref for _, ref in calls]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.failed = f"{method} on the tp={self.tp} shards timed out after {timeout_s:g}s"
                raise ShardFailure(self.failed)
            for ref in ready:
                try:
                    values[ref] = ray.get(ref)
                except Exception as exc:  # RayActorError (dead), RayTaskError (raised), ...
                    self.failed = f"{method} failed on tp={self.tp} rank {rank_of[ref]}: {brief(exc)}"
                    raise ShardFailure(self.failed) from exc
        return [values[ref] for _, ref in calls[len(calls) - len(ranks):]]

    # ------------------------------------------------------------------ Executor

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self._call("kv_bytes_per_block", block_size, ranks=[0])[0]

    def profile_kv_blocks(self, mem_util: float, block_size: int, max_rows: int) -> int | None:
        blocks = self._call("profile_kv_blocks", mem_util, block_size, max_rows)  # all ranks profile at once
        return None if None in blocks else min(blocks)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self._call("allocate_kv", num_blocks, block_size)

    def warm_up(self, max_seqs: int, rows_per_seq: int, prefill_rows: int) -> None:
        self._call("warm_up", max_seqs, rows_per_seq, prefill_rows)  # all ranks: their forwards all-reduce

    def execute(self, inp: ModelInput, sampling: SamplingInput) -> StepOutput:
        arg = pack_step(inp, sampling)
        if self.tp > 1 and not self.failed:
            arg = ray.put(arg)  # one copy shared by all ranks, not one serialisation per rank
        direct = self.direct_features and sampling.hidden != "none"
        out = unpack_output(self._call("execute", arg, direct)[0])
        if direct:  # ordered after this execute on rank 0; the drafter actor fetches it from there
            ref = self.shards[0].features.options(tensor_transport=ray_name(self.feature_transport)).remote()
            rows = sum(map(len, out.paths)) if sampling.hidden == "accepted" else len(inp.input_ids)
            out.hidden = RemoteFeatures(ref, 0, rows)
        return out

    def move_kv(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        if self.failed or len(src_slots) == 0:
            return  # a failure is reported by the next call
        src, dst = pack_tensor(src_slots), pack_tensor(dst_slots)
        self._pending += [(r, s.move_kv.remote(src, dst)) for r, s in enumerate(self.shards)]

    def shard_pids(self) -> list[int]:
        return self._call("pid")

    def forward_times(self) -> list[list[float]]:
        """Per rank: seconds of each recent forward inside the shard (see TargetShard.forward_times)."""
        return self._call("forward_times")

    def shutdown(self) -> None:
        """Kill the shards and free the placement group (bounded; never raises)."""
        self.failed = self.failed or "the executor was shut down"
        if self.shards and self.feature_transport == "shm":  # rank 0 frees the rows it still holds
            ray.wait([self.shards[0].shutdown.remote()], timeout=2.0)
        for s in self.shards:
            try:
                ray.kill(s, no_restart=True)
            except Exception:
                pass
        self.shards, self._pending = [], []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


def brief(exc: BaseException) -> str:
    """One short line for an actor error (Ray's own messages run to paragraphs)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = (lines[-1] if lines else type(exc).__name__)[:300]  # a traceback ends with its cause
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"the actor failed to start: {cause}" if "creation task" in text else "the actor died"
    return cause
