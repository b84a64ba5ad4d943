"""Which checkpoints the engine serves: the architecture registry, keyed by config.json.

Every registered architecture is a Llama-shaped decoder (RMSNorm, rotary attention with
GQA, SwiGLU MLP) built by engine/model.py; the families differ in a few switches:

=====================  ==========  ===========  ============  ========================
architecture           QKV bias    q/k RMSNorm  o_proj bias   sliding window
=====================  ==========  ===========  ============  ========================
LlamaForCausalLM       attention_bias           attention_bias  none
MistralForCausalLM     no          no           no            ``sliding_window``
Qwen2ForCausalLM       yes         no           no            ``use_sliding_window``
Qwen3ForCausalLM       attention_bias  yes      attention_bias  ``use_sliding_window``
=====================  ==========  ===========  ============  ========================

``architecture_fields(config)`` reads those switches from a config.json dict and refuses,
with a message naming it, every architecture or setting the engine cannot honour (an
unknown architecture, another activation, MLP biases, a quantized checkpoint, a RoPE type
engine/model.py does not compute (default, linear, llama3 and YaRN it does), partial rotary
embeddings): a setting is served exactly
or not at all, never ignored.

Sliding-window attention: the attention kernels attend over the whole context, which equals
a sliding window while the context fits in the window. A model with a window therefore
serves contexts up to the window (``ModelConfig.max_context``) and refuses a longer
``max_model_len`` (engine/config.py ``EngineConfig.check_model``).

No torch import: the CLI, the app and the planner read configs without loading a model.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type" (read when "architectures" is absent)
    family: str  # the name docs and logs use
    qkv_bias: bool | None  # biases on q, k, v: True/False fixed by the architecture, None = "attention_bias"
    o_bias: bool | None  # a bias on o_proj, the same convention
    qk_norm: bool  # an RMSNorm over each head of q and k before RoPE (Qwen3)
    window_field: str | None  # how the config turns a sliding window on, None if it cannot


ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", "Llama", None, None, False, None),
    Architecture("MistralForCausalLM", "mistral", "Mistral", False, False, False, "sliding_window"),
    Architecture("Qwen2ForCausalLM", "qwen2", "Qwen2", True, False, False, "use_sliding_window"),
    Architecture("Qwen3ForCausalLM", "qwen3", "Qwen3", None, None, True, "use_sliding_window"),
)}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # what engine/model.py rope_inv_freq computes


class UnsupportedModel(ValueError):
    """A config.json the engine cannot serve exactly; the message names what and why."""


def architecture_of(config: dict) -> Architecture:
    names = config.get("architectures") or []
    if not names:
        by_type = {a.model_type: a for a in ARCHITECTURES.values()}
        if config.get("model_type") in by_type:
            return by_type[config["model_type"]]
        raise UnsupportedModel(f"config.json names no architecture (model_type {config.get('model_type')!r}); "
                               f"supported: {', '.join(ARCHITECTURES)}")
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise UnsupportedModel(f"architecture {', '.join(names)} is not supported; supported: "
                               f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[names[0]]


def rope_type(config: dict) -> str:
    """The RoPE type of a config in either transformers layout (v5 ``rope_parameters``, v4
    ``rope_scaling``)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type", "default"))


def sliding_window(config: dict, arch: Architecture) -> int | None:
    """The window some layers attend over, or None when every layer sees the whole context."""
    window = config.get("sliding_window")
    if arch.window_field is None or not window:
        return None
    if arch.window_field == "use_sliding_window":
        if not config.get("use_sliding_window", False):
            return None
        types = config.get("layer_types")
        if types is not None:  # transformers v5: one entry per layer
            return int(window) if "sliding_attention" in types else None
        # v4 configs: layers from max_window_layers on use the window
        first = config.get("max_window_layers", 0)
        return int(window) if first < config["num_hidden_layers"] else None
    return int(window)


def architecture_fields(config: dict) -> dict:
    """config.json dict -> the ModelConfig fields that depend on the architecture:
    ``architecture``, ``qkv_bias``, ``o_bias``, ``qk_norm``, ``sliding_window``.
    Raises UnsupportedModel for anything the engine would otherwise have to ignore."""
    arch = architecture_of(config)
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act != "silu":
        raise UnsupportedModel(f"{arch.name}: hidden_act {act!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise UnsupportedModel(f"{arch.name}: mlp_bias=true is not supported")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise UnsupportedModel(f"{arch.name}: quantized checkpoints ({method}) are not supported; "
                               "serve the bf16/fp16 weights")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope_type(config) not in ROPE_TYPES:
        raise UnsupportedModel(f"{arch.name}: unsupported rope_scaling type {rope_type(config)!r} "
                               f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type(config) == "yarn" and not (rope.get("factor") and rope.get("original_max_position_embeddings")):
        raise UnsupportedModel(f"{arch.name}: yarn needs factor and original_max_position_embeddings in rope_scaling")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModel(f"{arch.name}: partial_rotary_factor != 1 is not supported")
    types = set(config.get("layer_types") or []) - {"full_attention", "sliding_attention"}
    if types:
        raise UnsupportedModel(f"{arch.name}: layer_types {sorted(types)} are not supported")
    bias = bool(config.get("attention_bias", False))
    return dict(
        architecture=arch.name,
        qkv_bias=bias if arch.qkv_bias is None else arch.qkv_bias,
        o_bias=bias if arch.o_bias is None else arch.o_bias,
        qk_norm=arch.qk_norm,
        sliding_window=sliding_window(config, arch),
    )
