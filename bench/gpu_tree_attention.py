"""Tree attention on GPU: correctness of the compiled kernels in bf16, then timing.

Run through bench/gpu_tree_attention.sh (it finds or installs torch + triton).

1. Checks: treespec_kernels.triton_attention.paged_attention (tree and causal) against the
   torch reference computed in fp32 from the same bf16 inputs; the decode kernel
   (treespec_kernels.triton_decode: decode rows, trees, causal chunks, chosen and forced
   KV splits) in fp32 and bf16 against the same fp32 reference; the Triton KV
   compaction against the torch one (bit-exact).
2. Timing, per (prefix length, tree size), B sequences of Llama-3-8B-shaped heads
   (32 query heads, 8 KV heads, head_dim 128), bf16, paged cache with shuffled blocks:
   - tree_ms:   Triton kernel, random tree, pre-packed ancestor mask;
   - causal_ms: the same kernel with causal masking (a chain of the same length);
   - sdpa_ms:   torch SDPA over the same tokens, contiguous K/V, causal mask aligned
                to the bottom right (flash / memory-efficient backends);
   - ref_ms:    the torch reference (gather the pages, then SDPA with the tree mask).
   tree_vs_sdpa = tree_ms / sdpa_ms (below 1: the paged tree kernel is faster).
3. Decode timing (``time_decode``): one attention call of Llama-3-70B's heads on one of 4
   tensor-parallel ranks (16 query heads, 2 KV heads, head_dim 128), bf16, at batch 1 and 32:
   the prefill-shaped kernel (triton_attention) against the decode kernel with the split count
   it picks and with one split.
The last line printed is one JSON object with everything measured.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from treespec_kernels import compaction, reference  # noqa: E402
from treespec_kernels import triton_attention, triton_compaction, triton_decode  # noqa: E402
from treespec_kernels.tree import batch_tree_mask, pack_mask  # noqa: E402

DEV = "cuda"
N_HEADS, N_KV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
BATCH = int(os.environ.get("BENCH_BATCH", "8"))
PREFIXES = [512, 2048, 8192]
TREES = [16, 64, 128]
HEADS_70B_TP4 = (16, 2, 128)  # Llama-3-70B on one of 4 TP ranks: 64 / 4 query heads, 8 / 4 KV heads
DECODE_SHAPES = [(1, 8192, 1), (1, 8192, 16), (1, 32768, 1), (32, 2048, 1)]  # (batch, context, rows)


def random_tree(t: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(max(0, i - 8), i) for i in range(1, t)]  # bushy but deep-ish


def make_batch(prefixes, tree_sizes, n_heads, n_kv, head_dim, dtype, seed):
    """Random paged cache holding B sequences (prefix + tree tokens), shuffled block tables."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lens = [p + t for p, t in zip(prefixes, tree_sizes)]
    need = [(n + 1 + BLOCK_SIZE - 1) // BLOCK_SIZE for n in lens]
    num_blocks = sum(need) + 4
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    used = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = perm[used : used + nb].int()
        used += nb
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, n_kv, head_dim, device=DEV, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    qsl = [0]
    for t in tree_sizes:
        qsl.append(qsl[-1] + t)
    q = torch.randn(qsl[-1], n_heads, head_dim, device=DEV, dtype=dtype)
    parents = [random_tree(t, rng) for t in tree_sizes]
    return q, k_cache, v_cache, tables.to(DEV), list(prefixes), qsl, parents


def check_attention() -> dict:
    """Max |triton(bf16) - reference(fp32)| over several batches; must stay within bf16 rounding."""
    worst = 0.0
    cases = [
        ([0, 37, 300, 1029], [1, 16, 64, 130], 32, 8),  # GQA 4, a 130-node tree (5 mask words)
        ([5, 16], [7, 33], 24, 3),                       # GQA 8
        ([100, 1], [20, 2], 8, 8),                       # no GQA
    ]
    for seed, (prefixes, trees, n_heads, n_kv) in enumerate(cases):
        q, kc, vc, bt, ctx, qsl, parents = make_batch(prefixes, trees, n_heads, n_kv, HEAD_DIM, torch.bfloat16, seed)
        for mask in (batch_tree_mask(parents, DEV), None):
            got = triton_attention.paged_attention(q, kc, vc, bt, ctx, qsl, mask).float()
            want = reference.paged_attention(q.float(), kc.float(), vc.float(), bt, ctx, qsl, mask)
            worst = max(worst, (got - want).abs().max().item())
    return {"attention_max_abs_err_bf16": worst, "attention_ok": worst < 2e-2}


def check_decode(tolerances: dict | None = None, head_dim: int = HEAD_DIM) -> dict:
    """Max |decode kernel - reference(fp32)| per input dtype, over tree and causal masks.

    tolerances: {dtype: largest error allowed} (fp32 1e-3, bf16 2e-2).
    """
    tolerances = tolerances or {torch.float32: 1e-3, torch.bfloat16: 2e-2}
    cases = [  # prefixes, rows, n_heads, n_kv, splits (None: the kernel's own rule)
        ([0, 37, 300, 1029], [1, 1, 16, 8], 32, 8, None),  # GQA 4, decode rows beside trees
        ([4000], [1], 16, 2, None),                        # 70B at tp=4, batch 1: many splits
        ([5, 700, 64], [61, 1, 3], 16, 8, 7),              # GQA 2: 61 rows x 2 in one tile
        ([100, 1], [20, 2], 8, 8, 3),                      # no GQA
        ([513, 2048], [8, 16], 64, 8, None),               # GQA 8: 16 rows x 8 = 128
    ]
    out, ok = {}, True
    for dtype, tol in tolerances.items():
        worst = 0.0
        for seed, (prefixes, rows, n_heads, n_kv, splits) in enumerate(cases):
            q, kc, vc, bt, ctx, qsl, parents = make_batch(prefixes, rows, n_heads, n_kv, head_dim, dtype, 100 + seed)
            for mask in (batch_tree_mask(parents, DEV), None):
                got = triton_decode.paged_attention(q, kc, vc, bt, ctx, qsl, mask, splits=splits).float()
                want = reference.paged_attention(q.float(), kc.float(), vc.float(), bt, ctx, qsl, mask)
                worst = max(worst, (got - want).abs().max().item())
        out[f"decode_max_abs_err_{str(dtype).removeprefix('torch.')}"] = worst
        ok = ok and worst < tol
    out["decode_ok"] = ok
    return out


def time_decode(batch: int, context: int, rows: int, heads: tuple = HEADS_70B_TP4) -> dict:
    """One attention call at (batch, context, rows of a random tree per sequence), bf16 on
    ``heads`` (n_heads, n_kv, head_dim): the prefill-shaped kernel, the decode kernel with the
    split count it picks, and the decode kernel with one split, in ms."""
    n_heads, n_kv, head_dim = heads
    q, kc, vc, bt, ctx, qsl, parents = make_batch(
        [context] * batch, [rows] * batch, n_heads, n_kv, head_dim, torch.bfloat16, context + rows)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=DEV)
    words = pack_mask(batch_tree_mask(parents, DEV)) if rows > 1 else None
    splits = triton_decode.splits_for(q, kc, batch, rows, context)
    row = {"batch": batch, "context": context, "rows": rows, "heads": list(heads), "splits": splits}
    for name, fn in (
        ("tree_kernel_ms", lambda: triton_attention.paged_attention_packed(
            q, kc, vc, bt, ctx_t, qsl_t, words, max_query_len=rows)),
        ("decode_ms", lambda: triton_decode.paged_attention_decode(
            q, kc, vc, bt, ctx_t, qsl_t, words, max_query_len=rows, splits=splits)),
        ("decode_one_split_ms", lambda: triton_decode.paged_attention_decode(
            q, kc, vc, bt, ctx_t, qsl_t, words, max_query_len=rows, splits=1)),
    ):
        try:
            row[name] = round(bench(fn), 4)
        except Exception as e:  # one failing variant must not hide the others
            row[name] = None
            row[name.replace("_ms", "_error")] = f"{type(e).__name__}: {e}"[:200]
    if row.get("decode_ms") and row.get("tree_kernel_ms"):
        row["decode_vs_tree_kernel"] = round(row["decode_ms"] / row["tree_kernel_ms"], 3)
    return row


