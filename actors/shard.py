"""TargetShard: one tensor-parallel rank of the target model, as a Ray actor.

A thin shell around ``engine.runner.ModelRunner``: the rank builds only its slice
of the model (the parallel layers' weight loaders read only its rows/columns),
owns its slice of the paged KV cache, and joins the replica's torch.distributed
group (nccl on GPU, gloo on CPU). Every rank runs every step on the same
``ModelInput``; rank 0 alone verifies the draft trees and samples (its logits are gathered
to the full vocabulary) and returns a ``StepOutput``.

Life cycle, driven by actors/executor.py:
    TargetShard.remote(...)   -> cheap: no model yet
    rendezvous()  (rank 0)    -> (address, free port) for the process group
    load(address, port)       -> all ranks at once: join the group, build, load weights
    execute / move_kv / allocate_kv ...
    features()  (rank 0)      -> the last step's feature rows, sent by Ray Direct Transport
                                 straight to the drafter actor (actors/drafter.py)
"""
from __future__ import annotations

import collections
import datetime
import os
import socket
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import torch

from actors.transport import unlink_segments
from engine.config import ModelConfig
from engine.parallel import TPGroup
from engine.batch import ModelInput, SamplingInput, StepOutput
from engine.runner import ModelRunner
from engine.weights import resolve_model


def runner_options(config) -> dict:
    """The ModelRunner keyword arguments a shard takes from its replica's EngineConfig."""
    return {"attention_backend": config.attention_backend, "feature_layers": config.feature_layers,
            "cuda_graphs": config.cuda_graphs, "max_model_len": config.max_model_len}


def local_device(device: str) -> str:
    """Inside an actor Ray exposes only its own GPU(s), so any 'cuda:N' becomes 'cuda'."""
    return "cuda" if device.startswith("cuda") else device


# join_group / leave_group are module functions, not methods: Ray pickles actor classes by
# value, and cloudpickle chokes on torch's config modules reachable from such methods.
def join_group(rank: int, world_size: int, address: str, port: int, device: str, timeout_s: float) -> None:
    """Make this process rank ``rank`` of a fresh default process group (nccl on GPU, gloo on CPU)."""
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


@ray.remote(max_restarts=0, max_task_retries=0, enable_tensor_transport=True)
class TargetShard:
    def __init__(self, model: str, dtype: str, device: str, rank: int, world_size: int,
                 num_threads: int | None = None, runner_options: dict | None = None):
        """model: a checkpoint directory or "default" (resolved on this node); runner_options:
        ModelRunner's keyword arguments from the EngineConfig (attention_backend, feature_layers,
        cuda_graphs, max_model_len: ``runner_options``)."""
        self.model, self.dtype, self.device = model, dtype, local_device(device)
        self.runner_options = runner_options or {}
        self.rank, self.world_size = rank, world_size
        if self.device == "cpu":
            # Ranks of one replica share the node's cores; oversubscription makes gloo crawl.
            torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // world_size))
        self.runner: ModelRunner | None = None
        self.kept_features: torch.Tensor | None = None  # rank 0: the last step's, for features()
        self.forward_s = collections.deque(maxlen=4096)  # recent forward times (orchestration benchmark)

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) where rank 0 will host the group's store; all ranks share this node."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return "127.0.0.1", s.getsockname()[1]

    def load(self, address: str, port: int, timeout_s: float) -> ModelConfig:
        """Join the process group, build this rank's model slice and load its weights."""
        if self.world_size > 1:
            join_group(self.rank, self.world_size, address, port, self.device, timeout_s)
        tp = TPGroup(self.rank, self.world_size)  # group None: this process's default group
        self.runner = ModelRunner(resolve_model(self.model), self.dtype, self.device, tp=tp, **self.runner_options)
        return self.runner.config

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.runner.kv_bytes_per_block(block_size)

    def profile_kv_blocks(self, mem_util: float, block_size: int, max_rows: int) -> int | None:
        return self.runner.profile_kv_blocks(mem_util, block_size, max_rows)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self.runner.allocate_kv(num_blocks, block_size)

    def warm_up(self, max_seqs: int, rows_per_seq: int, prefill_rows: int) -> list:
        return self.runner.warm_up(max_seqs, rows_per_seq, prefill_rows)

    def execute(self, packed: tuple, keep_features: bool = False) -> tuple | None:
        """packed: pack_step(ModelInput, SamplingInput). Every rank runs the forward; rank 0
        verifies and samples and returns pack_output(StepOutput), the others None.

        keep_features: rank 0 keeps the step's feature rows where they are (its device) for
        ``features()`` and returns the StepOutput without them."""
        t0 = time.perf_counter()
        inp, sampling = unpack_step(packed)
        if self.rank == 0:
            out = self.runner.step(inp, sampling, hidden_to_host=not keep_features)
            if keep_features:
                self.kept_features, out = out.hidden, replace(out, hidden=None)
            out = pack_output(out)
        else:
            self.runner.forward(inp)  # the collectives need every rank; its logits stay here
            out = None
        self.forward_s.append(time.perf_counter() - t0)
        return out

    def features(self) -> torch.Tensor:
        """Rank 0: the feature rows [R, H] the last ``execute(keep_features=True)`` kept.

        Called with ``.options(tensor_transport=...)``: the returned ref is handed to the
        drafter actor, which receives the tensor from this actor directly (gloo send/recv on
        CPU, a CUDA IPC handle on the GPU both share), never through the object store."""
        return self.kept_features

    def move_kv(self, src_slots: tuple, dst_slots: tuple) -> None:
        """src_slots, dst_slots: pack_tensor([M] int64)."""
        self.runner.move_kv(unpack_tensor(src_slots), unpack_tensor(dst_slots))

    def pid(self) -> int:
        return os.getpid()

    def forward_times(self) -> list[float]:
        """Seconds of each recent forward inside this actor (oldest first, at most 4096)."""
        return list(self.forward_s)

    def shutdown(self) -> None:
        unlink_segments()
        leave_group()


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# A step on the wire: the ModelInput and SamplingInput go to every rank, rank 0's
# StepOutput comes back (accepted rows, next tokens, the drafter's features: KBs, not the
# [M, vocab] logits). Ray pickles a torch tensor through torch.save (a byte copy and ~0.1
# ms per tensor) but moves a numpy array zero-copy through the node's shared-memory object
# store, so tensors travel as numpy.


