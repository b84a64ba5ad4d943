"""KV compaction after tree verification, in Triton (the engine's GPU path).

Same contract as ``treespec_kernels.compaction.compact_kv``; importing this module imports
triton (set ``TRITON_INTERPRET=1`` first to run on CPU tensors).

One program moves one (sequence, KV head, chunk of head_dim) for K and V. Rows
are independent only per column, and sources overlap destinations (node
``accepted[i] >= i`` lands on position i, which may be another row's source), so
the program loads all accepted rows of its column chunk, waits at a barrier for
every thread of the program to finish loading, then stores.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from treespec_kernels.compaction import Accepted, accepted_tensor


@triton.jit
def _compact_kv_kernel(
    k_cache_ptr, v_cache_ptr, bt_ptr, ctx_ptr, acc_ptr,
    block_size, max_len,
    stride_cb, stride_cs, stride_ch, stride_bt, stride_acc,
    HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    bt_ptr += seq.to(tl.int64) * stride_bt
    prefix = tl.load(ctx_ptr + seq)

    step = tl.arange(0, BLOCK_L)
    node = tl.load(acc_ptr + seq.to(tl.int64) * stride_acc + step, mask=step < max_len, other=-1)
    moves = (node >= 0) & (node != step)  # node == step is already in place
    src_pos = prefix + tl.where(moves, node, 0)
    dst_pos = prefix + step
    src_block = tl.load(bt_ptr + src_pos // block_size, mask=moves, other=0).to(tl.int64)
    dst_block = tl.load(bt_ptr + dst_pos // block_size, mask=moves, other=0).to(tl.int64)
    src = (src_block * stride_cb + (src_pos % block_size) * stride_cs)[:, None] + kv_head * stride_ch + offs_d[None, :]
    dst = (dst_block * stride_cb + (dst_pos % block_size) * stride_cs)[:, None] + kv_head * stride_ch + offs_d[None, :]
    io_mask = moves[:, None] & d_valid[None, :]

    k = tl.load(k_cache_ptr + src, mask=io_mask)
    v = tl.load(v_cache_ptr + src, mask=io_mask)
    tl.debug_barrier()  # all sources read before any destination is written
    tl.store(k_cache_ptr + dst, k, mask=io_mask)
    tl.store(v_cache_ptr + dst, v, mask=io_mask)


def compact_kv(
    k_cache: torch.Tensor | Sequence[torch.Tensor],
    v_cache: torch.Tensor | Sequence[torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: Sequence[int] | torch.Tensor,
    accepted: Accepted,
) -> None:
    """Drop-in for ``treespec_kernels.compaction.compact_kv`` (one launch per layer, no host sync
    when context_lens and accepted are tensors on the cache's device).

    k_cache/v_cache: [num_blocks, block_size, n_kv, D] or per-layer lists of them;
    block_tables: [B, max_blocks] int32; context_lens: [B] prefix lengths before the
    step; accepted: [B, max_len] node indices, -1 padded (or a list of lists).
    """
    k_caches = [k_cache] if isinstance(k_cache, torch.Tensor) else list(k_cache)
    v_caches = [v_cache] if isinstance(v_cache, torch.Tensor) else list(v_cache)
    device = k_caches[0].device
    acc = accepted_tensor(accepted, device).to(torch.int32).contiguous()
    ctx = torch.as_tensor(context_lens, dtype=torch.int32, device=device)
    batch, max_len = acc.shape
    _, block_size, n_kv, head_dim = k_caches[0].shape
    block_d = min(64, max(16, triton.next_power_of_2(head_dim)))
    grid = (batch, n_kv, triton.cdiv(head_dim, block_d))
    for k, v in zip(k_caches, v_caches, strict=True):
        if k.stride() != v.stride() or k.stride(3) != 1:
            raise ValueError("k_cache and v_cache must share strides, with a contiguous last dim")
        _compact_kv_kernel[grid](
            k, v, block_tables, ctx, acc, block_size, max_len,
            k.stride(0), k.stride(1), k.stride(2), block_tables.stride(0), acc.stride(0),
            HEAD_DIM=head_dim, BLOCK_L=max(16, triton.next_power_of_2(max_len)), BLOCK_D=block_d,
        )
