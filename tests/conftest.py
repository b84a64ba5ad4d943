"""Shared fixtures. The code runs from the repository root (not installed)."""
from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def default_dir() -> str:
    from engine.weights import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def hf_model(default_dir):
    """transformers' LlamaForCausalLM on the converted default weights (fp32): the logits oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(default_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


@pytest.fixture(scope="session")
def executor(default_dir):
    """One fp32 in-process executor of the default model, shared by engine tests."""
    from engine.executor import InProcessExecutor

    return InProcessExecutor(default_dir, "float32")


@pytest.fixture
def make_engine(executor, tokenizer):
    """Build an LLMEngine over the shared executor (a fresh KV cache each time)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    def make(drafter_model=None, /, **kw):  # kw: EngineConfig fields (drafter= names the kind)
        kw.setdefault("num_blocks", 256)
        kw.setdefault("block_size", 16)
        kw.setdefault("tree_budget", 60)  # room for any tree a test drafts (not the CPU's auto budget)
        return LLMEngine(EngineConfig(**kw), executor, drafter_model, tokenizer)

    return make


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a list.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for better sleep.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is 17 times 23? Show your work.",
]


@pytest.fixture(scope="session")
def chat_prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for p in CHAT_PROMPTS
    ]


def random_llama_dir(path: str, *, heads=6, kv_heads=2, hidden=96, layers=2, vocab=320, tie=False,
                     rope_scaling=None, seed=0) -> str:
    """A small random LlamaForCausalLM saved as an HF safetensors checkpoint."""
    return random_model_dir(path, "llama", heads=heads, kv_heads=kv_heads, hidden=hidden, layers=layers,
                            vocab=vocab, tie=tie, rope_scaling=rope_scaling, seed=seed)


def random_model_dir(path: str, family: str = "llama", *, heads=6, kv_heads=2, hidden=96, layers=2, vocab=320,
                     tie=False, rope_scaling=None, seed=0, **extra) -> str:
    """A small random checkpoint of a transformers family ("llama", "mistral", "qwen2", "qwen3"),
    saved by transformers' own model class. extra: more config fields (sliding_window, ...).
    Biases and the per-head q/k norms (Qwen2/Qwen3) are randomised too, so they matter."""
    import transformers

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=tie, rope_scaling=rope_scaling,
        bos_token_id=0, eos_token_id=vocab - 1, **extra,
    )
    model = getattr(transformers, f"{name}ForCausalLM")(cfg)
    with torch.no_grad():  # default init is tiny; widen it so logits differ meaningfully
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
            elif n.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


# ------------------------------------------------------------------------------ served apps


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_cluster(num_cpus: int, **ray_init):
    """A fresh local Ray with Serve's HTTP proxy on a free loopback port, shut down on exit;
    yields (base URL, port). ray_init: more ``ray.init`` arguments."""
    import ray
    from ray import serve

    port = free_port()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=num_cpus, configure_logging=False, log_to_driver=False, **ray_init)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", port
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_healthy(url: str, timeout: float = 180) -> None:
    """Wait until a served application's /health answers 200; fail (never hang) past timeout."""
    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{url} never became healthy"
        time.sleep(0.5)


def replica_status(base: str) -> dict:
    """The LLM replica's state as /health reports it (engine load, active requests, decision)."""
    import httpx

    return httpx.get(base + "/health", timeout=10).json()["replica"]


def wait_replica_idle(base: str, timeout: float = 30.0) -> dict:
    """Wait until the replica holds no request and no KV block; its status then."""
    deadline = time.time() + timeout
    while True:
        st = replica_status(base)
        if st["active"] == 0 and st["running"] == 0 and st["waiting"] == 0 and st["kv_used"] == 0:
            return st
        assert time.time() < deadline, f"requests or KV blocks left over: {st}"
        time.sleep(0.2)
