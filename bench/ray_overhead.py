"""What running the target on Ray actors costs per decode step, and TP=1 vs TP=3 decode speed.

Three measurements on the same model, prompts and greedy decode steps:

1. In-process engine vs the same engine on a RayExecutor with TP=1, in alternating
   rounds (so background load hits both alike): step time and its relative overhead.
2. Orchestration per step, measured directly on the Ray side: driver-side time of
   ``executor.execute`` minus the forward time inside the shard (TargetShard.stats);
   this is what crossing the actor boundary costs (send ModelInput, return ModelOutput).
3. Decode tokens/s of the Ray replica at TP=1 and TP=3 (gloo on CPU; on a 2-core
   machine TP=3 is for correctness, not speed: see docs/benchmarks.md).

Usage:  python bench/ray_overhead.py [--batch 4] [--steps 16] [--rounds 4] [--tp 3] [--threads 1]
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # Ray workers

import ray  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from actors.executor import RayExecutor  # noqa: E402
from engine.build import build_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a Python function that checks whether a number is prime.",
    "List three facts about the planet Mars.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "Give me a recipe for pancakes.",
    "What is tensor parallelism?",
    "Translate 'good morning' into French, Spanish and German.",
]


class TimedExecutor:
    """Wraps an executor, recording the driver-side seconds of each execute()."""

    def __init__(self, inner):
        self.inner, self.execute_s = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, inp, sampling):
        t0 = time.perf_counter()
        out = self.inner.execute(inp, sampling)
        self.execute_s.append(time.perf_counter() - t0)
        return out


def start(engine: LLMEngine, prompts, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        engine.add_request(engine.tokenize_chat([{"role": "user", "content": p}]), params)
    while not engine.scheduler.running or engine.scheduler.waiting:
        engine.step()  # prefill (every prompt), not timed


def decode(engine: LLMEngine, steps: int) -> list[float]:
    """Seconds of each of `steps` decode steps."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        assert engine.last_step.kind == "decode"
    return times


def ms(xs) -> float:
    return round(1e3 * statistics.median(xs), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating in-process / Ray rounds")
    ap.add_argument("--tp", type=int, default=3, help="the TP degree compared with TP=1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the in-process engine and of each rank (1: robust on a shared machine)")
    args = ap.parse_args()
    prompts = (PROMPTS * args.batch)[: args.batch]
    max_tokens = args.steps * args.rounds + 8
    config = EngineConfig(num_blocks=256, tree_budget=0, dtype=args.dtype)

    torch.set_num_threads(args.threads)
    ray.init(num_cpus=max(8, args.tp + 2), include_dashboard=False, log_to_driver=False)
    local = build_engine(config)
    tokenizer = local.tokenizer
    remote_ex = TimedExecutor(RayExecutor(config, num_threads=args.threads))
    remote = build_engine(config, executor=remote_ex, tokenizer=tokenizer)
    start(local, prompts, max_tokens)
    start(remote, prompts, max_tokens)

    # 1 + 2: alternating rounds, TP=1.
    local_s, remote_s = [], []
    remote_ex.execute_s = []
    for _ in tqdm(range(args.rounds), desc="in-process vs ray tp=1"):
        local_s += decode(local, args.steps)
        remote_s += decode(remote, args.steps)
    driver_s = remote_ex.execute_s
    forward_s = remote_ex.forward_times()[0][-len(driver_s):]
    orchestration_s = [d - f for d, f in zip(driver_s, forward_s)]
    remote_ex.shutdown()
    del local

    # 3: TP=N decode speed.
    config_n = EngineConfig(num_blocks=256, tree_budget=0, dtype=args.dtype, tp=args.tp)
    ex_n = RayExecutor(config_n, cpus_per_rank=1, num_threads=args.threads)
    engine_n = build_engine(config_n, executor=ex_n, tokenizer=tokenizer)
    start(engine_n, prompts, max_tokens)
    tpn_s = []
    for _ in tqdm(range(args.rounds), desc=f"ray tp={args.tp}"):
        tpn_s += decode(engine_n, args.steps)
    ex_n.shutdown()
    ray.shutdown()

    local_ms, remote_ms = ms(local_s), ms(remote_s)
    tp1_tok_s, tpn_tok_s = args.batch / statistics.median(remote_s), args.batch / statistics.median(tpn_s)
    result = {
        "bench": "ray_overhead",
        "model": "default (SmolLM2-135M-Instruct)",
        "dtype": args.dtype,
        "batch": args.batch,
        "threads_per_rank": args.threads,
        "decode_steps": args.steps * args.rounds,
        "inprocess_step_ms": local_ms,
        "ray_tp1_step_ms": remote_ms,
        "ray_tp1_overhead_pct": round(100 * (remote_ms - local_ms) / local_ms, 1),
        "shard_forward_ms": ms(forward_s),
        "orchestration_ms": ms(orchestration_s),
        "orchestration_p10_ms": round(1e3 * sorted(orchestration_s)[len(orchestration_s) // 10], 2),
        "orchestration_pct": round(100 * statistics.median(orchestration_s) / statistics.median(forward_s), 1),
        "tp1_decode_tok_s": round(tp1_tok_s, 1),
        f"tp{args.tp}_decode_tok_s": round(tpn_tok_s, 1),
        f"tp{args.tp}_vs_tp1": round(tpn_tok_s / tp1_tok_s, 2),
    }
    print(f"in-process {local_ms:.1f} ms/step, ray tp=1 {remote_ms:.1f} ms/step "
          f"({result['ray_tp1_overhead_pct']:+.1f}%); orchestration {result['orchestration_ms']:.2f} ms/step "
          f"({result['orchestration_pct']:.1f}% of the forward); decode tok/s tp=1 {tp1_tok_s:.1f}, "
          f"tp={args.tp} {tpn_tok_s:.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
