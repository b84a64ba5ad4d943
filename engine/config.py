"""Model configuration read from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

from engine.architectures import ARCHITECTURES, architecture_fields
from engine.drafters.registry import KINDS


@dataclass
class ModelConfig:
    """The hyper-parameters of a Llama-shaped decoder the engine needs.

    architecture and the switches after it say which family's variant it is
    (engine/architectures.py): biases on q/k/v and o_proj, an RMSNorm over each q/k head,
    and the sliding window some layers use (None: none).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: dict, architecture: str | None = None) -> "ModelConfig":
        """A config.json dict -> ModelConfig; engine.architectures.UnsupportedModel (a
        ValueError naming it) for an architecture or setting the engine cannot honour.
        architecture: read d as this one, whatever it names (a drafter's config.json describes
        Llama-shaped layers under an architecture name of its own)."""
        if architecture is not None:
            d = {**d, "architectures": [architecture]}
        heads = d["num_attention_heads"]
        # transformers v5 writes "rope_parameters" (theta inside); v4 checkpoints use
        # "rope_theta" + "rope_scaling". Accept both.
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else d.get("rope_scaling")
        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            **architecture_fields(d),
        )

    @classmethod
    def from_path(cls, path: str) -> "ModelConfig":
        """path: a checkpoint directory or a config.json file."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture].family

    @property
    def max_context(self) -> int:
        """The longest context served exactly: the positions, and the sliding window if the model
        has one (attention runs over the whole context, equal to the window only within it)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    def validate_tp(self, world_size: int) -> None:
        """Raise ValueError unless ``world_size`` shards this model evenly."""
        if world_size < 1:
            raise ValueError(f"tp must be >= 1, got {world_size}")
        if self.num_attention_heads % world_size:
            raise ValueError(
                f"tp={world_size} must divide the {self.num_attention_heads} attention heads"
            )
        kv = self.num_key_value_heads
        if kv % world_size and world_size % kv:
            raise ValueError(
                f"tp={world_size} must divide the {kv} KV heads or be a multiple of them"
            )


DRAFTER_KINDS = ("off", *KINDS)  # engine/drafters/registry.py
CPU_KV_CACHE_GIB = 0.5  # the KV cache of a CPU replica, where no device memory is measured
ATTENTION_BACKENDS = ("auto", "torch", "triton")  # engine/attention.py
CUDA_GRAPHS = ("auto", "on", "off")  # engine/graphs.py


