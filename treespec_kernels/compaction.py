"""KV compaction after tree verification (torch reference; the engine's CPU path).

A verified tree of sequence b was written at positions ``context_lens[b] + node``
(node = 0 .. T_b - 1). Acceptance picks one root-to-node path, ``accepted[b]`` (node
indices, root first). Compaction moves that path's K/V to positions
``context_lens[b] + i`` (i = 0 .. len - 1), so the cache holds exactly the accepted
tokens after the prefix; the caller then advances ``context_lens[b]`` by ``len``.
Slots after the new length keep stale data, which later writes overwrite.

Source and destination ranges overlap (``accepted[b][i] >= i``): every source is
read before any destination is written.
"""
from __future__ import annotations

from typing import Sequence

import torch

Accepted = torch.Tensor | Sequence[Sequence[int]]


def accepted_tensor(accepted: Accepted, device: torch.device | str | None = None) -> torch.Tensor:
    """accepted as int64 [B, max_len], -1 padded (a list of lists or a tensor)."""
    if isinstance(accepted, torch.Tensor):
        return accepted.to(device=device, dtype=torch.long)
    max_len = max((len(a) for a in accepted), default=0)
    out = torch.full((len(accepted), max(max_len, 1)), -1, dtype=torch.long)
    for b, a in enumerate(accepted):
        out[b, : len(a)] = torch.as_tensor(list(a), dtype=torch.long)
    return out.to(device)


def compaction_slots(
    block_tables: torch.Tensor, context_lens: Sequence[int] | torch.Tensor, accepted: Accepted, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source and destination slots of the tokens that move.

    block_tables: [B, max_blocks] int; context_lens: [B]; accepted: [B, max_len]
    node indices, -1 padded. Returns (src, dst), int64 [M] each on block_tables'
    device, with the tokens already in place (node i accepted at step i) left out.
    Computed once per step, shared by all layers (see ``copy_slots``).
    """
    device = block_tables.device
    if device.type == "cpu" and not isinstance(accepted, torch.Tensor):  # a step's few moves: plain Python
        tables, src, dst = block_tables.tolist(), [], []
        for table, ctx, path in zip(tables, [int(c) for c in context_lens], accepted):
            for i, node in enumerate(path):
                if node >= 0 and node != i:
                    s, d = ctx + node, ctx + i
                    src.append(table[min(s // block_size, len(table) - 1)] * block_size + s % block_size)
                    dst.append(table[min(d // block_size, len(table) - 1)] * block_size + d % block_size)
        return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
    acc = accepted_tensor(accepted, device)
    ctx = torch.as_tensor(context_lens, dtype=torch.long, device=device).view(-1, 1)
    step = torch.arange(acc.shape[1], device=device).view(1, -1)

    def slot(pos: torch.Tensor) -> torch.Tensor:
        blocks = block_tables.long().gather(1, (pos // block_size).clamp(max=block_tables.shape[1] - 1))
        return blocks * block_size + pos % block_size

    moves = (acc >= 0) & (acc != step)
    src = slot(ctx + acc.clamp(min=0))[moves]
    dst = slot(ctx + step)[moves]
    return src, dst


def copy_slots(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """cache [..., num_blocks, block_size, n_kv, D]: slot dst[m] <- slot src[m], all reads first.

    Leading dims (e.g. [2, num_layers] for a whole model's K and V in one tensor)
    move together, so one gather and one scatter serve every layer.
    """
    lead = cache.shape[:-4]
    flat = cache.view(*lead, -1, cache.shape[-2] * cache.shape[-1])  # [..., slots, n_kv * D]
    flat[..., dst, :] = flat[..., src, :]  # advanced indexing gathers into a new tensor before the scatter


def compact_kv(
    k_cache: torch.Tensor | Sequence[torch.Tensor],
    v_cache: torch.Tensor | Sequence[torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: Sequence[int] | torch.Tensor,
    accepted: Accepted,
) -> None:
    """Move each sequence's accepted path to just after its prefix, in place.

    k_cache/v_cache: [num_blocks, block_size, n_kv, D], or lists of them (one per
    layer; the slots are computed once). block_tables: [B, max_blocks] int32.
    context_lens: [B] prefix lengths *before* this step's tokens. accepted:
    [B, max_len] local node indices, -1 padded, or a list of B lists; after the
    call, position ``context_lens[b] + i`` holds node ``accepted[b][i]``.
    """
    k_caches = [k_cache] if isinstance(k_cache, torch.Tensor) else list(k_cache)
    v_caches = [v_cache] if isinstance(v_cache, torch.Tensor) else list(v_cache)
    src, dst = compaction_slots(block_tables, context_lens, accepted, k_caches[0].shape[1])
    if src.numel() == 0:
        return
    for cache in k_caches + v_caches:
        copy_slots(cache, src, dst)
