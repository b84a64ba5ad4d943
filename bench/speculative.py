"""Speculative decoding speed at batch 1, temperature 0: off vs EAGLE vs Medusa.

    python bench/speculative.py [--dtype auto] [--prompts 24] [--max-tokens 128] [--tree-budget 4,8,16]

Runs the fixed prompt set of bench/common.py (8 categories) through one engine
per mode and tree budget, on the same weights in the same process. The modes
take turns prompt by prompt, so a shared machine's load drift hits them alike.
Prints per-category tau, the time per step spent drafting and verifying, and
the final JSON line with tokens/s, tau and speedup over speculation-off per
budget (``by_budget``) and at each drafter's best budget (``eagle_speedup``,
``medusa_speedup``). Uses the shipped drafters (assets/) with the engine's prompt-lookup
chain (``--lookup N``; ``--lookup-off-too`` also runs each drafter without it, as
``eagle_nolookup`` / ``medusa_nolookup``, and ``--lookup-also 3,4`` with other lengths);
--draft random measures the machinery alone. ``--plot PNG`` draws speedup and tau by budget and
where each step's time goes; ``--from-json FILE --plot PNG`` redraws a saved run.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from tqdm import tqdm

from common import emit, flat_prompts


def plot(result: dict, path: str) -> None:
    """Speedup and tau vs tree budget per drafter; draft + verify ms per step vs a plain step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(result["by_budget"], key=int)
    kinds = ("eagle", "medusa")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"eagle": "C0", "medusa": "C1"}
    for name in result["by_budget"][budgets[0]]:  # the engine defaults solid, other variants dashed
        rows = [result["by_budget"][b][name] for b in budgets]
        x = [int(b) for b in budgets]
        style = dict(marker="o", label=name, color=colors[name.split("_")[0]], ls="-" if name in kinds else "--")
        axes[0].plot(x, [r["speedup"] for r in rows], **style)
        axes[1].plot(x, [r["tau"] for r in rows], **style)
    axes[0].axhline(1.0, color="gray", lw=0.5)
    for ax in axes[:2]:
        ax.set_xticks([int(b) for b in budgets])
    axes[0].set(xlabel="tree budget (draft nodes)", ylabel="speedup over speculation off",
                title=f"Batch 1, T=0, {result['dtype']}, {result['prompts']} prompts x {result['max_tokens']} tokens")
    axes[1].set(xlabel="tree budget (draft nodes)", ylabel="tau (tokens / verify step)", title="Acceptance")
    width = 0.38
    for i, kind in enumerate(kinds):
        xs = [j + (i - 0.5) * width for j in range(len(budgets))]
        draft = [result["by_budget"][b][kind]["draft_ms"] for b in budgets]
        verify = [result["by_budget"][b][kind]["verify_ms"] for b in budgets]
        axes[2].bar(xs, verify, width, label=f"{kind} verify")
        axes[2].bar(xs, draft, width, bottom=verify, label=f"{kind} draft")
    axes[2].axhline(result["off_ms_per_step"], color="black", ls="--", lw=1, label="plain step")
    axes[2].set_xticks(range(len(budgets)), budgets)
    axes[2].set(xlabel="tree budget", ylabel="ms per step", title="Where a step's time goes")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    ap.add_argument("--plot", default=None, help="write a PNG of the results here")
    ap.add_argument("--from-json", default=None, help="with --plot: redraw a saved final JSON line, run nothing")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="draft-head rows, most frequent first (default: the server's CPU default; 0: all)")
    ap.add_argument("--draft-min-prob", type=float, default=None,
                    help="EAGLE's cost-aware stop (default: the server's CPU default; 0: exact EAGLE-2 search)")
    ap.add_argument("--draft-int8", default="on", choices=["on", "off", "both"],
                    help="int8 drafter weights where the CPU has AMX-INT8 or AVX512-VNNI, or the AVX2 build (on: the engine default); both: "
                         "also run the drafters on bf16 weights, reported as eagle_bf16 / medusa_bf16")
    ap.add_argument("--lookup", type=int, default=None,
                    help="prompt-lookup tokens merged into each tree (default: the engine's, 6; 0: off)")
    ap.add_argument("--lookup-off-too", action="store_true",
                    help="also run each drafter without lookup, reported as eagle_nolookup / medusa_nolookup")
    ap.add_argument("--lookup-also", default="",
                    help="comma list of other lookup lengths to run each drafter with, in the same process, "
                         "reported as eagle_lookupN / medusa_lookupN")
    args = ap.parse_args()
    if args.from_json:
        if not args.plot:
            ap.error("--from-json needs --plot")
        with open(args.from_json) as f:
            plot(json.loads(f.read().strip().splitlines()[-1]), args.plot)
        return

    from engine.config import EngineConfig, auto_draft_min_prob, auto_draft_vocab_size, auto_dtype
    from engine.build import build_engine
    from engine.executor import InProcessExecutor
    from engine.sampling import SamplingParams
    from engine.weights import resolve_model
    from transformers import AutoTokenizer

    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    budgets = [int(b) for b in args.tree_budget.split(",")]
    draft_vocab = auto_draft_vocab_size("cpu") if args.draft_vocab is None else args.draft_vocab
    min_prob = auto_draft_min_prob("cpu") if args.draft_min_prob is None else args.draft_min_prob
    model_dir = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model_dir)
    executor = InProcessExecutor(model_dir, dtype)  # one copy of the target, shared by all modes
    prompts = [(c, tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
               for c, p in flat_prompts(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens)

    # The engines share the executor's KV cache: safe because one request runs at a time.
    # (name, drafter kind, int8 weights, lookup tokens) per speculative mode
    lookup = EngineConfig.lookup_tokens if args.lookup is None else args.lookup
    variants = [(k, k, args.draft_int8 != "off", lookup) for k in ("eagle", "medusa")]
    if args.draft_int8 == "both":
        variants += [(f"{k}_bf16", k, False, lookup) for k in ("eagle", "medusa")]
    if args.lookup_off_too:
        variants += [(f"{k}_nolookup", k, args.draft_int8 != "off", 0) for k in ("eagle", "medusa")]
    for n in (int(x) for x in args.lookup_also.split(",") if x.strip()):
        if n < 0:
            ap.error("--lookup-also lengths must be >= 0")
        variants += [(f"{k}_lookup{n}", k, args.draft_int8 != "off", n) for k in ("eagle", "medusa")]
    engines = {}
    for name, kind, int8, look, budget in [("off", "off", False, 0, 0)] + [v + (b,) for b in budgets for v in variants]:
        cfg = EngineConfig(dtype=dtype, drafter=kind, draft_path=args.draft, tree_budget=budget,
                           max_num_seqs=1, num_blocks=128, draft_vocab_size=draft_vocab,
                           draft_min_prob=min_prob, draft_int8=int8, lookup_tokens=look)
        engines[(name, budget)] = eng = build_engine(cfg, executor=executor, tokenizer=tok)
        eng.generate([prompts[0][1]], SamplingParams(max_tokens=8))  # warm-up: this mode's shapes
    stats = {mode: ModeStats() for mode in engines}
    for cat, ids in tqdm(prompts, desc=f"{len(engines)} modes"):
        for mode, eng in engines.items():
            t = time.perf_counter()
            out = eng.generate([ids], params)[0]
            stats[mode].add(cat, out, time.perf_counter() - t)
    vanilla = stats[("off", 0)].tok_s
    by_budget = {}
    for (name, budget), st in stats.items():
        if name != "off":
            by_budget.setdefault(str(budget), {})[name] = summ = st.summary(vanilla)
            print(f"{name} budget {budget}: {summ}")
    off = stats[("off", 0)].summary(vanilla)
    print(f"off: {off}")

    best = {kind: str(max(budgets, key=lambda b: by_budget[str(b)][kind]["speedup"])) for kind in ("eagle", "medusa")}
    result = {
        "bench": "speculative",
        "dtype": dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "drafters": args.draft or "shipped",
        "draft_vocab_size": draft_vocab or "all",
        "draft_min_prob": min_prob,
        "draft_int8": args.draft_int8,
        "lookup_tokens": lookup,
        "vanilla_tok_s": round(vanilla, 2),
        "off_ms_per_step": off["verify_ms"],
        "eagle_best_budget": int(best["eagle"]),
        "eagle_speedup": by_budget[best["eagle"]]["eagle"]["speedup"],
        "eagle_tau": by_budget[best["eagle"]]["eagle"]["tau"],
        "medusa_best_budget": int(best["medusa"]),
        "medusa_speedup": by_budget[best["medusa"]]["medusa"]["speedup"],
        "medusa_tau": by_budget[best["medusa"]]["medusa"]["tau"],
        "by_budget": by_budget,
    }
    if args.plot:
        plot(result, args.plot)
    emit(result)


if __name__ == "__main__":
    main()
