"""The engine end to end through each attention backend (engine/attention.py).

The Triton kernels run on CPU tensors in Triton's interpreter, which must be on before the
process first imports triton (transformers imports it): so the Triton runs happen in a child
process started with TRITON_INTERPRET=1, this file's ``__main__``. The oracle is the same
engine on the "torch" reference attention: speculative decoding at T=0, with 8-node EAGLE trees verified
in one forward, must produce the same tokens on both. The child counts the kernel calls: decode and
verify steps go through the decode-shaped kernel (treespec_kernels/triton_decode.py), some with
several KV splits, and the step that prefills the 70-token prompt (70 rows x GQA 2 > 128) through
the prefill-shaped one (treespec_kernels/triton_attention.py).

fp32 and fp16 are compared; bf16 only on a GPU (the interpreter's bf16 ``tl.dot`` is wrong:
docs/kernels.md, Tests).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, random_llama_dir, random_model_dir
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling import SamplingParams
from engine.drafters.loading import load_drafter
from engine.executor import InProcessExecutor
from engine.graphs import GraphForward

PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2, 250, 8], [64, 65, 66, 67, 68, 69, 70, 71, 72],
           [(7 * i) % 300 for i in range(70)]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return random_llama_dir(str(tmp_path_factory.mktemp("tiny")), heads=4, kv_heads=2, hidden=64, layers=2,
                            vocab=300, seed=5)


def run_engine(model_dir: str, dtype: str, attention_backend: str, cuda_graphs: str = "off"):
    """cuda_graphs="on": decode and verify steps padded to their buckets (engine/graphs.py), as a
    CUDA graph replays them; on CPU they run eagerly."""
    executor = InProcessExecutor(model_dir, dtype, attention_backend=attention_backend, cuda_graphs=cuda_graphs,
                                 max_model_len=256)
    cfg = EngineConfig(model=model_dir, drafter="eagle", draft_path="random", tree_budget=8, draft_depth=4,
                       draft_top_k=2, block_size=16, num_blocks=64, seed=0, dtype=dtype,
                       draft_min_prob=0.0, draft_vocab_size=0, attention_backend=attention_backend,
                       cuda_graphs=cuda_graphs, max_model_len=256)
    drafter = load_drafter(cfg, model_dir, executor, seed=1)
    engine = LLMEngine(cfg, executor, drafter)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert engine.kv_blocks_used == 0
    return outs, executor


def tokens_in_child(model_dir: str, dtype: str, attention_backend: str, cuda_graphs: str = "off") -> dict:
    """run_engine in a fresh process with Triton's interpreter on: {"attention", "tokens", "drafted",
    "verify_steps", "calls"}."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, __file__, model_dir, dtype, attention_backend, cuda_graphs], cwd=ROOT,
                         env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """Every switch of the registry's families at once: QKV and o_proj biases, q/k head norms."""
    return random_model_dir(str(tmp_path_factory.mktemp("qwen3")), "qwen3", heads=4, kv_heads=2, hidden=64,
                            layers=2, vocab=300, seed=6, attention_bias=True)


@pytest.mark.parametrize("model,dtype,graphs", [("llama", "float32", "off"), ("llama", "float16", "off"),
                                                ("qwen3", "float32", "on")])
def test_engine_through_triton_equals_torch(tiny_dir, qwen3_dir, model, dtype, graphs):
    """The Triton path's layers also run the fused norm / RoPE / SiLU-mul kernels
    (treespec_kernels/triton_ops.py): the same tokens as the torch ops; the Qwen3 run also
    pads its decode and verify steps to CUDA-graph buckets (run eagerly here)."""
    model_dir = tiny_dir if model == "llama" else qwen3_dir
    torch_outs, torch_exec = run_engine(model_dir, dtype, "torch")
    assert torch_exec.runner.backend.attention == "torch"
    triton_run = tokens_in_child(model_dir, dtype, "triton", graphs)
    assert triton_run["graphs"] == (graphs == "on")
    assert triton_run["attention"] == "triton"
    assert triton_run["tokens"] == [o.token_ids for o in torch_outs]
    assert all(len(o.token_ids) == 12 for o in torch_outs)
    # trees of several nodes were really verified through the kernels
    assert triton_run["drafted"] >= 8 * len(PROMPTS)
    assert triton_run["verify_steps"] >= len(PROMPTS)
    calls = triton_run["calls"]
    assert calls["decode"] > 0 and calls["decode_split"] > 0 and calls["prefill"] > 0, calls
    forwards = calls["rms_norm"]  # one per target forward (layer 0's input norm)
    assert forwards > 0 and calls["rope"] == calls["silu_mul"] == 2 * forwards, calls
    assert calls["add_rms_norm"] == 2 * 2 * forwards, calls  # 2 x layers: one in layer 0, two later, one final


