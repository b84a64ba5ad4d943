"""The decode-shaped Triton attention kernel (treespec_kernels/triton_decode.py) and its dispatch.

Runs in Triton's interpreter on a machine without CUDA, with the flag handling of
tests/test_kernels_attention.py (whose batch builder and float64 path oracle it shares):
every node's output equals softmax attention over its sequence's prefix plus its
root-to-node path, in fp32 and fp16, for decode (1 row), tree verification (random trees of
8, 16 and 61 rows) and causal prefill-shaped chunks; GQA groups 1, 2, 4 and 8; shuffled,
non-contiguous block tables; the split-KV reduction forced to several splits (some of them
empty) as well as the split count the kernel picks.
"""
import pytest
import torch

from test_kernels_attention import _triton_interpreter  # noqa: F401 (autouse: the interpreter flag)
from test_kernels_attention import DEVICE, assert_close, make_batch, path_oracle, triton_attention, triton_decode
from treespec_kernels import reference
from treespec_kernels.tree import batch_tree_mask, pack_mask


def decode(batch, tree=True, splits=None, **kw):
    mask = batch_tree_mask(batch.parents, DEVICE) if tree else None
    return triton_decode.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                         batch.context_lens, batch.query_start_loc, mask, splits=splits, **kw)


TOL = {torch.float32: 2e-5, torch.float16: 4e-3}

