"""Time to first token (one prefill and its first sampled token) of this engine vs
transformers on the same weights and dtype, by prompt length.

    python bench/prefill.py [--lengths 16,40,128,256,512] [--repeats 5] [--dtype bfloat16]

A prompt of N tokens is the first N of the bench prompts' chat-formatted text, run
through ``LLMEngine.generate(max_tokens=1)`` (the engine's whole path: scheduling, the
forward, sampling) and through one transformers forward of the same ids (logits of the
last row only). Where the fused CPU kernel runs, the engine takes prompts of up to
``PREFILL_CHUNKS * max_rows`` tokens as fused chunks of ``max_rows`` (engine/backends.py,
``split_causal``), longer ones on its eager torch path, which is timed too
(``engine_torch_path``). The sides run round-robin, medians over --repeats, so a noisy
host slows them alike; ``ratio`` is transformers' time over the engine's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tqdm import tqdm

from common import emit, flat_prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="16,40,128,256,512", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    try:
        lengths = sorted({int(n) for n in args.lengths.split(",")})
    except ValueError:
        raise SystemExit(f"error: --lengths must be comma-separated integers, got {args.lengths!r}")
    if lengths[0] < 1 or args.repeats < 1:
        raise SystemExit("error: --lengths and --repeats must be positive")

    from transformers import AutoModelForCausalLM

    from engine.config import EngineConfig
    from engine.build import build_engine
    from engine.backends import PREFILL_CHUNKS
    from engine.sampling import SamplingParams
    from engine.weights import default_model_dir

    cfg = EngineConfig(dtype=args.dtype, drafter="off", max_num_seqs=1, max_model_len=max(2048, lengths[-1] + 16))
    engine = build_engine(cfg)
    fused = engine.executor.runner.fused
    os.environ["TREESPEC_CPU_KERNEL"] = "torch"
    eager = build_engine(cfg) if fused is not None else None
    os.environ.pop("TREESPEC_CPU_KERNEL")
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=getattr(torch, args.dtype))

    text = [t for p in flat_prompts() for t in engine.tokenize_chat([{"role": "user", "content": p[1]}])]
    if len(text) < lengths[-1]:
        raise SystemExit(f"error: the bench prompts hold {len(text)} tokens, fewer than {lengths[-1]}")
    prompts = {n: text[:n] for n in lengths}
    params = SamplingParams(max_tokens=1)

    def run_engine(e, ids):
        t = time.perf_counter()
        e.generate([ids], params)
        return time.perf_counter() - t

    @torch.inference_mode()
    def run_hf(ids):
        t = time.perf_counter()
        hf(torch.tensor([ids]), logits_to_keep=1).logits.argmax(-1)
        return time.perf_counter() - t

    sides = {"engine": lambda ids: run_engine(engine, ids), "hf": run_hf}
    if eager is not None:
        sides["engine_torch_path"] = lambda ids: run_engine(eager, ids)
    for f in sides.values():  # warm-up: every length once
        for ids in prompts.values():
            f(ids)
    times = {s: {n: [] for n in lengths} for s in sides}
    for _ in tqdm(range(args.repeats), desc="round-robin prefills"):
        for n, ids in prompts.items():
            for s, f in sides.items():
                times[s][n].append(f(ids))
    ms = {s: {n: 1e3 * statistics.median(v) for n, v in per.items()} for s, per in times.items()}
    print(f"{'tokens':>7}" + "".join(f"{s:>20}" for s in sides) + f"{'hf / engine':>13}")
    for n in lengths:
        print(f"{n:>7}" + "".join(f"{ms[s][n]:>17.1f} ms" for s in sides) + f"{ms['hf'][n] / ms['engine'][n]:>13.2f}")
    emit({
        "bench": "prefill",
        "dtype": args.dtype,
        "engine_kernel": "fused" if fused is not None else "torch",
        "fused_prefill_max_tokens": PREFILL_CHUNKS * fused.max_rows if fused is not None else 0,
        "ms": {s: {str(n): round(v, 2) for n, v in per.items()} for s, per in ms.items()},
        "ratio": {str(n): round(ms["hf"][n] / ms["engine"][n], 3) for n in lengths},
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
