"""Self-distillation data for drafters: ``python -m train.data --prompts N --max-tokens T --out DIR``.

1. a prompt set (train/prompts.py: seeds + templates + questions the target writes
   itself), never overlapping the held-out bench prompts;
2. responses from the target with the engine's batched decoding;
3. the target's final hidden state of every token (prompt + response) from one
   prefill through the engine's ModelRunner, in the serving dtype;
4. Parquet shards of ``shard_size`` sequences: category, prompt_len, token_ids
   (list<int32>), features (binary: [L, H] bfloat16 bits, row-major).

Resumable: shards already on disk are skipped. The prompt list is written to
``prompts.jsonl`` first, so a rerun rebuilds exactly the same shards.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

SCHEMA = pa.schema([
    ("category", pa.string()),
    ("prompt_len", pa.int32()),
    ("token_ids", pa.list_(pa.int32())),
    ("features", pa.binary()),
])


# ---------------------------------------------------------------------- Parquet


def write_shard(path: str, rows: list[dict], hidden_size: int) -> None:
    """rows: dicts with category, prompt_len, token_ids [L], features [L, H] tensor (any float dtype)."""
    table = pa.table({
        "category": [r["category"] for r in rows],
        "prompt_len": [int(r["prompt_len"]) for r in rows],
        "token_ids": [list(map(int, r["token_ids"])) for r in rows],
        "features": [r["features"].to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
                     for r in rows],
    }, schema=SCHEMA.with_metadata({"hidden_size": str(hidden_size), "feature_dtype": "bfloat16"}))
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a shard exists only once it is complete


def read_shard(path: str) -> list[dict]:
    """The rows of one shard, features as bfloat16 tensors [L, H]."""
    table = pq.read_table(path)
    hidden = int(table.schema.metadata[b"hidden_size"])
    rows = []
    for cat, plen, toks, feats in zip(*(table.column(c).to_pylist() for c in SCHEMA.names)):
        f = torch.from_numpy(np.frombuffer(feats, dtype=np.int16).copy()).view(torch.bfloat16).view(-1, hidden)
        rows.append({"category": cat, "prompt_len": plen, "token_ids": toks, "features": f})
    return rows


def shard_paths(data_dir: str) -> list[str]:
    """The shards of one data set directory, or of several given as "DIR1,DIR2"."""
    return [p for d in data_dir.split(",") if d
            for p in sorted(glob.glob(os.path.join(d, "shard-*.parquet")))]


def load_dataset(data_dir: str, limit: int | None = None) -> list[dict]:
    paths = shard_paths(data_dir)
    if not paths:
        raise FileNotFoundError(f"no shard-*.parquet files in {data_dir!r}; run python -m train.data first")
    rows = []
    for p in tqdm(paths, desc="reading shards", disable=len(paths) < 4):
        rows += read_shard(p)
        if limit and len(rows) >= limit:
            return rows[:limit]
    return rows


# ---------------------------------------------------------------------- features


@torch.inference_mode()
def prefill_features(runner, seqs: list[list[int]], max_batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Final hidden state of every token of each sequence: one causal prefill each, batched.

    runner: engine.runner.ModelRunner (its KV cache is (re)allocated here).
    Returns [L_i, H] tensors in the runner's dtype.
    """
    from engine.batch import SeqInput, build_model_input

    bs = 16
    longest = max(len(s) for s in seqs)
    blocks_needed = (max(max_batch_tokens, longest) + bs - 1) // bs + len(seqs) + 1
    if runner.num_blocks < blocks_needed:
        runner.allocate_kv(blocks_needed, bs)
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    i = 0
    while i < len(order):
        batch, tokens, next_block = [], 0, 0
        while i < len(order) and (not batch or tokens + len(seqs[order[i]]) <= max_batch_tokens):
            s = seqs[order[i]]
            nb = (len(s) + bs - 1) // bs
            batch.append((order[i], SeqInput(list(s), list(range(len(s))), list(range(next_block, next_block + nb)), 0)))
            next_block += nb
            tokens += len(s)
            i += 1
        inp = build_model_input([x for _, x in batch], bs)
        res = runner.execute(inp)
        for b, (idx, _) in enumerate(batch):
            out[idx] = res.hidden[inp.query_start_loc[b]: inp.query_start_loc[b + 1]].clone()
    return out


# ---------------------------------------------------------------------- building


def build_shards(model_dir: str, prompts: list[tuple[str, list[int]]], out: str, *, max_tokens: int = 256,
                 gen_dtype: str = "bfloat16", feature_dtype: str = "float32", max_num_seqs: int = 32,
                 shard_size: int = 64, temperatures=(0.0,), seed: int = 0, progress: bool = True,
                 worker: tuple[int, int] = (0, 1)) -> list[str]:
    """Generate responses and features for token-id prompts; write/skip shards. Returns the shard paths.

    prompts: (category, prompt token ids). Prompt i is answered at temperature
    temperatures[i % len(temperatures)] (seeded per prompt). worker (i, n): build only
    shards k with k % n == i, so n processes can share one output directory.
    """
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.runner import ModelRunner
    from engine.sampling import SamplingParams

    os.makedirs(out, exist_ok=True)
    n_shards = (len(prompts) + shard_size - 1) // shard_size
    paths = [os.path.join(out, f"shard-{k:05d}.parquet") for k in range(n_shards)]
    todo = [k for k in range(n_shards) if not os.path.exists(paths[k]) and k % worker[1] == worker[0]]
    if not todo:
        return paths
    engine = build_engine(EngineConfig(model=model_dir, dtype=gen_dtype, drafter="off", max_num_seqs=max_num_seqs,
                                       kv_cache_gib=2.0, seed=seed))
    runner = ModelRunner(model_dir, feature_dtype)
    hidden = runner.config.hidden_size
    bar = tqdm(total=len(todo), desc="shards", disable=not progress)
    for k in todo:
        chunk = prompts[k * shard_size: (k + 1) * shard_size]
        params = []
        for j in range(len(chunk)):
            i = k * shard_size + j
            t = temperatures[i % len(temperatures)]
            params.append(SamplingParams(max_tokens=max_tokens, temperature=t, seed=seed * 100003 + i))
        outs = engine.generate([p for _, p in chunk], params, progress=progress)
        seqs = [list(p) + list(o.token_ids) for (_, p), o in zip(chunk, outs)]
        feats = prefill_features(runner, seqs)
        rows = [{"category": c, "prompt_len": len(p), "token_ids": s, "features": f}
                for (c, p), s, f in zip(chunk, seqs, feats)]
        write_shard(paths[k], rows, hidden)
        bar.update(1)
    bar.close()
    return paths