@dataclass
class EngineConfig:
    """Everything needed to build one engine replica (shared with actors/ and app/).

    Fields left at "auto" / None take the device's defaults when the engine is built
    (``resolve``), so every entry point (server, CLI, benchmarks) serves the same way.

    model: a HF checkpoint directory, or "default" for the embedded SmolLM2-135M-Instruct.
    dtype: "float32", "bfloat16", "float16", or "auto" (``auto_dtype``; with a given
        executor, the executor's dtype).
    drafter: the drafter kind loaded at start: "off", "eagle", "eagle3", "medusa", or "auto" (the
        kind at draft_path, or the default model's shipped drafter, else off: ``default_drafter``);
        requests and the router may switch speculation off per step, never on without one.
    draft_path: drafter directory, this project's layout or a published one (EAGLE-1/2,
        EAGLE-3, Medusa-1: engine/drafters/registry.py); None means the shipped drafter of
        the default model.
    tree_budget: draft tree nodes per sequence per step (0 disables speculation; None:
        ``auto_tree_budget``).
    draft_depth, draft_top_k: EAGLE-2 tree search (depth levels, children per node; the
        paper uses top-k 10).
    draft_vocab_size: at most this many draft-head rows, the drafter's most frequent
        tokens first (its ``draft_vocab_order`` must be "frequency"); 0: all of them; None:
        ``auto_draft_vocab_size``. A smaller head reads fewer bytes per draft depth, which
        pays for small CPU trees.
    draft_min_prob: EAGLE stops drafting deeper once the likeliest frontier path is less
        likely than this (0: EAGLE-2's exact search, which expands while a deeper node could
        still enter the tree; None: ``auto_draft_min_prob``).
    draft_int8: the fused CPU drafters (engine/fused.py) keep int8 weights where the CPU has
        AMX-INT8 or AVX512-VNNI, or runs the AVX2 build of the kernel: a draft call streams
        half the bytes. Drafts only rank candidates and verification against the target
        keeps the output exact, so only tau can change.
    lookup_tokens: while speculating, also verify up to this many tokens that followed the
        latest earlier occurrence of the sequence's last 2-4 tokens (prompt lookup, merged
        into the drafter's tree as one more chain; engine/lookup.py); 0 disables it. These
        nodes come on top of tree_budget and cost no drafter forward.
    num_blocks: KV blocks; None sizes the cache from kv_cache_gib.
    kv_cache_gib: the KV cache's size per rank; None (auto): on a GPU, what
        gpu_memory_utilization of its memory leaves after the weights and a profiled forward
        at the largest step (engine/kv_cache.py kv_blocks_for_memory, shared with
        engine/plan.py); on CPU, CPU_KV_CACHE_GIB.
    gpu_memory_utilization: the fraction of each GPU the replica may use (weights, one
        step's activations and the KV cache).
    attention_backend: "auto" (Triton on CUDA; on CPU torch, or the fused C kernel for a
        bf16 model), "torch" or "triton" (on CPU in Triton's interpreter: slow, for tests).
    feature_layers: the target features a drafter reads: None, the final normed hidden state
        (EAGLE, Medusa); else the inputs of these decoder layers (transformers'
        ``hidden_states[i]``, 0 the embedding output), concatenated [N, len * H] (EAGLE-3:
        engine/drafters/eagle3.py ``eagle3_feature_layers``). The target then runs its torch
        forward on a CPU, not the fused kernel.
    cuda_graphs: "auto" (on CUDA with Triton attention: decode and verify steps padded to
        bucketed shapes and replayed as CUDA graphs, engine/graphs.py), "on" (also on CPU,
        where the padded steps run eagerly: for tests), or "off".
    """

    model: str = "default"
    tp: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    drafter: str = "auto"
    draft_path: str | None = None
    tree_budget: int | None = None
    draft_depth: int = 8
    draft_top_k: int = 10
    draft_vocab_size: int | None = None
    draft_min_prob: float | None = None
    draft_int8: bool = True
    lookup_tokens: int = 6
    attention_backend: str = "auto"
    seed: int = 0
    feature_layers: tuple[int, ...] | None = None
    cuda_graphs: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.drafter not in DRAFTER_KINDS + ("auto",):
            raise ValueError(f"drafter must be one of {DRAFTER_KINDS + ('auto',)}, got {self.drafter!r}")
        for name in ("tp", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 (0: all), got {self.draft_vocab_size}")
        if self.draft_min_prob is not None and not 0.0 <= self.draft_min_prob < 1.0:
            raise ValueError(f"draft_min_prob must be in [0, 1), got {self.draft_min_prob}")
        if self.draft_depth < 1 or self.draft_top_k < 1:
            raise ValueError(f"draft_depth and draft_top_k must be >= 1, got {self.draft_depth}, {self.draft_top_k}")
        if self.tree_budget is not None and self.tree_budget < 0:
            raise ValueError(f"tree_budget must be >= 0, got {self.tree_budget}")
        if self.lookup_tokens < 0:
            raise ValueError(f"lookup_tokens must be >= 0, got {self.lookup_tokens}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs must be one of {CUDA_GRAPHS}, got {self.cuda_graphs!r}")
        if self.feature_layers is not None:
            layers = self.feature_layers
            if (not isinstance(layers, (list, tuple)) or not layers
                    or any(not isinstance(i, int) or i < 0 for i in layers)):
                raise ValueError(f"feature_layers must be None or a list of layer ids >= 0, got {layers!r}")
            self.feature_layers = tuple(layers)  # a list from JSON / YAML

    def resolve(self, executor_dtype: str | None = None) -> "EngineConfig":
        """A copy with every "auto" / None default replaced by the device's value.

        executor_dtype: the dtype of an executor the engine is given (its drafter must match).
        Resolving a resolved config changes nothing.
        """
        dtype = self.dtype if self.dtype != "auto" else executor_dtype or auto_dtype(self.device)
        drafter = self.drafter
        if drafter == "auto":
            from engine.drafters.loading import default_drafter

            drafter = default_drafter(self.model, self.device, self.draft_path)
        feature_layers = self.feature_layers
        if drafter == "eagle3" and feature_layers is None:
            feature_layers = eagle3_features(self.model, self.draft_path)
        return dataclasses.replace(
            self, dtype=dtype, drafter=drafter, feature_layers=feature_layers,
            tree_budget=auto_tree_budget(self.device) if self.tree_budget is None else self.tree_budget,
            draft_vocab_size=(auto_draft_vocab_size(self.device) or 0) if self.draft_vocab_size is None
            else self.draft_vocab_size,
            draft_min_prob=auto_draft_min_prob(self.device) if self.draft_min_prob is None else self.draft_min_prob,
        )

    def check_model(self, model: ModelConfig) -> None:
        """Raise ValueError unless this config can serve ``model`` (TP split, context length)."""
        model.validate_tp(self.tp)
        if self.max_model_len > model.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"{model.max_position_embeddings} positions"
            )
        if self.max_model_len > model.max_context:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds this {model.family} model's sliding window of "
                f"{model.sliding_window} tokens; attention over a window is not implemented, so contexts "
                f"are served up to the window: set max_model_len <= {model.max_context}"
            )


