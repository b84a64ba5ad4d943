"""Acceptance of trained drafters: ``python -m train.eval [--drafters eagle,medusa]``.

Runs the real engine with speculation on the held-out prompts (train/held_out.py
PROMPTS, never used for training) and measures, per drafter, temperature and
category: tau = tokens committed per verification step (bonus included, as in
the EAGLE/Medusa papers) and the fraction of steps accepting at least d draft
tokens, d = 1..8. Writes a JSON file, a Markdown table and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MAX_DEPTH = 8


def run_engine(engine, prompts: list[list[int]], params: list) -> list[list[int]]:
    """Run prompts to completion; per prompt, the tokens committed by each decode step."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    steps = {i: [] for i in ids}
    while engine.has_unfinished():
        outs = engine.step()
        if engine.last_step is not None and engine.last_step.kind == "decode":
            for o in outs:
                if o.new_token_ids:
                    steps[o.request_id].append(len(o.new_token_ids))
    return [steps[i] for i in ids]


def summarize(step_lists: list[list[int]]) -> dict:
    """tau and at-least-d acceptance over all steps of some sequences.

    The last step of a sequence may be cut short by EOS / max_tokens; it is kept
    (the papers count it too), which slightly lowers tau.
    """
    steps = [s for seq in step_lists for s in seq]
    n = max(1, len(steps))
    return {"tau": round(sum(steps) / n, 3), "steps": len(steps),
            "accept_ge": [round(sum(1 for s in steps if s - 1 >= d) / n, 3) for d in range(1, MAX_DEPTH + 1)]}


