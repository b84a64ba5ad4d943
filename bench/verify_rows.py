"""What a verification step of N tree rows costs against a one-row decode step.

    python bench/verify_rows.py [--rows 1,3,5,9,13,17] [--context 150] [--repeats 20]

Speculation pays for a step of 1 + budget (+ lookup) rows with the tokens it accepts, so
the cost of rows is what decides the tree budget a CPU can afford: bandwidth-bound
kernels (AMX, AVX512-BF16) read the weights once for all rows, while the AVX2 build's
fp32 multiply-adds grow with them. One target forward of the default model (bf16, the
fused CPU kernel where it runs) at a fixed context, for each row count in turn, repeated
round-robin so that a noisy host slows all counts alike. The rows are one causal chain
of draft tokens (tree attention over the context plus the chain) with logits for every
row, as a verification step asks. Prints ms per forward and its ratio to one row.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from common import emit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,3,5,9,13,17", help="comma-separated row counts (1 is always run)")
    ap.add_argument("--context", type=int, default=150, help="tokens in the KV cache before the rows")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    rows = sorted({1, *(int(r) for r in args.rows.split(","))})
    if rows[0] < 1 or args.context < 1 or args.repeats < 1:
        raise SystemExit("error: --rows, --context and --repeats must be positive")

    from engine.batch import SeqInput, build_model_input
    from engine.runner import ModelRunner
    from engine.weights import default_model_dir

    runner = ModelRunner(default_model_dir(), args.dtype)
    block = 16
    blocks = (args.context + rows[-1]) // block + 1
    runner.allocate_kv(blocks, block)
    table = list(range(blocks))
    vocab = runner.config.vocab_size
    g = torch.Generator().manual_seed(0)
    context = torch.randint(100, vocab, (args.context,), generator=g).tolist()
    chunk = 32
    for s in range(0, args.context, chunk):  # prefill, in chunks the fused path takes
        ids = context[s:s + chunk]
        runner.execute(build_model_input([SeqInput(ids, list(range(s, s + len(ids))), table, s)], block))

    def step(n: int):
        ids = torch.randint(100, vocab, (n,), generator=g).tolist()
        return build_model_input([SeqInput(ids, list(range(args.context, args.context + n)), table, args.context,
                                           tree_parents=list(range(-1, n - 1)), logits_rows=list(range(n)))], block)

    inputs = {n: step(n) for n in rows}
    for n in rows:
        runner.execute(inputs[n])  # warm up
    times = {n: [] for n in rows}
    for _ in tqdm(range(args.repeats), desc="round-robin forwards"):
        for n in rows:
            t0 = time.perf_counter()
            runner.execute(inputs[n])
            times[n].append((time.perf_counter() - t0) * 1e3)
    ms = {n: statistics.median(times[n]) for n in rows}
    kernel = "fused" if runner.fused is not None else "torch"
    print(f"{'rows':>5} {'ms':>8} {'x one row':>10}   ({kernel} kernel, {args.dtype}, context {args.context})")
    for n in rows:
        print(f"{n:>5} {ms[n]:>8.2f} {ms[n] / ms[1]:>10.2f}")
    emit({"bench": "verify_rows", "kernel": kernel, "dtype": args.dtype, "context": args.context,
          "ms": {str(n): round(ms[n], 3) for n in rows},
          "ratio_to_one_row": {str(n): round(ms[n] / ms[1], 3) for n in rows}})


if __name__ == "__main__":
    main()
