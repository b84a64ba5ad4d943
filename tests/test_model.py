"""engine.model against transformers' LlamaForCausalLM on the same weights (fp32)."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import random_llama_dir
from engine.batch import SeqInput, build_model_input
from engine.runner import ModelRunner


def engine_logits(runner: ModelRunner, ids: list[int], split: int, block_table: list[int]) -> torch.Tensor:
    """Prefill ids[:split] then feed the rest in 1- and 3-token chunks; logits [len(ids), V]."""
    out, pos = [], 0
    chunks = [split] + [1, 3] * len(ids)
    for c in chunks:
        if pos >= len(ids):
            break
        toks = ids[pos : pos + c]
        inp = build_model_input(
            [SeqInput(toks, list(range(pos, pos + len(toks))), block_table, pos, logits_rows=list(range(len(toks))))],
            runner.block_size,
        )
        out.append(runner.execute(inp).logits)
        pos += len(toks)
    return torch.cat(out)


def test_default_model_matches_transformers_gguf_loader(default_dir):
    """Our GGUF reader + model vs transformers reading the same GGUF file on its own."""
    from transformers import AutoModelForCausalLM

    from engine.weights import gguf_path

    path = gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    runner = ModelRunner(default_dir, "float32")
    runner.allocate_kv(16, 8)
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 10, 200, 17, 4000, 9, 33]
    ours = engine_logits(runner, ids, 9, [7, 3, 12, 0])  # non-contiguous blocks
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("tie,scaling", [
    (False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}),
    (True, None),
])
def test_random_config_matches_transformers(tmp_path, tie, scaling):
    from transformers import LlamaForCausalLM

    d = random_llama_dir(str(tmp_path), tie=tie, rope_scaling=scaling, layers=3)
    hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = ModelRunner(d, "float32")
    runner.allocate_kv(64, 4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (150,), generator=g).tolist()  # long enough for llama3 scaling to matter
    ours = engine_logits(runner, ids, 100, list(range(63, 20, -1)))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


def test_llama3_scaling_changes_frequencies():
    from engine.model import rope_inv_freq

    plain = rope_inv_freq(64, 500000.0, None)
    scaled = rope_inv_freq(64, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert torch.allclose(plain[:4], scaled[:4])  # high frequencies are kept
    assert torch.allclose(plain[-1] / 8, scaled[-1])  # low frequencies slowed by the factor


def test_unknown_rope_scaling_is_a_clear_error():
    from engine.model import rope_inv_freq

    with pytest.raises(ValueError, match="rope_scaling"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn-ish"})


def test_tp_validation_message():
    from engine.config import ModelConfig

    cfg = ModelConfig(vocab_size=10, hidden_size=576, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    cfg.validate_tp(3)
    cfg.validate_tp(9)
    with pytest.raises(ValueError, match="must divide the 9 attention heads"):
        cfg.validate_tp(2)


def test_bf16_packed_weights_match_plain_linear(tmp_path):
    """oneDNN-packed bf16 weights (the CPU fast path) give the plain F.linear results."""
    from engine.parallel import pack_cpu_weights

    d = random_llama_dir(str(tmp_path), tie=False, layers=3)
    plain = ModelRunner(d, "bfloat16", pack_weights=False, attention_backend="torch")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # e.g. an AVX2-only CPU
        assert pack_cpu_weights(plain.model) == 0  # nothing packed: the model keeps F.linear
        pytest.skip("oneDNN packs bf16 weights only on CPUs with AVX512-BF16/AMX or AVX-NE-CONVERT")
    packed = ModelRunner(d, "bfloat16", attention_backend="torch")
    assert not any("packed_weight" in m.__dict__ for m in plain.model.modules())
    assert sum("packed_weight" in m.__dict__ for m in packed.model.modules()) == 3 * 4 + 1  # 4 per layer + head
    assert pack_cpu_weights(ModelRunner(d, "float32").model) == 0  # fp32 keeps F.linear
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    outs = []
    for r in (plain, packed):
        r.allocate_kv(16, 4)
        outs.append(engine_logits(r, ids, 30, list(range(12))))
    diff = (outs[0] - outs[1]).abs().max().item()
    assert diff <= 1e-2 * outs[0].abs().max().item()
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).float().mean() >= 0.95
