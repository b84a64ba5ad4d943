"""Build a drafter from a directory (config.json + model.safetensors) or at random.

The drafter shares the target's embedding and lm_head: in-process it takes the
executor's tensors; elsewhere (a Ray drafter actor) it reads just those two
tensors from the target checkpoint.
"""
from __future__ import annotations

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


def shipped_drafter(kind: str) -> str:
    return os.path.join(ASSETS, f"{kind}-smollm2-135m")


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
        path = shipped_drafter(cfg.speculation)
        if os.path.exists(os.path.join(path, "config.json")):
            return path
        raise FileNotFoundError(f"no shipped {cfg.speculation} drafter at {path}; pass --draft DIR (or 'random')")
    raise FileNotFoundError(f"speculation={cfg.speculation} needs a drafter for {cfg.model}: pass draft_path")


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
    """An EagleDrafter or MedusaDrafter for ``cfg.speculation``."""
    dtype = DTYPES[cfg.dtype]
    shared = executor.embed_and_head() if executor is not None else None
    embed, lm_head = shared if shared is not None else target_embed_and_head(model_dir, dtype)
    target = ModelConfig.from_path(model_dir)
    path = resolve_draft_path(cfg)
    if path == RANDOM:
        torch.manual_seed(seed)
        if cfg.speculation == "eagle":
            model = EagleModel(EagleConfig.from_target(target), dtype)
        else:
            model = MedusaModel(MedusaConfig(target.hidden_size, target.vocab_size), dtype)
        state_ids = None
    else:
        config, state = read_drafter(path)
        if config.get("kind") != cfg.speculation:
            raise ValueError(f"{path} holds a {config.get('kind')} drafter, not {cfg.speculation}")
        if config["hidden_size"] != target.hidden_size or config["vocab_size"] != target.vocab_size:
            raise ValueError(f"drafter {path} does not match the target model's hidden size / vocabulary")
        state_ids = cap_draft_vocab(state.pop("draft_vocab_ids", None), config, cfg.draft_vocab_size, path)
        if cfg.speculation == "eagle":
            model = EagleModel(EagleConfig.from_dict(config), dtype)
        else:
            model = MedusaModel(MedusaConfig.from_dict(config), dtype)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    head = DraftHead(lm_head.detach().to(dtype), state_ids)
    if cfg.device == "cpu":
        pack_cpu_weights(model)  # bf16 only: drafting reads ~20 MB per depth, packed ~1.5x faster
        pack_cpu_weights(head)
    if cfg.speculation == "eagle":
        # bf16 on a CPU with AVX512-BF16: each draft depth is one C call (engine/fused.py).
        embed = embed.detach().to(dtype)
        fused = (FusedModel.for_eagle(model, head.weight, int8=cfg.draft_int8, embed=embed)
                 if cfg.device == "cpu" else None)
        return EagleDrafter(model, embed, head, cfg.draft_top_k, cfg.draft_depth,
                            cfg.draft_min_prob, fused=fused)
    fused = (FusedMedusa.for_medusa(model, head.weight, int8=cfg.draft_int8)
             if cfg.device == "cpu" else None)
    return MedusaDrafter(model, head, max_nodes=max(cfg.tree_budget, 1), fused=fused)
