"""Tensor parallelism: world_size 2 and 3 (gloo, separate processes) equal world_size 1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, random_llama_dir

WORKER = os.path.join(ROOT, "tests", "tp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tp_logits(model_dir: str, world: int, out: str) -> torch.Tensor:
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, WORKER, "--rank", str(r), "--world", str(world), "--port", str(port),
                          "--model", model_dir, "--out", out], stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return torch.load(out)


@pytest.mark.parametrize("heads,kv_heads,world", [(6, 2, 2), (6, 3, 3), (4, 2, 4), (4, 1, 2)])
def test_random_config_tp_equals_single(tmp_path, heads, kv_heads, world):
    """(4, 2, 4) and (4, 1, 2) replicate KV heads: world_size exceeds the KV head count."""
    d = random_llama_dir(str(tmp_path / "m"), heads=heads, kv_heads=kv_heads, hidden=heads * 16, vocab=301)
    single = tp_logits(d, 1, str(tmp_path / "one.pt"))
    sharded = tp_logits(d, world, str(tmp_path / "tp.pt"))
    assert (single - sharded).abs().max().item() <= 1e-4


def test_default_model_tp3_equals_single(tmp_path, default_dir):
    single = tp_logits(default_dir, 1, str(tmp_path / "one.pt"))
    sharded = tp_logits(default_dir, 3, str(tmp_path / "tp.pt"))
    assert single.shape[-1] == 49152
    assert (single - sharded).abs().max().item() <= 1e-4
