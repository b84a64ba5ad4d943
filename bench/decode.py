"""Batch-1 decode speed of this engine vs transformers ``generate``, same weights and dtype.

    python bench/decode.py [--dtype bfloat16] [--prompts 3] [--max-tokens 128]

Both sides generate exactly --max-tokens tokens per prompt (EOS ignored), timed
end to end (prefill included). ``fraction_of_limit`` compares the engine with
the memory-bandwidth bound: bandwidth / weight bytes read per decode step.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from common import emit, flat_prompts, memory_bandwidth_gbs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.weights import default_model_dir

    engine = LLMEngine(EngineConfig(dtype=args.dtype, max_num_seqs=1))
    prompts = [engine.tokenize_chat([{"role": "user", "content": p}]) for _, p in flat_prompts(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up

    def time_engine():
        t = time.perf_counter()
        for p in tqdm(prompts, desc=f"engine {args.dtype}"):
            engine.generate([p], params)
        return len(prompts) * args.max_tokens / (time.perf_counter() - t)

    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype) if not args.no_hf else None

    def time_hf():
        t = time.perf_counter()
        with torch.inference_mode():
            for p in tqdm(prompts, desc=f"transformers {args.dtype}"):
                hf.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                            do_sample=False)
        return len(prompts) * args.max_tokens / (time.perf_counter() - t)

    if hf is not None:
        with torch.inference_mode():
            hf.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)
    # Interleave the two sides so background load hits both alike.
    eng, ref = [], []
    for _ in range(2):
        eng.append(time_engine())
        if hf is not None:
            ref.append(time_hf())
    engine_tok_s, hf_tok_s = max(eng), max(ref) if ref else float("nan")

    model = engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    bw = memory_bandwidth_gbs()
    limit = bw * 1e9 / weight_bytes
    emit({
        "bench": "decode",
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "engine_tok_s": round(engine_tok_s, 2),
        "hf_tok_s": round(hf_tok_s, 2),
        "ratio": round(engine_tok_s / hf_tok_s, 3),
        "bandwidth_gb_s": round(bw, 2),
        "weight_mb": round(weight_bytes / 1e6, 1),
        "limit_tok_s": round(limit, 2),
        "fraction_of_limit": round(engine_tok_s / limit, 3),
        "threads": torch.get_num_threads(),
    })


if __name__ == "__main__":
    main()
