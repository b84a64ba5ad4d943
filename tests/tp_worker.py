"""One tensor-parallel rank for tests/test_tp.py (run as a separate process).

Builds its shard of the model, runs a fixed prefill + decode + tree forward and
(rank 0) saves the logits.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.parallel import TPGroup  # noqa: E402
from engine.batch import SeqInput, build_model_input  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402


def run(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    bt = [5, 1, 7, 3, 0, 2, 4, 6]
    n = len(ids) - 4
    outs = [runner.execute(build_model_input(
        [SeqInput(ids[:n], list(range(n)), bt, 0, logits_rows=list(range(n)))], runner.block_size)).logits]
    outs.append(runner.execute(build_model_input([SeqInput(ids[n:n + 1], [n], bt, n)], runner.block_size)).logits)
    tree = ids[n + 1:]  # a 3-node tree: root with two children
    outs.append(runner.execute(build_model_input(
        [SeqInput(tree, [n + 1, n + 2, n + 2], bt, n + 1, tree_parents=[-1, 0, 0], logits_rows=[0, 1, 2])],
        runner.block_size)).logits)
    return torch.cat(outs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.world)
    runner = ModelRunner(args.model, "float32", tp=TPGroup(args.rank, args.world))
    runner.allocate_kv(8, 4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.config.vocab_size, (20,), generator=g).tolist()
    logits = run(runner, ids)
    if args.rank == 0:
        torch.save(logits, args.out)
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
