"""Batch-1 decode speed of this engine vs transformers ``generate``, same weights and dtype.

    python bench/decode.py [--dtype bfloat16] [--prompts 3] [--max-tokens 128]

Both sides generate exactly --max-tokens tokens per prompt (EOS ignored), timed
end to end (prefill included). ``fraction_of_limit`` compares the engine with
the memory-bandwidth bound: bandwidth / weight bytes read per decode step, where
the bandwidth is the highest of several probes spread over the run. Where the
fused CPU kernel runs (engine/fused.py), the same engine on its eager torch path
is timed too (``engine_torch_path_tok_s``).

If llama-cpp-python is installed (an optional peer, never a dependency: see
docs/benchmarks.md), llama.cpp runs the same prompts on the GGUF file the
default weights come from (Q4_1: it reads ~3x fewer bytes per token than the
engine's dequantized bf16 weights), and its own fraction of the same bound is
reported next to the engine's.
"""
from __future__ import annotations

import argparse
import os
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
    ap.add_argument("--llama-cpp", default="auto", choices=["auto", "off"],
                    help="auto: add llama.cpp on the GGUF file when llama-cpp-python is installed")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from engine.config import EngineConfig
    from engine.build import build_engine
    from engine.sampling import SamplingParams
    from engine.weights import default_model_dir

    cfg = EngineConfig(dtype=args.dtype, drafter="off", max_num_seqs=1)
    engine = build_engine(cfg)
    kernel = "fused" if engine.executor.runner.fused is not None else "torch"
    # The eager torch path of the same engine, as a second peer where the fused kernel runs.
    os.environ["TREESPEC_CPU_KERNEL"] = "torch"
    eager = build_engine(cfg) if kernel == "fused" else None
    os.environ.pop("TREESPEC_CPU_KERNEL")
    prompts = [engine.tokenize_chat([{"role": "user", "content": p}]) for _, p in flat_prompts(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    for e in (engine, eager):
        if e is not None:
            e.generate([prompts[0]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up

    def time_engine(e=engine, name=kernel):
        t = time.perf_counter()
        for p in tqdm(prompts, desc=f"engine {args.dtype} ({name})"):
            e.generate([p], params)
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
    cpp = llama_cpp_peer(prompts, args.max_tokens) if args.llama_cpp == "auto" else None
    # Interleave the sides so background load hits them alike; probe the bandwidth between
    # them and keep the highest reading (this shared VM's varies over time, 30-62 GB/s seen):
    # the bound is then the most the machine showed during the run.
    eng, eager_runs, ref, cpp_runs, probes = [], [], [], [], []
    for _ in range(2):
        probes.append(memory_bandwidth_gbs())
        eng.append(time_engine())
        if eager is not None:
            eager_runs.append(time_engine(eager, "torch"))
        if hf is not None:
            ref.append(time_hf())
        if cpp is not None:
            cpp_runs.append(cpp())
    engine_tok_s, hf_tok_s = max(eng), max(ref) if ref else float("nan")

    model = engine.executor.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    probes.append(memory_bandwidth_gbs())
    bw = max(probes)
    limit = bw * 1e9 / weight_bytes
    emit({
        "bench": "decode",
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "engine_kernel": kernel,
        "engine_tok_s": round(engine_tok_s, 2),
        "engine_torch_path_tok_s": round(max(eager_runs), 2) if eager_runs else None,
        "hf_tok_s": round(hf_tok_s, 2),
        "ratio": round(engine_tok_s / hf_tok_s, 3),
        "bandwidth_gb_s": round(bw, 2),
        "bandwidth_probes_gb_s": [round(b, 1) for b in probes],
        "weight_mb": round(weight_bytes / 1e6, 1),
        "limit_tok_s": round(limit, 2),
        "fraction_of_limit": round(engine_tok_s / limit, 3),
        **llama_cpp_figures(cpp_runs, engine_tok_s, bw),
        "threads": torch.get_num_threads(),
    })


def llama_cpp_peer(prompts: list[list[int]], max_tokens: int):
    """A timer for llama.cpp greedy decoding of the same token ids, or None if it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: skipping the llama.cpp peer", flush=True)
        return None
    from engine.weights import gguf_path

    llm = Llama(model_path=gguf_path(), n_ctx=1024, n_threads=torch.get_num_threads(), n_batch=512,
                seed=0, verbose=False)

    def run(ps, n):
        for p in ps:
            for i, _ in enumerate(llm.generate(p, temp=0.0, top_k=1, reset=True)):
                if i + 1 >= n:  # llama.cpp's generator never stops by itself: EOS is ignored, as on the other sides
                    break

    run(prompts[:1], 8)  # warm-up

    def timed():
        t = time.perf_counter()
        run(tqdm(prompts, desc="llama.cpp gguf"), max_tokens)
        return len(prompts) * max_tokens / (time.perf_counter() - t)

    return timed


def llama_cpp_figures(runs: list[float], engine_tok_s: float, bw_gbs: float) -> dict:
    if not runs:
        return {"llama_cpp_tok_s": None}
    from engine.weights import gguf_path

    tok_s = max(runs)
    gguf_bytes = os.path.getsize(gguf_path())
    return {
        "llama_cpp_tok_s": round(tok_s, 2),
        "engine_vs_llama_cpp": round(engine_tok_s / tok_s, 3),
        "llama_cpp_weight_mb": round(gguf_bytes / 1e6, 1),
        "llama_cpp_fraction_of_limit": round(tok_s / (bw_gbs * 1e9 / gguf_bytes), 3),
    }


if __name__ == "__main__":
    main()
