"""Small fused Triton kernels for the decoder layer's elementwise ops (the engine's CUDA path).

Each replaces a chain of torch ops with one launch, so a layer costs fewer kernel launches
on CUDA (the CPU keeps its torch path and never imports this module):

- ``rms_norm(x [N, H], weight [H], eps) -> [N, H]``
- ``add_rms_norm(x [N, H], residual [N, H], weight [H], eps) -> (normed [N, H], residual)``:
  the residual add and the next norm in one pass; writes ``x + residual`` into ``residual``.
- ``silu_mul(gate_up [N, 2 * I]) -> [N, I]``: the MLP's ``silu(gate) * up``.
- ``rope(qk [N, heads, D], positions [N], inv_freq [D / 2], ...)``: rotate-half RoPE of q and
  k together, in place, optionally after a per-head RMSNorm (Qwen3's q_norm / k_norm);
  cos/sin come from the positions inside the kernel (no cos/sin tensors).

Numerics follow the torch ops they replace (engine/model.py): statistics and arithmetic in
fp32, rounded to the tensor dtype wherever torch rounds (the normalised vector before the
weight multiply, silu before the multiply by up, cos/sin before the rotation). Rows may be
strided views; the last dimension must be contiguous.

A leaf module: it imports only torch and triton. To run on CPU tensors (tests), set
``TRITON_INTERPRET=1`` before the first import.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum rounded to the stream's dtype, as torch's add: it is both the new residual
        # and what the norm sees. The row is read before it is written, by this program only.
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype)  # torch rounds before the weight multiply
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch's silu, rounded to dtype like F.silu
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(qk_ptr, pos_ptr, inv_freq_ptr, qw_ptr, kw_ptr, stride_n, stride_h, n_heads, n_q_heads, eps,
                 scale, HALF: tl.constexpr, HEAD_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    d_valid = offs < HALF
    mask = (heads < n_heads)[:, None] & d_valid[None, :]
    # Rotate-half works on the two halves of each head: load them as two [BLOCK_H, HALF] tiles.
    ptrs = qk_ptr + tok * stride_n + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)

    if HEAD_NORM:  # RMSNorm of each head's D-vector, q heads with qw, k heads with kw
        rstd = tl.math.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)
        is_q = (heads < n_q_heads)[:, None]
        w1 = tl.where(is_q, tl.load(qw_ptr + offs, mask=d_valid, other=0.0).to(tl.float32)[None, :],
                      tl.load(kw_ptr + offs, mask=d_valid, other=0.0).to(tl.float32)[None, :])
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + offs, mask=d_valid, other=0.0).to(tl.float32)[None, :],
                      tl.load(kw_ptr + HALF + offs, mask=d_valid, other=0.0).to(tl.float32)[None, :])
        x1f = ((x1f * rstd[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2f = ((x2f * rstd[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)

    # freqs in fp32 like transformers; cos/sin rounded to x's dtype as the torch path does.
    freqs = tl.load(pos_ptr + tok).to(tl.float32) * tl.load(inv_freq_ptr + offs, mask=d_valid, other=0.0)
    cos = (tl.cos(freqs) * scale).to(dtype).to(tl.float32)[None, :]
    sin = (tl.sin(freqs) * scale).to(dtype).to(tl.float32)[None, :]
    tl.store(ptrs, (x1f * cos - x2f * sin).to(dtype), mask=mask)
    tl.store(ptrs + HALF, (x2f * cos + x1f * sin).to(dtype), mask=mask)


def _row_warps(block: int) -> int:
    """Warps for one program over a row of ``block`` elements: about 8-16 elements a thread."""
    return 4 if block <= 2048 else 8 if block <= 4096 else 16


def _check_rows(name: str, t: torch.Tensor, width: int | None = None) -> None:
    if t.dim() != 2 or (width is not None and t.shape[1] != width):
        raise ValueError(f"{name} must be [N, {width or 'H'}], got {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")


def _launch_rms_norm(x, residual, weight, eps):
    n, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    out = torch.empty((n, hidden), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if n == 0:
        return out
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x  # unused when HAS_RESIDUAL is False
    _rms_norm_kernel[(n,)](
        x, res, weight.contiguous(), out, x.stride(0), res.stride(0), out.stride(0), hidden, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_row_warps(block),
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, one launch.

    x: [N, H] (rows may be strided, last dim contiguous); weight: [H]. The statistics and
    the normalisation are fp32, the normalised row is rounded to x's dtype and then
    multiplied by the weight, exactly as ``engine.model.RMSNorm``. Returns a new [N, H]
    tensor in ``torch.promote_types(x.dtype, weight.dtype)`` (x's dtype when they match).
    One program per row, the whole row in one block (BLOCK = next power of two >= H).
    """
    _check_rows("x", x)
    return _launch_rms_norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, one launch: ``residual += x; return rms_norm(residual), residual``.

    x, residual: [N, H] of the same dtype (rows may be strided, last dim contiguous);
    weight: [H]. The sum is computed in fp32 and rounded to the dtype (what torch's
    ``x + residual`` gives for fp16, bf16 and fp32) and the norm is taken of that rounded
    sum, as ``rms_norm(x + residual)`` would.

    **In place**: the sum overwrites ``residual``, which is returned as the second
    element (the same tensor); the first is a new [N, H] normed tensor, as ``rms_norm``.
    """
    _check_rows("x", x)
    _check_rows("residual", residual, x.shape[1])
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError("x and residual must have the same shape, dtype and device")
    return _launch_rms_norm(x, residual, weight, eps), residual


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The gated MLP activation: ``F.silu(gate) * up`` with ``gate, up = gate_up.chunk(2, -1)``.

    gate_up: [N, 2 * I] (the fused gate/up projection's output; rows may be strided, last
    dim contiguous). Returns a new [N, I] tensor in gate_up's dtype. As torch: silu in fp32,
    rounded to the dtype, then the product in fp32, rounded again.
    """
    _check_rows("gate_up", gate_up)
    n, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up's last dim must be even, got {width}")
    inter = width // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
    )
    return out


