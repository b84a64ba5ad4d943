"""Command line generation: ``python -m engine.generate --prompt TEXT [--json]``.

Applies the model's chat template, runs the engine built as the server builds it
(``engine.build.build_engine``: the same "auto" defaults, drafter included) and prints
the completion, or one JSON line with text, tokens, tokens_per_s and mean_accepted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from engine.config import ATTENTION_BACKENDS, DRAFTER_KINDS


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    ap = OneLineParser(prog="python -m engine.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", required=True, help="user message (the chat template is applied)")
    ap.add_argument("--model", default="default", help="HF checkpoint directory, or 'default'")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--drafter", "--speculation", default="auto", choices=["auto", *DRAFTER_KINDS],
                    help="auto: the kind --draft holds, else the shipped drafter of the default model, else off")
    ap.add_argument("--draft", default=None,
                    help="drafter directory: this project's layout or a published EAGLE-1/2, EAGLE-3 or "
                         "Medusa-1 checkpoint (default: the shipped one)")
    ap.add_argument("--tree-budget", type=int, default=None, help="draft tree nodes per step (default: auto)")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="draft-head rows, the drafter's most frequent tokens first (0: all; default: auto)")
    ap.add_argument("--draft-min-prob", type=float, default=None,
                    help="EAGLE: stop drafting deeper below this path probability (0: exact EAGLE-2 search)")
    ap.add_argument("--attention-backend", default="auto", choices=list(ATTENTION_BACKENDS),
                    help="auto: Triton on CUDA, torch or the fused C kernel on CPU; triton on CPU runs "
                         "in Triton's interpreter (slow)")
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from engine.build import build_engine
        from engine.config import EngineConfig
        from engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        cfg = EngineConfig(model=args.model, dtype=args.dtype, drafter=args.drafter, draft_path=args.draft,
                           max_num_seqs=1, tree_budget=args.tree_budget, draft_vocab_size=args.draft_vocab,
                           draft_min_prob=args.draft_min_prob, attention_backend=args.attention_backend)
        engine = build_engine(cfg)
        prompt = args.prompt if args.raw else engine.tokenize_chat([{"role": "user", "content": args.prompt}])
        t0 = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        dt = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = out.seq.output_text
    if args.json:
        print(json.dumps({
            "text": text,
            "tokens": len(out.token_ids),
            "tokens_per_s": round(len(out.token_ids) / dt, 2),
            "finish_reason": out.finish_reason,
            "drafter": engine.config.drafter,
            "draft_format": getattr(engine.drafter, "format", None),
            "mean_accepted": round(out.seq.stats.mean_accepted, 3),
        }))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