def check_compaction() -> dict:
    q, kc, vc, bt, ctx, qsl, parents = make_batch([3, 40, 17], [9, 64, 1], 8, 8, HEAD_DIM, torch.bfloat16, 7)
    accepted = []
    for par in parents:
        node, path = len(par) - 1, []
        while node >= 0:
            path.append(node)
            node = par[node]
        accepted.append(path[::-1])
    k2, v2 = kc.clone(), vc.clone()
    compaction.compact_kv(kc, vc, bt, ctx, accepted)
    triton_compaction.compact_kv(k2, v2, bt, torch.tensor(ctx, device=DEV), accepted)
    ok = torch.equal(kc, k2) and torch.equal(vc, v2)
    return {"compaction_ok": ok}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40)


def time_case(prefix: int, tree: int) -> dict:
    q, kc, vc, bt, ctx, qsl, parents = make_batch(
        [prefix] * BATCH, [tree] * BATCH, N_HEADS, N_KV, HEAD_DIM, torch.bfloat16, prefix + tree)
    ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=DEV)
    bool_mask = batch_tree_mask(parents, DEV)
    words = pack_mask(bool_mask)

    def tree_fn():
        return triton_attention.paged_attention_packed(q, kc, vc, bt, ctx_t, qsl_t, words, max_query_len=tree)

    def causal_fn():
        return triton_attention.paged_attention_packed(q, kc, vc, bt, ctx_t, qsl_t, None, max_query_len=tree)

    # The peer: the same query/key counts, contiguous K/V, bottom-right causal mask.
    qd = q.view(BATCH, tree, N_HEADS, HEAD_DIM).transpose(1, 2)
    kd = torch.randn(BATCH, N_KV, prefix + tree, HEAD_DIM, device=DEV, dtype=torch.bfloat16)
    vd = torch.randn_like(kd)
    bias = causal_lower_right(tree, prefix + tree)

    def sdpa_fn():
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias, enable_gqa=True)

    def ref_fn():
        return reference.paged_attention(q, kc, vc, bt, ctx, qsl, bool_mask)

    row = {"prefix": prefix, "tree": tree, "batch": BATCH}
    for name, fn in (("tree_ms", tree_fn), ("causal_ms", causal_fn), ("sdpa_ms", sdpa_fn), ("ref_ms", ref_fn)):
        try:
            row[name] = round(bench(fn), 4)
        except Exception as e:  # a peer that cannot run this shape must not hide the others
            row[name] = None
            row[name.replace("_ms", "_error")] = f"{type(e).__name__}: {e}"[:200]
    if row.get("tree_ms") and row.get("sdpa_ms"):
        row["tree_vs_sdpa"] = round(row["tree_ms"] / row["sdpa_ms"], 3)
    if row.get("tree_ms") and row.get("causal_ms"):
        row["tree_vs_causal"] = round(row["tree_ms"] / row["causal_ms"], 3)
    return row