def eagle3_features(model: str, draft_path: str | None) -> tuple[int, ...]:
    """The target layers an EAGLE-3 drafter at draft_path (or a random one) reads."""
    from engine.drafters.eagle3 import eagle3_feature_layers
    from engine.drafters.registry import detect_format
    from engine.weights import resolve_model

    config = {} if draft_path in (None, "random") else detect_format(draft_path).config
    return eagle3_feature_layers(config, ModelConfig.from_path(resolve_model(model)))


def auto_dtype(device: str = "cpu") -> str:
    """The serving dtype a device runs best: bfloat16 on GPUs, on CPUs with native bf16
    matmuls (AVX512-BF16 or AMX: oneDNN streams half the bytes of fp32 there) and where the
    fused CPU kernel runs (its AVX2 build reads bf16 weights and multiplies in fp32: 2.7x
    the fp32 torch path's decode speed on an AMD Zen 3), else float32."""
    import torch

    if device.startswith("cuda"):
        return "bfloat16"
    from engine.fused import fused_kernel_available

    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if bf16 or fused_kernel_available() else "float32"


def auto_draft_vocab_size(device: str = "cpu") -> int | None:
    """Draft-head rows: all the drafter has on a GPU; the 4096 most frequent on a CPU, where a
    drafter call streams its head (4096 x 576 int8 = 2.4 MB for the default model, a quarter
    of an EAGLE call's bytes): fewer rows cost more acceptance than they save in reads, more
    cost more reads than they add in acceptance
    (docs/benchmarks.md#defaults-chosen-from-these-tables)."""
    return None if device.startswith("cuda") else 4096


def auto_draft_min_prob(device: str = "cpu") -> float:
    """EAGLE's cost-aware stop: 0 (exact EAGLE-2 search) on a GPU, where a draft depth is a
    small fraction of a target step; 0.2 on a CPU, where one depth (a fused drafter forward)
    costs a few percent of a verify step, so a path less likely than that cannot repay it
    (bench/draft_stop.py; docs/benchmarks.md#defaults-chosen-from-these-tables)."""
    return 0.0 if device.startswith("cuda") else 0.2


def auto_tree_budget(device: str = "cpu") -> int:
    """Largest draft tree per sequence (plus the lookup chain): 60 nodes on a GPU, 6 on a CPU
    with AMX tiles, 4 with AVX512-BF16 alone, 2 with the AVX2 build, because that is how many
    verify rows each device adds before a step costs more than the accepted tokens repay
    (docs/benchmarks.md#defaults-chosen-from-these-tables)."""
    if device.startswith("cuda"):
        return 60
    from treespec_kernels import cpu_fused

    if cpu_fused.isa() == "avx512":
        return 6 if cpu_fused.has_amx() else 4
    return 2