def evaluate(model: str, kinds: list[str], drafts: dict, temperatures: list[float], prompts: dict,
             max_tokens: int = 64, tree_budget: int = 60, dtype: str = "float32", seed: int = 0,
             tokenizer=None, draft_depth: int | None = None, draft_top_k: int | None = None,
             draft_vocab_size: int | None = None) -> dict:
    """prompts: {category: [token ids, ...]}. Returns {kind: {"T": {category|"all": summary}}}."""
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.sampling import SamplingParams

    flat = [(c, p) for c, ps in prompts.items() for p in ps]
    results = {}
    for kind in kinds:
        tree = {k: v for k, v in (("draft_depth", draft_depth), ("draft_top_k", draft_top_k),
                                  ("draft_vocab_size", draft_vocab_size)) if v}
        # The drafter's own acceptance, as the papers measure it: the exact EAGLE-2 search over the
        # whole draft vocabulary, and no prompt-lookup chain (it would add its accepted tokens to
        # every depth).
        cfg = EngineConfig(model=model, dtype=dtype, drafter=kind, draft_path=drafts.get(kind),
                           tree_budget=tree_budget, max_num_seqs=len(flat), seed=seed, draft_min_prob=0.0,
                           **{"draft_vocab_size": 0, **tree}, lookup_tokens=0,
                           num_blocks=len(flat) * ((max(len(p) for _, p in flat) + max_tokens + tree_budget) // 16 + 3))
        engine = build_engine(cfg, tokenizer=tokenizer)
        results[kind] = {}
        for t in temperatures:
            t0 = time.perf_counter()
            params = [SamplingParams(max_tokens=max_tokens, temperature=t, seed=seed + i) for i in range(len(flat))]
            per_seq = run_engine(engine, [p for _, p in flat], params)
            res = {"all": summarize(per_seq)}
            for c in prompts:
                res[c] = summarize([s for (cc, _), s in zip(flat, per_seq) if cc == c])
            res["all"]["seconds"] = round(time.perf_counter() - t0, 1)
            results[kind][str(t)] = res
            print(f"{kind} T={t}: tau {res['all']['tau']} ({res['all']['seconds']} s)", file=sys.stderr)
    return results


def write_markdown(results: dict, path: str, meta: dict) -> None:
    kinds = list(results)
    temps = list(next(iter(results.values())))
    cats = [c for c in next(iter(next(iter(results.values())).values())) if c != "all"]
    lines = ["# Drafter acceptance (held-out prompts)", "",
             "tau = tokens committed per target verification step (bonus token included). "
             + ", ".join(f"{k}: {v}" for k, v in meta.items()), "",
             "| drafter | T | " + " | ".join(cats) + " | all |", "|---|---|" + "---|" * (len(cats) + 1)]
    for k in kinds:
        for t in temps:
            r = results[k][t]
            lines.append(f"| {k} | {t} | " + " | ".join(f"{r[c]['tau']:.2f}" for c in cats) + f" | **{r['all']['tau']:.2f}** |")
    lines += ["", "Fraction of steps accepting at least d draft tokens (all categories):", "",
              "| drafter | T | " + " | ".join(f"d>={d}" for d in range(1, MAX_DEPTH + 1)) + " |",
              "|---|---|" + "---|" * MAX_DEPTH]
    for k in kinds:
        for t in temps:
            a = results[k][t]["all"]["accept_ge"]
            lines.append(f"| {k} | {t} | " + " | ".join(f"{x:.2f}" for x in a) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_card(draft_dir: str, kind: str, results: dict, meta: dict, data_note: str = "") -> None:
    """README.md of a drafter directory: what it is, how it was trained, tau by category."""
    with open(os.path.join(draft_dir, "config.json")) as f:
        cfg = json.load(f)
    tr = cfg.get("train", {})
    size = os.path.getsize(os.path.join(draft_dir, "model.safetensors")) / 2**20
    res = results[kind]
    cats = [c for c in next(iter(res.values())) if c != "all"]
    layers = cfg.get("num_layers", 1)
    title = {"eagle": f"EAGLE drafter ({layers} decoder layer{'s' if layers > 1 else ''}, EAGLE-2 dynamic tree)",
             "medusa": f"Medusa heads ({cfg.get('num_heads')} heads of {cfg.get('num_layers', 1)} residual blocks, "
                       "per-step tree)"}[kind]
    lines = [f"# {title} for SmolLM2-135M-Instruct", "",
             f"- weights: model.safetensors, bf16, {size:.1f} MB (embedding and lm_head are shared from the target)",
             f"- draft vocabulary: {cfg.get('draft_vocab_size') or cfg['vocab_size']} most frequent response ids "
             "(`draft_vocab_ids`"
             + (", most frequent first: `draft_vocab_size=N` drafts with the top N; the server on CPU uses 4096"
                if cfg.get("draft_vocab_order") == "frequency" else "") + ")",
             f"- training data: {data_note}".rstrip(),
             f"- training: {tr.get('steps')} steps ({tr.get('epochs')} epochs) in {tr.get('seconds')} s on "
             "a shared 2-core CPU (bf16 autocast)"
             + (f", unroll {tr['unroll']}, noise {tr['noise']}, ce weight {tr['ce_weight']}" if kind == "eagle" else "")
             + (f"; continued (`--init-from`) from a {tr['init_from']['steps']}-step, {tr['init_from']['seconds']} s run"
                if tr.get("init_from") else ""),
             "- reproduce: see docs/drafters.md", "",
             f"tau (tokens per verification step, bonus included) on the held-out prompts of train/held_out.py, "
             f"tree budget {meta.get('tree_budget')}, {meta.get('max_tokens')} new tokens, target {meta.get('dtype')}"
             + (f", tree depth {meta['draft_depth']} x top-{meta['draft_top_k']}, draft vocabulary "
                f"{meta.get('draft_vocab_size', 'all')}" if kind == "eagle" and "draft_depth" in meta else "") + ":",
             "", "| T | " + " | ".join(cats) + " | all |", "|---|" + "---|" * (len(cats) + 1)]
    for t, r in res.items():
        lines.append(f"| {t} | " + " | ".join(f"{r[c]['tau']:.2f}" for c in cats) + f" | **{r['all']['tau']:.2f}** |")
    with open(os.path.join(draft_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results)
    temps = list(next(iter(results.values())))
    cats = [c for c in next(iter(next(iter(results.values())).values())) if c != "all"] + ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / (len(kinds) * len(temps))
    i = 0
    for k in kinds:
        for t in temps:
            xs = [j + (i - (len(kinds) * len(temps) - 1) / 2) * width for j in range(len(cats))]
            axes[0].bar(xs, [results[k][t][c]["tau"] for c in cats], width, label=f"{k} T={t}")
            i += 1
    axes[0].set_xticks(range(len(cats)), cats)
    axes[0].set_ylabel("tau (tokens / verify step)")
    axes[0].set_title("Acceptance by category, 60-node tree")
    axes[0].legend(fontsize=8, ncol=2)
    axes[0].axhline(1.0, color="gray", lw=0.5)
    for k in kinds:
        for t in temps:
            a = results[k][t]["all"]["accept_ge"]
            axes[1].plot(range(1, len(a) + 1), a, marker="o", label=f"{k} T={t}")
    axes[1].set_xlabel("draft depth d")
    axes[1].set_ylabel("P(accepted >= d)")
    axes[1].set_title("Acceptance by depth")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--drafters", default="eagle,medusa", help="comma list of drafter kinds")
    ap.add_argument("--eagle", default=None, help="EAGLE drafter dir (default: the shipped one)")
    ap.add_argument("--medusa", default=None, help="Medusa drafter dir (default: the shipped one)")
    ap.add_argument("--temperatures", default="0,0.7,1.0")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tree-budget", type=int, default=60)
    ap.add_argument("--draft-depth", type=int, default=None, help="EAGLE tree depth (default: the engine's)")
    ap.add_argument("--draft-top-k", type=int, default=None, help="EAGLE children per node (default: the engine's)")
    ap.add_argument("--draft-vocab", type=int, default=None, help="draft-head rows, most frequent first (default: all)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--per-category", type=int, default=3, help="held-out prompts per category")
    ap.add_argument("--out", default="docs/acceptance", help="writes OUT.json, OUT.md and OUT.png")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cards", default=None,
                    help="write README.md cards into the drafter dirs, with this note on the training data")
    ap.add_argument("--merge", default=None,
                    help="comma list of JSON files from earlier runs: combine them into OUT.* without running")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:  # e.g. EAGLE and Medusa evaluated in two processes
        results, meta = {}, {}
        for path in args.merge.split(","):
            with open(path) as f:
                d = json.load(f)
            results.update(d["results"])
            meta = {**d["meta"], **meta}
        _write(args.out, results, meta)
        if args.cards:
            from engine.drafters.loading import shipped_drafter_dir

            for kind in results:
                write_card(getattr(args, kind) or shipped_drafter_dir(kind), kind, results, meta, args.cards)
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from train.held_out import PROMPTS
    from engine.weights import resolve_model

    try:
        model_dir = resolve_model(args.model)
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompts = {c: [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False) for p in ps[: args.per_category]]
                   for c, ps in PROMPTS.items()}
        kinds = [k for k in args.drafters.split(",") if k]
        temps = [float(t) for t in args.temperatures.split(",")]
        from engine.drafters.loading import resolve_draft_path
        from engine.config import EngineConfig

        # None: the drafter the engine would pick for --model (the shipped one for the default model).
        drafts = {k: getattr(args, k) or resolve_draft_path(EngineConfig(model=args.model, drafter=k))
                  for k in kinds}
        results = evaluate(model_dir, kinds, drafts, temps, prompts,
                           args.max_tokens, args.tree_budget, args.dtype, args.seed,
                           draft_depth=args.draft_depth, draft_top_k=args.draft_top_k,
                           draft_vocab_size=args.draft_vocab)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {"tree_budget": args.tree_budget, "max_tokens": args.max_tokens, "dtype": args.dtype,
            "prompts": sum(len(v) for v in prompts.values()),
            "draft_depth": args.draft_depth or EngineConfig.draft_depth,
            "draft_top_k": args.draft_top_k or EngineConfig.draft_top_k,
            "draft_vocab_size": args.draft_vocab or "all"}
    _write(args.out, results, meta)
    return 0


def _write(out: str, results: dict, meta: dict) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    write_markdown(results, out + ".md", meta)
    plot(results, out + ".png")
    print(json.dumps({k: {t: v[t]["all"]["tau"] for t in v} for k, v in results.items()}))


if __name__ == "__main__":
    sys.exit(main())
