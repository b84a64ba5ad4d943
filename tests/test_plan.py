"""engine.plan: the capacity planner's figures equal what the engine really allocates."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.plan import GIB, PRESETS, main, plan
from engine.runner import ModelRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _real(model_dir: str, dtype: str, num_blocks: int, block_size: int = 16) -> tuple[int, int]:
    """(parameter bytes, K+V cache bytes) of a real ModelRunner after allocate_kv."""
    runner = ModelRunner(model_dir, dtype, "cpu", load=False)
    runner.allocate_kv(num_blocks, block_size)
    params = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv = sum(t.numel() * t.element_size() for layer in runner.model.layers
             for t in (layer.self_attn.k_cache, layer.self_attn.v_cache))
    return params, kv


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_matches_engine_allocation(default_dir, dtype):
    p = plan("default", tp=1, dtype=dtype, gpu_mem_gib=4, batch=4, tree=16, context=512)
    p_dir = plan(default_dir, tp=1, dtype=dtype, gpu_mem_gib=4, batch=4, tree=16, context=512)
    params, kv = _real(default_dir, dtype, num_blocks=37)
    assert p["weight_bytes_per_shard"] == p_dir["weight_bytes_per_shard"] == params
    assert p["kv_bytes_per_block"] * 37 == kv
    assert p["kv_bytes_per_token_per_shard"] == 30 * 2 * 3 * 64 * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    # The engine sizes its cache with the same rule (kv_cache_gib // bytes per block).
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor

    eng = LLMEngine(EngineConfig(kv_cache_gib=0.05, dtype=dtype), InProcessExecutor(default_dir, dtype, load=False),
                    None, tokenizer=object())
    assert eng.allocator.num_blocks == int(0.05 * GIB // p["kv_bytes_per_block"])
    # The preset is the default checkpoint's architecture.
    real = ModelConfig.from_path(default_dir)
    preset = ModelConfig.from_dict(PRESETS["default"])
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta"):
        assert getattr(real, f) == getattr(preset, f), f


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2, 6])
def test_random_config_sharded_matches_each_rank(tmp_path, tp, family):
    """Any config.json of a registered family: Qwen2's QKV biases are split with their rows,
    Qwen3's q/k norms replicated on every rank."""
    from conftest import random_model_dir
    from engine.parallel import TPGroup

    d = random_model_dir(str(tmp_path / "m"), family, heads=6, kv_heads=2, hidden=96, layers=2, vocab=320)
    p = plan(d, tp=tp, dtype="float32", gpu_mem_gib=1, batch=2, tree=8, context=256, reserve_gib=0)
    cfg = ModelConfig.from_path(d)
    per_rank = []
    for rank in range(tp):
        r = ModelRunner(d, "float32", "cpu", tp=TPGroup(rank, tp), config=cfg, load=False)
        r.allocate_kv(5, 16)
        per_rank.append(sum(x.numel() * x.element_size() for x in r.model.parameters()))
        kv = sum(t.numel() * t.element_size() for layer in r.model.layers
                 for t in (layer.self_attn.k_cache, layer.self_attn.v_cache))
        assert kv == 5 * p["kv_bytes_per_block"]
    assert p["weight_bytes_per_rank"] == per_rank
    # KV heads are split while tp divides them, replicated (one per rank) beyond.
    kv_local = max(1, 2 // tp)
    assert p["kv_bytes_per_token_per_shard"] == 2 * 2 * kv_local * 16 * 4
    if tp == 1:  # an unsharded model: the whole parameter count
        from safetensors.torch import load_file

        full = sum(x.numel() for x in load_file(str(tmp_path / "m" / "model.safetensors")).values())
        assert p["params"] == full


class StandInMemory:
    """A device's memory as ModelRunner.profile_kv_blocks reads it, with fixed figures: a CPU
    has no device memory to measure (on CUDA, engine.runner.CudaMemory reads the driver and
    the allocator). The forward it brackets is the real one."""

    def __init__(self, total: int, resident: int, transient: int):
        self.figures = (total, resident, transient)
        self.calls: list[str] = []

    def total(self):
        return self.figures[0]

    def in_use(self):
        self.calls.append("in_use")
        return self.figures[1]

    def reset_peak(self):
        self.calls.append("reset_peak")

    def transient_peak(self):
        self.calls.append("transient_peak")
        return self.figures[2]


def test_profiled_kv_cache_equals_the_plan(tmp_path):
    """kv_cache_gib unset: the engine sizes its cache from device memory after a profiled
    forward of its largest step, by the planner's own rule (kv_blocks_for_memory). Fed the
    planner's estimate as the measurement, the engine allocates exactly the planner's blocks."""
    from conftest import random_llama_dir
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor

    d = random_llama_dir(str(tmp_path / "m"), layers=2)
    p = plan(d, tp=1, dtype="float32", gpu_mem_gib=0.25, batch=2, tree=8, context=256, mem_util=0.5,
             reserve_gib=0.01)
    executor = InProcessExecutor(d, "float32")
    rows = []
    forward = executor.runner.forward
    executor.runner.forward = lambda inp: rows.append(len(inp.input_ids)) or forward(inp)
    executor.runner.memory = memory = StandInMemory(
        int(0.25 * GIB), p["weight_bytes_per_shard"] + p["buffer_bytes_per_shard"], p["activation_reserve_bytes"])
    config = EngineConfig(model=d, dtype="float32", max_num_seqs=2, tree_budget=8, lookup_tokens=0,
                          max_num_batched_tokens=16, gpu_memory_utilization=0.5, drafter="off")
    engine = LLMEngine(config, executor)
    assert engine.allocator.num_blocks == p["kv_blocks"] > 0
    assert rows == [2 * (1 + 8)]  # the largest verify step, every row's logits
    assert memory.calls == ["reset_peak", "transient_peak", "in_use"]
    assert executor.runner.kv_cache.shape[2] == p["kv_blocks"]

    executor.runner.memory = StandInMemory(int(0.25 * GIB), int(0.2 * GIB), 0)  # 0.2 GiB taken of 0.125
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        LLMEngine(config, executor)
    executor.runner.memory = None  # where device memory is not measured (CPU): CPU_KV_CACHE_GIB
    from engine.config import CPU_KV_CACHE_GIB

    engine = LLMEngine(config, executor)
    assert engine.allocator.num_blocks == int(CPU_KV_CACHE_GIB * GIB // p["kv_bytes_per_block"])


def test_batch_limits_follow_blocks():
    p = plan("llama-3-8b", tp=1, gpu_mem_gib=80, batch=8, tree=64, context=2048, reserve_gib=4)
    usable = int(80 * GIB * 0.9)
    blocks = (usable - p["weight_bytes_per_shard"] - p["buffer_bytes_per_shard"] - 4 * GIB) // p["kv_bytes_per_block"]
    assert p["kv_blocks"] == blocks
    assert p["max_batch_no_tree"] == blocks // 128
    assert p["max_batch_with_tree"] == blocks // math.ceil((2048 + 64) / 16)
    assert p["max_batch_with_tree"] <= p["max_batch_no_tree"] and p["fits"]
    assert p["kv_bytes_per_token_per_shard"] == 32 * 2 * 8 * 128 * 2  # 128 KiB per token, bf16


def test_70b_plan_cli():
    out = subprocess.run([sys.executable, "-m", "engine.plan", "--model", "llama-3-70b", "--tp", "4",
                          "--gpu-mem-gib", "80", "--batch", "128", "--tree", "64", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout.strip().splitlines()[-1])
    assert 70e9 < p["params"] < 71e9
    assert abs(p["weight_bytes_per_shard"] / GIB - 70.55e9 * 2 / 4 / GIB) < 0.5  # bf16 / 4 ranks
    assert p["kv_bytes_per_token_per_shard"] == 80 * 2 * 2 * 128 * 2  # 2 of 8 KV heads per rank
    assert p["max_batch_with_tree"] <= p["max_batch_no_tree"]
    assert p["fits"] == (p["max_batch_with_tree"] >= 128)
    table = subprocess.run([sys.executable, "-m", "engine.plan", "--model", "llama-3-70b", "--tp", "4",
                            "--gpu-mem-gib", "80", "--batch", "128", "--tree", "64"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "weights per shard" in table.stdout and "max batch" in table.stdout


# Parameter counts the model cards publish (billions, rounded as there).
PUBLISHED_PARAMS = {"llama-3-70b": 70.6, "llama-3.1-70b": 70.6, "qwen2.5-72b": 72.7, "qwen3-32b": 32.8,
                    "mistral-large-2407": 122.6}


@pytest.mark.parametrize("preset", PUBLISHED_PARAMS)
def test_70b_class_presets(preset):
    """Each preset is read as its family and sized like the published checkpoint."""
    p = plan(preset, tp=8, gpu_mem_gib=80, batch=32, tree=64, context=8192)
    assert abs(p["params"] / 1e9 - PUBLISHED_PARAMS[preset]) < 0.06
    cfg = ModelConfig.from_dict(PRESETS[preset])
    assert cfg.architecture == PRESETS[preset]["architectures"][0] and cfg.sliding_window is None
    assert p["kv_bytes_per_token_per_shard"] == cfg.num_hidden_layers * 2 * 1 * cfg.head_dim * 2  # 1 of 8 KV heads
    assert p["fits"]


@pytest.mark.parametrize("argv, needle", [
    (["--model", "nope"], "unknown model"),
    (["--model", "llama-3-70b", "--tp", "3"], "tp=3"),
    (["--tp", "0"], "tp must be"),
    (["--batch", "x"], "invalid int"),
    (["--gpu-mem-gib", "-1"], "gpu-mem-gib"),
    (["--dtype", "int3"], "dtype"),
    (["--mem-util", "1.5"], "mem-util"),
    (["--context", "100000"], "positions"),
    (["--model", "qwen2.5-72b", "--tp", "3"], "tp=3"),
])
def test_bad_args_one_line_error(capsys, argv, needle):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_config_json_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["llama-3-8b"], "eos_token_id": 2}))
    assert plan(str(path))["weight_bytes_per_shard"] == plan("llama-3-8b")["weight_bytes_per_shard"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["--model", str(bad)]) == 2
