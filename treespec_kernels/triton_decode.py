"""Decode-shaped tree attention over the paged KV cache, in Triton, with split-KV.

Same contract as ``treespec_kernels.triton_attention.paged_attention_packed`` (cache layout:
``treespec_kernels/__init__.py``), shaped for steps with few new rows per sequence: decode
(1 row) and tree verification (a few dozen). Importing this module imports triton; to run on
CPU tensors, set ``TRITON_INTERPRET=1`` before the first import.

One program handles (sequence b, KV head h, KV split s). Its Q tile holds every new row of
sequence b for every query head of h's GQA group, token-major (row r: token r // G, head
h * G + r % G), padded to BLOCK_M = next power of two of max(16, max_T * G), so each K/V tile
is read once for all of them. The sequence's prefix tiles (BLOCK_N keys each) are shared out
among the S splits in contiguous runs; the last split also takes the new tokens under the
causal or packed ancestor mask. Each split runs the online softmax of ``triton_attention``
over its keys; with S > 1 it writes its normalized partial output and log-sum-exp (fp32),
and ``_combine_kernel`` merges the splits of each (row, head). With S == 1 the main kernel
writes the output itself.

Which kernel runs a step (``use_decode_kernel``): this one while ``max_T * G <=
DECODE_MAX_ROWS`` (one Q tile of at most 128 rows), ``triton_attention`` above that
(prefill-shaped steps, tiled over query rows). The number of splits: ``num_splits``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from treespec_kernels.tree import pack_mask
from treespec_kernels.triton_attention import _load_kv, _new_tokens_step, _online_softmax_step, _query_tile

DECODE_MAX_ROWS = 128  # largest Q tile (new rows x GQA group) the decode kernel takes
TARGET_PROGRAMS_PER_SM = 2  # split until B * n_kv * S reaches this many programs per SM
MIN_SPLIT_TILES = 2  # on a GPU, no split reads fewer key tiles than this (interpreter: 1)
MAX_SPLITS = 128
NOMINAL_SMS = 132  # an H100 SXM; the split rule's SM count where there is no CUDA device

# (BLOCK_M, head_dim <= 64, <= 128, larger) -> (BLOCK_N, num_warps, num_stages) on a GPU.
LAUNCH_CONFIGS = {
    16: ((64, 4, 3), (64, 4, 3), (32, 4, 2)),
    32: ((64, 4, 3), (64, 4, 2), (32, 4, 2)),
    64: ((64, 4, 2), (64, 4, 2), (32, 8, 2)),
    128: ((64, 8, 2), (32, 8, 2), (32, 8, 1)),
}


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    bt_ptr, ctx_ptr, qsl_ptr, mask_ptr,
    qk_scale, block_size, num_splits,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt, stride_mask,
    stride_ps, stride_pn, stride_ls, stride_ln,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    split_off = split.to(tl.int64)

    q_start = tl.load(qsl_ptr + seq)
    n_new = tl.load(qsl_ptr + seq + 1) - q_start
    prefix = tl.load(ctx_ptr + seq)
    bt_ptr += seq.to(tl.int64) * stride_bt

    tok, head, row_valid, offs_d, d_valid, q_rows, q = _query_tile(
        q_ptr, stride_qn, stride_qh, q_start, n_new, tl.arange(0, BLOCK_M), kv_head,
        GROUP=GROUP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # This split's run of prefix tiles: [t0, t1) of cdiv(prefix, BLOCK_N), in equal runs.
    n_tiles = tl.cdiv(prefix, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    t0 = split * per_split
    t1 = tl.minimum(n_tiles, t0 + per_split)
    n_full = prefix // BLOCK_N
    for i in range(t0, tl.minimum(t1, n_full)):  # full tiles: no mask
        pos = i * BLOCK_N + offs_n
        k = _load_kv(k_cache_ptr, bt_ptr, pos, pos < prefix, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=False, EVEN_D=EVEN_D)
        v = _load_kv(v_cache_ptr, bt_ptr, pos, pos < prefix, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=False, EVEN_D=EVEN_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, None, qk_scale,
                                             MASKED=False, DOT_PRECISION=DOT_PRECISION)
    if (n_full >= t0) & (n_full < t1):  # the partial last prefix tile, when it is this split's
        pos = n_full * BLOCK_N + offs_n
        in_range = pos < prefix
        k = _load_kv(k_cache_ptr, bt_ptr, pos, in_range, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=True, EVEN_D=EVEN_D)
        v = _load_kv(v_cache_ptr, bt_ptr, pos, in_range, offs_d, d_valid, kv_head, block_size,
                     stride_cb, stride_cs, stride_ch, MASKED=True, EVEN_D=EVEN_D)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, in_range[None, :], qk_scale,
                                             MASKED=True, DOT_PRECISION=DOT_PRECISION)

    if split == num_splits - 1:  # the new tokens, causal or under the tree's ancestor mask
        for j0 in range(0, n_new, BLOCK_N):
            acc, m_i, l_i = _new_tokens_step(acc, m_i, l_i, q, j0 + offs_n, n_new, prefix, tok, q_rows, row_valid,
                                             k_cache_ptr, v_cache_ptr, bt_ptr, mask_ptr, stride_mask, offs_d,
                                             d_valid, kv_head, block_size, stride_cb, stride_cs, stride_ch,
                                             qk_scale, IS_CAUSAL=IS_CAUSAL, EVEN_D=EVEN_D,
                                             DOT_PRECISION=DOT_PRECISION)

    seen = l_i > 0.0  # false for padding rows and for rows of a split with no keys
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    store_mask = row_valid[:, None] & d_valid[None, :]
    if SPLIT:
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # log2 units
        tl.store(part_o_ptr + split_off * stride_ps + q_rows[:, None] * stride_pn + head[:, None] * HEAD_DIM
                 + offs_d[None, :], out, mask=store_mask)
        tl.store(part_lse_ptr + split_off * stride_ls + q_rows * stride_ln + head, lse, mask=row_valid)
    else:
        tl.store(out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _combine_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, num_splits, n_heads,
    stride_ps, stride_pn, stride_ls, stride_ln, stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[row, heads] = sum_s 2^lse_s o_s / sum_s 2^lse_s over the splits, for BLOCK_H heads."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_valid = heads < n_heads
    o_mask = h_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    w = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    lse_ptrs = part_lse_ptr + row * stride_ln + heads
    o_ptrs = part_o_ptr + row * stride_pn + heads[:, None] * HEAD_DIM + offs_d[None, :]
    for _ in range(0, num_splits):
        lse = tl.load(lse_ptrs, mask=h_valid, other=float("-inf"))
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        lse_ptrs += stride_ls
        o_ptrs += stride_ps
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen yet: avoid -inf - -inf
        alpha = tl.math.exp2(m - m_safe)
        beta = tl.math.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + o * beta[:, None]
        w = w * alpha + beta
        m = m_new
    out = acc / tl.where(w == 0.0, 1.0, w)[:, None]
    tl.store(out_ptr + row * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=o_mask)


def use_decode_kernel(max_query_len: int, group: int) -> bool:
    """Whether a step goes to this kernel: all its rows x the GQA group fit one Q tile of
    ``DECODE_MAX_ROWS`` (128); larger (prefill-shaped) steps go to ``triton_attention``."""
    return max_query_len * group <= DECODE_MAX_ROWS


def block_m_for(max_query_len: int, group: int) -> int:
    """The Q tile's rows: next power of two of max(16, max_T * G) (``tl.dot`` needs >= 16)."""
    return max(16, triton.next_power_of_2(max_query_len * group))


