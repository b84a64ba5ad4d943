"""The GPU check: what only a GPU can show, in one prepared run for the minutes one is at hand.

    bash bench/gpu_check.sh [--out DIR]     # a machine with an NVIDIA GPU (no network, no Ray)
    bash bench/gpu_check.sh --dry-run       # the same code on CPU with tiny shapes (CI runs it)

Checks (each reports ok; one failing does not stop the others):
- kernels: the Triton attention (bf16, tree and causal masks) and the decode-shaped kernel (fp32
  and bf16, forced and chosen KV splits) against the fp32 torch reference, the Triton KV
  compaction against the torch one (bench/gpu_tree_attention.py), tree vs causal attention at
  equal tokens (64 rows x 8 sequences at 2048 and 8192 tokens of context), and one attention
  call of Llama-3-70B's heads at tp=4 through the prefill-shaped and the decode kernel
  (batch 1 at 8192 and 32768 tokens, a 16-row tree at 8192, batch 32 at 2048);
- engine_equality: a small random Llama through the engine on the device (Triton attention,
  verification on the device): speculative decoding, with a drafter that drafts the plain
  continuation among decoys, gives plain decoding's tokens at T=0, in float32 and bfloat16.
- kv_profile: the KV cache sized from device memory (gpu_memory_utilization 0.9, a profiled
  forward) beside engine/plan.py's estimate for the same shapes.
- drafter_placement: a drafter built for the target sits on the target's device.
Figures, on a Llama-3-8B-shaped random model in bf16 (a 2-layer toy in the dry run):
- decode_tok_s: plain decoding through the engine at batch 1, 8 and 32, with CUDA graphs off and
  on (engine/graphs.py), and their ratio;
- verify_ratio: a forward of 16 / 32 / 64 tree rows over a 1-row forward (512-token context);
- bandwidth_fraction: batch-1 decode against weight bytes / the device's measured copy bandwidth.

Writes gpu_check.json into --out and prints a table; the last line is the JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.drafters.base import Drafter, DraftTree  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor import InProcessExecutor  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

TOY = dict(architectures=["LlamaForCausalLM"], vocab_size=320, hidden_size=128, intermediate_size=256,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
           max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
           eos_token_id=[319])


def random_checkpoint(path: str, cfg: dict, seed: int = 0) -> str:
    """A random LlamaForCausalLM saved as an HF checkpoint (transformers writes the format)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    keys = {k: v for k, v in cfg.items() if k not in ("bos_token_id", "eos_token_id")}
    model = LlamaForCausalLM(LlamaConfig(**keys, eos_token_id=cfg["eos_token_id"][0]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return path


class ContinuationDrafter(Drafter):
    """Drafts the known plain continuation as a chain of up to 4 nodes, a decoy sibling at
    each depth: trees are accepted and rejected mid-way, and the KV cache compacted."""

    kind = "eagle"

    def __init__(self, references: list[list[int]], vocab: int):
        self.references, self.vocab, self.seqs = references, vocab, {}

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.seqs[request_id] = list(token_ids) + [next_token]

    def on_verified(self, request_id, accepted, hidden, next_token):
        self.seqs[request_id] += list(accepted[1:]) + [next_token]

    def release(self, request_id):
        self.seqs.pop(request_id, None)

    def propose(self, request_ids, budgets):
        trees = []
        for rid, budget in zip(request_ids, budgets):
            seq = self.seqs.get(rid, [])
            ref = next((r for r in self.references if r[: len(seq)] == seq), seq)
            tokens, parents, parent = [], [], -1
            for t in ref[len(seq): len(seq) + min(4, budget // 2)]:
                tokens += [(t + 1) % self.vocab, t]  # the decoy first: the true child is not always node 0
                parents += [parent, parent]
                parent = len(tokens) - 1
            trees.append(DraftTree(tokens, parents))
        return trees


def kernels(device: str) -> dict:
    if device == "cpu":
        return {"ok": True, "skipped": "the CPU test suite runs the kernels in Triton's interpreter"}
    import gpu_tree_attention as kernel_bench

    out = {"tests": os.environ.get("KERNEL_TESTS", "not run"),  # bench/gpu_check.sh runs them first
           **kernel_bench.check_attention(), **kernel_bench.check_decode(), **kernel_bench.check_compaction()}
    out["tree_vs_causal"] = {f"{prefix}+{tree}": kernel_bench.time_case(prefix, tree).get("tree_vs_causal")
                             for prefix, tree in ((2048, 64), (8192, 64))}
    out["decode_70b_tp4"] = {f"batch{b}_ctx{c}_rows{r}": kernel_bench.time_decode(b, c, r)
                             for b, c, r in kernel_bench.DECODE_SHAPES}
    out["ok"] = bool(out["attention_ok"] and out["decode_ok"] and out["compaction_ok"]
                     and out["tests"] != "failed")
    return out


def engine_equality(device: str, dtypes: list[str], workdir: str) -> dict:
    path = random_checkpoint(os.path.join(workdir, "toy"), TOY)
    prompts = [[5, 17, 3, 99, 42, 7], [11, 2, 250, 8], list(range(60, 90))]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    result = {}
    for dtype in dtypes:
        executor = InProcessExecutor(path, dtype, device)
        base = dict(model=path, dtype=dtype, device=device, num_blocks=64, max_num_seqs=4, drafter="off")
        plain = LLMEngine(EngineConfig(**base, tree_budget=0), executor).generate(prompts, greedy)
        refs = [p + o.token_ids for p, o in zip(prompts, plain)]
        engine = LLMEngine(EngineConfig(**{**base, "drafter": "eagle"}, tree_budget=8, lookup_tokens=0), executor,
                           ContinuationDrafter(refs, TOY["vocab_size"]))
        spec = engine.generate(prompts, greedy)
        # The same speculative run with decode/verify steps padded to buckets (CUDA graphs on a GPU).
        graphed = InProcessExecutor(path, dtype, device, cuda_graphs="on", max_model_len=256)
        graph_engine = LLMEngine(EngineConfig(**{**base, "drafter": "eagle"}, tree_budget=8, lookup_tokens=0,
                                              max_model_len=256), graphed, ContinuationDrafter(refs, TOY["vocab_size"]))
        graph_spec = graph_engine.generate(prompts, greedy)
        steps = sum(o.seq.stats.verify_steps for o in spec)
        result[dtype] = {
            "attention": executor.runner.backend.attention,
            "equal": [o.token_ids for o in spec] == [o.token_ids for o in plain],
            "cuda_graphs_equal": [o.token_ids for o in graph_spec] == [o.token_ids for o in plain],
            "tokens_per_step": round(sum(len(o.token_ids) for o in spec) / max(1, steps), 2),
            "kv_blocks_leaked": engine.kv_blocks_used,
        }
    result["ok"] = all(r["equal"] and r["cuda_graphs_equal"] and r["kv_blocks_leaked"] == 0 and r["tokens_per_step"] > 1.5
                       for r in result.values())
    return result


class DryRunMemory:
    """engine.runner.CudaMemory's interface for the CPU dry run, with fixed figures."""

    def total(self):
        return 4 * 2**30

    def in_use(self):
        return 0

    def reset_peak(self):
        pass

    def transient_peak(self):
        return 0


def kv_profile(device: str, model: dict, workdir: str) -> dict:
    from engine.plan import plan

    executor = InProcessExecutor(None, "bfloat16", device, config=ModelConfig.from_dict(model), load=False)
    cfg = EngineConfig(model="default", dtype="bfloat16", device=device, drafter="off", tree_budget=16,
                       lookup_tokens=0, max_num_seqs=16, max_num_batched_tokens=512)
    if device == "cpu":  # the dry run: a stand-in device of 4 GiB, nothing resident, no activations
        executor.runner.memory = DryRunMemory()
    engine = LLMEngine(cfg, executor)
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(model, f)
    gib = executor.runner.memory.total() / 2**30
    predicted = plan(path, dtype="bfloat16", gpu_mem_gib=gib, batch=16, tree=16, context=512, mem_util=0.9,
                     block_size=16)["kv_blocks"]
    blocks, per_block = engine.allocator.num_blocks, executor.kv_bytes_per_block(16)
    del engine, executor
    if device != "cpu":
        torch.cuda.empty_cache()  # the next check builds its own model and cache
    return {"ok": blocks > 0, "kv_blocks": blocks, "planned_kv_blocks": predicted,
            "kv_gib": round(blocks * per_block / 2**30, 2), "device_gib": round(gib, 1)}


def drafter_placement(device: str, workdir: str) -> dict:
    from engine.drafters.loading import load_drafter

    path = os.path.join(workdir, "toy")
    executor = InProcessExecutor(path, "float32", device)
    drafter = load_drafter(EngineConfig(model=path, drafter="eagle", draft_path="random", dtype="float32",
                                        device=device, tree_budget=4, draft_vocab_size=0), path, executor)
    devices = {t.device.type for t in [*drafter.model.parameters(), *drafter.head.buffers(), drafter.embed_weight]}
    return {"ok": devices == {torch.device(device).type}, "devices": sorted(devices)}


def timed(fn, sync, repeats: int) -> float:
    """Best seconds of fn over repeats (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def figures(device: str, model: dict, batches: list[int], new_tokens: int) -> dict:
    from engine.batch import SeqInput, build_model_input

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    executor = InProcessExecutor(None, "bfloat16", device, config=ModelConfig.from_dict(model), load=False)
    runner = executor.runner
    with torch.no_grad():
        for p in runner.model.parameters():
            p.normal_(0, 0.02)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    out = {"weight_gb": round(weight_bytes / 1e9, 2)}
    by_graphs, warm_up = {}, {}
    for graphs in ("off", "on"):  # on CPU "on" runs the padded steps eagerly: the code path only
        runner.cuda_graphs, runner.max_model_len = graphs, 256
        decode = by_graphs[graphs] = {}
        for batch in batches:
            t0 = time.perf_counter()  # the engine warms up (compiles, captures graphs) as it starts
            engine = LLMEngine(EngineConfig(model="default", dtype="bfloat16", device=device, drafter="off",
                                            tree_budget=0, num_blocks=max(64, batch * 40), max_num_seqs=batch,
                                            max_model_len=256), executor)
            sync()
            start_s = time.perf_counter() - t0
            prompts = [[(7 * b + i) % model["vocab_size"] for i in range(32)] for b in range(batch)]
            params, short = SamplingParams(max_tokens=new_tokens, ignore_eos=True), SamplingParams(max_tokens=4,
                                                                                                   ignore_eos=True)
            first = timed(lambda: engine.generate(prompts, short), sync, 1)  # nothing left to compile or capture
            again = timed(lambda: engine.generate(prompts, short), sync, 1)
            warm_up[f"{graphs}/{batch}"] = {"engine_start_s": round(start_s, 2),
                                            "first_request_ratio": round(first / again, 3)}
            seconds = timed(lambda: engine.generate(prompts, params), sync, 1)
            decode[str(batch)] = round(batch * new_tokens / seconds, 1)
    out["warm_up"] = warm_up  # first_request_ratio near 1: the first request pays no compile or capture
    decode = out["decode_tok_s"] = by_graphs["off"]
    out["decode_tok_s_cuda_graphs"] = by_graphs["on"]
    out["cuda_graphs_speedup"] = {b: round(by_graphs["on"][b] / by_graphs["off"][b], 3) for b in decode}
    runner.cuda_graphs = "off"
    # One sequence with a 512-token context: a forward of R tree rows over a 1-row forward.
    runner.allocate_kv(64, 16)
    table = list(range(64))
    context = 512

    def forward(rows: int):
        parents = [-1] + [(i - 1) // 2 for i in range(1, rows)] if rows > 1 else None
        depth = [0] * rows
        for i in range(1, rows):
            depth[i] = depth[(i - 1) // 2] + 1
        inp = build_model_input([SeqInput([3] * rows, [context + d for d in depth], table, context,
                                          tree_parents=parents, logits_rows=list(range(rows)))], 16)
        return lambda: runner.forward(inp)

    one = timed(forward(1), sync, 5)
    out["verify_ratio"] = {str(r): round(timed(forward(r), sync, 5) / one, 3) for r in (16, 32, 64)}
    n = 2**28 if device.startswith("cuda") else 2**22
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * n / timed(lambda: dst.copy_(src), sync, 5)  # read + write
    out["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    out["bandwidth_fraction"] = round(decode[str(batches[0])] * weight_bytes / bandwidth, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the code path, not the figures")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.json")
    args = ap.parse_args()
    if args.dry_run:
        device, dtypes, model, batches, new_tokens = "cpu", ["float32"], TOY, [1, 2], 8
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
            return 2
        from engine.plan import PRESETS

        device, dtypes, model, batches, new_tokens = "cuda", ["float32", "bfloat16"], PRESETS["llama-3-8b"], [1, 8, 32], 64
    result = {"bench": "gpu_check", "dry_run": args.dry_run,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as workdir:
        checks = [("kernels", lambda: kernels(device)),
                  ("engine_equality", lambda: engine_equality(device, dtypes, workdir)),
                  ("drafter_placement", lambda: drafter_placement(device, workdir)),
                  ("kv_profile", lambda: kv_profile(device, model, workdir)),
                  ("figures", lambda: figures(device, model, batches, new_tokens))]
        for name, check in checks:
            t = time.perf_counter()
            try:
                result[name] = check()
            except Exception as exc:  # report it and run the next check: GPU minutes are scarce
                traceback.print_exc()
                result[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            result[name]["seconds"] = round(time.perf_counter() - t, 1)
            print(f"{name:18s} {json.dumps(result[name])}", file=sys.stderr)
    result["ok"] = all(result[name].get("ok", True) for name, _ in checks)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
