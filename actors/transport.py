"""Feature transports: how a step's feature rows go from rank 0 to the drafter actor.

Both actors sit in one placement group bundle, on one node (and on GPU, one device),
so the rows need no network: they are handed over in place, as a Ray Direct
Transport object (``@ray.method(tensor_transport=...)``): rank 0's ``features()``
returns the tensor, the replica passes the ref on, and Ray moves the tensor from
rank 0 into the drafter actor without the replica or the object store touching it.

Ray 2.60's own transports for this (gloo, CUDA IPC) cannot abort a transfer, and on a
failed one Ray kills both actors: a drafter dying mid-transfer would take rank 0, and
with it every request of the replica, down. The transports here are one-sided and
abortable, so a failed transfer only fails the drafter's call, and the drafter's
death degrades the replica to plain decoding, as it must:

    "shm"      (CPU): rank 0 copies the rows into a POSIX shared-memory segment named
               after itself and the object; the drafter maps it and copies them out; the
               segment is unlinked when the ref goes out of scope, when the executor shuts
               down (``unlink_segments``), or, after a crash, by the next transport of the
               node (``sweep_stale_segments``).
    "cuda_ipc" (GPU): Ray's CUDA IPC transport (the drafter opens an IPC handle of the
               rows on the GPU it shares with rank 0: no copy at all), made abortable.

``register()`` must run in the process that creates the actors (the replica), before
it creates them.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
from ray.experimental.rdt.cuda_ipc_transport import CudaIpcTransport
from ray.experimental.rdt.tensor_transport_manager import (
    CommunicatorMetadata,
    TensorTransportManager,
    TensorTransportMetadata,
)

TRANSPORTS = ("shm", "cuda_ipc")
PREFIX = "treespec-"  # shared-memory segments: treespec-<creator pid>-<object id>
_lock = threading.Lock()
_registered = False


@dataclass
class ShmMetadata(TensorTransportMetadata):
    segment: str = ""  # the shared-memory segment's name
    offsets: list[int] = field(default_factory=list)  # byte offset of each tensor in it


class SharedMemoryTransport(TensorTransportManager):
    """One-sided CPU transport between actors of one node (see the module docstring)."""

    def __init__(self):
        self.segments: dict[str, shared_memory.SharedMemory] = {}  # sender: obj_id -> segment
        sweep_stale_segments()

    @property
    def tensor_transport_backend(self) -> str:
        return "SHM"

    @staticmethod
    def is_one_sided() -> bool:
        return True

    @staticmethod
    def can_abort_transport() -> bool:
        return True  # nothing to abort: the receiver only reads; the sender is never involved

    def actor_has_tensor_transport(self, actor) -> bool:
        return True

    def extract_tensor_transport_metadata(self, obj_id: str, rdt_object: list) -> ShmMetadata:
        tensors = [t.detach().contiguous() for t in rdt_object]
        offsets, size = [], 0
        for t in tensors:
            offsets.append(size)
            size += (t.numel() * t.element_size() + 63) // 64 * 64
        segment = shared_memory.SharedMemory(name=f"{PREFIX}{os.getpid()}-{obj_id}", create=True, size=max(size, 1))
        for t, offset in zip(tensors, offsets):
            data = _bytes(t)
            np.frombuffer(segment.buf, np.uint8, len(data), offset)[:] = data
        self.segments[obj_id] = segment
        return ShmMetadata([(t.shape, t.dtype) for t in tensors], "cpu", segment.name, offsets)

    def get_communicator_metadata(self, src_actor, dst_actor, backend=None) -> CommunicatorMetadata:
        return CommunicatorMetadata()

    def recv_multiple_tensors(self, obj_id, tensor_transport_metadata, communicator_metadata, target_buffers=None):
        meta = tensor_transport_metadata
        segment = shared_memory.SharedMemory(name=meta.segment)
        # Python < 3.13 tracks segments it merely opens, and would unlink the sender's at exit.
        resource_tracker.unregister(segment._name, "shared_memory")
        try:
            out = []
            for (shape, dtype), offset in zip(meta.tensor_meta, meta.offsets):
                t = torch.empty(shape, dtype=dtype)
                data = _bytes(t)
                data[:] = np.frombuffer(segment.buf, np.uint8, len(data), offset)
                out.append(t)
            return out
        finally:
            segment.close()

    def send_multiple_tensors(self, tensors, tensor_transport_metadata, communicator_metadata):
        raise NotImplementedError("the shm transport is one-sided: the receiver reads")

    def garbage_collect(self, obj_id, tensor_transport_meta, tensors) -> None:
        segment = self.segments.pop(obj_id, None)
        if segment is not None:
            segment.close()
            segment.unlink()

    def abort_transport(self, obj_id, communicator_metadata) -> None:
        pass

    def unlink_all(self) -> None:
        for obj_id in list(self.segments):
            self.garbage_collect(obj_id, None, None)


def sweep_stale_segments() -> None:
    """Unlink the segments of creators that died without freeing them (killed actors)."""
    if not os.path.isdir("/dev/shm"):
        return
    for name in os.listdir("/dev/shm"):
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass  # another sweeper was first


def unlink_segments() -> None:
    """Free the segments this process still holds (called before its actor is killed)."""
    from ray.experimental.rdt import util

    if "SHM" in util.transport_manager_info:  # this process knows the transport (Ray passes it on)
        util.get_tensor_transport_manager("SHM").unlink_all()


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's storage as a writable uint8 numpy view."""
    return t.reshape(-1).view(torch.uint8).numpy()


class AbortableCudaIpcTransport(CudaIpcTransport):
    """Ray's CUDA IPC transport, declared abortable: it is one-sided (the receiver opens an
    IPC handle), so a failed transfer concerns the receiver alone and the sender lives on."""

    @property
    def tensor_transport_backend(self) -> str:
        return "TREESPEC_CUDA_IPC"

    @staticmethod
    def can_abort_transport() -> bool:
        return True

    def abort_transport(self, obj_id, communicator_metadata) -> None:
        pass


def register() -> None:
    """Make "shm" and "cuda_ipc" (as ray_name(...)) known to Ray in this process (idempotent)."""
    from ray.experimental.rdt.util import register_tensor_transport

    global _registered
    with _lock:
        if not _registered:
            register_tensor_transport("SHM", ["cpu"], SharedMemoryTransport, torch.Tensor)
            register_tensor_transport("TREESPEC_CUDA_IPC", ["cuda"], AbortableCudaIpcTransport, torch.Tensor)
            _registered = True


def ray_name(transport: str) -> str:
    """The name Ray knows a transport of TRANSPORTS by."""
    return {"shm": "SHM", "cuda_ipc": "TREESPEC_CUDA_IPC"}[transport]