def main() -> int:
    start = time.time()
    result = {
        "bench": "gpu_tree_attention",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "heads": [N_HEADS, N_KV, HEAD_DIM],
        "block_size": BLOCK_SIZE,
        "gpu_tests": os.environ.get("GPU_TESTS", "not run"),
    }
    result.update(check_attention())
    result.update(check_decode())
    result.update(check_compaction())
    print(f"checks: {json.dumps(result)}", flush=True)
    rows = []
    print(f"{'prefix':>7} {'tree':>5} {'tree_ms':>9} {'causal_ms':>10} {'sdpa_ms':>9} {'ref_ms':>9} {'tree/sdpa':>9}")
    for prefix in PREFIXES:
        for tree in TREES:
            row = time_case(prefix, tree)
            rows.append(row)
            fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
            print(f"{prefix:>7} {tree:>5} {fmt(row['tree_ms']):>9} {fmt(row['causal_ms']):>10} "
                  f"{fmt(row['sdpa_ms']):>9} {fmt(row['ref_ms']):>9} {row.get('tree_vs_sdpa', '-'):>9}", flush=True)
            torch.cuda.empty_cache()
    result["results"] = rows
    result["decode"] = [time_decode(*shape) for shape in DECODE_SHAPES]
    for row in result["decode"]:
        print(f"decode {json.dumps(row)}", flush=True)
    result["ok"] = bool(result["attention_ok"] and result["decode_ok"] and result["compaction_ok"])
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
