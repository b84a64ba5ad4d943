"""EAGLE-3 drafters as their authors publish them, searched with EAGLE-2's dynamic tree.

EAGLE-3 (SafeAILab/EAGLE, eagle/model/cnets.py) reads three of the target's hidden states
instead of its last one: the inputs of decoder layers 2, L//2 and L-3 by default
(transformers' ``hidden_states[i]``, index 0 the embedding output), concatenated in layer
order, [N, 3 * H_target]. One decoder layer ("midlayer") then drafts:

    first step:   g = fc(features)                  fc: [H, 3 * H_target], no bias
    later steps:  g = the drafter's own previous output (before its final norm)
    x = cat(input_layernorm(embed(token)), hidden_norm(g))       [2H]: q/k/v read 2H
    h = g + o_proj(attention(x))                      (residual: g itself, or hidden_norm(g)
    out = h + mlp(post_attention_layernorm(h))         with config "norm_before_residual")
    logits = lm_head(norm(out))                       over the draft vocabulary [Vd]
    target id = draft id + d2t[draft id]

The embedding is the checkpoint's ``embed_tokens.weight`` when it ships one (drafters whose
hidden size differs from the target's), else the target's. The tree search is
``EagleDrafter``'s (engine/drafters/eagle.py): it already feeds the model the target's
features for committed tokens and its own outputs for drafted ones, and its DraftHead applies
``norm`` before the draft-vocabulary lm_head. The fused CPU drafter (engine/fused.py) runs
EAGLE-1 layers only, so EAGLE-3 drafts on the torch path.

Published files: config.json (LlamaConfig-like: hidden_size, heads, intermediate_size,
vocab_size, ``draft_vocab_size``, optional ``target_hidden_size``, layer ids: see
``eagle3_feature_layers``) and pytorch_model.bin or model.safetensors with ``fc.weight``,
``midlayer.{hidden_norm, input_layernorm, post_attention_layernorm}.weight``,
``midlayer.self_attn.{q,k,v,o}_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``,
``norm.weight``, ``lm_head.weight``, ``d2t`` [Vd] int64, ``t2d`` [V] bool and, in some,
``embed_tokens.weight``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.config import ModelConfig
from engine.drafters.common import DraftHead
from engine.drafters.eagle import EagleDrafter, draft_attention
from engine.model import MLP, RMSNorm, RotaryEmbedding
from engine.parallel import TPGroup, linear, pack_cpu_weights


@dataclass
class Eagle3Config:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    num_aux_hidden_states: int = 3  # target layers whose inputs fc reads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    norm_before_residual: bool = False  # vLLM's option: the residual is hidden_norm(g), not g
    num_layers: int = 1  # EagleDrafter sizes its KV cache by this; EAGLE-3 has one midlayer

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3Config":
        """From a published config.json (a LlamaConfig with EAGLE-3's fields)."""
        if d.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"EAGLE-3 drafter config: num_hidden_layers={d['num_hidden_layers']}; "
                             "only the one-midlayer architecture is supported")
        # heads, head_dim, rope, read as a target's: the midlayer is a Llama layer, whatever the target
        target = ModelConfig.from_dict({"num_hidden_layers": 1, **d}, "LlamaForCausalLM")
        ids = aux_layer_ids(d)
        return cls(
            hidden_size=target.hidden_size, num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads, head_dim=target.head_dim,
            intermediate_size=target.intermediate_size, vocab_size=target.vocab_size,
            draft_vocab_size=d.get("draft_vocab_size") or target.vocab_size,
            target_hidden_size=d.get("target_hidden_size") or target.hidden_size,
            num_aux_hidden_states=len(ids[0]) if ids else 3,
            rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
            norm_before_residual=bool(d.get("norm_before_residual", False)),
        )

    @classmethod
    def from_target(cls, target: ModelConfig, draft_vocab_size: int | None = None) -> "Eagle3Config":
        """A drafter shaped like one target layer (random drafters in tests)."""
        return cls(target.hidden_size, target.num_attention_heads, target.num_key_value_heads, target.head_dim,
                   target.intermediate_size, target.vocab_size, draft_vocab_size or target.vocab_size,
                   target.hidden_size, rms_norm_eps=target.rms_norm_eps, rope_theta=target.rope_theta,
                   max_position_embeddings=target.max_position_embeddings)


