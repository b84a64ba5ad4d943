"""The fused elementwise Triton kernels (treespec_kernels/triton_ops.py) against plain torch.

Runs in Triton's interpreter on a machine without CUDA, with the flag handling of
tests/test_kernels_attention.py (TRITON_INTERPRET=1 while the module is imported and while
each test runs). Each op is compared with the torch formula of the engine's path written
out here (not taken from the module under test), in fp32 and fp16, for 1, 7 and 33 rows,
power-of-two and other widths, and strided row views: RMSNorm, residual add + RMSNorm
(whose new residual must equal ``x + residual`` exactly, written in place), SiLU-mul, and
RoPE of a q|k slice of a wider qkv row, with and without per-head norms (Qwen3).
"""
import pytest
import torch
import torch.nn.functional as F

from test_kernels_attention import _triton_interpreter  # noqa: F401 (autouse: the interpreter flag)
from test_kernels_attention import DEVICE
from test_kernels_attention import triton_ops as ops


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
ROWS = pytest.mark.parametrize("n", [1, 7, 33])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
EPS = 1e-6


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[expected.dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


# --------------------------------------------------------------------------- torch formulas

def torch_rms_norm(x, weight, eps=EPS):
    """engine.model.RMSNorm: normalise in fp32, round to x's dtype, multiply by the weight."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rope(x, positions, inv_freq, scale=1.0):
    """The engine's rotate-half RoPE: x [N, heads, D] -> rotated copy in x's dtype; cos and sin
    multiplied by scale (YaRN's attention factor)."""
    freqs = positions.float()[:, None] * inv_freq.float()
    cos = (torch.cat([freqs.cos(), freqs.cos()], -1) * scale)[:, None].to(x.dtype)
    sin = (torch.cat([-freqs.sin(), freqs.sin()], -1) * scale)[:, None].to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def inv_freq_for(head_dim, theta=10000.0):
    return (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float().to(DEVICE)


# --------------------------------------------------------------------------- RMSNorm

@DTYPES
@ROWS
@pytest.mark.parametrize("hidden", [64, 96, 576])
def test_rms_norm(n, hidden, dtype):
    x = randn(n, hidden, dtype=dtype, seed=n * hidden, scale=3.0)
    weight = randn(hidden, dtype=dtype, seed=1, scale=0.5) + 1
    out = ops.rms_norm(x, weight, EPS)
    assert_close(out, torch_rms_norm(x, weight))


@DTYPES
def test_rms_norm_strided_rows(dtype):
    wide = randn(7, 1000, dtype=dtype, seed=2)
    x = wide[:, 100:676]  # rows 1000 apart
    weight = randn(576, dtype=dtype, seed=3) + 1
    assert_close(ops.rms_norm(x, weight, EPS), torch_rms_norm(x, weight))


def test_rms_norm_fp32_weight_promotes_like_torch():
    x = randn(7, 96, dtype=torch.float16, seed=4)
    weight = randn(96, dtype=torch.float32, seed=5) + 1
    out = ops.rms_norm(x, weight, EPS)
    expected = torch_rms_norm(x, weight)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@DTYPES
@ROWS
@pytest.mark.parametrize("hidden", [64, 96, 576])
def test_add_rms_norm(n, hidden, dtype):
    x = randn(n, hidden, dtype=dtype, seed=10 + n * hidden)
    residual = randn(n, hidden, dtype=dtype, seed=20 + n * hidden, scale=4.0)
    weight = randn(hidden, dtype=dtype, seed=6, scale=0.5) + 1
    expected_residual = x + residual
    expected = torch_rms_norm(expected_residual, weight)
    x_before = x.clone()

    normed, new_residual = ops.add_rms_norm(x, residual, weight, EPS)
    assert new_residual is residual  # written in place
    assert torch.equal(new_residual, expected_residual)
    assert torch.equal(x, x_before)
    assert_close(normed, expected)


def test_add_rms_norm_strided_rows():
    wide = randn(33, 2 * 576, dtype=torch.float16, seed=7)
    x, residual = wide[:, :576], wide[:, 576:]
    weight = randn(576, dtype=torch.float16, seed=8) + 1
    expected_residual = x + residual
    normed, new_residual = ops.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(wide[:, 576:], expected_residual)  # the view's storage was updated
    assert torch.equal(wide[:, :576], x)
    assert_close(normed, torch_rms_norm(expected_residual, weight))


# --------------------------------------------------------------------------- SiLU-mul

@DTYPES
@ROWS
@pytest.mark.parametrize("inter", [64, 96, 576, 1100])  # 1100: two column blocks, the last partial
def test_silu_mul(n, inter, dtype):
    gate_up = randn(n, 2 * inter, dtype=dtype, seed=30 + n * inter, scale=3.0)
    gate, up = gate_up.chunk(2, -1)
    assert_close(ops.silu_mul(gate_up), F.silu(gate) * up)


def test_silu_mul_strided_rows():
    wide = randn(7, 3 * 96, dtype=torch.float16, seed=9, scale=3.0)
    gate_up = wide[:, 96:]  # the gate|up part of a wider row
    gate, up = gate_up.chunk(2, -1)
    assert_close(ops.silu_mul(gate_up), F.silu(gate) * up)


# --------------------------------------------------------------------------- RoPE

# head_dim, q heads, kv heads. (128, 14, 4): 18 heads, more than one head tile per token,
# the q/k boundary inside the second; 96: a half (48) that is not a power of two.
ROPE_SHAPES = [(64, 4, 2), (128, 14, 4), (96, 3, 1)]


def qkv_rows(n, head_dim, n_q, n_kv, dtype, seed):
    """A fused qkv projection output [n, (n_q + 2 n_kv) D] and its q|k view [n, n_q + n_kv, D]."""
    qkv = randn(n, (n_q + 2 * n_kv) * head_dim, dtype=dtype, seed=seed, scale=2.0)
    return qkv, qkv[:, : (n_q + n_kv) * head_dim].view(n, n_q + n_kv, head_dim)


def positions_for(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32768, (n,), generator=g).to(DEVICE)


@DTYPES
@ROWS
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: f"d{s[0]}-q{s[1]}-kv{s[2]}")
@pytest.mark.parametrize("head_norm,scale", [(False, 1.0), (True, 1.0), (False, 1.1386)],
                         ids=["rope", "norm-rope", "yarn-scale"])
def test_rope(n, shape, dtype, head_norm, scale):
    """With head_norm, each q and k head is RMS-normalised with its weight first (Qwen3); with
    scale, cos and sin are multiplied by it (YaRN's attention factor for factor 4)."""
    head_dim, n_q, n_kv = shape
    qkv, qk = qkv_rows(n, head_dim, n_q, n_kv, dtype, seed=40 + n)
    positions, inv_freq = positions_for(n, 41 + n), inv_freq_for(head_dim)
    before = qkv.clone()
    weights = None
    if head_norm:
        weights = (randn(head_dim, dtype=dtype, seed=52, scale=0.5) + 1,
                   randn(head_dim, dtype=dtype, seed=53, scale=0.5) + 1)
        q, k = qk.split([n_q, n_kv], dim=1)
        expected = torch.cat([torch_rope(torch_rms_norm(q, weights[0]), positions, inv_freq),
                              torch_rope(torch_rms_norm(k, weights[1]), positions, inv_freq)], dim=1)
    else:
        expected = torch_rope(qk.clone(), positions, inv_freq, scale)

    assert ops.rope(qk, positions, inv_freq, head_norm_weight=weights, n_q_heads=n_q, eps=EPS, scale=scale) is qk
    assert_close(qk, expected)
    v_cols = (n_q + n_kv) * head_dim
    assert torch.equal(qkv[:, v_cols:], before[:, v_cols:])  # v untouched


def test_rope_position_zero_is_identity():
    # cos 0 = 1, sin 0 = 0: every head comes back unchanged, bit for bit.
    qkv, qk = qkv_rows(7, 64, 4, 2, torch.float16, seed=60)
    before = qk.clone()
    ops.rope(qk, torch.zeros(7, dtype=torch.int64, device=DEVICE), inv_freq_for(64))
    assert torch.equal(qk, before)


def test_rope_rejects_bad_arguments():
    _, qk = qkv_rows(3, 64, 4, 2, torch.float32, seed=61)
    positions, inv_freq = positions_for(3, 62), inv_freq_for(64)
    with pytest.raises(ValueError):
        ops.rope(qk.transpose(1, 2), positions, inv_freq)  # last dim not contiguous
    with pytest.raises(ValueError):
        ops.rope(qk, positions, inv_freq_for(32))
    with pytest.raises(ValueError):
        ops.rope(qk, positions, inv_freq, head_norm_weight=(inv_freq_for(128), inv_freq_for(128)))  # no n_q_heads
