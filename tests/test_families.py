"""Model families: Llama, Mistral, Qwen2 and Qwen3 checkpoints (random tiny ones, saved by
transformers' own model classes) served like transformers serves them, sharded, and with
every drafter kind; configs the engine cannot honour are refused, naming what.

Oracles: transformers' forward and ``generate`` on the same checkpoint (fp32), world size 1
for TP, speculation off for speculation on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, random_model_dir
from test_model import engine_logits
from test_tp import tp_logits
from engine.architectures import UnsupportedModel
from engine.build import build_engine
from engine.config import EngineConfig, ModelConfig
from engine.runner import ModelRunner
from engine.sampling import SamplingParams

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SHAPE = dict(heads=4, kv_heads=2, hidden=64, layers=3, vocab=320)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> str:
    seed = FAMILIES.index(request.param)
    return random_model_dir(str(tmp_path_factory.mktemp(request.param)), request.param, seed=seed, **SHAPE)


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def family_of(path: str) -> str:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["model_type"]


def test_registry_reads_each_family(family_dir):
    cfg = ModelConfig.from_path(family_dir)
    family = family_of(family_dir)
    assert cfg.architecture.lower().startswith(family)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == {
        "llama": (False, False, False), "mistral": (False, False, False),
        "qwen2": (True, False, False), "qwen3": (False, False, True)}[family]
    runner = ModelRunner(family_dir, "float32")
    attn = runner.model.layers[0].self_attn
    assert (attn.qkv_proj.bias is not None) == cfg.qkv_bias and (attn.q_norm is not None) == cfg.qk_norm


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers(family_dir, tmp_path, tie):
    """A 100-token prefill, then 1- and 3-token steps over the cached KV (non-contiguous blocks)."""
    path = family_dir
    if tie:
        path = random_model_dir(str(tmp_path / "tied"), family_of(family_dir), tie=True, seed=7, **SHAPE)
    runner = ModelRunner(path, "float32")
    runner.allocate_kv(64, 4)
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = engine_logits(runner, ids, 100, list(range(63, 20, -1)))
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
     "attention_factor": 1.25},
], ids=["qwen-recommended", "explicit"])
def test_yarn_rope_equals_transformers(tmp_path, rope):
    """YaRN (Qwen2.5 / Qwen3's long-context setting): frequencies blended between interpolated
    and kept, cos/sin scaled by the attention factor; 150 tokens reach past the original 32-64."""
    from engine.backends import FusedCPUForward

    d = random_model_dir(str(tmp_path / "m"), "qwen2", seed=8, rope_scaling={**rope, "rope_theta": 10000.0}, **SHAPE)
    assert ModelConfig.from_path(d).rope_scaling["rope_type"] == "yarn"
    runner = ModelRunner(d, "float32")
    assert runner.model.model.rope.attention_factor == pytest.approx(rope.get("attention_factor", 1.1386294), 1e-6)
    runner.allocate_kv(64, 4)
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = engine_logits(runner, ids, 100, list(range(64)))
    with torch.no_grad():
        ref = hf_model(d)(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4
    # The fused CPU kernel's RoPE has no cos/sin factor: a YaRN Llama runs its torch forward.
    llama = random_model_dir(str(tmp_path / "l"), "llama", seed=8, rope_scaling={**rope, "rope_theta": 10000.0},
                             **SHAPE)
    assert not isinstance(ModelRunner(llama, "bfloat16").backend, FusedCPUForward)


def test_tp2_equals_tp1(family_dir, tmp_path):
    single = tp_logits(family_dir, 1, str(tmp_path / "one.pt"))
    sharded = tp_logits(family_dir, 2, str(tmp_path / "tp.pt"))
    assert (single - sharded).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("llama", {"attention_bias": True})])
def test_biases_with_kv_heads_replicated(tmp_path, family, extra):
    """tp=4 over 2 KV heads: each KV head and its bias rows on two ranks. Llama's
    attention_bias also puts a bias on o_proj, which the all-reduce must count once."""
    d = random_model_dir(str(tmp_path / "m"), family, seed=5, **extra, **SHAPE)
    cfg = ModelConfig.from_path(d)
    assert cfg.qkv_bias and cfg.o_bias == (family == "llama")
    runner = ModelRunner(d, "float32")
    runner.allocate_kv(16, 4)
    ids = list(range(5, 45))
    with torch.no_grad():
        ref = hf_model(d)(torch.tensor([ids])).logits[0]
    assert (engine_logits(runner, ids, 30, list(range(16))) - ref).abs().max().item() <= 1e-4
    single = tp_logits(d, 1, str(tmp_path / "one.pt"))
    sharded = tp_logits(d, 4, str(tmp_path / "tp.pt"))
    assert (single - sharded).abs().max().item() <= 1e-4


PROMPTS = [[3, 17, 250, 9, 41], [100, 7, 7, 55, 12, 300, 2, 90, 33]]


def plain_outputs(path: str, max_tokens: int = 24) -> list[list[int]]:
    engine = build_engine(EngineConfig(model=path, dtype="float32", drafter="off", num_blocks=64))
    return [o.token_ids for o in engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))]


def test_greedy_generation_equals_transformers_generate(family_dir):
    hf = hf_model(family_dir)
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, like ignore_eos
    ours = plain_outputs(family_dir)
    for prompt, tokens in zip(PROMPTS, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["eagle", "eagle3", "medusa"])
def test_speculation_is_lossless(family_dir, kind):
    """A random drafter of each kind attaches to the target (its features, embedding and head)
    and, at T = 0, changes nothing but the step count."""
    engine = build_engine(EngineConfig(model=family_dir, dtype="float32", drafter=kind, draft_path="random",
                                       tree_budget=8, draft_depth=4, draft_top_k=4, draft_min_prob=0.0,
                                       lookup_tokens=0, num_blocks=64))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in outs] == plain_outputs(family_dir)
    assert sum(o.seq.stats.drafted for o in outs) > 0  # trees were drafted and verified
    assert engine.kv_blocks_used == 0


def test_bf16_cpu_backend_per_family(family_dir, caplog):
    """The fused CPU kernel runs Llama's layer: Llama and Mistral take it (where it builds),
    Qwen2 (QKV biases) and Qwen3 (q/k norms) run their torch forward and say why."""
    from engine.backends import FusedCPUForward, ModelForward
    from engine.fused import fused_kernel_available

    caplog.set_level("INFO", logger="engine.backends")
    runner = ModelRunner(family_dir, "bfloat16")
    family = family_of(family_dir)
    if family in ("qwen2", "qwen3"):
        assert type(runner.backend) is ModelForward
        assert any("torch forward" in r.message for r in caplog.records) or not fused_kernel_available()
    elif fused_kernel_available():
        assert isinstance(runner.backend, FusedCPUForward)


# ------------------------------------------------------------------------------ refusals


def write_config(tmp_path, **changes) -> str:
    from transformers import Qwen2Config

    d = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1).to_dict()
    d["architectures"] = ["Qwen2ForCausalLM"]
    d.update(changes)
    os.makedirs(tmp_path, exist_ok=True)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(d, f)
    return str(tmp_path)


REFUSED = {
    "architecture GPT2LMHeadModel": dict(architectures=["GPT2LMHeadModel"]),
    "architecture Qwen3MoeForCausalLM": dict(architectures=["Qwen3MoeForCausalLM"]),
    "hidden_act 'gelu'": dict(hidden_act="gelu"),
    "mlp_bias": dict(mlp_bias=True),
    "quantized checkpoints \\(fp8\\)": dict(quantization_config={"quant_method": "fp8"}),
    "rope_scaling type 'dynamic'": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
    "yarn needs factor and original_max_position_embeddings": dict(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": 0.5}),
    "layer_types \\['chunked_attention'\\]": dict(layer_types=["chunked_attention", "full_attention"]),
    "names no architecture": dict(architectures=None, model_type="gemma"),
}


@pytest.mark.parametrize("message", REFUSED)
def test_unsupported_config_is_refused_naming_it(tmp_path, message):
    path = write_config(tmp_path, **REFUSED[message])
    with pytest.raises(UnsupportedModel, match=message):
        ModelConfig.from_path(path)


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    path = write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    proc = subprocess.run([sys.executable, "-m", "engine.generate", "--model", path, "--prompt", "hi"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "architecture GPT2LMHeadModel is not supported" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "engine.plan", "--model", path], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "architecture GPT2LMHeadModel is not supported" in proc.stderr


def test_published_qwen25_config_has_no_window(tmp_path):
    """Qwen2.5's configs name a sliding window with use_sliding_window false: full attention."""
    path = write_config(tmp_path, use_sliding_window=False, sliding_window=131072, max_window_layers=70,
                        layer_types=None)
    assert ModelConfig.from_path(path).sliding_window is None
    v4 = write_config(tmp_path / "v4", use_sliding_window=True, sliding_window=32, max_window_layers=1,
                      layer_types=None)
    assert ModelConfig.from_path(v4).sliding_window == 32  # layer 1 on uses the window


# ------------------------------------------------------------------------------ sliding window


def test_sliding_window_serves_exactly_up_to_the_window(tmp_path):
    """Mistral with a 40-token window: generations inside the window equal transformers'
    (whose attention applies the window), a prompt past it is refused, not silently served
    with full attention, and a Ray-style explicit max_model_len past it is a config error."""
    from engine.engine import RequestError

    d = random_model_dir(str(tmp_path / "m"), "mistral", seed=3, sliding_window=40, **SHAPE)
    cfg = ModelConfig.from_path(d)
    assert (cfg.sliding_window, cfg.max_context) == (40, 40)
    engine = build_engine(EngineConfig(model=d, dtype="float32", drafter="off", num_blocks=64))
    assert engine.max_model_len == 40
    prompt = PROMPTS[1]
    out = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert len(prompt) + len(out.token_ids) <= 40
    hf = hf_model(d)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=len(out.token_ids), do_sample=False, pad_token_id=0)
    assert out.token_ids == ref[0, len(prompt):].tolist()
    with pytest.raises(RequestError, match="context is 40"):
        engine.add_request(list(range(1, 45)))
    with pytest.raises(ValueError, match="sliding window of 40 tokens"):
        EngineConfig(model=d, max_model_len=64).check_model(cfg)
