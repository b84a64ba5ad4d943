"""Attention over the paged KV cache: metadata and backend choice.

The CPU path uses the torch reference in treespec_kernels/reference.py; on CUDA the
Triton kernels in treespec_kernels/triton_attention.py are used (imported lazily, so
CPU runs never need Triton).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from treespec_kernels.reference import attention_plan
from treespec_kernels.reference import paged_attention as torch_paged_attention
from treespec_kernels.reference import write_kv


@dataclass
class AttentionMetadata:
    """What every attention layer of one forward needs (see treespec_kernels/__init__.py).

    slot_mapping:    [N] int64, cache slot of each new token.
    block_tables:    [B, max_blocks] int32.
    context_lens:    B ints, tokens already in the cache before this forward.
    query_start_loc: B+1 ints, spans of each sequence's new tokens in the batch.
    tree_mask:       None (causal) or bool [N, max_T] (draft trees).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_start_loc: list[int]
    tree_mask: torch.Tensor | None = None
    # CPU path: padding and mask of the forward, built by the first layer for the rest.
    plans: dict = field(default_factory=dict)


def attend(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [N, H, D] -> [N, H, D]."""
    if q.is_cuda:
        from treespec_kernels.triton_attention import paged_attention as triton_paged_attention

        return triton_paged_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc,
            meta.tree_mask, scale,
        )
    key = (q.shape[1] // k_cache.shape[2], q.dtype)  # (query heads per KV head, dtype)
    plan = meta.plans.get(key)
    if plan is None:
        plan = meta.plans[key] = attention_plan(
            meta.context_lens, meta.query_start_loc, meta.tree_mask, key[0], q.dtype, q.device,
            meta.block_tables, k_cache.shape[1],
        )
    return torch_paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, meta.tree_mask, scale,
        plan,
    )


__all__ = ["AttentionMetadata", "attend", "write_kv"]
