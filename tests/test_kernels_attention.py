"""Tree attention and KV compaction: torch references and Triton kernels.

On a machine without CUDA the Triton kernels run in the interpreter: this module
sets TRITON_INTERPRET=1 while it imports them (the kernels are decorated at import
time) and, through an autouse fixture, while each of its tests runs (triton reads
the flag again at launch), and restores it after, so other test modules are unaffected.

Oracles written here with plain matmul/softmax, independent of the references:
- every tree node's output equals causal attention over prefix + its root-to-node path;
- after compaction, the cache equals one built by appending only the accepted tokens.
"""
import importlib
import os
import random
from dataclasses import dataclass

import pytest
import torch

from treespec_kernels import compaction, reference
from treespec_kernels.tree import batch_tree_mask, pack_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_triton_modules():
    interpret = DEVICE == "cpu"
    old = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import treespec_kernels.triton_attention as ta
        import treespec_kernels.triton_compaction as tc
        import treespec_kernels.triton_decode as td
        import treespec_kernels.triton_ops as to

        if interpret and type(ta._tree_attention_kernel).__name__ != "InterpretedFunction":
            ta, tc = importlib.reload(ta), importlib.reload(tc)  # imported earlier without the flag
        if (interpret and type(td._decode_attention_kernel).__name__ != "InterpretedFunction"
                or td._load_kv is not ta._load_kv):  # the decode kernel builds on ta's helpers
            td = importlib.reload(td)
        if interpret and type(to._rms_norm_kernel).__name__ != "InterpretedFunction":
            to = importlib.reload(to)
        return ta, tc, td, to
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


triton_attention, triton_compaction, triton_decode, triton_ops = _import_triton_modules()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


ATTENTION = {"torch": reference.paged_attention, "triton": triton_attention.paged_attention}
COMPACT = {"torch": compaction.compact_kv, "triton": triton_compaction.compact_kv}


# --------------------------------------------------------------------------- cases

def random_tree(kind: str, t: int, rng: random.Random) -> list[int]:
    if kind == "single" or t == 1:
        return [-1]
    if kind == "chain":
        return [i - 1 for i in range(t)]
    if kind == "wide":
        return [-1] + [0] * (t - 1)
    if kind == "deep":
        return [-1] + [i - 1 if rng.random() < 0.8 else rng.randrange(i) for i in range(1, t)]
    return [-1] + [rng.randrange(i) for i in range(1, t)]


