"""Tree attention over the paged KV cache, in Triton (the engine's GPU path).

Same contract as ``treespec_kernels.reference.paged_attention`` (see ``treespec_kernels/__init__.py``
for the cache layout). Importing this module imports triton; the CPU path never
does. To run on CPU tensors, set ``TRITON_INTERPRET=1`` before the first import.

One program handles (sequence b, KV head h, tile of query rows). GQA: the rows of
the Q tile are (query token, query head of h's group) pairs, token-major, so each
K/V tile is loaded once for all ``n_heads // n_kv`` query heads that share it.
The keys are walked in two phases with an online softmax (fp32 statistics and
accumulator):

1. the committed prefix, visible to every query: full tiles carry no mask at all,
   only the last partial tile masks its out-of-range columns;
2. the new tokens (tree/chain/decode), masked per row: causal (column <= token)
   or by the tree's ancestor mask, bit-packed as int32 words per query row
   (bit ``j % 32`` of word ``j // 32`` = column j, see ``treespec_kernels.tree.pack_mask``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from treespec_kernels.tree import pack_mask


@triton.jit
def _load_kv(cache_ptr, bt_ptr, pos, valid, offs_d, d_valid, kv_head, block_size,
             stride_cb, stride_cs, stride_ch, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Keys or values of token positions ``pos`` [BLOCK_N] of one sequence: [BLOCK_N, BLOCK_D].

    MASKED=False (full prefix tiles) and EVEN_D (head_dim a power of two) load with no mask.
    """
    # Gather per position: a tile may span several cache blocks, in any order.
    if MASKED:
        block = tl.load(bt_ptr + pos // block_size, mask=valid, other=0).to(tl.int64)
    else:
        block = tl.load(bt_ptr + pos // block_size).to(tl.int64)
    ptrs = (cache_ptr + block[:, None] * stride_cb + (pos % block_size)[:, None] * stride_cs
            + kv_head * stride_ch + offs_d[None, :])
    if MASKED:
        return tl.load(ptrs, mask=valid[:, None] & d_valid[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_valid[None, :], other=0.0)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale,
                         MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one K/V tile into the running (acc, row max, row sum); scores in log2 units."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row that has seen nothing visible yet keeps max -inf; use 0 so that
    # exp2(-inf - -inf) does not turn into NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _query_tile(q_ptr, stride_qn, stride_qh, q_start, n_new, rows, kv_head,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A sequence's query rows for one KV head: row r is query token r // GROUP, query head
    kv_head * GROUP + r % GROUP. Returns (tok, head, row_valid, offs_d, d_valid, q_rows, q)."""
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = tok < n_new
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    return tok, head, row_valid, offs_d, d_valid, q_rows, q


@triton.jit
def _new_tokens_step(acc, m_i, l_i, q, col, n_new, prefix, tok, q_rows, row_valid,
                     k_cache_ptr, v_cache_ptr, bt_ptr, mask_ptr, stride_mask, offs_d, d_valid,
                     kv_head, block_size, stride_cb, stride_cs, stride_ch, qk_scale,
                     IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the step's new tokens (columns ``col`` of the sequence's new rows): row
    ``tok`` sees column j where j <= tok (causal) or where its packed ancestor mask says so."""
    col_valid = col < n_new
    pos = prefix + col
    k = _load_kv(k_cache_ptr, bt_ptr, pos, col_valid, offs_d, d_valid, kv_head, block_size,
                 stride_cb, stride_cs, stride_ch, MASKED=True, EVEN_D=EVEN_D)
    v = _load_kv(v_cache_ptr, bt_ptr, pos, col_valid, offs_d, d_valid, kv_head, block_size,
                 stride_cb, stride_cs, stride_ch, MASKED=True, EVEN_D=EVEN_D)
    if IS_CAUSAL:
        visible = (col[None, :] <= tok[:, None]) & col_valid[None, :]
    else:
        words = tl.load(mask_ptr + q_rows[:, None] * stride_mask + (col // 32)[None, :],
                        mask=row_valid[:, None] & col_valid[None, :], other=0)
        visible = ((words >> (col % 32)[None, :]) & 1) != 0
    return _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED=True, DOT_PRECISION=DOT_PRECISION)


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, bt_ptr, ctx_ptr, qsl_ptr, mask_ptr,
    qk_scale, block_size,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt, stride_mask,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M

    q_start = tl.load(qsl_ptr + seq)
    n_new = tl.load(qsl_ptr + seq + 1) - q_start
    if row0 >= n_new * GROUP:  # the grid is sized for the longest sequence
        return
    prefix = tl.load(ctx_ptr + seq)
    bt_ptr += seq.to(tl.int64) * stride_bt

    rows = row0 + tl.arange(0, BLOCK_M)
    tok, head, row_valid, offs_d, d_valid, q_rows, q = _query_tile(
        q_ptr, stride_qn, stride_qh, q_start, n_new, rows, kv_head, GROUP=GROUP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # Phase 1a: full prefix tiles, no mask of any kind.
    n_full = prefix // BLOCK_N
    for i in range(0, n_full):
        pos = i * BLOCK_N + offs_n
        k = _load_kv(k_cache_ptr, bt_ptr, pos, pos < prefix, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=False, EVEN_D=EVEN_D)
        v = _load_kv(v_cache_ptr, bt_ptr, pos, pos < prefix, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=False, EVEN_D=EVEN_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, None, qk_scale,
                                             MASKED=False, DOT_PRECISION=DOT_PRECISION)
    # Phase 1b: the partial last prefix tile, masked to the prefix length only.
    if n_full * BLOCK_N < prefix:
        pos = n_full * BLOCK_N + offs_n
        in_range = pos < prefix
        k = _load_kv(k_cache_ptr, bt_ptr, pos, in_range, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=True, EVEN_D=EVEN_D)
        v = _load_kv(v_cache_ptr, bt_ptr, pos, in_range, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=True, EVEN_D=EVEN_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, in_range[None, :], qk_scale,
                                             MASKED=True, DOT_PRECISION=DOT_PRECISION)

    # Phase 2: the new tokens, with the causal or ancestor mask.
    if IS_CAUSAL:
        # Causal rows never look past their own token: stop at the tile's last token.
        n_cols = tl.minimum(n_new, (row0 + BLOCK_M - 1) // GROUP + 1)
    else:
        n_cols = n_new
    for j0 in range(0, n_cols, BLOCK_N):
        acc, m_i, l_i = _new_tokens_step(acc, m_i, l_i, q, j0 + offs_n, n_new, prefix, tok, q_rows, row_valid,
                                         k_cache_ptr, v_cache_ptr, bt_ptr, mask_ptr, stride_mask, offs_d, d_valid,
                                         kv_head, block_size, stride_cb, stride_cs, stride_ch, qk_scale,
                                         IS_CAUSAL=IS_CAUSAL, EVEN_D=EVEN_D, DOT_PRECISION=DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only; every real row sees itself
    out = acc / l_i[:, None]
    o_rows = (q_start + tok).to(tl.int64)
    tl.store(out_ptr + o_rows[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


def _default_blocks(q: torch.Tensor, head_dim: int) -> tuple[int, int]:
    if q.device.type != "cuda":
        return 16, 16  # interpreter: small tiles keep the numpy emulation fast
    return 64, (64 if head_dim <= 64 else 32)


def paged_attention_packed(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    packed_mask: torch.Tensor | None = None,
    scale: float | None = None,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``paged_attention`` with the tree mask already bit-packed.

    q: [N, n_heads, D]; k_cache/v_cache: [num_blocks, block_size, n_kv, D];
    block_tables: [B, max_blocks] int32; context_lens: [B] int32 on q's device;
    query_start_loc: [B+1] int32 on q's device; packed_mask: None for causal, or
    int32 [N, ceil(max_T / 32)] (``treespec_kernels.tree.pack_mask`` of the bool mask).
    max_query_len: the largest T_b; pass it to avoid a host sync (it sizes the grid).
    block_m/block_n: tile sizes (rows = query token x head pairs; key positions).
    Returns [N, n_heads, D] in q's dtype.
    """
    n, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv ({n_kv})")
    group = n_heads // n_kv
    batch = block_tables.shape[0]
    out = torch.empty_like(q)
    if n == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("k_cache and v_cache must share strides, with a contiguous last dim")
    scale = head_dim ** -0.5 if scale is None else scale
    default_m, default_n = _default_blocks(q, head_dim)
    block_m = block_m or default_m
    block_n = block_n or default_n
    is_causal = packed_mask is None
    mask = q if is_causal else packed_mask  # dummy pointer when causal
    if not is_causal and packed_mask.stride(1) != 1:
        mask = packed_mask.contiguous()

    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (batch, n_kv, triton.cdiv(max_query_len * group, block_m))
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, context_lens, query_start_loc, mask,
        scale * 1.4426950408889634, k_cache.shape[1],  # log2(e): the kernel uses exp2
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), 0 if is_causal else mask.stride(0),
        GROUP=group, HEAD_DIM=head_dim, IS_CAUSAL=is_causal,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int] | torch.Tensor,
    query_start_loc: list[int] | torch.Tensor,
    tree_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Drop-in for ``treespec_kernels.reference.paged_attention`` (same arguments and result).

    tree_mask: None (causal among the new tokens) or bool [N, max_T]; it is
    bit-packed here (``pack_mask``), use ``paged_attention_packed`` to pack once
    per step and share the words across layers.
    """
    max_query_len = None
    if not isinstance(query_start_loc, torch.Tensor):
        max_query_len = max(b - a for a, b in zip(query_start_loc[:-1], query_start_loc[1:]))
    device = q.device
    context_lens = torch.as_tensor(context_lens, dtype=torch.int32, device=device)
    query_start_loc = torch.as_tensor(query_start_loc, dtype=torch.int32, device=device)
    packed = None if tree_mask is None else pack_mask(tree_mask.to(device))
    return paged_attention_packed(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, packed, scale, max_query_len
    )
