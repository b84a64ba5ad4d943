"""Speculative decoding speed at batch 1, temperature 0: off vs EAGLE vs Medusa.

    python bench/speculative.py [--dtype auto] [--prompts 24] [--max-tokens 128] [--tree-budget 4,8,16]

Runs the fixed prompt set of bench/common.py (8 categories) through one engine
per mode and tree budget, on the same weights in the same process. The modes
take turns prompt by prompt, so a shared machine's load drift hits them alike.
Prints per-category tau, the time per step spent drafting and verifying, and
the final JSON line with tokens/s, tau and speedup over speculation-off per
budget (``by_budget``) and at each drafter's best budget (``eagle_speedup``,
``medusa_speedup``). Uses the shipped drafters (assets/); --draft random
measures the machinery alone.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

from tqdm import tqdm

from common import emit, flat_prompts


class ModeStats:
    """What one mode (drafter, budget) did over the prompts."""

    def __init__(self):
        self.tokens = self.steps = self.committed = 0
        self.seconds = self.draft_s = self.verify_s = 0.0
        self.per_cat = defaultdict(lambda: [0, 0])

    def add(self, category, out, seconds):
        st = out.seq.stats
        self.tokens += len(out.token_ids)
        self.seconds += seconds
        self.steps += st.verify_steps
        self.committed += st.committed
        self.draft_s += st.draft_time
        self.verify_s += st.verify_time
        self.per_cat[category][0] += st.committed
        self.per_cat[category][1] += st.verify_steps

    @property
    def tok_s(self):
        return self.tokens / self.seconds

    @property
    def tau(self):
        return self.committed / self.steps if self.steps else 0.0

    def summary(self, vanilla_tok_s):
        return {"tok_s": round(self.tok_s, 2), "tau": round(self.tau, 3),
                "speedup": round(self.tok_s / vanilla_tok_s, 3),
                "draft_ms": round(1e3 * self.draft_s / max(self.steps, 1), 2),
                "verify_ms": round(1e3 * self.verify_s / max(self.steps, 1), 2),
                "tau_by_category": {c: round(a / b, 3) for c, (a, b) in self.per_cat.items() if b}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: the engine's best dtype on this machine (bf16 where the CPU has it)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tree-budget", default="4,8,16", help="comma list of tree budgets (draft nodes per step)")
    ap.add_argument("--draft", default=None, help="'random' for untrained drafters (default: shipped)")
    args = ap.parse_args()

    from engine.config import EngineConfig, auto_dtype
    from engine.drafters.loading import load_drafter
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor
    from engine.sampling import SamplingParams
    from engine.weights import resolve_model
    from transformers import AutoTokenizer

    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    budgets = [int(b) for b in args.tree_budget.split(",")]
    model_dir = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model_dir)
    executor = InProcessExecutor(model_dir, dtype)  # one copy of the target, shared by all modes
    prompts = [(c, tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
               for c, p in flat_prompts(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens)

    # The engines share the executor's KV cache: safe because one request runs at a time.
    engines = {}
    for kind, budget in [("off", 0)] + [(k, b) for b in budgets for k in ("eagle", "medusa")]:
        cfg = EngineConfig(dtype=dtype, speculation=kind, draft_path=args.draft, tree_budget=budget,
                           max_num_seqs=1, num_blocks=128)
        drafter = load_drafter(cfg, model_dir, executor) if kind != "off" else None
        engines[(kind, budget)] = eng = LLMEngine(cfg, executor, drafter, tok)
        eng.generate([prompts[0][1]], SamplingParams(max_tokens=8))  # warm-up: this mode's shapes
    stats = {mode: ModeStats() for mode in engines}
    for cat, ids in tqdm(prompts, desc=f"{len(engines)} modes"):
        for mode, eng in engines.items():
            t = time.perf_counter()
            out = eng.generate([ids], params)[0]
            stats[mode].add(cat, out, time.perf_counter() - t)
    vanilla = stats[("off", 0)].tok_s
    by_budget = {}
    for (kind, budget), st in stats.items():
        if kind != "off":
            by_budget.setdefault(str(budget), {})[kind] = summ = st.summary(vanilla)
            print(f"{kind} budget {budget}: {summ}")
    off = stats[("off", 0)].summary(vanilla)
    print(f"off: {off}")

    best = {kind: str(max(budgets, key=lambda b: by_budget[str(b)][kind]["speedup"])) for kind in ("eagle", "medusa")}
    emit({
        "bench": "speculative",
        "dtype": dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "drafters": args.draft or "shipped",
        "vanilla_tok_s": round(vanilla, 2),
        "off_ms_per_step": off["verify_ms"],
        "eagle_best_budget": int(best["eagle"]),
        "eagle_speedup": by_budget[best["eagle"]]["eagle"]["speedup"],
        "eagle_tau": by_budget[best["eagle"]]["eagle"]["tau"],
        "medusa_best_budget": int(best["medusa"]),
        "medusa_speedup": by_budget[best["medusa"]]["medusa"]["speedup"],
        "medusa_tau": by_budget[best["medusa"]]["medusa"]["tau"],
        "by_budget": by_budget,
    })


if __name__ == "__main__":
    main()
