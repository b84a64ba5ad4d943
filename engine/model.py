"""The Llama-shaped decoder every registered architecture builds (Llama, Mistral, Qwen2,
Qwen3: engine/architectures.py), with tensor parallelism decided at build time.

Shapes: the forward takes the new tokens of all sequences flattened,
``input_ids [N]`` and ``positions [N]``, plus AttentionMetadata, and returns the
final hidden states ``[N, hidden]`` (after the last RMSNorm; these are also the
features EAGLE drafters read). ``compute_logits`` maps them to ``[N, vocab]``.
``forward_features`` also returns the inputs of chosen layers (EAGLE-3's features).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import AttentionMetadata, attend, write_kv
from engine.config import ModelConfig
from engine.parallel import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    TPGroup,
    VocabParallelEmbedding,
    replicated_loader,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = replicated_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with llama3 / linear / YaRN scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "yarn":
        # Dimensions that turn fewer than beta_slow times over the original context are
        # interpolated (slowed by the factor), those turning more than beta_fast times kept,
        # with a linear ramp between (YaRN, arXiv:2309.00071; transformers' rounding of the range).
        factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def dim_turning(turns: float) -> float:
            return head_dim * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_turning(fast), dim_turning(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        return (inv_freq / factor * ramp + inv_freq * (1 - ramp)).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, blended, out).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def rope_attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature (its ``attention_factor``,
    else 0.1 ln(factor) + 1, or the ratio of its two mscale terms); 1 for the other types."""
    scaling = scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (Hugging Face layout).

    cos/sin are computed once per forward from the positions (no [max_positions, D]
    table: that would be 128 MiB for a 128k-context model) and shared by all layers.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self.attention_factor = rope_attention_factor(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos [N, 1, D], signed sin [N, 1, D] (first half negated), in dtype."""
        freqs = positions.float()[:, None] * self.inv_freq.float()  # fp32 like transformers, even after .to(bf16)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return torch.cat([cos, cos], -1)[:, None].to(dtype), torch.cat([-sin, sin], -1)[:, None].to(dtype)

    def rotate(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        """x [N, heads, D] (may be a strided view) -> rotated copy, in x's dtype.

        x * cos + rotate_half(x) * sin, where rotate_half(x) * sin == roll(x, D/2) * signed sin:
        three ops for q and k together instead of a dozen each.
        """
        cos, sin = cos_sin
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin=None):
        """positions [N]; q [N, H, D], k [N, Hkv, D] -> rotated q, k."""
        cos_sin = cos_sin if cos_sin is not None else self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos_sin), self.rotate(k, cos_sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, rope: RotaryEmbedding, dtype):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, tp, dtype,
            bias=cfg.qkv_bias,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, tp, dtype,
                                        bias=cfg.o_bias)
        # Qwen3: each head of q and k RMS-normalised over head_dim before RoPE (weights shared by heads)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rope = rope
        self.scale = cfg.head_dim ** -0.5
        self.k_cache = self.v_cache = None  # [num_blocks, block_size, n_kv_local, D], set by the runner

    def forward(self, x, positions, meta: AttentionMetadata, cos_sin=None):
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        # q and k are adjacent in the fused projection: rotate them as one [n, H + Hkv, D] block.
        qk = qkv[:, : q_size + kv_size].view(n, -1, self.head_dim)
        if meta.ops is not None:  # one launch: the q/k head norms and RoPE, in place
            norms = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            meta.ops.rope(qk, positions, self.rope.inv_freq, norms, self.num_heads,
                          self.q_norm.eps if norms else 0.0, scale=self.rope.attention_factor)
        else:
            cos_sin = cos_sin if cos_sin is not None else self.rope.cos_sin(positions, x.dtype)
            if self.q_norm is not None:
                q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
                qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
            qk = self.rope.rotate(qk, cos_sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size:].view(n, self.num_kv_heads, self.head_dim)
        write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        o = attend(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(n, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, tp, dtype
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, dtype)

    def forward(self, x, ops=None):
        """ops: treespec_kernels.triton_ops on the Triton path (silu(gate) * up in one launch)."""
        gate_up = self.gate_up_proj(x)
        if ops is not None:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, rope: RotaryEmbedding, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, tp, rope, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, tp, dtype)

    def forward(self, x, positions, meta, cos_sin=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, delta, residual, positions, meta):
        """The Triton path: each residual add runs fused with the norm after it (meta.ops).
        delta: the previous layer's MLP output, added to ``residual`` (the stream, updated in
        place) here; None at layer 0. Returns (this layer's MLP output, the stream)."""
        ops, eps = meta.ops, self.input_layernorm.eps
        if delta is None:
            h = ops.rms_norm(residual, self.input_layernorm.weight, eps)
        else:
            h, residual = ops.add_rms_norm(delta, residual, self.input_layernorm.weight, eps)
        attn = self.self_attn(h, positions, meta)
        h, residual = ops.add_rms_norm(attn, residual, self.post_attention_layernorm.weight, eps)
        return self.mlp(h, ops), residual


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, self.rope, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, meta, inputs_embeds=None, capture: tuple[int, ...] | None = None):
        """-> the final normed hidden [N, H]; with ``capture`` (layer ids), also the inputs of
        those layers, concatenated in that order: [N, len(capture) * H]. Layer i's input is the
        whole residual stream there, transformers' ``hidden_states[i]`` (0: the embedding
        output); EAGLE-3 drafters read three of them."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        taps = {}
        if meta.ops is not None:  # the Triton path: x is the stream, updated in place
            x, delta = (x if inputs_embeds is None else x.clone()), None
            for i, layer in enumerate(self.layers):
                if capture is not None and i in capture:
                    taps[i] = x.clone() if delta is None else x + delta
                delta, x = layer.forward_fused(delta, x, positions, meta)
            hidden, _ = meta.ops.add_rms_norm(delta, x, self.norm.weight, self.norm.eps)
        else:
            cos_sin = self.rope.cos_sin(positions, x.dtype)
            for i, layer in enumerate(self.layers):
                if capture is not None and i in capture:
                    taps[i] = x
                x = layer(x, positions, meta, cos_sin)
            hidden = self.norm(x)
        if capture is None:
            return hidden
        return hidden, torch.cat([taps[i] for i in capture], dim=-1)


class CausalLM(nn.Module):
    # HF checkpoint name -> (our parameter, shard id) for the fused projections.
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, dtype=torch.float32):
        super().__init__()
        tp = tp or TPGroup()
        cfg.validate_tp(tp.world_size)
        self.config, self.tp = cfg, tp
        self.model = Decoder(cfg, tp, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self):
        return self.model.layers

    def forward(self, input_ids, positions, meta: AttentionMetadata, inputs_embeds=None) -> torch.Tensor:
        """input_ids, positions: [N] -> hidden [N, hidden]."""
        return self.model(input_ids, positions, meta, inputs_embeds)

    def forward_features(self, input_ids, positions, meta: AttentionMetadata,
                         layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: [N] -> (final hidden [N, hidden] for the logits, the inputs of
        ``layers`` concatenated: [N, len(layers) * hidden]). Every rank holds them whole: the
        residual stream is replicated after each row-parallel all-reduce."""
        return self.model(input_ids, positions, meta, capture=layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (full vocab on every rank)."""
        return self.lm_head(hidden)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)
