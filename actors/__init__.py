"""Ray actors around the engine: the distributed runtime of one replica.

- shard.py     TargetShard: one tensor-parallel rank (ModelRunner + KV slice + process group).
- executor.py  RayExecutor: the engine's Executor over the TP shards of one placement group.
- drafter.py   Drafter actor and RayDrafterProxy (the engine's Drafter, with bounded waits).
- replica.py   Replica: LLMEngine + RayExecutor + drafter, with failure recovery.
- router.py    Router: speculation policy from cluster utilization.

Per step, ModelInput goes to every rank and ModelOutput comes back from rank 0; request
ids, token lists and feature tensors go to the drafter and draft trees come back.

Names are imported lazily, so ``import actors.router`` does not load torch or the engine.
"""
import importlib

_EXPORTS = {
    "Drafter": "actors.drafter",
    "DrafterFailure": "actors.drafter",
    "RayDrafterProxy": "actors.drafter",
    "RayExecutor": "actors.executor",
    "ShardFailure": "actors.executor",
    "Replica": "actors.replica",
    "TargetShard": "actors.shard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
