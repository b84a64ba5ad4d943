"""Host synchronizations of one served step on the torch path must not grow with the number
of layers or the size of the draft trees.

On a GPU every read of a device value by the host (``.item()``, ``int(t)``, a boolean mask's
``nonzero``, a device-to-host copy) stalls the launch queue. torch.profiler records the
operators behind the first two, ``aten::_local_scalar_dense`` and ``aten::nonzero`` (on CPU
it counts the host-side ones too: the step's bookkeeping on small host tensors), and on CUDA
the device-to-host copies themselves (on CPU a copy cannot be told from a dtype cast). A
step of a 1- and a 3-layer model, with 4- and 16-node trees, must record the same counts:
the metadata is built once per forward and verification reads the device once, however
deep the model or wide the tree.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import random_llama_dir
from engine.batch import SamplingInput, SeqInput, build_model_input
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from treespec_kernels.tree import tree_depth_list

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "Memcpy DtoH")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
          SamplingParams(temperature=1.0)]


def step_syncs(runner: ModelRunner, nodes: int) -> dict[str, int]:
    seqs = []
    for b in range(len(PARAMS)):
        prompt = [3 + b, 17, 41, 9, 250, 77]
        runner.execute(build_model_input([SeqInput(prompt, list(range(6)), [b], 0)], 16))
        parents = [-1] + [(i - 1) // 2 for i in range(1, nodes)]  # a binary tree
        seqs.append(SeqInput([5 + i for i in range(nodes)], [6 + d for d in tree_depth_list(parents)], [b, 8 + b],
                             6, tree_parents=parents, logits_rows=list(range(nodes))))
    inp = build_model_input(seqs, 16)
    sampling = SamplingInput(PARAMS, torch.rand(len(PARAMS) * (nodes + 1)), hidden="accepted")
    runner.step(inp, sampling)  # warm up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step(inp, sampling)
    counts = {op: 0 for op in SYNC_OPS}
    for event in prof.events():
        for op in SYNC_OPS:
            counts[op] += event.name.startswith(op)
    return counts


@pytest.mark.parametrize("attention", ["torch"] + (["triton"] if DEVICE == "cuda" else []))
def test_syncs_do_not_grow_with_layers_or_tree_size(tmp_path, attention):
    counts = {}
    for layers in (1, 3):
        d = random_llama_dir(str(tmp_path / f"m{layers}"), layers=layers)
        runner = ModelRunner(d, "float32", DEVICE, attention_backend=attention)
        runner.allocate_kv(16, 16)
        for nodes in (4, 16):
            counts[layers, nodes] = step_syncs(runner, nodes)
    first = counts[1, 4]
    assert all(c == first for c in counts.values()), counts
    assert sum(first.values()) <= 10, first