def rope(
    qk: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    head_norm_weight: tuple[torch.Tensor, torch.Tensor] | None = None,
    n_q_heads: int | None = None,
    eps: float = 1e-6,
    scale: float = 1.0,
) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face layout) of q and k heads together, **in place**; one launch.

    qk: [N, heads, D], the q heads then the k heads of each token; may be a strided view
    (e.g. ``qkv[:, :q_size + kv_size].view(N, -1, D)``) but its last dim must be contiguous.
    positions: [N] integer token positions; inv_freq: [D / 2] (used as fp32).

    Per token, with ``freqs = positions.float()[:, None] * inv_freq.float()`` (fp32) and
    ``cos``, ``sin`` of it rounded to qk's dtype, each head's halves (x1, x2) become
    ``(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``, computed in fp32 and rounded once: the
    torch path's ``torch.addcmul(x * cos, x.roll(D // 2, -1), signed_sin)`` up to its
    intermediate rounding.

    head_norm_weight: None, or (q_weight [D], k_weight [D]) to RMSNorm each head's D-vector
    first (as ``rms_norm`` on that vector, rounded to qk's dtype; Qwen3's q_norm / k_norm):
    heads ``< n_q_heads`` use q_weight, the rest k_weight. n_q_heads is required with it.
    scale: cos and sin are multiplied by it before rounding (YaRN's attention factor).
    Returns qk (the same tensor).
    """
    if qk.dim() != 3 or qk.stride(2) != 1:
        raise ValueError(f"qk must be [N, heads, D] with a contiguous last dim, got {tuple(qk.shape)}")
    n, n_heads, head_dim = qk.shape
    if head_dim % 2 or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"head_dim must be even and inv_freq [head_dim / 2], got {head_dim}, "
                         f"{tuple(inv_freq.shape)}")
    if positions.shape != (n,):
        raise ValueError(f"positions must be [{n}], got {tuple(positions.shape)}")
    if head_norm_weight is not None:
        if n_q_heads is None or not 0 <= n_q_heads <= n_heads:
            raise ValueError("head_norm_weight needs n_q_heads in [0, heads]")
        q_w, k_w = (w.contiguous() for w in head_norm_weight)
        if q_w.shape != (head_dim,) or k_w.shape != (head_dim,):
            raise ValueError(f"head norm weights must be [{head_dim}]")
    else:
        q_w = k_w = qk  # unused when HEAD_NORM is False
    if n == 0 or n_heads == 0:
        return qk
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    # Tiles of at most 2048 elements (both halves): large head counts split across programs.
    block_h = max(1, min(triton.next_power_of_2(n_heads), 1024 // block_half))
    grid = (n, triton.cdiv(n_heads, block_h))
    _rope_kernel[grid](
        qk, positions.contiguous(), inv_freq.float().contiguous(), q_w, k_w, qk.stride(0), qk.stride(1),
        n_heads, n_q_heads or 0, float(eps), float(scale),
        HALF=half, HEAD_NORM=head_norm_weight is not None, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4,
    )
    return qk
