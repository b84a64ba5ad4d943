"""Build a drafter from a directory or at random.

The directory holds this project's layout (config.json with a ``kind`` + model.safetensors)
or a published checkpoint (EAGLE-1/2, EAGLE-3, Medusa-1): engine/drafters/registry.py
detects which, engine/drafters/published.py converts it. The drafter shares the target's
embedding and lm_head (published Medusa-1 heads keep their own lm_heads): in-process it
takes the executor's tensors; elsewhere (a Ray drafter actor) it reads just those two
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
from engine.drafters.published import convert, read_weights
from engine.drafters.registry import DrafterFormat, check_target, detect_format
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
    """The kind of the drafter at ``path``, in any format ``detect_format`` knows."""
    return detect_format(path).kind


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


def draft_format(cfg: EngineConfig) -> str:
    """The format name of the drafter ``cfg`` (resolved) loads: a registry format, or "random"."""
    path = resolve_draft_path(cfg)
    return "random" if path == RANDOM else detect_format(path).name


def load_drafter(cfg: EngineConfig, model_dir: str, executor=None, seed: int = 0):
    """``build_drafter``'s drafter, its ``format`` set (what /v1/models and the CLI report)."""
    drafter = build_drafter(cfg, model_dir, executor, seed)
    drafter.format = draft_format(cfg.resolve(getattr(executor, "dtype", None)))
    return drafter


def build_drafter(cfg: EngineConfig, model_dir: str, executor=None, seed: int = 0):
    """A drafter for ``cfg.drafter`` (in the executor's dtype when given): an EagleDrafter,
    MedusaDrafter or (eagle3) Eagle3Drafter, from ``cfg.draft_path`` in any format
    ``registry.detect_format`` knows, or "random". ValueError when the directory holds another
    kind, or a drafter whose sizes do not fit the target."""
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
    fmt = None if path == RANDOM else detect_format(path)
    if fmt is not None:
        if fmt.kind != cfg.drafter:
            raise ValueError(f"{path} holds a {fmt.kind} drafter ({fmt.name} format), not {cfg.drafter}")
        check_target(fmt, target)
    if cfg.drafter == "eagle3":
        return _load_eagle3(cfg, fmt, target, embed, dtype, device, seed)
    if fmt is None:
        torch.manual_seed(seed)
        if cfg.drafter == "eagle":
            model = EagleModel(EagleConfig.from_target(target), dtype)
        else:
            model = MedusaModel(MedusaConfig(target.hidden_size, target.vocab_size), dtype)
        state_ids = None
    else:
        config, state = convert(fmt, target) if fmt.published else read_drafter(path)
        state_ids = cap_draft_vocab(state.pop("draft_vocab_ids", None), config, cfg.draft_vocab_size, path)
        if cfg.drafter == "eagle":
            model = EagleModel(EagleConfig.from_dict(config), dtype)
        else:
            model = MedusaModel(MedusaConfig.from_dict(config), dtype)
        try:
            model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        except RuntimeError as exc:  # a size mismatch: one line, naming the tensors
            raise ValueError(f"{path}: its {fmt.name} weights do not fit a {cfg.drafter} drafter: "
                             f"{' '.join(str(exc).split())[:400]}") from None
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
    fused = None
    if cpu and model.lm_heads is not None:  # the fused kernel reads one shared head
        log.info("drafter %s: Medusa heads with their own lm_heads draft on the torch path", path)
    elif cpu:
        fused = FusedMedusa.for_medusa(model, head.weight, int8=cfg.draft_int8)
    return MedusaDrafter(model, head, max_nodes=max(cfg.tree_budget, 1), fused=fused)


def _load_eagle3(cfg: EngineConfig, fmt: DrafterFormat | None, target: ModelConfig, embed, dtype, device, seed):
    """An EAGLE-3 drafter (engine/drafters/eagle3.py): published, or random for tests."""
    from engine.drafters import eagle3

    if fmt is None:
        torch.manual_seed(seed)
        model = eagle3.Eagle3Model(eagle3.Eagle3Config.from_target(target), dtype)
        return eagle3.eagle3_drafter(model, embed, dtype, device, cfg.draft_top_k, cfg.draft_depth,
                                     cfg.draft_min_prob)
    state = read_weights(fmt, skip=())  # its own embedding, where it ships one, is its input embedding
    return eagle3.load_eagle3(state, fmt.config, target, embed, dtype, device, cfg.draft_top_k, cfg.draft_depth,
                              cfg.draft_min_prob)