# seed, prefixes, trees (kind, rows), n_kv, group, head_dim, block_size, tree mask (False: causal)
CASES = {
    "decode-gqa1": (10, [0, 5, 37, 100], [("single", 1)] * 4, 2, 1, 16, 4, True),
    "decode-gqa2": (11, [17, 64, 3], [("single", 1)] * 3, 2, 2, 32, 8, True),
    "decode-gqa4": (12, [50, 1], [("single", 1)] * 2, 1, 4, 16, 16, True),
    "decode-gqa8": (13, [33, 90], [("single", 1)] * 2, 1, 8, 16, 4, True),
    "tree-8-16": (20, [40, 7], [("random", 8), ("random", 16)], 2, 2, 16, 4, True),
    "tree-61-mixed": (21, [25, 70, 0], [("random", 61), ("deep", 16), ("wide", 8)], 1, 4, 16, 8, True),
    "tree-16-gqa1": (22, [65], [("random", 16)], 2, 1, 32, 16, True),
    "tree-and-decode-gqa8": (23, [9, 48], [("chain", 8), ("single", 1)], 1, 8, 16, 4, True),
    "prefill-chunks": (30, [0, 20], [("chain", 40), ("chain", 7)], 2, 2, 16, 4, False),
    "prefill-64-gqa4": (31, [0, 3], [("chain", 64), ("chain", 2)], 1, 4, 16, 8, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_kernel_path_oracle(name, dtype):
    """Against the float64 path oracle, with the split count the kernel picks, one split
    (no reduction pass) and three forced splits."""
    seed, prefixes, trees, n_kv, group, head_dim, block_size, tree = CASES[name]
    batch = make_batch(seed, prefixes, trees, n_kv, group, head_dim, block_size, dtype=dtype)
    expected = path_oracle(batch)  # a causal chunk is a chain: the same oracle
    for splits in (None, 1, 3):
        out = decode(batch, tree, splits)
        assert out.dtype == dtype
        assert_close(out, expected, tol=TOL[dtype])


def test_many_splits_some_empty():
    # More splits than some sequences have key tiles (a 2-token prefix, an empty one): their
    # extra splits see no keys and must drop out of the reduction; a long prefix across 9
    # splits of uneven length; tile shapes other than the cache block size.
    batch = make_batch(40, [2, 0, 150, 31], [("random", 5), ("chain", 3), ("single", 1), ("random", 12)],
                       n_kv=2, group=2, head_dim=16, block_size=8)
    expected = path_oracle(batch)
    for splits in (2, 9, 40):
        assert_close(decode(batch, splits=splits), expected)
    assert_close(decode(batch, splits=9, block_n=32), expected)


def test_matches_the_tree_kernel_and_the_reference():
    # The packed entry with a custom scale, against triton_attention's kernel and the torch
    # reference, tree and causal.
    batch = make_batch(41, [19, 44, 6], [("random", 11), ("deep", 6), ("single", 1)], n_kv=2, group=3,
                       head_dim=24, block_size=4)  # group 3 and head_dim 24: padded tiles
    ctx = torch.tensor(batch.context_lens, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor(batch.query_start_loc, dtype=torch.int32, device=DEVICE)
    for words in (pack_mask(batch_tree_mask(batch.parents, DEVICE)), None):
        got = triton_decode.paged_attention_decode(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                                   ctx, qsl, words, scale=0.2, max_query_len=11, splits=4)
        tree_kernel = triton_attention.paged_attention_packed(batch.q, batch.k_cache, batch.v_cache,
                                                              batch.block_tables, ctx, qsl, words, scale=0.2)
        mask = None if words is None else batch_tree_mask(batch.parents, DEVICE)
        want = reference.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                         batch.context_lens, batch.query_start_loc, mask, scale=0.2)
        assert_close(got, want)
        assert_close(got, tree_kernel)


def test_split_and_tile_rules():
    nd = triton_decode.num_splits
    # Llama-3-70B at tp=4 (2 local KV heads), 8192 tokens, 64-key tiles, 132 SMs.
    assert nd(8192, 1 * 2, 64, 132) == 64        # limited by 2-tile splits: 128 programs
    assert nd(8192, 32 * 2, 64, 132) == 5        # batch 32: 2 programs per SM
    assert nd(100_000, 1, 64, 132) == 128        # capped
    assert nd(127, 2, 64, 132) == 1              # under two tiles: no split
    assert nd(0, 2, 64, 132) == 1
    assert nd(40, 2, 16, 132, min_split_tiles=1) == 3   # the interpreter's 1-tile splits
    assert triton_decode.use_decode_kernel(1, 8) and triton_decode.use_decode_kernel(16, 8)
    assert triton_decode.use_decode_kernel(61, 2) and not triton_decode.use_decode_kernel(17, 8)
    assert [triton_decode.block_m_for(t, g) for t, g in [(1, 1), (1, 8), (3, 8), (61, 2), (16, 8)]] == \
        [16, 16, 32, 128, 128]
    for block_m in (16, 32, 64, 128, 256):
        for head_dim in (16, 64, 128, 256):
            block_n, warps, stages = triton_decode.launch_config(block_m, head_dim, cuda=True)
            assert block_n in (32, 64) and warps in (4, 8) and stages >= 1


def test_engine_attend_dispatches_by_shape(monkeypatch):
    """engine.attention.attend: the decode kernel (split count chosen once per forward) while
    max_T x group <= 128, the tree kernel above; both equal the reference."""
    from engine.attention import AttentionMetadata, attend

    calls = []

    def recorded(name, real):
        def call(*args, **kw):
            calls.append((name, kw.get("splits")))
            return real(*args, **kw)
        return call

    for module, name in ((triton_decode, "paged_attention_decode"), (triton_attention, "paged_attention_packed")):
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    for seed, tree, group, expected_kernel in ((50, ("random", 16), 4, "paged_attention_decode"),
                                               (51, ("chain", 40), 4, "paged_attention_packed")):
        batch = make_batch(seed, [37, 5], [tree, ("single", 1)], n_kv=1, group=group, block_size=8)
        mask = batch_tree_mask(batch.parents, DEVICE)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
        meta = AttentionMetadata("triton", None, batch.block_tables, batch.context_lens, batch.query_start_loc,
                                 i32(batch.context_lens), i32(batch.query_start_loc), tree[1], mask,
                                 pack_mask(mask), (triton_attention, triton_decode))
        calls.clear()
        for _ in range(2):  # two layers
            assert_close(attend(batch.q, batch.k_cache, batch.v_cache, meta, 0.25), path_oracle(batch, 0.25))
        assert [c[0] for c in calls] == [expected_kernel] * 2
        if expected_kernel == "paged_attention_decode":
            splits = triton_decode.splits_for(batch.q, batch.k_cache, 2, tree[1], 37)
            assert calls[0][1] == calls[1][1] == meta.plans[group] == splits
            assert DEVICE != "cpu" or splits == 3  # interpreter: 1-tile splits of 16 keys