def aux_layer_ids(config: dict) -> tuple[list[int], bool] | None:
    """The layer ids a config names, and whether they count layer outputs; None if it names none.

    Two conventions are published: vLLM reads top-level ``eagle_aux_hidden_state_layer_ids``
    as the *inputs* of those layers (its Llama forward appends ``hidden_states + residual``
    before running layer i); SGLang reads ``eagle_config.eagle_aux_hidden_state_layer_ids``
    (as SpecForge writes it, default [1, L//2 - 1, L - 4]) as layer *outputs* and adds 1.
    """
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if top:
        return list(top), False
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:
        return list(nested), True
    return None


def eagle3_feature_layers(config: dict, target: ModelConfig) -> tuple[int, ...]:
    """The target layers whose inputs an EAGLE-3 drafter reads, ascending (the order the
    published code concatenates them in): EngineConfig.feature_layers for this drafter.

    A layer id i means the input of decoder layer i, transformers' ``hidden_states[i]``.
    Default (no ids in the config): EAGLE's (2, L//2, L-3). Raises ValueError when the ids
    fall outside the target's L layers or coincide (EAGLE's own code would then capture fewer
    features than its fc reads).
    """
    n = target.num_hidden_layers
    named = aux_layer_ids(config)
    if named is None:
        layers, source = [2, n // 2, n - 3], f"EAGLE-3's default (2, L//2, L-3) for L={n}"
    else:
        ids, outputs = named
        layers = [int(i) + 1 for i in ids] if outputs else [int(i) for i in ids]
        source = (f"eagle_config.eagle_aux_hidden_state_layer_ids {ids} (layer outputs: inputs {layers})"
                  if outputs else f"eagle_aux_hidden_state_layer_ids {ids}")
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"EAGLE-3 feature layers {layers} from {source}: the target has {n} layers "
                         f"(layer inputs 0..{n - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"EAGLE-3 feature layers {layers} from {source} coincide: a {n}-layer target is "
                         "too shallow for these ids; name distinct ones in the drafter's config")
    return tuple(sorted(layers))


