"""build_engine: the one way every entry point assembles an in-process engine.

The server (app/), the CLI (engine/generate.py), drafter training and evaluation (train/)
and the benchmarks (bench/) call it, so the same EngineConfig serves the same way: "auto"
fields take the device's defaults (``EngineConfig.resolve``), and the drafter is loaded
beside the target, sharing its embedding and head. The Ray replica (actors/replica.py)
builds the same engine over TP shard actors.
"""
from __future__ import annotations

import logging
import os

from engine.config import EngineConfig
from engine.engine import LLMEngine

log = logging.getLogger(__name__)


def build_engine(config: EngineConfig, *, executor=None, tokenizer=None) -> LLMEngine:
    """An LLMEngine of ``config.model`` with the drafter ``config.drafter`` names.

    executor: an existing target (engine.executor.Executor) to build on, so that several
        engines (a benchmark's modes) share one copy of the weights; its dtype wins over
        ``config.dtype="auto"``. Default: a new in-process one.
    tokenizer: default the checkpoint's own (None when it ships none).

    With drafter="auto" a drafter that fails to load leaves the engine serving without
    speculation (logged); a drafter asked for by name must load, or this raises
    (FileNotFoundError, ValueError).
    """
    from engine.drafters.loading import load_drafter
    from engine.executor import InProcessExecutor
    from engine.weights import resolve_model

    resolved = config.resolve(getattr(executor, "dtype", None))
    model_dir = resolve_model(resolved.model)
    if executor is None:
        executor = InProcessExecutor(model_dir, resolved.dtype, resolved.device,
                                     attention_backend=resolved.attention_backend,
                                     feature_layers=resolved.feature_layers, cuda_graphs=resolved.cuda_graphs,
                                     max_model_len=resolved.max_model_len)
    drafter = None
    if resolved.drafter != "off" and resolved.tree_budget > 0:
        try:
            drafter = load_drafter(resolved, model_dir, executor)
        except (ImportError, FileNotFoundError, ValueError) as exc:
            if config.drafter != "auto":
                raise
            log.warning("could not load the %s drafter (%s); serving without speculation", resolved.drafter, exc)
            resolved.drafter = "off"
    return LLMEngine(resolved, executor, drafter, tokenizer or load_tokenizer(model_dir))


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts only)."""
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