def pack_tensor(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), ""


def unpack_tensor(packed: tuple[np.ndarray, str]) -> torch.Tensor:
    array, dtype = packed
    with warnings.catch_warnings():
        # Arrays read from the object store are flagged read-only; nothing else reads this copy.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


@dataclass(frozen=True)
class RemoteFeatures:
    """Feature rows [start, stop) of a tensor that stays on rank 0 until the drafter actor
    fetches it: ``ref`` comes from ``TargetShard.features`` (a Ray Direct Transport object).

    The engine only slices a step's features per sequence (``StepOutput.hidden[a:b]``) and
    hands the slices to its drafter; slicing this narrows the range and moves nothing. Only
    ``RayDrafterProxy`` reads it.
    """

    ref: Any
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice) -> "RemoteFeatures":
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("RemoteFeatures slices are contiguous row ranges")
        return RemoteFeatures(self.ref, self.start + start, self.start + max(start, stop))


def pack_output(out: StepOutput) -> tuple:
    return out.paths, out.next_tokens, None if out.hidden is None else pack_tensor(out.hidden)


def unpack_output(packed: tuple) -> StepOutput:
    paths, next_tokens, hidden = packed
    return StepOutput(paths, next_tokens, None if hidden is None else unpack_tensor(hidden))


def pack_step(inp: ModelInput, sampling: SamplingInput) -> tuple:
    draft = sampling.draft_probs
    return (pack_input(inp), sampling.params, pack_tensor(sampling.uniforms),
            None if draft is None else (pack_tensor(draft[0]), pack_tensor(draft[1])), sampling.hidden)


def unpack_step(packed: tuple) -> tuple[ModelInput, SamplingInput]:
    inp, params, uniforms, draft, hidden = packed
    draft = None if draft is None else (unpack_tensor(draft[0]), unpack_tensor(draft[1]))
    return unpack_input(inp), SamplingInput(params, unpack_tensor(uniforms), draft, hidden)


def pack_input(inp: ModelInput) -> dict:
    """ModelInput as a dict of its fields, tensors as pack_tensor pairs (named under "tensors")."""
    fields = vars(inp)
    tensors = [k for k, v in fields.items() if isinstance(v, torch.Tensor)]
    return {**{k: pack_tensor(v) if k in tensors else v for k, v in fields.items()}, "tensors": tensors}


def unpack_input(packed: dict) -> ModelInput:
    packed = dict(packed)
    tensors = packed.pop("tensors")
    return ModelInput(**{k: unpack_tensor(v) if k in tensors else v for k, v in packed.items()})
