"""Capacity planner: will a model fit, sharded over TP ranks, and how large a batch can it serve?

``python -m engine.plan --model llama-3-70b --tp 4 --gpu-mem-gib 80 --batch 128 --tree 64``

The model is built exactly as the engine builds it (``ModelRunner`` -> ``CausalLM``
with a ``TPGroup(rank, world)`` per rank) but on the meta device, so no memory is used
and the figures are the engine's own: weight bytes are the parameters of each rank's
shard, KV bytes per block come from ``ModelRunner.kv_bytes_per_block``. Per rank::

    usable   = gpu_mem * mem_util
    kv       = usable - weights - reserve        (reserve: activations of one step, see below)
    blocks   = kv // kv_bytes_per_block           (engine/kv_cache.py kv_blocks_for_memory: the
                                                  engine's own rule, which measures what the
                                                  planner estimates)
    per seq  = ceil((context + tree) / block)     (the scheduler reserves tree scratch per sequence)
    max batch = blocks // per seq

The activation reserve is an estimate of the largest transient tensors of one forward
over ``batch * (1 + tree)`` rows (fp32 full-vocabulary logits on every rank, the sharded
logits before the all-gather, and the MLP/attention intermediates), plus a fixed
workspace (CUDA context, allocator slack); ``--reserve-gib`` replaces it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from engine.architectures import UnsupportedModel
from engine.config import ModelConfig
from engine.kv_cache import kv_blocks_for_memory
from engine.parallel import TPGroup
from engine.runner import DTYPES, ModelRunner

GIB = 2**30

def _llama(**fields) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **fields}


# The config.json of public checkpoints (their model cards' numbers), read like any other.
PRESETS = {
    "llama-3-70b": _llama(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                          max_position_embeddings=8192, bos_token_id=128000, eos_token_id=[128001, 128009]),
    "llama-3.1-70b": _llama(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            max_position_embeddings=131072, bos_token_id=128000,
                            eos_token_id=[128001, 128008, 128009]),
    "llama-3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=8192, bos_token_id=128000, eos_token_id=[128001, 128009]),
    "qwen2.5-72b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
                    "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 70,
                    "bos_token_id": 151643, "eos_token_id": 151645},
    "qwen3-32b": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                  "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
                  "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                  "bos_token_id": 151643, "eos_token_id": 151645},
    "mistral-large-2407": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                           "vocab_size": 32768, "hidden_size": 12288, "intermediate_size": 28672,
                           "num_hidden_layers": 88, "num_attention_heads": 96, "num_key_value_heads": 8,
                           "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                           "max_position_embeddings": 131072, "sliding_window": None,
                           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "smollm2-135m": _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                           max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
PRESETS["default"] = PRESETS["smollm2-135m"]


def model_config(model: str) -> ModelConfig:
    """A preset name, a checkpoint directory or a config.json path (any registered
    architecture: engine/architectures.py) -> ModelConfig."""
    if model.lower() in PRESETS:
        return ModelConfig.from_dict(PRESETS[model.lower()])
    if os.path.isdir(model) or os.path.isfile(model):
        try:
            return ModelConfig.from_path(model)
        except UnsupportedModel:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot read a model config from {model}: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"unknown model {model!r}: use a config.json path, a checkpoint directory or one of "
                     f"{', '.join(sorted(PRESETS))}")


def meta_runner(cfg: ModelConfig, dtype: str, rank: int, world: int) -> ModelRunner:
    """Rank ``rank``'s shard, built by the engine's own code on the meta device (no memory)."""
    return ModelRunner(None, dtype, "meta", tp=TPGroup(rank, world), config=cfg, load=False)


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def buffer_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's buffers (the RoPE cos/sin tables)."""
    return sum(b.numel() * b.element_size() for b in module.buffers())


