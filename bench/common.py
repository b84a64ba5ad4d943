"""Helpers shared by the benchmarks: prompt sets, bandwidth probe, JSON output."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The prompt sets live with drafter training, which must never train on them.
from train.held_out import PROMPTS, TUNING_PROMPTS, flat_prompts  # noqa: E402,F401


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth (GB/s): the best of several full reductions over a large buffer, by
    torch's ``sum()`` and, where the fused CPU kernel builds, by its prefetched stream
    (treespec_kernels/cpu_fused.c ``fused_stream_sum``, the way its GEMVs read weights); either can
    read faster on a given machine, and the limit should be the best this machine reaches."""
    x = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    probes = [lambda: x.sum()]
    try:
        from engine.fused import build_dir
        from treespec_kernels import cpu_fused

        if cpu_fused.unsupported_reason() is None:
            lib = cpu_fused.load(build_dir())
            probes.append(lambda: lib.fused_stream_sum(x.data_ptr(), x.numel(), torch.get_num_threads()))
    except (ImportError, RuntimeError):
        pass
    best = float("inf")
    for probe in probes:
        for _ in range(repeats):
            t = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def emit(result: dict) -> None:
    """The final JSON line every benchmark prints."""
    print(json.dumps(result), flush=True)
