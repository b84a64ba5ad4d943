"""How the drafter's features reach the drafter actor: through the replica ("host") or
straight from rank 0 ("shm"; "cuda_ipc" on a GPU), on a Ray replica with a drafter actor.

Two replicas of the default model at tp=1, each with the shipped EAGLE drafter as an actor,
differ only in ``feature_transport``; they decode the same greedy batch in alternating
rounds (background load hits both alike). Reported per transport: the median decode step
(drafter propose + target verify + the features' trip), tokens committed per second, and
the bytes rank 0 returns per decode step. The tokens of both must be equal.

Usage:  python bench/feature_transport.py [--batch 4] [--tokens 48] [--rounds 3] [--transport shm]
The last line printed is one JSON object with every figure; "ratio" is direct / host
decode tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)  # Ray workers

import ray  # noqa: E402

from actors.replica import Replica  # noqa: E402
from bench.ray_overhead import PROMPTS  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def measure(replica: Replica, prompts: list, params: SamplingParams) -> tuple[list, list[float], int, list[int]]:
    """Run one batch to the end: (token ids, decode step seconds, tokens committed, bytes back per decode step)."""
    executor, sizes = replica.engine.executor, []
    call = executor._call

    def recording(method, *args, **kw):
        values = call(method, *args, **kw)
        if method == "execute":
            sizes.append(len(pickle.dumps(values[0], protocol=5)))
        return values

    executor._call = recording
    ids = [replica.add_request(p, params) for p in prompts]
    final, steps, committed, decode_sizes = {}, [], 0, []
    while len(final) < len(ids):
        t0, before = time.perf_counter(), len(sizes)
        outs = replica.step()
        if replica.last_step is not None and replica.last_step.kind == "decode":
            steps.append(time.perf_counter() - t0)
            committed += sum(len(o.new_token_ids) for o in outs)
            decode_sizes += sizes[before:]
        final |= {o.request_id: o for o in outs if o.finished}
    executor._call = call
    return [final[i].token_ids for i in ids], steps, committed, decode_sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="alternating host / direct rounds")
    ap.add_argument("--transport", default="shm", help="the direct transport compared with host")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    config = EngineConfig(num_blocks=256, dtype=args.dtype)
    options = {"cpus_per_rank": 1, "drafter_cpus": 1, "num_threads": 1}
    replicas = {t: Replica(config, executor_options=options | {"feature_transport": t}, drafter_required=True)
                for t in ("host", args.transport)}
    tok = replicas["host"].engine
    prompts = [tok.tokenize_chat([{"role": "user", "content": p}]) for p in (PROMPTS * args.batch)[: args.batch]]
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    stats = {t: {"steps": [], "tokens": 0, "seconds": 0.0, "bytes": []} for t in replicas}
    outputs = {}
    for _ in range(args.rounds):
        for t, replica in replicas.items():
            tokens, steps, committed, sizes = measure(replica, prompts, params)
            outputs.setdefault(t, tokens)
            s = stats[t]
            s["steps"] += steps
            s["tokens"] += committed
            s["seconds"] += sum(steps)
            s["bytes"] += sizes
    for replica in replicas.values():
        replica.shutdown()
    ray.shutdown()
    assert outputs["host"] == outputs[args.transport], "the transports gave different tokens"

    result = {"bench": "feature_transport", "model": "default (SmolLM2-135M-Instruct) + shipped EAGLE drafter actor",
              "dtype": args.dtype, "batch": args.batch, "tp": 1}
    for t, s in stats.items():
        result[f"{t}_step_ms"] = round(1e3 * statistics.median(s["steps"]), 2)
        result[f"{t}_tok_s"] = round(s["tokens"] / s["seconds"], 1)
        result[f"{t}_bytes_back_per_step"] = int(statistics.median(s["bytes"]))
    result["ratio"] = round(result[f"{args.transport}_tok_s"] / result["host_tok_s"], 3)
    print(f"host {result['host_step_ms']} ms/step {result['host_tok_s']} tok/s; {args.transport} "
          f"{result[f'{args.transport}_step_ms']} ms/step {result[f'{args.transport}_tok_s']} tok/s "
          f"(ratio {result['ratio']}); bytes back per step {result['host_bytes_back_per_step']} vs "
          f"{result[f'{args.transport}_bytes_back_per_step']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
