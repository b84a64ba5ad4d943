"""Published drafter checkpoints -> this project's drafter modules, one conversion per format.

A conversion returns (config, state) in this project's own layout (``EagleConfig`` /
``MedusaConfig`` as a dict with its ``kind``, tensors under our module names), so a
published drafter loads the way a drafter this project trained does
(engine/drafters/loading.py). Which format a directory holds: engine/drafters/registry.py.
EAGLE-3 has its own model and loader (engine/drafters/eagle3.py).

EAGLE-1/2 (SafeAILab/EAGLE eagle/model/cnets1.py; yuhuili/EAGLE-*): at position i the input
is fc(cat(embed(t[i+1]), f[i])), f the target's last hidden state after its final norm; fc
has a bias unless the file lacks one (EAGLE for Llama 3); then Llama decoder layers of which
layer 0 has no input RMSNorm; no final norm; the target's lm_head and embedding (a stored
``embed_tokens.weight`` is the target's own copy, not read).

Medusa-1 (FasterDecoding/Medusa medusa/model/medusa_model.py; medusa_lm_head.pt): head i is
``L`` residual blocks x + SiLU(linear(x)) then its own lm_head [V, H] without bias, on the
target's last hidden state; keys ``{i}.{j}.linear.{weight,bias}`` and ``{i}.{L}.weight``.
"""
from __future__ import annotations

import logging

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.drafters.eagle import EagleConfig
from engine.drafters.medusa import MedusaConfig
from engine.drafters.registry import DrafterFormat, load_pickle, medusa_layout
from engine.drafters.trees import MC_SIM_7B_63

log = logging.getLogger(__name__)


def read_weights(fmt: DrafterFormat, skip: tuple[str, ...] = ("embed_tokens.weight",)) -> dict[str, torch.Tensor]:
    """The tensors of a drafter's weight file (safetensors, or a torch pickle read tensors-only
    and memory-mapped), but those in ``skip``: an EAGLE file's copy of the target's embedding
    is 2 GB for a 70B target, and never read."""
    file = fmt.files[0]
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k not in skip}
    return {k: v for k, v in load_pickle(file, mmap=True).items() if k not in skip}


def convert(fmt: DrafterFormat, target: ModelConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our config dict, our state dict) of a published EAGLE-1/2 or Medusa-1 drafter."""
    converters = {"eagle": eagle_from_published, "medusa1": medusa_from_published}
    if fmt.name not in converters:
        raise ValueError(f"{fmt.path}: no conversion for the {fmt.name} format")
    return converters[fmt.name](fmt, target, read_weights(fmt))


class _Take:
    """Pops tensors by name; ``left`` names what no rule took (unexpected for the format)."""

    def __init__(self, fmt: DrafterFormat, state: dict):
        self.fmt, self.state = fmt, dict(state)

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise ValueError(f"{self.fmt.path}: the {self.fmt.name} drafter lacks {name}")
        return self.state.pop(name)

    def done(self) -> None:
        if self.state:
            raise ValueError(f"{self.fmt.path}: unexpected tensors for a {self.fmt.name} drafter: "
                             f"{', '.join(sorted(self.state)[:8])}")


def eagle_from_published(fmt: DrafterFormat, target: ModelConfig, state: dict) -> tuple[dict, dict]:
    """EAGLE-1/2 -> EagleModel: ``layers.i.self_attn.X_proj`` -> ``layers.i.X_proj``, ``mlp.gate_proj``
    and ``mlp.up_proj`` fused into ``mlp.gate_up_proj`` (gate rows first), norms and fc kept."""
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    # heads, head_dim, rope, eps: its layers are Llama layers, whatever the target's family
    sizes = ModelConfig.from_dict({**fmt.config, "vocab_size": target.vocab_size}, "LlamaForCausalLM")
    cfg = EagleConfig.from_target(sizes, num_layers=layers)
    cfg.input_norm, cfg.fc_bias, cfg.rope_scaling = False, "fc.bias" in state, sizes.rope_scaling
    take = _Take(fmt, state)
    out = {"fc.weight": take("fc.weight")}
    if cfg.fc_bias:
        out["fc.bias"] = take("fc.bias")
    for i in range(layers):
        src = dst = f"layers.{i}."
        for p in "qkvo":
            out[f"{dst}{p}_proj.weight"] = take(f"{src}self_attn.{p}_proj.weight")
        out[f"{dst}mlp.gate_up_proj.weight"] = torch.cat([take(f"{src}mlp.gate_proj.weight"),
                                                          take(f"{src}mlp.up_proj.weight")])
        out[f"{dst}mlp.down_proj.weight"] = take(f"{src}mlp.down_proj.weight")
        out[f"{dst}post_attention_layernorm.weight"] = take(f"{src}post_attention_layernorm.weight")
        if i:  # layer 0 has none
            out[f"{dst}input_layernorm.weight"] = take(f"{src}input_layernorm.weight")
    take.state.pop("embed_tokens.weight", None)  # the target's embedding, shared
    take.done()
    return cfg.to_dict(), out


def medusa_from_published(fmt: DrafterFormat, target: ModelConfig, state: dict) -> tuple[dict, dict]:
    """Medusa-1 -> MedusaModel with per-head lm_heads: ``{i}.{j}.linear.*`` -> ``heads.{i}.{j}.linear.*``,
    ``{i}.{L}.weight`` -> ``lm_heads.{i}.weight``. The heads are counted from the tensors: a
    published config.json may name fewer than the file holds (medusa-vicuna-7b-v1.3 says 2,
    ships 5), and the file is what the heads were trained as."""
    heads, blocks = medusa_layout({k: None for k in state})
    c = fmt.config
    for key, found, what in (("medusa_num_heads", heads, "heads"), ("medusa_num_layers", blocks, "blocks per head")):
        if c.get(key) != found:
            log.warning("drafter %s: config.json says %s=%s, the weights hold %d %s: using %d",
                        fmt.path, key, c.get(key), found, what, found)
    take = _Take(fmt, state)
    out = {}
    for i in range(heads):
        for j in range(blocks):
            for p in ("weight", "bias"):
                out[f"heads.{i}.{j}.linear.{p}"] = take(f"{i}.{j}.linear.{p}")
        out[f"lm_heads.{i}.weight"] = take(f"{i}.{blocks}.weight")
    take.done()
    cfg = MedusaConfig(out["heads.0.0.linear.weight"].shape[0], target.vocab_size, num_heads=heads,
                       num_layers=blocks, head_lm=True, choices=MC_SIM_7B_63)
    return cfg.to_dict(), out
