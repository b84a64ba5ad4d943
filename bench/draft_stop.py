"""EAGLE's cost-aware stop: acceptance and drafting time per ``draft_min_prob``.

    python bench/draft_stop.py [--min-probs 0,0.1,0.2,0.25,0.3,0.35,0.45] [--tree-budget 5] [--max-tokens 96]

Runs the tuning prompts of bench/common.py (in neither the drafters' training set
nor the held-out set) at batch 1, temperature 0, with the shipped EAGLE drafter,
once per threshold; the thresholds take turns prompt by prompt so load drift hits
them alike. Reports tau, drafter forwards and drafting ms per verify step, and a
``value`` = tau / (verify + drafting ms): the threshold with the highest value makes
the fastest server on this machine. Final JSON line: ``by_min_prob`` and ``best``.
"""
from __future__ import annotations

import argparse

from tqdm import tqdm

from common import TUNING_PROMPTS, emit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-probs", default="0,0.1,0.2,0.25,0.3,0.35,0.45", help="comma list of draft_min_prob")
    ap.add_argument("--tree-budget", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=len(TUNING_PROMPTS))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--draft", default=None, help="'random' for an untrained drafter (default: shipped)")
    args = ap.parse_args()
    try:
        min_probs = [float(x) for x in args.min_probs.split(",")]
    except ValueError:
        ap.error(f"--min-probs must be a comma list of numbers, got {args.min_probs!r}")

    from engine.config import EngineConfig, auto_draft_vocab_size, auto_dtype
    from engine.build import build_engine
    from engine.executor import InProcessExecutor
    from engine.sampling import SamplingParams
    from engine.weights import resolve_model
    from transformers import AutoTokenizer

    dtype = auto_dtype("cpu")
    model_dir = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model_dir)
    executor = InProcessExecutor(model_dir, dtype)
    engines, drafters = {}, {}
    for p in min_probs:
        try:
            cfg = EngineConfig(dtype=dtype, drafter="eagle", draft_path=args.draft, tree_budget=args.tree_budget,
                               max_num_seqs=1, num_blocks=128, draft_vocab_size=auto_draft_vocab_size("cpu"),
                               draft_min_prob=p)
        except ValueError as exc:
            ap.error(str(exc))
        engines[p] = build_engine(cfg, executor=executor, tokenizer=tok)
        drafters[p] = drafter = engines[p].drafter
        engines[p].generate([TUNING_PROMPTS[0]], SamplingParams(max_tokens=8))  # warm-up
        drafter.forwards = 0  # counted by the drafter: catch-ups and draft depths
    prompts = [engines[min_probs[0]].tokenize_chat([{"role": "user", "content": p}])
               for p in TUNING_PROMPTS[: args.prompts]]
    totals = {p: {"committed": 0, "steps": 0, "draft_s": 0.0, "verify_s": 0.0} for p in min_probs}
    params = SamplingParams(max_tokens=args.max_tokens)
    for ids in tqdm(prompts, desc=f"{len(min_probs)} thresholds"):
        for p, eng in engines.items():
            st = eng.generate([ids], params)[0].seq.stats
            t = totals[p]
            t["committed"] += st.committed
            t["steps"] += st.verify_steps
            t["draft_s"] += st.draft_time
            t["verify_s"] += st.verify_time
    by = {}
    for p, t in totals.items():
        steps = max(t["steps"], 1)
        draft_ms, verify_ms = 1e3 * t["draft_s"] / steps, 1e3 * t["verify_s"] / steps
        tau = t["committed"] / steps
        by[str(p)] = {"tau": round(tau, 4), "draft_ms": round(draft_ms, 2), "verify_ms": round(verify_ms, 2),
                      "drafter_forwards_per_step": round(drafters[p].forwards / steps, 3),
                      "value": round(1e3 * tau / (verify_ms + draft_ms), 2)}
        print(f"draft_min_prob {p}: {by[str(p)]}")
    emit({"bench": "draft_stop", "dtype": dtype, "tree_budget": args.tree_budget, "prompts": len(prompts),
          "max_tokens": args.max_tokens, "by_min_prob": by, "best": max(by, key=lambda k: by[k]["value"])})


if __name__ == "__main__":
    main()
