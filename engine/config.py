"""Model configuration read from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The Llama-architecture hyper-parameters the engine needs."""

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

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
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
        )

    @classmethod
    def from_path(cls, path: str) -> "ModelConfig":
        """path: a checkpoint directory or a config.json file."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

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


SPECULATION_MODES = ("off", "eagle", "medusa")


@dataclass
class EngineConfig:
    """Everything needed to build one engine replica (shared with actors/ and app/).

    model: a HF checkpoint directory, or "default" for the embedded SmolLM2-135M-Instruct.
    speculation: the drafter kind loaded at start ("off", "eagle", "medusa"); requests
        and the router may switch speculation off per step, never on without a drafter.
    draft_path: drafter directory; None means the shipped drafter of the default model.
    tree_budget: draft tree nodes per sequence per step (0 disables speculation).
    draft_depth, draft_top_k: EAGLE-2 tree search (depth levels, children per node; the
        paper uses top-k 10).
    draft_vocab_size: at most this many draft-head rows, the drafter's most frequent
        tokens first (its ``draft_vocab_order`` must be "frequency"); None or 0: all of them.
        A smaller head reads fewer bytes per draft depth, which pays for small CPU trees.
    draft_min_prob: EAGLE stops drafting deeper once the likeliest frontier path is less
        likely than this (0: EAGLE-2's exact search, which expands while a deeper node could
        still enter the tree). Where a draft depth costs a few percent of a target step
        (CPU), a low-probability depth cannot pay for its forward (``auto_draft_min_prob``).
    draft_int8: the fused CPU drafters (engine/fused.py) keep int8 weights where the CPU has
        AMX-INT8 or AVX512-VNNI, or runs the AVX2 build of the kernel: a draft call streams
        half the bytes.
        Drafts only rank candidates and verification against the target keeps the output
        exact, so only tau can change.
    lookup_tokens: while speculating, also verify up to this many tokens that followed the
        latest earlier occurrence of the sequence's last 2-4 tokens (prompt lookup, merged
        into the drafter's tree as one more chain; engine/lookup.py); 0 disables it. These
        nodes come on top of tree_budget and cost no drafter forward.
    num_blocks: KV blocks; None sizes the cache from kv_cache_gib.
    """

    model: str = "default"
    tp: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gib: float = 0.5
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    speculation: str = "off"
    draft_path: str | None = None
    tree_budget: int = 60
    draft_depth: int = 8
    draft_top_k: int = 10
    draft_vocab_size: int | None = None
    draft_min_prob: float = 0.0
    draft_int8: bool = True
    lookup_tokens: int = 6
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.speculation not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {SPECULATION_MODES}, got {self.speculation!r}")
        for name in ("tp", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 (0: all), got {self.draft_vocab_size}")
        if not 0.0 <= self.draft_min_prob < 1.0:
            raise ValueError(f"draft_min_prob must be in [0, 1), got {self.draft_min_prob}")
        if self.draft_depth < 1 or self.draft_top_k < 1:
            raise ValueError(f"draft_depth and draft_top_k must be >= 1, got {self.draft_depth}, {self.draft_top_k}")
        if self.tree_budget < 0:
            raise ValueError(f"tree_budget must be >= 0, got {self.tree_budget}")
        if self.lookup_tokens < 0:
            raise ValueError(f"lookup_tokens must be >= 0, got {self.lookup_tokens}")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and self.dtype == "float32":
            pass  # allowed, just slow

    def check_model(self, model: ModelConfig) -> None:
        """Raise ValueError unless this config can serve ``model`` (TP split, context length)."""
        model.validate_tp(self.tp)
        if self.max_model_len > model.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"{model.max_position_embeddings} positions"
            )


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
    of an EAGLE call's bytes). Same-process A/Bs at a 6-node tree with lookup: 4096 rows vs
    8192 cost 0.8% of EAGLE's tau (0.15% of Medusa's) and gave both ~1% more speedup; 2048
    lost 2.5% of tau (docs/benchmarks.md)."""
    return None if device.startswith("cuda") else 4096


def auto_draft_min_prob(device: str = "cpu") -> float:
    """EAGLE's cost-aware stop: 0 (exact EAGLE-2 search) on a GPU, where a draft depth is a
    small fraction of a target step; 0.2 on a CPU, where one depth (a fused drafter forward,
    ~0.35 ms with the search in C) is ~2.5% of an 8-node verify step (~14 ms): on the tuning
    prompts at the CPU's 8-node tree, tau per ms of a step is highest at 0.2, 4% above 0.35
    (2.38 drafter forwards a step instead of 1.79, tau 2.41 instead of 2.30; session 14,
    bench/draft_stop.py, docs/benchmarks.md)."""
    return 0.0 if device.startswith("cuda") else 0.2


def auto_tree_budget(device: str = "cpu") -> int:
    """Largest draft tree per sequence: 60 nodes on a GPU (the EAGLE-2 paper's budget:
    verifying them costs about one step). On a CPU it is what verifying extra rows costs:
    with AMX tiles (treespec_kernels/cpu_fused.c) a 9-token verify step costs ~1.12x a one-token
    step, and 6 nodes (plus the lookup chain) matched or beat 8 in all five runs with both
    on session 19's Xeon (EAGLE 2.001-2.072x at 6 over eight runs, 1.993-2.053x at 8,
    1.949-1.998x at 4; Medusa 1.685-1.737x at 6), for fewer rows of compute and KV per
    request under load (8 was best by a hair in session 14); with AVX512-BF16 dot
    products alone (an AMD Zen 4) up to ~10 rows cost about one, each row past that ~1 ms,
    and 4 nodes (plus the lookup chain) was best on average over three runs of 4, 5 and 6
    (EAGLE 1.83x / 1.80x / 1.76x, Medusa 1.61x / 1.58x / 1.51x); with the AVX2 build (fp32
    multiply-adds, treespec_kernels/cpu_fused_avx2.h) on an AMD Zen 3, 2 nodes (plus the lookup
    chain) beat 3 in three same-process runs of four and tied once, and 3 beat 4, 5 and 8
    (bench/speculative.py, docs/benchmarks.md)."""
    if device.startswith("cuda"):
        return 60
    from treespec_kernels import cpu_fused

    if cpu_fused.isa() == "avx512":
        return 6 if cpu_fused.has_amx() else 4
    return 2