def activation_reserve(cfg: ModelConfig, tp: int, dtype: str, rows: int, workspace_gib: float) -> int:
    """Bytes of the largest transient tensors of one forward over ``rows`` tokens on one rank."""
    item = DTYPES[dtype].itemsize
    logits = rows * cfg.vocab_size * 4 + rows * math.ceil(cfg.vocab_size / tp) * item  # gathered fp32 + shard
    q_kv = (cfg.num_attention_heads + 2 * max(1, cfg.num_key_value_heads // tp) * tp) * cfg.head_dim // tp
    layer = rows * item * (4 * cfg.hidden_size + q_kv + 3 * cfg.intermediate_size // tp)
    return int(logits + layer + workspace_gib * GIB)


def plan(model: str = "default", tp: int = 1, gpu_mem_gib: float = 80.0, dtype: str = "bfloat16",
         batch: int = 1, tree: int = 0, context: int = 4096, block_size: int = 16, mem_util: float = 0.9,
         reserve_gib: float | None = None, workspace_gib: float = 1.0) -> dict:
    """The plan as a dict (what ``--json`` prints). Raises ValueError for impossible arguments."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, v in (("tp", tp), ("batch", batch), ("context", context), ("block_size", block_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if tree < 0:
        raise ValueError(f"tree must be >= 0, got {tree}")
    if not gpu_mem_gib > 0:
        raise ValueError(f"gpu-mem-gib must be > 0, got {gpu_mem_gib}")
    if not 0 < mem_util <= 1:
        raise ValueError(f"mem-util must be in (0, 1], got {mem_util}")
    if reserve_gib is not None and reserve_gib < 0:
        raise ValueError(f"reserve-gib must be >= 0, got {reserve_gib}")
    cfg = model_config(model)
    cfg.validate_tp(tp)
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds the model's {cfg.max_position_embeddings} positions")

    # Ranks can differ (a vocabulary that does not split evenly); plan for the largest shard.
    weights, kv_block, buffers = [], [], 0
    for rank in range(tp):
        runner = meta_runner(cfg, dtype, rank, tp)
        weights.append(param_bytes(runner.model))
        kv_block.append(runner.kv_bytes_per_block(block_size))
        buffers = max(buffers, buffer_bytes(runner.model))
    w, kvb = max(weights), max(kv_block)
    rows = batch * (1 + tree)
    reserve = int(reserve_gib * GIB) if reserve_gib is not None else activation_reserve(
        cfg, tp, dtype, rows, workspace_gib)
    usable = int(gpu_mem_gib * GIB * mem_util)
    kv_bytes = max(0, usable - w - buffers - reserve)
    blocks = kv_blocks_for_memory(int(gpu_mem_gib * GIB), mem_util, w + buffers + reserve, kvb)
    per_seq = math.ceil(context / block_size)
    per_seq_tree = math.ceil((context + tree) / block_size)
    max_batch = blocks // per_seq
    max_batch_tree = blocks // per_seq_tree
    fits = kv_bytes > 0 and batch <= max_batch_tree
    if kv_bytes <= 0:
        why = f"weights ({w / GIB:.1f} GiB) + reserve ({reserve / GIB:.1f} GiB) exceed {usable / GIB:.1f} GiB usable"
    elif not fits:
        why = (f"batch {batch} needs {batch * per_seq_tree} KV blocks at context {context} + tree {tree}; "
               f"{blocks} fit")
    else:
        why = f"batch {batch} uses {batch * per_seq_tree} of {blocks} KV blocks"
    return {
        "model": model, "params": sum(p.numel() for p in meta_runner(cfg, dtype, 0, 1).model.parameters()),
        "tp": tp, "dtype": dtype, "gpu_mem_gib": gpu_mem_gib, "mem_util": mem_util, "batch": batch, "tree": tree,
        "context": context, "block_size": block_size,
        "weight_bytes_per_shard": w, "weight_bytes_per_rank": weights, "buffer_bytes_per_shard": buffers,
        "kv_bytes_per_token_per_shard": kvb // block_size, "kv_bytes_per_block": kvb,
        "activation_reserve_bytes": reserve, "usable_bytes": usable, "kv_budget_bytes": kv_bytes,
        "kv_blocks": blocks, "kv_tokens": blocks * block_size,
        "blocks_per_seq": per_seq, "blocks_per_seq_with_tree": per_seq_tree,
        "max_batch_no_tree": max_batch, "max_batch_with_tree": max_batch_tree,
        "fits": fits, "reason": why,
    }


def _gib(b: int) -> str:
    return f"{b / GIB:.2f} GiB"


def table(p: dict) -> str:
    rows = [
        ("model", f"{p['model']} ({p['params'] / 1e9:.2f} B params), {p['dtype']}, tp={p['tp']}"),
        ("GPU memory per rank", f"{p['gpu_mem_gib']:g} GiB x {p['mem_util']:g} usable = {_gib(p['usable_bytes'])}"),
        ("weights per shard", _gib(p["weight_bytes_per_shard"])),
        ("activation reserve", f"{_gib(p['activation_reserve_bytes'])} (batch {p['batch']} x (1 + tree {p['tree']}) rows)"),
        ("KV cache per shard", f"{_gib(p['kv_budget_bytes'])} = {p['kv_blocks']} blocks of {p['block_size']} tokens"),
        ("KV bytes per token per shard", f"{p['kv_bytes_per_token_per_shard']:,} B"),
        ("KV tokens per shard", f"{p['kv_tokens']:,}"),
        (f"max batch at context {p['context']}", f"{p['max_batch_no_tree']} without tree scratch, "
                                                  f"{p['max_batch_with_tree']} with tree {p['tree']}"),
        ("fits", f"{'yes' if p['fits'] else 'NO'}: {p['reason']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        print(f"engine.plan: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    ap = _OneLineParser(prog="python -m engine.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default",
                    help=f"config.json path, checkpoint directory or preset ({', '.join(sorted(PRESETS))})")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one device (GiB)")
    ap.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    ap.add_argument("--batch", type=int, default=1, help="running sequences per replica")
    ap.add_argument("--tree", type=int, default=0, help="draft tree nodes per sequence (tree budget)")
    ap.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt + output)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--mem-util", type=float, default=0.9, help="fraction of device memory the replica may use")
    ap.add_argument("--reserve-gib", type=float, default=None, help="activation reserve (default: estimated)")
    ap.add_argument("--workspace-gib", type=float, default=1.0, help="fixed part of the estimated reserve")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON line")

    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # argparse already printed a one-line usage error
        return int(exc.code or 0)
    try:
        p = plan(args.model, args.tp, args.gpu_mem_gib, args.dtype, args.batch, args.tree, args.context,
                 args.block_size, args.mem_util, args.reserve_gib, args.workspace_gib)
    except ValueError as exc:
        print(f"engine.plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(p) if args.json else table(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