def launch_config(block_m: int, head_dim: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a Q tile of block_m rows (``LAUNCH_CONFIGS``);
    under the interpreter 16-key tiles (its numpy emulation is fastest on small tiles)."""
    if not cuda:
        return 16, 4, 1
    column = 0 if head_dim <= 64 else 1 if head_dim <= 128 else 2
    return LAUNCH_CONFIGS[min(block_m, 128)][column]


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(max_context_len: int, programs: int, block_n: int, sms: int = NOMINAL_SMS,
               min_split_tiles: int = MIN_SPLIT_TILES) -> int:
    """How many splits the keys of each (sequence, KV head) are shared out among.

    Enough that the grid has ``TARGET_PROGRAMS_PER_SM`` (2) programs per SM, S = ceil(2 * sms /
    programs) with programs = B * n_kv, but no more than leaves every split ``min_split_tiles``
    tiles of ``block_n`` keys of the longest prefix (max_context_len), and at most MAX_SPLITS
    (128); at least 1. Llama-3-70B at tp=4 (2 local KV heads), batch 1, 8192 tokens of
    context, 64-key tiles: S = min(132, 64, 128) = 64, 128 programs for 132 SMs; at batch 32,
    S = min(5, 64) = 5.
    """
    want = triton.cdiv(TARGET_PROGRAMS_PER_SM * sms, max(1, programs))
    most = triton.cdiv(max_context_len, block_n) // max(1, min_split_tiles)
    return max(1, min(want, most, MAX_SPLITS))


def splits_for(q: torch.Tensor, k_cache: torch.Tensor, batch: int, max_query_len: int,
               max_context_len: int, block_n: int | None = None) -> int:
    """``num_splits`` for a step of ``batch`` sequences on q's device with key tiles of block_n
    (default ``launch_config``'s): the device's SM count and 2-tile splits on CUDA; under the
    interpreter the nominal 132 SMs and 1-tile splits, so short test contexts run the reduction."""
    n_heads, head_dim = q.shape[1:]
    n_kv = k_cache.shape[2]
    cuda = q.device.type == "cuda"
    block_n = block_n or launch_config(block_m_for(max_query_len, n_heads // n_kv), head_dim, cuda)[0]
    if not cuda:
        return num_splits(max_context_len, batch * n_kv, block_n, NOMINAL_SMS, 1)
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return num_splits(max_context_len, batch * n_kv, block_n, sm_count(index), MIN_SPLIT_TILES)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    packed_mask: torch.Tensor | None = None,
    scale: float | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """``triton_attention.paged_attention_packed`` with the decode kernel (same arguments).

    q: [N, n_heads, D]; k_cache/v_cache: [num_blocks, block_size, n_kv, D]; block_tables:
    [B, max_blocks] int32; context_lens: [B] int32 and query_start_loc: [B+1] int32 on q's
    device; packed_mask: None for causal, or int32 [N, ceil(max_T / 32)] (``pack_mask``).
    max_query_len / max_context_len: the largest T_b / prefix; pass them to avoid host syncs
    (they size the Q tile and the split count). splits: force the number of KV splits
    (default ``num_splits``). block_n, num_warps, num_stages: override ``launch_config``.
    Any max_T * G works; past DECODE_MAX_ROWS the Q tile grows beyond what suits a GPU.
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
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("k_cache and v_cache must share strides, with a contiguous last dim")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    cuda = q.device.type == "cuda"
    block_m = block_m_for(max_query_len, group)
    default_n, default_warps, default_stages = launch_config(block_m, head_dim, cuda)
    block_n = block_n or default_n
    if splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        splits = splits_for(q, k_cache, batch, max_query_len, max_context_len, block_n)
    scale = head_dim ** -0.5 if scale is None else scale
    is_causal = packed_mask is None
    mask = q if is_causal else packed_mask  # dummy pointer when causal
    if not is_causal and packed_mask.stride(1) != 1:
        mask = packed_mask.contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    split = splits > 1
    if split:
        part_o = torch.empty(splits, n, n_heads, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, n, n_heads, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    _decode_attention_kernel[(batch, n_kv, splits)](
        q, k_cache, v_cache, out, part_o, part_lse, block_tables, context_lens, query_start_loc, mask,
        scale * 1.4426950408889634, k_cache.shape[1], splits,  # log2(e): the kernel uses exp2
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), 0 if is_causal else mask.stride(0),
        n * n_heads * head_dim, n_heads * head_dim, n * n_heads, n_heads,
        GROUP=group, HEAD_DIM=head_dim, IS_CAUSAL=is_causal, SPLIT=split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages,
    )
    if split:
        block_h = min(16, triton.next_power_of_2(n_heads))
        _combine_kernel[(n, triton.cdiv(n_heads, block_h))](
            part_o, part_lse, out, splits, n_heads,
            n * n_heads * head_dim, n_heads * head_dim, n * n_heads, n_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
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
    splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Drop-in for ``treespec_kernels.reference.paged_attention`` through the decode kernel.

    tree_mask: None (causal among the new tokens) or bool [N, max_T], packed here;
    splits, block_n: as in ``paged_attention_decode``.
    """
    lens = context_lens.tolist() if isinstance(context_lens, torch.Tensor) else list(context_lens)
    starts = query_start_loc.tolist() if isinstance(query_start_loc, torch.Tensor) else list(query_start_loc)
    device = q.device
    packed = None if tree_mask is None else pack_mask(tree_mask.to(device))
    return paged_attention_decode(
        q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device), packed, scale,
        max(b - a for a, b in zip(starts[:-1], starts[1:])), max(lens), splits, block_n,
    )
