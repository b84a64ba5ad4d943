"""Build a drafter from a directory (config.json + model.safetensors) or at random.

The drafter shares the target's embedding and lm_head: in-process it takes the
executor's tensors; elsewhere (a Ray drafter actor) it reads just those two
tensors from the target checkpoint.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open

from engine.config import EngineConfig, ModelConfig
from engine.drafters.common import DraftHead, read_drafter
from engine.drafters.eagle import EagleConfig, EagleDrafter, EagleModel
from engine.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaModel
from engine.fused import FusedMedusa, FusedModel
from engine.parallel import pack_cpu_weights
from engine.runner import DTYPES
from engine.weights import DEFAULT_MODEL, checkpoint_files

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets")
log = logging.getLogger(__name__)
RANDOM = "random"  # --draft random: an untrained drafter (tests, smoke runs)


def shipped_drafter_dir(kind: str) -> str:
    """Where the drafter of ``kind`` for the default model ships (assets/)."""
    return os.path.join(ASSETS, f"{kind}-smollm2-135m")


def default_drafter(model: str, device: str = "cpu", draft_path: str | None = None) -> str:
    """The drafter kind ``drafter="auto"`` stands for.

    With a draft_path: the kind it holds. For the default model: its shipped EAGLE drafter,
    else its Medusa heads (EAGLE leads at batch 1 on every CPU class measured and is the
    GPU choice: docs/benchmarks.md#defaults-chosen-from-these-tables). Any other model: "off".
    """
    if draft_path not in (None, RANDOM):
        return read_drafter_kind(draft_path)
    if model not in (None, "", DEFAULT_MODEL):
        return "off"
    return next((k for k in ("eagle", "medusa") if os.path.exists(os.path.join(shipped_drafter_dir(k), "config.json"))),
                "off")


def read_drafter_kind(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        kind = json.load(f).get("kind")
    if kind not in ("eagle", "medusa"):
        raise ValueError(f"{path}/config.json names no drafter kind (eagle or medusa): {kind!r}")
    return kind


def target_embed_and_head(model_dir: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Read only the embedding and lm_head of a checkpoint."""
    cfg = ModelConfig.from_path(model_dir)
    found = {}
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as f:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in f.keys():
                    found[name] = f.get_tensor(name).to(dtype)
    embed = found["model.embed_tokens.weight"]
    return embed, (embed if cfg.tie_word_embeddings else found["lm_head.weight"])


def resolve_draft_path(cfg: EngineConfig) -> str:
    if cfg.draft_path:
        return cfg.draft_path
    if cfg.model in (None, "", DEFAULT_MODEL):
        path = shipped_drafter_dir(cfg.drafter)
        if os.path.exists(os.path.join(path, "config.json")):
            return path
        raise FileNotFoundError(f"no shipped {cfg.drafter} drafter at {path}; pass --draft DIR (or 'random')")
    raise FileNotFoundError(f"drafter={cfg.drafter} needs a drafter for {cfg.model}: pass draft_path")


def cap_draft_vocab(ids: torch.Tensor | None, config: dict, cap: int | None, path: str) -> torch.Tensor | None:
    """The first ``cap`` of a frequency-ranked draft vocabulary (all of it when cap is None, 0
    or not smaller). A drafter whose ids are not ranked, or that drafts over the full
    vocabulary, keeps them all: a cap is a speed preference, not a requirement."""
    if not cap or ids is None or cap >= len(ids):
        return ids
    if config.get("draft_vocab_order") != "frequency":
        log.warning("drafter %s: draft vocabulary not ranked by frequency; draft_vocab_size=%d ignored", path, cap)
        return ids
    return ids[:cap]


def load_drafter(cfg: EngineConfig, model_dir: str, executor=None, seed: int = 0):
    """An EagleDrafter or MedusaDrafter for ``cfg.drafter`` (in the executor's dtype when given)."""
    cfg = cfg.resolve(getattr(executor, "dtype", None))
    if cfg.drafter == "off":
        raise ValueError("drafter=off: no drafter to load")
    dtype = DTYPES[cfg.dtype]
    shared = executor.embed_and_head() if executor is not None else None
    embed, lm_head = shared if shared is not None else target_embed_and_head(model_dir, dtype)
    # The drafter lives where the target's tensors are: beside the shared embedding in process,
    # else on the configured device (a drafter actor reads its own copy of the weights).
    device = embed.device if shared is not None else torch.device(cfg.device)
    target = ModelConfig.from_path(model_dir)
    path = resolve_draft_path(cfg)
    if path == RANDOM:
        torch.manual_seed(seed)
        if cfg.drafter == "eagle":
            model = EagleModel(EagleConfig.from_target(target), dtype)
        else:
            model = MedusaModel(MedusaConfig(target.hidden_size, target.vocab_size), dtype)
        state_ids = None
    else:
        config, state = read_drafter(path)
        if config.get("kind") != cfg.drafter:
            raise ValueError(f"{path} holds a {config.get('kind')} drafter, not {cfg.drafter}")
        if config["hidden_size"] != target.hidden_size or config["vocab_size"] != target.vocab_size:
            raise ValueError(f"drafter {path} does not match the target model's hidden size / vocabulary")
        state_ids = cap_draft_vocab(state.pop("draft_vocab_ids", None), config, cfg.draft_vocab_size, path)
        if cfg.drafter == "eagle":
            model = EagleModel(EagleConfig.from_dict(config), dtype)
        else:
            model = MedusaModel(MedusaConfig.from_dict(config), dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model = model.to(device)
    head = DraftHead(lm_head.detach().to(device, dtype), state_ids).to(device)
    cpu = device.type == "cpu"
    if cpu:
        pack_cpu_weights(model)  # bf16 only: drafting reads ~20 MB per depth, packed ~1.5x faster
        pack_cpu_weights(head)
    if cfg.drafter == "eagle":
        # bf16 on a CPU the fused kernel runs on (AVX512-BF16, or AVX2 + FMA:
        # treespec_kernels/cpu_fused.py): a whole draft step is one C call (engine/fused.py).
        embed = embed.detach().to(device, dtype)
        fused = FusedModel.for_eagle(model, head.weight, int8=cfg.draft_int8, embed=embed) if cpu else None
        return EagleDrafter(model, embed, head, cfg.draft_top_k, cfg.draft_depth,
                            cfg.draft_min_prob, fused=fused)
    fused = FusedMedusa.for_medusa(model, head.weight, int8=cfg.draft_int8) if cpu else None
    return MedusaDrafter(model, head, max_nodes=max(cfg.tree_budget, 1), fused=fused)