class Eagle3Layer(nn.Module):
    """EAGLE-3's midlayer: attention over cat(normed embedding, normed hidden) [2H], then a Llama MLP."""

    def __init__(self, cfg: Eagle3Config, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * d, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        mcfg = ModelConfig(cfg.vocab_size, h, cfg.intermediate_size, 1, cfg.num_attention_heads,
                           cfg.num_key_value_heads, d)
        self.mlp = MLP(mcfg, TPGroup(), dtype)
        with torch.no_grad():  # the parallel linears allocate uninitialised weights
            for lin in (self.mlp.gate_up_proj, self.mlp.down_proj):
                bound = lin.weight.shape[1] ** -0.5
                lin.weight.uniform_(-bound, bound)

    def forward(self, emb, g, rope, positions, mask, past_k=None, past_v=None):
        gn = self.hidden_norm(g)
        residual = gn if self.cfg.norm_before_residual else g
        x = torch.cat([self.input_layernorm(emb), gn], dim=-1)
        a, k, v = draft_attention(self, x, rope, positions, mask, past_k, past_v)
        h = residual + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Eagle3Model(nn.Module):
    """fc + midlayer + final norm, with the drafter's own lm_head [Vd, H], d2t [Vd] and, when
    the checkpoint ships one, embedding [V, H] (buffers: the head and the embedding are read
    by EagleDrafter's DraftHead and lookups, not by forward)."""

    def __init__(self, cfg: Eagle3Config, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(cfg.num_aux_hidden_states * cfg.target_hidden_size, h, bias=False, dtype=dtype)
        self.midlayer = Eagle3Layer(cfg, dtype)
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("lm_head", torch.empty(cfg.draft_vocab_size, h, dtype=dtype))
        nn.init.normal_(self.lm_head, std=h ** -0.5)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("embed_tokens", None)  # [V, H] when the checkpoint has its own

    def draft_ids(self) -> torch.Tensor:
        """Target token id of each draft-vocabulary row: [Vd] (draft id + d2t)."""
        return torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t

    def forward(self, tok_emb, hidden, positions, mask, past_k=None, past_v=None):
        """tok_emb [B, n, H]; hidden [B, n, 3 * H_target] (target features: fc projects them) or
        [B, n, H] (the drafter's own earlier outputs); positions [B, n]; mask bool [B, n, P + n];
        past_k/v [1, B, n_kv, P, D] or None. Returns (out [B, n, H] before the final norm,
        k, v [1, B, n_kv, P + n, D])."""
        if hidden.shape[-1] == self.fc.in_features:  # as cnets.py: fc only where the width says target features
            hidden = linear(self.fc, hidden.to(self.fc.weight.dtype))
        elif hidden.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"EAGLE-3 drafter input of width {hidden.shape[-1]}: expected the target's features "
                             f"({self.fc.in_features}) or a drafter output ({self.cfg.hidden_size})")
        out, k, v = self.midlayer(tok_emb, hidden.to(tok_emb.dtype), self.rope, positions, mask,
                                  None if past_k is None else past_k[0], None if past_v is None else past_v[0])
        return out, k.unsqueeze(0), v.unsqueeze(0)


class Eagle3Drafter(EagleDrafter):
    """EagleDrafter over an Eagle3Model; only the kind differs (requests may ask for it by name)."""

    kind = "eagle3"


def _published_names(state: dict) -> dict:
    """Accept the layouts EAGLE-3 files come in: ``midlayer.*`` (EAGLE, SpecForge), ``layers.0.*``
    (speculators, vLLM's own names) and a ``model.`` prefix."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("model.")
        if k.startswith("layers.0."):
            k = "midlayer." + k[len("layers.0."):]
        out[k] = v
    return out


def eagle3_from_state(config: dict | Eagle3Config, state: dict[str, torch.Tensor], target: ModelConfig,
                      dtype=torch.float32) -> Eagle3Model:
    """An Eagle3Model holding a published state dict's weights.

    Raises ValueError on a missing or unexpected key, or a tensor whose shape does not fit the
    config (naming the key and both shapes), and on a d2t that maps outside the target's vocabulary.
    """
    cfg = config if isinstance(config, Eagle3Config) else Eagle3Config.from_dict(config)
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"EAGLE-3 drafter vocab_size {cfg.vocab_size} != the target's {target.vocab_size}")
    if cfg.target_hidden_size != target.hidden_size:
        raise ValueError(f"EAGLE-3 drafter target_hidden_size {cfg.target_hidden_size} != the target's "
                         f"hidden size {target.hidden_size}")
    state = _published_names(state)
    h, d, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    m = "midlayer."
    shapes = {
        "fc.weight": (h, cfg.num_aux_hidden_states * cfg.target_hidden_size),
        m + "hidden_norm.weight": (h,), m + "input_layernorm.weight": (h,),
        m + "post_attention_layernorm.weight": (h,),
        m + "self_attn.q_proj.weight": (nh * d, 2 * h), m + "self_attn.k_proj.weight": (nkv * d, 2 * h),
        m + "self_attn.v_proj.weight": (nkv * d, 2 * h), m + "self_attn.o_proj.weight": (h, nh * d),
        m + "mlp.gate_proj.weight": (cfg.intermediate_size, h), m + "mlp.up_proj.weight": (cfg.intermediate_size, h),
        m + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        "norm.weight": (h,), "lm_head.weight": (cfg.draft_vocab_size, h),
    }
    optional = {"d2t": (cfg.draft_vocab_size,), "t2d": (cfg.vocab_size,), "embed_tokens.weight": (cfg.vocab_size, h)}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes) - set(optional))
    if missing or unexpected:
        raise ValueError(f"not an EAGLE-3 state dict: missing {missing}, unexpected {unexpected}")
    for key, shape in {**shapes, **optional}.items():
        if key in state and tuple(state[key].shape) != shape:
            raise ValueError(f"EAGLE-3 weight {key}: shape {tuple(state[key].shape)}, the config needs {shape}")
    if "d2t" not in state and cfg.draft_vocab_size != cfg.vocab_size:
        raise ValueError(f"EAGLE-3 state dict has no d2t but drafts over {cfg.draft_vocab_size} of "
                         f"{cfg.vocab_size} tokens")
    if "embed_tokens.weight" not in state and h != target.hidden_size:
        raise ValueError(f"EAGLE-3 drafter of hidden size {h} ships no embed_tokens.weight and cannot share "
                         f"the target's embedding (hidden size {target.hidden_size})")

    model = Eagle3Model(cfg, dtype)
    w = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    layer = model.midlayer
    with torch.no_grad():
        model.fc.weight.copy_(w["fc.weight"])
        for name in ("hidden_norm", "input_layernorm", "post_attention_layernorm"):
            getattr(layer, name).weight.copy_(w[f"{m}{name}.weight"])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer, name).weight.copy_(w[f"{m}self_attn.{name}.weight"])
        layer.mlp.gate_up_proj.weight.copy_(torch.cat([w[m + "mlp.gate_proj.weight"], w[m + "mlp.up_proj.weight"]]))
        layer.mlp.down_proj.weight.copy_(w[m + "mlp.down_proj.weight"])
        model.norm.weight.copy_(w["norm.weight"])
        model.lm_head.copy_(w["lm_head.weight"])
        if "d2t" in state:
            model.d2t.copy_(state["d2t"].long())
        if "embed_tokens.weight" in state:
            model.embed_tokens = w["embed_tokens.weight"].clone()
    ids = model.draft_ids()
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"EAGLE-3 d2t maps draft ids to target ids outside [0, {cfg.vocab_size})")
    if "t2d" in state and not bool(state["t2d"].bool()[ids].all()):
        raise ValueError("EAGLE-3 d2t and t2d disagree: a draft row maps to a target id t2d does not mark")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def eagle3_drafter(model: Eagle3Model, embed: torch.Tensor | None, dtype, device, top_k: int = 10, depth: int = 8,
                   min_prob: float = 0.0) -> Eagle3Drafter:
    """A ready drafter: ``model`` (moved to device, dtype), EAGLE-2's search (top_k children per
    frontier node, depth levels, the draft_min_prob stop), and the embedding: the model's own
    when its checkpoint ships one, else ``embed`` (the target's [V, H])."""
    device = torch.device(device)
    inv_freq = model.rope.inv_freq
    model = model.to(device, dtype)
    model.rope.inv_freq = inv_freq.to(device)  # RoPE frequencies stay fp32, as the target's
    own = model.embed_tokens
    if own is None and embed is None:
        raise ValueError("an EAGLE-3 drafter without embed_tokens needs the target's embedding")
    embed = (own if own is not None else embed).detach().to(device, dtype)
    ids = model.draft_ids() if model.cfg.draft_vocab_size != model.cfg.vocab_size else None
    if ids is not None and torch.equal(ids, torch.arange(model.cfg.vocab_size, device=device)):
        ids = None
    head = DraftHead(model.lm_head, ids, norm=model.norm, rows_selected=True).to(device)
    if device.type == "cpu":
        pack_cpu_weights(model)  # bf16 only (a no-op otherwise): oneDNN's packed layout streams faster
        pack_cpu_weights(head)
    return Eagle3Drafter(model, embed, head, top_k, depth, min_prob, fused=None)


def load_eagle3(state: dict, config: dict, target: ModelConfig, embed: torch.Tensor | None,
                dtype=torch.float32, device="cpu", top_k: int = 10, depth: int = 8,
                min_prob: float = 0.0) -> Eagle3Drafter:
    """A published EAGLE-3 drafter, ready to draft for ``target``.

    state, config: its weights and config.json (engine/drafters/published.py ``read_weights``
        and the registry's ``DrafterFormat.config``).
    embed: the target's embedding weight [V, H] (used unless the checkpoint has its own).
    The target must capture ``eagle3_feature_layers(config, target)`` (EngineConfig.feature_layers).
    """
    eagle3_feature_layers(config, target)  # fail here, not at the first step, when the target is too shallow
    model = eagle3_from_state(config, state, target, dtype)
    return eagle3_drafter(model, embed, dtype, device, top_k, depth, min_prob)