def self_questions(engine, per_cat: int, seed: int = 0) -> list[tuple[str, str]]:
    """Ask the target to write new questions per category (sampled, deduplicated)."""
    from engine.sampling import SamplingParams
    from train.prompts import question_requests

    reqs = question_requests(per_cat)
    prompts = [engine.tokenize_chat([{"role": "user", "content": r}]) for _, r in reqs]
    params = [SamplingParams(max_tokens=64, temperature=0.9, top_p=0.95, seed=seed + i) for i in range(len(reqs))]
    outs = engine.generate(prompts, params, progress=True)
    got = []
    for (cat, _), o in zip(reqs, outs):
        text = engine.tokenizer.decode(o.token_ids, skip_special_tokens=True).strip().strip('"').split("\n")[0]
        if o.finish_reason == "stop" and 15 <= len(text) <= 300:
            got.append((cat, text))
    return got


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.data", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="HF checkpoint directory, or 'default'")
    ap.add_argument("--out", default=".cache/drafter-data/smollm2-135m", help="output directory for the Parquet shards")
    ap.add_argument("--prompts", type=int, default=640, help="number of prompts (responses) to build")
    ap.add_argument("--max-tokens", type=int, default=256, help="response length cap")
    ap.add_argument("--self-questions", type=int, default=12,
                    help="questions per category the target writes itself (0: none)")
    ap.add_argument("--prompts-file", default=None,
                    help="JSONL with {'category','prompt'} (or {'messages'}) rows: your own prompts instead")
    ap.add_argument("--gen-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--feature-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the feature prefill; match the serving dtype")
    ap.add_argument("--temperatures", default="0,0,0.7", help="comma list, cycled over prompts")
    ap.add_argument("--samples-per-prompt", type=int, default=1,
                    help="answer every prompt this many times; passes after the first sample at --resample-temperature")
    ap.add_argument("--resample-temperature", type=float, default=0.8)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--worker", default="0/1", help="I/N: this process builds shards k with k %% N == I")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.weights import resolve_model

    try:
        model_dir = resolve_model(args.model)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    listing = os.path.join(args.out, "prompts.jsonl")
    t0 = time.time()
    if os.path.exists(listing):  # resume: the same prompts in the same order
        with open(listing) as f:
            rows = [json.loads(line) for line in f]
    else:
        from transformers import AutoTokenizer

        from train.prompts import build_prompt_set

        tok = AutoTokenizer.from_pretrained(model_dir)
        if args.prompts_file:
            with open(args.prompts_file) as f:
                items = [json.loads(line) for line in f if line.strip()]
            pairs = [(it.get("category", "custom"), it.get("messages") or it["prompt"]) for it in items]
            pairs = pairs[: args.prompts]
        else:
            extra = []
            if args.self_questions:
                from engine.build import build_engine
                from engine.config import EngineConfig

                eng = build_engine(EngineConfig(model=model_dir, dtype=args.gen_dtype, drafter="off",
                                                max_num_seqs=args.max_num_seqs))
                extra = self_questions(eng, args.self_questions, args.seed)
                del eng
                print(f"target wrote {len(extra)} usable questions", file=sys.stderr)
            pairs = build_prompt_set(args.prompts, args.seed, extra)
        temps = tuple(float(x) for x in args.temperatures.split(","))
        rows = []
        for cat, p in pairs:
            msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            rows.append({"category": cat, "prompt": p, "ids": list(ids), "temperature": temps[len(rows) % len(temps)]})
        # More samples of the same prompts: the unique prompt pool is small, sampled
        # answers still teach the drafter new continuations in the target's own style.
        first = list(rows)
        for _ in range(1, args.samples_per_prompt):
            rows += [dict(r, temperature=args.resample_temperature) for r in first]
        with open(listing, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if all("temperature" in r for r in rows):
        temps = tuple(r["temperature"] for r in rows)  # one per row, cycled once
    else:  # listings written before per-row temperatures
        temps = tuple(float(x) for x in args.temperatures.split(","))
    paths = build_shards(model_dir, [(r["category"], r["ids"]) for r in rows], args.out,
                         max_tokens=args.max_tokens, gen_dtype=args.gen_dtype, feature_dtype=args.feature_dtype,
                         max_num_seqs=args.max_num_seqs, shard_size=args.shard_size, temperatures=temps,
                         seed=args.seed, worker=tuple(int(x) for x in args.worker.split("/")))
    paths = [p for p in paths if os.path.exists(p)]
    n_tok = sum(pq.read_metadata(p).num_rows for p in paths)
    print(f"{len(paths)} shards, {n_tok} sequences in {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
