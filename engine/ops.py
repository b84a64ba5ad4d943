"""Row helpers every step uses: argmax and top-k log-probabilities of logits rows.

One implementation is chosen once per process: the kernel library's vectorized scans
(treespec_kernels/cpu_fused.c) for fp32 CPU rows where it builds, torch everywhere else
(CUDA tensors, other dtypes, ``TREESPEC_CPU_KERNEL=torch``). Verification, sampling and
the drafters call these and never the C binding itself.
"""
from __future__ import annotations

import ctypes

import torch

from engine.fused import build_dir, fused_kernel_available
from treespec_kernels import cpu_fused

_helpers: list = []  # [kernel library or None], decided once


def _helper_lib():
    """The kernel library for the row helpers below, or None (torch then); decided once."""
    if not _helpers:
        _helpers.append(cpu_fused.load(build_dir()) if fused_kernel_available() else None)
    return _helpers[0]


def _fits_helper(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and _helper_lib() is not None


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Row-wise argmax of fp32 CPU logits [R, V] as a list (torch.argmax's first maximum),
    by the kernel library's vectorized scan where it builds (torch's takes ~1 ms for a
    13-row tree of a 49k vocabulary, ~10% of a verification step); torch elsewhere."""
    if not _fits_helper(logits):
        return logits.argmax(-1).tolist()
    x = logits.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _helper_lib().fused_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out.tolist()


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [R, V] -> (the k best log-probabilities [R, k], best first, their indices
    [R, k]): a drafter's per-depth top-k, in one vectorized C pass where the kernel library
    builds (torch's topk + logsumexp cost ~0.4 ms a call at [4, 8192]); torch elsewhere."""
    if not _fits_helper(logits) or not 0 < k <= min(64, logits.shape[1]):
        vals, idx = logits.topk(k, dim=-1)  # log-softmax only where it is kept: k of V values
        return vals - torch.logsumexp(logits, dim=-1, keepdim=True), idx
    x = logits.contiguous()
    vals = torch.empty(x.shape[0], k, dtype=torch.float32)
    idx = torch.empty(x.shape[0], k, dtype=torch.int64)
    _helper_lib().fused_topk(x.data_ptr(), x.shape[0], x.shape[1], k, vals.data_ptr(), idx.data_ptr(),
                             torch.get_num_threads())
    return vals, idx


def topk_logprob_lists(logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """topk_logprobs as Python lists (what a drafter's tree search consumes), written by the
    C pass straight into ctypes arrays: no tensors to allocate or convert per call."""
    if not _fits_helper(logits) or not 0 < k <= min(64, logits.shape[1]):
        vals, idx = topk_logprobs(logits, k)
        return vals.tolist(), idx.tolist()
    x = logits.contiguous()
    rows = x.shape[0]
    vals, idx = (ctypes.c_float * (rows * k))(), (ctypes.c_int64 * (rows * k))()
    _helper_lib().fused_topk(x.data_ptr(), rows, x.shape[1], k, vals, idx, torch.get_num_threads())
    vals, idx = vals[:], idx[:]
    return [vals[r * k:(r + 1) * k] for r in range(rows)], [idx[r * k:(r + 1) * k] for r in range(rows)]