def path_to(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


@dataclass
class Batch:
    """A batch in the paged cache, plus each sequence's K/V in logical order for the oracles."""

    q: torch.Tensor  # [N, H, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: list[int]
    query_start_loc: list[int]
    parents: list[list[int]]
    k_seq: list[torch.Tensor]  # per sequence [prefix + T, n_kv, D]
    v_seq: list[torch.Tensor]


def make_batch(seed, prefixes, trees, n_kv, group, head_dim=16, block_size=4, dtype=torch.float32,
               consecutive=False):
    """trees: list of (kind, T). Blocks are shuffled so no table is contiguous or in order
    (consecutive=True: ascending ids from block 2, as the allocator gives one request)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    parents = [random_tree(kind, t, rng) for kind, t in trees]
    lens = [p + len(par) for p, par in zip(prefixes, parents)]
    # Room for one more token per sequence (the compaction test appends a decode token).
    blocks_per_seq = [(n + block_size) // block_size for n in lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column, left as garbage ids of other sequences
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks filled with noise, never referenced
    perm = torch.randperm(num_blocks, generator=gen)
    if consecutive:
        perm = (torch.arange(num_blocks) + 2) % num_blocks
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = perm[used : used + nb].int()
        tables[b, nb:] = perm[(used + nb) % num_blocks]
        used += nb

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache = randn(num_blocks, block_size, n_kv, head_dim)
    v_cache = randn(num_blocks, block_size, n_kv, head_dim)
    k_seq, v_seq = [], []
    for b, n in enumerate(lens):
        k, v = randn(n, n_kv, head_dim), randn(n, n_kv, head_dim)
        pos = torch.arange(n)
        slots = tables[b, pos // block_size].long() * block_size + pos % block_size
        reference.write_kv(k_cache, v_cache, k, v, slots)
        k_seq.append(k)
        v_seq.append(v)
    qsl = [0]
    for par in parents:
        qsl.append(qsl[-1] + len(par))
    q = randn(qsl[-1], n_kv * group, head_dim)
    to = lambda x: x.to(DEVICE)  # noqa: E731
    return Batch(to(q), to(k_cache), to(v_cache), to(tables), list(prefixes), qsl, parents,
                 k_seq, v_seq)


def path_oracle(batch: Batch, scale=None) -> torch.Tensor:
    """Per node: softmax(q K^T * scale) V over prefix + root-to-node path, in float64."""
    n_heads, head_dim = batch.q.shape[1:]
    n_kv = batch.k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(batch.q.shape, dtype=torch.float64)
    q = batch.q.cpu().double()
    for b, parents in enumerate(batch.parents):
        prefix, start = batch.context_lens[b], batch.query_start_loc[b]
        for i in range(len(parents)):
            keys = list(range(prefix)) + [prefix + j for j in path_to(parents, i)]
            k = batch.k_seq[b][keys].double().repeat_interleave(n_heads // n_kv, dim=1)  # [L, H, D]
            v = batch.v_seq[b][keys].double().repeat_interleave(n_heads // n_kv, dim=1)
            scores = torch.einsum("hd,lhd->hl", q[start + i], k) * scale
            out[start + i] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v)
    return out


def run(backend, batch: Batch, tree=True, **kw):
    mask = batch_tree_mask(batch.parents, DEVICE) if tree else None
    return ATTENTION[backend](batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                              batch.context_lens, batch.query_start_loc, mask, **kw)


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_close(actual, expected, tol=2e-5):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=tol, rtol=tol)


# A handful of batches covering the matrix: GQA 1/3/8, prefix 0 and non-multiples of
# the block size, chains, wide, deep, random and single-node trees, mixed sizes.
BATCHES = [
    # seed, prefixes, trees, n_kv, group, head_dim, block_size
    (0, [0, 13, 8], [("random", 9), ("chain", 5), ("single", 1)], 2, 1, 16, 4),
    (1, [21, 0, 5], [("wide", 12), ("deep", 20), ("random", 3)], 1, 3, 32, 8),
    (2, [7, 16, 0], [("single", 1), ("random", 7), ("chain", 6)], 1, 8, 16, 16),
    (3, [3, 40], [("deep", 33), ("wide", 2)], 2, 3, 24, 4),  # head_dim not a power of two
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BATCHES, ids=lambda c: f"seed{c[0]}-gqa{c[4]}")
def test_tree_attention_path_oracle(backend, case):
    seed, prefixes, trees, n_kv, group, head_dim, block_size = case
    batch = make_batch(seed, prefixes, trees, n_kv, group, head_dim, block_size)
    assert_close(run(backend, batch), path_oracle(batch))


@pytest.mark.parametrize("case", BATCHES, ids=lambda c: f"seed{c[0]}-gqa{c[4]}")
def test_triton_matches_reference_tree_and_causal(case):
    seed, prefixes, trees, n_kv, group, head_dim, block_size = case
    batch = make_batch(seed, prefixes, trees, n_kv, group, head_dim, block_size)
    for tree in (True, False):
        assert_close(run("triton", batch, tree), run("torch", batch, tree))


def test_triton_large_tree_and_tile_shapes():
    # 130 nodes: five mask words per row, many tree tiles; a prefix spanning several
    # full key tiles plus a partial one; a tile shape unlike the cache block size.
    batch = make_batch(4, [37, 2], [("random", 130), ("deep", 40)], n_kv=2, group=2, block_size=8)
    expected = path_oracle(batch)
    assert_close(run("torch", batch), expected)
    assert_close(run("triton", batch), expected)
    words = pack_mask(batch_tree_mask(batch.parents, DEVICE))
    for block_m, block_n in [(16, 32), (32, 16), (64, 64)]:
        out = triton_attention.paged_attention_packed(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables, i32(batch.context_lens),
            i32(batch.query_start_loc), words, block_m=block_m, block_n=block_n)
        assert_close(out, expected)


def test_triton_half_precision():
    # fp16 storage, fp32 accumulation. (bf16 is checked on GPU only: the triton 3.9
    # interpreter multiplies bf16 bit patterns in tl.dot, triton-lang/triton#11584.)
    batch = make_batch(7, [19, 0], [("random", 21), ("chain", 3)], n_kv=2, group=4, block_size=8,
                       dtype=torch.float16)
    out = run("triton", batch)
    assert out.dtype == torch.float16
    assert_close(out, path_oracle(batch), tol=4e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_chunk_and_decode(backend):
    # tree_mask=None: a prefill chunk is a chain; decode is T=1. Also a custom scale.
    batch = make_batch(5, [0, 9, 30, 4], [("chain", 11), ("single", 1), ("single", 1), ("chain", 4)],
                       n_kv=2, group=3, block_size=4)
    assert_close(run(backend, batch, tree=False), path_oracle(batch))
    assert_close(run(backend, batch, tree=False, scale=0.3), path_oracle(batch, scale=0.3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tree", [("random", 9), ("single", 1)])
def test_one_sequence_on_consecutive_blocks(backend, tree):
    # One request on ascending block ids: the torch path reads its keys as a view of
    # the cache instead of gathering them; both must still match the oracle.
    batch = make_batch(8, [13], [tree], n_kv=2, group=3, block_size=4, consecutive=True)
    plan = reference.attention_plan(batch.context_lens, batch.query_start_loc, None, 3, batch.q.dtype,
                                    DEVICE, batch.block_tables, 4)
    assert plan.kv_start == 2
    assert_close(run(backend, batch), path_oracle(batch))
    shuffled = make_batch(8, [13], [tree], n_kv=2, group=3, block_size=4)
    assert reference.attention_plan(shuffled.context_lens, shuffled.query_start_loc, None, 3, shuffled.q.dtype,
                                    DEVICE, shuffled.block_tables, 4).kv_start is None


def test_triton_packed_entry_with_max_query_len():
    batch = make_batch(6, [5, 11], [("random", 10), ("wide", 6)], n_kv=1, group=3, block_size=4)
    words = pack_mask(batch_tree_mask(batch.parents, DEVICE))
    out = triton_attention.paged_attention_packed(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, i32(batch.context_lens),
        i32(batch.query_start_loc), words, max_query_len=10)
    assert_close(out, path_oracle(batch))


# --------------------------------------------------------------------------- compaction

def random_paths(batch: Batch, rng: random.Random) -> list[list[int]]:
    """Root-to-node path of a random node per sequence (some empty: nothing accepted)."""
    out = []
    for parents in batch.parents:
        node = rng.randrange(-1, len(parents))
        out.append(path_to(parents, node) if node >= 0 else [])
    return out


def decode_attention(k_cache, v_cache, tables, lens, q, k_new, v_new, backend):
    """One decode token per sequence appended at position lens[b]; attention over the cache."""
    block_size = k_cache.shape[1]
    pos = torch.tensor(lens)
    slots = (tables.cpu()[torch.arange(len(lens)), pos // block_size].long() * block_size
             + pos % block_size).to(DEVICE)
    reference.write_kv(k_cache, v_cache, k_new, v_new, slots)
    return ATTENTION[backend](q, k_cache, v_cache, tables, lens, list(range(len(lens) + 1)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compaction_equals_appending_accepted(backend, seed):
    rng = random.Random(seed)
    prefixes = [rng.choice([0, 3, 8, 13]) for _ in range(3)]
    trees = [(rng.choice(["random", "deep", "chain", "wide"]), rng.randint(1, 24)) for _ in range(3)]
    block_size = rng.choice([4, 8])
    batch = make_batch(seed, prefixes, trees, n_kv=2, group=3, head_dim=16, block_size=block_size)
    accepted = random_paths(batch, rng)
    # Two layers share one call; the second layer's cache holds different data.
    k2, v2 = batch.k_cache.flip(0).contiguous(), batch.v_cache.flip(0).contiguous()
    acc_arg = accepted if seed % 2 else compaction.accepted_tensor(accepted, DEVICE)
    COMPACT[backend]([batch.k_cache, k2], [batch.v_cache, v2], batch.block_tables,
                     batch.context_lens, acc_arg)

    new_lens = [p + len(a) for p, a in zip(batch.context_lens, accepted)]
    expected_k, expected_v = [], []
    for b, (prefix, acc) in enumerate(zip(batch.context_lens, accepted)):
        keep = list(range(prefix)) + [prefix + j for j in acc]
        expected_k.append(batch.k_seq[b][keep])
        expected_v.append(batch.v_seq[b][keep])
        table = batch.block_tables[b]
        assert torch.equal(reference.gather_kv(batch.k_cache, table, new_lens[b]).cpu(), expected_k[b])
        assert torch.equal(reference.gather_kv(batch.v_cache, table, new_lens[b]).cpu(), expected_v[b])

    # Attention of a decode step over the compacted cache equals attention over a
    # fresh cache (other blocks, other order) that only ever received the accepted tokens.
    gen = torch.Generator().manual_seed(seed)
    n_kv, d = batch.k_cache.shape[2:]
    q = torch.randn(len(new_lens), 3 * n_kv, d, generator=gen).to(DEVICE)
    k_new = torch.randn(len(new_lens), n_kv, d, generator=gen).to(DEVICE)
    v_new = torch.randn(len(new_lens), n_kv, d, generator=gen).to(DEVICE)
    got = decode_attention(batch.k_cache, batch.v_cache, batch.block_tables, new_lens, q, k_new, v_new, backend)

    need = [(n + 1 + block_size - 1) // block_size for n in new_lens]
    perm = torch.randperm(sum(need), generator=gen)
    fresh_tables = torch.zeros(len(need), max(need), dtype=torch.int32)
    fresh_k = torch.zeros(sum(need), block_size, n_kv, d)
    fresh_v = torch.zeros_like(fresh_k)
    used = 0
    for b, nb in enumerate(need):
        fresh_tables[b, :nb] = perm[used : used + nb].int()
        used += nb
        pos = torch.arange(new_lens[b])
        slots = fresh_tables[b, pos // block_size].long() * block_size + pos % block_size
        reference.write_kv(fresh_k, fresh_v, expected_k[b], expected_v[b], slots)
    want = decode_attention(fresh_k.to(DEVICE), fresh_v.to(DEVICE), fresh_tables.to(DEVICE), new_lens,
                            q, k_new, v_new, backend)
    assert_close(got, want, tol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compaction_overlapping_ranges(backend):
    # A chain accepted fully (nothing moves) and a path whose sources are other rows'
    # destinations: node 2 -> position 1 while node 4 -> position 2, etc.
    parents = [[-1, 0, 1, 2], [-1, 0, 1, 0, 2, 4, 5]]
    accepted = [[0, 1, 2, 3], [0, 2, 4, 5, 6]]
    block_size, n_kv, d = 4, 1, 16
    tables = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    prefixes = [3, 5]
    k = torch.randn(6, block_size, n_kv, d)
    v = torch.randn(6, block_size, n_kv, d)
    logical_k = [reference.gather_kv(k, tables[b], prefixes[b] + len(p)) for b, p in enumerate(parents)]
    logical_v = [reference.gather_kv(v, tables[b], prefixes[b] + len(p)) for b, p in enumerate(parents)]
    k_dev, v_dev = k.to(DEVICE), v.to(DEVICE)
    COMPACT[backend](k_dev, v_dev, tables.to(DEVICE), torch.tensor(prefixes), accepted)
    for b, acc in enumerate(accepted):
        keep = list(range(prefixes[b])) + [prefixes[b] + j for j in acc]
        n = len(keep)
        assert torch.equal(reference.gather_kv(k_dev, tables[b].to(DEVICE), n).cpu(), logical_k[b][keep])
        assert torch.equal(reference.gather_kv(v_dev, tables[b].to(DEVICE), n).cpu(), logical_v[b][keep])