def test_triton_on_cpu_needs_the_interpreter_from_the_start(tiny_dir):
    """In a process that imported triton compiled (this one: transformers imports it), asking
    for the Triton backend on CPU is a clear error at start, not a failure inside a kernel."""
    import triton.language as tl

    if type(tl.zeros).__name__ == "InterpretedFunction":
        pytest.skip("this process runs Triton interpreted")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        InProcessExecutor(tiny_dir, "float32", attention_backend="triton")


def test_attention_backend_is_validated(tiny_dir):
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(model=tiny_dir, attention_backend="flash").resolve()
    with pytest.raises(ValueError, match="attention_backend"):
        InProcessExecutor(tiny_dir, "float32", attention_backend="flash")


def test_generate_cli_forces_the_triton_backend():
    """``python -m engine.generate --attention-backend triton`` runs the default model and its
    shipped EAGLE drafter through the Triton kernels (interpreted on CPU) and prints the same
    text as the torch backend; an unknown backend is a one-line CLI error."""
    def cli(backend):
        return subprocess.run(
            [sys.executable, "-m", "engine.generate", "--prompt", "The capital of France is", "--raw",
             "--max-tokens", "6", "--drafter", "eagle", "--dtype", "float32", "--attention-backend", backend],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
    torch_run, triton_run = cli("torch"), cli("triton")
    assert torch_run.returncode == 0, torch_run.stderr
    assert triton_run.returncode == 0, triton_run.stderr
    assert triton_run.stdout == torch_run.stdout and torch_run.stdout.strip()
    bad = cli("flash")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "flash" in bad.stderr


def count_kernel_calls() -> dict:
    """Wrap the Triton entry points that engine.attention.attend and the layers call; returns the
    live counts."""
    import torch

    from engine.attention import triton_attention, triton_ops

    prefill_kernel, decode_kernel = triton_attention(torch.device("cpu"))
    calls = {"decode": 0, "decode_split": 0, "prefill": 0}
    decode, prefill = decode_kernel.paged_attention_decode, prefill_kernel.paged_attention_packed

    def counted_decode(*args, **kw):
        calls["decode"] += 1
        calls["decode_split"] += kw.get("splits", 1) > 1
        return decode(*args, **kw)

    def counted_prefill(*args, **kw):
        calls["prefill"] += 1
        return prefill(*args, **kw)

    decode_kernel.paged_attention_decode = counted_decode
    prefill_kernel.paged_attention_packed = counted_prefill
    ops = triton_ops(torch.device("cpu"))  # the layers' fused elementwise ops
    for name in ("rms_norm", "add_rms_norm", "rope", "silu_mul"):
        calls[name] = 0

        def counted(*args, _op=getattr(ops, name), _name=name, **kw):
            calls[_name] += 1
            return _op(*args, **kw)

        setattr(ops, name, counted)
    return calls


if __name__ == "__main__":  # the child of tokens_in_child
    calls = count_kernel_calls()
    outs, executor = run_engine(*sys.argv[1:5])
    print(json.dumps({
        "attention": getattr(executor.runner.backend, "eager", executor.runner.backend).attention,
        "graphs": isinstance(executor.runner.backend, GraphForward),
        "tokens": [o.token_ids for o in outs],
        "drafted": sum(o.seq.stats.drafted for o in outs),
        "verify_steps": sum(o.seq.stats.verify_steps for o in outs),
        "calls": calls,
    }))
