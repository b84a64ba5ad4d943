"""Speculative decoding speed at batch 1, temperature 0: off vs EAGLE vs Medusa.

    python bench/speculative.py [--dtype float32] [--prompts 24] [--max-tokens 128] [--tree-budget 60]

Runs the fixed prompt set of bench/common.py (8 categories) through one engine
per mode, on the same weights in the same process, and prints per-category
tau and the final JSON line with vanilla/eagle/medusa tokens/s, tau and speedups.
Uses the shipped drafters (assets/); --draft random measures the machinery alone.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

from tqdm import tqdm

from common import emit, flat_prompts


def run_mode(engine, prompts, params, label):
    tokens, steps, committed, per_cat = 0, 0, 0, defaultdict(lambda: [0, 0])
    t0 = time.perf_counter()
    for cat, ids in tqdm(prompts, desc=label):
        out = engine.generate([ids], params)[0]
        st = out.seq.stats
        tokens += len(out.token_ids)
        steps += st.verify_steps
        committed += st.committed
        per_cat[cat][0] += st.committed
        per_cat[cat][1] += st.verify_steps
    dt = time.perf_counter() - t0
    tau = committed / steps if steps else 0.0
    return tokens / dt, tau, {c: round(a / b, 3) for c, (a, b) in per_cat.items() if b}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tree-budget", type=int, default=60)
    ap.add_argument("--medusa-budget", type=int, default=None, help="Medusa tree size (default: --tree-budget)")
    ap.add_argument("--draft", default=None, help="'random' for untrained drafters (default: shipped)")
    args = ap.parse_args()

    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor
    from engine.sampling import SamplingParams
    from engine.weights import resolve_model
    from transformers import AutoTokenizer

    model_dir = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model_dir)
    executor = InProcessExecutor(model_dir, args.dtype)  # one copy of the target, shared by all modes
    prompts = [(c, tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
               for c, p in flat_prompts(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens)

    def engine_for(kind):
        budget = args.tree_budget if kind != "medusa" else (args.medusa_budget or args.tree_budget)
        cfg = EngineConfig(dtype=args.dtype, speculation=kind, draft_path=args.draft, tree_budget=budget,
                           max_num_seqs=1, num_blocks=128)
        drafter = load_drafter(cfg, model_dir, executor) if kind != "off" else None
        return LLMEngine(cfg, executor, drafter, tok)

    warm = engine_for("off")
    warm.generate([prompts[0][1]], SamplingParams(max_tokens=8))
    results = {}
    for kind in ("off", "eagle", "medusa"):
        results[kind] = run_mode(engine_for(kind), prompts, params, kind)
        print(f"{kind}: {results[kind][0]:.2f} tok/s, tau {results[kind][1]:.3f}, by category {results[kind][2]}")
    vanilla = results["off"][0]
    emit({
        "bench": "speculative",
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "tree_budget": args.tree_budget,
        "drafters": args.draft or "shipped",
        "vanilla_tok_s": round(vanilla, 2),
        "eagle_tok_s": round(results["eagle"][0], 2),
        "medusa_tok_s": round(results["medusa"][0], 2),
        "eagle_tau": round(results["eagle"][1], 3),
        "medusa_tau": round(results["medusa"][1], 3),
        "eagle_speedup": round(results["eagle"][0] / vanilla, 3),
        "medusa_speedup": round(results["medusa"][0] / vanilla, 3),
        "eagle_tau_by_category": results["eagle"][2],
        "medusa_tau_by_category": results["medusa"][2],
    })


if __name__ == "__main__":
    main()
