"""Torch reference implementations: the engine's CPU path and the kernels' oracle.

See ``treespec_kernels/__init__.py`` for the KV cache layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, in order.

    cache: [num_blocks, block_size, n_kv, D]; block_table: [max_blocks] int.
    Returns [length, n_kv, D] (a copy).
    """
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int] | torch.Tensor,
    query_start_loc: list[int] | torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Attention of new tokens over their sequence's prefix and each other.

    q:               [N, n_heads, D], the new tokens of B sequences concatenated.
    k_cache/v_cache: [num_blocks, block_size, n_kv, D], new tokens already written.
    block_tables:    [B, max_blocks] int32.
    context_lens:    [B] committed prefix length of each sequence.
    query_start_loc: [B+1] cumulative new-token counts.
    tree_mask:       None for causal order among the new tokens; otherwise bool
                     [N, max_T]: row i (a query of sequence b, local index r) column
                     j says whether new token j of sequence b is visible to it.
                     Rows of a tree are ancestor masks (diagonal included).
    plan:            ``attention_plan(...)`` of these arguments, built once per
                     forward and shared by the layers (built here when None).
    Returns [N, n_heads, D] in q's dtype.

    Prefix tokens are always visible; only the new-token block is masked.

    All B sequences go through one SDPA call: queries padded to T_max per
    sequence, each KV head's query group folded into the query axis
    ([B, n_kv, T_max * group, D]) so SDPA stays on its fused CPU kernel (GQA via
    ``enable_gqa`` or a boolean mask would send it to the slow math path).
    """
    n, n_heads, head_dim = q.shape
    n_kv, block_size = k_cache.shape[2], k_cache.shape[1]
    group = n_heads // n_kv
    scale = head_dim ** -0.5 if scale is None else scale
    if plan is None:
        plan = attention_plan(context_lens, query_start_loc, tree_mask, group, q.dtype, q.device,
                              block_tables, block_size)
    b, t_max, l_max = len(plan.lengths), plan.t_max, plan.l_max
    n_blocks = (l_max + block_size - 1) // block_size
    if plan.kv_start is not None:  # one sequence on consecutive blocks: a view, no gather
        blocks = slice(plan.kv_start, plan.kv_start + n_blocks)
        k = k_cache[blocks].flatten(0, 1)[:l_max].transpose(0, 1).unsqueeze(0)  # [1, n_kv, L, D]
        v = v_cache[blocks].flatten(0, 1)[:l_max].transpose(0, 1).unsqueeze(0)
    else:
        tables = block_tables[:b, :n_blocks].long()
        k = k_cache[tables].flatten(1, 2)[:, :l_max].transpose(1, 2)  # [B, n_kv, L_max, D]
        v = v_cache[tables].flatten(1, 2)[:, :l_max].transpose(1, 2)
    if plan.rows is None:  # every sequence has exactly T_max new tokens: no padding
        qp = q.view(b, t_max, n_kv, group, head_dim)
    else:
        qp = q.new_zeros(b * t_max, n_heads, head_dim).index_copy_(0, plan.rows, q)
        qp = qp.view(b, t_max, n_kv, group, head_dim)
    qp = qp.transpose(1, 2).reshape(b, n_kv, t_max * group, head_dim)  # query row = t * group + g
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=plan.bias, scale=scale)
    out = out.view(b, n_kv, t_max, group, head_dim).transpose(1, 2).reshape(b * t_max, n_heads, head_dim)
    return out if plan.rows is None else out[plan.rows]


@dataclass
class AttentionPlan:
    """The layout of one forward's queries and keys, shared by every layer.

    rows:    [N] int64, row of each query in the padded [B * T_max] layout
             (None when every sequence has T_max queries).
    lengths: B key lengths (prefix + new tokens); l_max is their maximum.
    bias:    additive mask [B, 1, T_max * group, L_max] in q's dtype (0 or -inf),
             or None when every query sees all L_max keys (decode, equal lengths).
    kv_start: first block of a single sequence (B = 1) whose blocks are consecutive
             ids, so its keys are read as a view of the cache; None: gather.
             The allocator hands out ascending ids, so one request at a time
             (batch-1 latency) always takes this path.
    """

    rows: torch.Tensor | None
    t_max: int
    lengths: list[int]
    l_max: int
    bias: torch.Tensor | None
    kv_start: int | None = None


def attention_plan(
    context_lens: list[int] | torch.Tensor,
    query_start_loc: list[int] | torch.Tensor,
    tree_mask: torch.Tensor | None,
    group: int,
    dtype: torch.dtype,
    device: torch.device | str,
    block_tables: torch.Tensor | None = None,
    block_size: int | None = None,
) -> AttentionPlan:
    """Padding rows, the additive mask and the key layout of ``paged_attention`` (see its arguments)."""
    if isinstance(context_lens, torch.Tensor):
        context_lens = context_lens.tolist()
    if isinstance(query_start_loc, torch.Tensor):
        query_start_loc = query_start_loc.tolist()
    counts = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(context_lens))]
    t_max = max(counts)
    lengths = [c + t for c, t in zip(context_lens, counts)]
    l_max = max(lengths)
    rows = None
    if min(counts) < t_max:
        rows = torch.cat([torch.arange(t) + i * t_max for i, t in enumerate(counts)]).to(device)
    kv_start = None
    if block_tables is not None and len(lengths) == 1:
        ids = block_tables[0, : (l_max + block_size - 1) // block_size].tolist()
        if ids == list(range(ids[0], ids[0] + len(ids))):
            kv_start = ids[0]
    if t_max == 1 and min(lengths) == l_max:
        return AttentionPlan(rows, t_max, lengths, l_max, None, kv_start)
    visible = torch.zeros(len(counts), t_max, l_max, dtype=torch.bool)
    for i, (prefix, t) in enumerate(zip(context_lens, counts)):
        visible[i, :, :prefix] = True
        if tree_mask is None:
            visible[i, :t, prefix : prefix + t] = torch.ones(t, t, dtype=torch.bool).tril()
        else:
            start = query_start_loc[i]
            visible[i, :t, prefix : prefix + t] = tree_mask[start : start + t, :t].cpu()
        visible[i, t:, 0] = True  # padding queries see one key, so no row is all -inf
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    bias = bias.repeat_interleave(group, dim=1).unsqueeze(1).to(device)
    return AttentionPlan(rows, t_max, lengths, l_max, bias, kv_start)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values [N, n_kv, D] at flat slots [N] (see the layout)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)
