"""The fused CPU forward (treespec_kernels/cpu_fused.c via engine/fused.py).

Oracles: transformers' fp32 logits (the fused bf16 path must be no less accurate than
the torch bf16 path), the engine's fp32 torch path on random configs (paged attention
with trees and several sequences), and decoding the accepted path one token at a time
(a tree row must give bit-identical results: that is what keeps speculation lossless).
Skipped, with the reason, where neither build fits (AVX512-BF16, or AVX2 + FMA: see
treespec_kernels/cpu_fused.py) or there is no C compiler; on a CPU with AMX the GEMVs run
on tiles, and the random-config test checks both paths.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_llama_dir
from engine.fused import FusedModel
from engine.ops import argmax_rows, topk_logprobs
from engine.batch import SeqInput, build_model_input
from engine.runner import ModelRunner
from treespec_kernels.cpu_fused import has_amx, unsupported_reason

pytestmark = pytest.mark.skipif(unsupported_reason() is not None, reason=f"fused CPU kernel: {unsupported_reason()}")
HAS_AMX = has_amx()


def int8_available() -> bool:
    """int8 drafter weights run here: AMX-INT8 tiles in use (not TREESPEC_CPU_AMX=0),
    AVX512-VNNI without tiles (int8 rows), or the AVX2 build (int8 panels)."""
    from engine.fused import build_dir
    from treespec_kernels import cpu_fused

    return cpu_fused.int8_weights(cpu_fused.load(build_dir()))


def run(runner: ModelRunner, seqs: list[SeqInput]):
    return runner.execute(build_model_input(seqs, runner.block_size))


def chunked_logits(runner: ModelRunner, ids: list[int], split: int, table: list[int]) -> torch.Tensor:
    """Prefill ids[:split], then feed 1-, 3- and 5-token chunks; logits [len(ids), V]."""
    out, pos, sizes = [], 0, [split] + [1, 3, 5] * len(ids)
    for c in sizes:
        if pos >= len(ids):
            break
        toks = ids[pos: pos + c]
        out.append(run(runner, [SeqInput(toks, list(range(pos, pos + len(toks))), table, pos,
                                         logits_rows=list(range(len(toks))))]).logits)
        pos += len(toks)
    return torch.cat(out)


def test_default_model_bf16_fused_is_as_accurate_as_torch_bf16(default_dir, hf_model, tokenizer):
    fused = ModelRunner(default_dir, "bfloat16")
    torch_bf16 = ModelRunner(default_dir, "bfloat16", attention_backend="torch")
    assert fused.fused is not None and torch_bf16.fused is None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = ids + tokenizer.encode(" The Danube, the Rhine and the Seine are three of them, and")
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    ids = list(ids)
    errs, agree = [], []
    for r in (fused, torch_bf16):
        r.allocate_kv(32, 16)
        out = chunked_logits(r, ids, 20, [5, 2, 9, 0, 7])  # 20 rows: the fused path prefills too
        errs.append((out - ref).abs().max().item())
        agree.append((out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    print("max |logit - fp32| fused, torch bf16:", errs, "argmax agreement:", agree)
    assert errs[0] <= 1.25 * errs[1], errs
    assert agree[0] >= agree[1] - 0.05 and agree[0] >= 0.85, agree


@pytest.mark.parametrize("hidden,heads,kv_heads,block_size,amx",
                         [(96, 6, 2, 4, True), (96, 6, 2, 4, False), (80, 5, 1, 3, False)])
def test_random_config_trees_and_batches_match_fp32_torch(tmp_path, monkeypatch, hidden, heads, kv_heads,
                                                          block_size, amx):
    """Two sequences in one forward, one a draft tree and one a causal chunk, over paged
    blocks; hidden 80 exercises the masked tail of the AVX512 GEMV (80 is not a multiple
    of 32, so no matrix fits AMX tiles); hidden 96 runs every matrix on AMX tiles where the
    CPU has them (amx=True), or on AVX512-BF16 dot products (TREESPEC_CPU_AMX=0). In the
    AVX2 build every matrix is in 16-row panels, the 319-row head's last one padded, and
    head_dim 16 is one split 16-dim block of the attention."""
    if amx and not HAS_AMX:
        pytest.skip("the CPU has no AMX-BF16")
    monkeypatch.setenv("TREESPEC_CPU_AMX", "1" if amx else "0")
    d = random_llama_dir(str(tmp_path), hidden=hidden, heads=heads, kv_heads=kv_heads, layers=3, tie=False)
    fused, ref = ModelRunner(d, "bfloat16"), ModelRunner(d, "float32")
    assert fused.fused is not None and fused.fused.amx == amx
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 319, (60,), generator=g).tolist()
    tables = [[3, 9, 1, 14, 6, 11, 0, 8], [2, 13, 5, 7, 12, 4, 10, 15]]
    parents = [-1, 0, 0, 1, 1, 2, 4]
    outs = []
    for r in (fused, ref):
        r.allocate_kv(16, block_size)
        run(r, [SeqInput(ids[:9], list(range(9)), tables[0], 0), SeqInput(ids[20:31], list(range(11)), tables[1], 0)])
        depth = [0, 1, 1, 2, 2, 2, 3]
        o = run(r, [SeqInput(ids[40:47], [9 + x for x in depth], tables[0], 9, tree_parents=parents,
                             logits_rows=list(range(7))),
                    SeqInput(ids[31:35], list(range(11, 15)), tables[1], 11, logits_rows=list(range(4)))])
        outs.append(o)
    a, b = outs
    scale = b.logits.abs().max().item()
    assert (a.logits - b.logits).abs().max().item() <= 0.03 * scale
    assert (a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean().item() >= 0.9
    assert (a.hidden.float() - b.hidden).abs().max().item() <= 0.05 * b.hidden.abs().max().item()


TREES = [([-1, 0, 0, 1, 3, 2], (4, 5)),
         # 21 nodes: a unit's queries fill a 16-row score tile and part of another
         ([-1, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12, 14, 15, 16, 17], (18, 20))]


# Context lengths: all keys in the tile the rows' own keys start in (23), or whole shared
# 32-key tiles before it (77 = 2 * 32 + 13): the paths of the V sums in values_amx.
@pytest.mark.parametrize("ctx", [23, 77])
@pytest.mark.parametrize("parents,leaves", TREES, ids=["6-nodes", "21-nodes"])
def test_tree_rows_are_bit_identical_to_decoding_the_path(default_dir, parents, leaves, ctx):
    """Verifying a tree in one forward gives, for each node, exactly the logits and hidden
    state of decoding its root-to-node path one token at a time (with another sequence
    sharing the forward), so greedy speculation reproduces plain decoding bit for bit."""
    r = ModelRunner(default_dir, "bfloat16")
    r.allocate_kv(32, 16)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 49152, (ctx,), generator=g).tolist()
    tree = torch.randint(0, 49152, (len(parents),), generator=g).tolist()
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        depth[i] = depth[p] + 1 if p >= 0 else 0
    per_seq = (ctx + len(parents) + 15) // 16  # tree rows are written after the context, one slot each
    a_table, b_table = list(range(per_seq)), list(range(per_seq, 2 * per_seq))
    other = [2 * per_seq, 2 * per_seq + 1]
    for table in (a_table, b_table):  # the same prefix twice: identical cache contents
        run(r, [SeqInput(prefix, list(range(ctx)), table, 0)])
    run(r, [SeqInput(prefix[:5], list(range(5)), other, 0)])
    t = run(r, [SeqInput(tree, [ctx + x for x in depth], a_table, ctx, tree_parents=parents,
                         logits_rows=list(range(len(tree)))),
                SeqInput(prefix[5:6], [5], other, 5)])
    for node in leaves:
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        table = list(b_table)
        for i, n in enumerate(path):
            out = run(r, [SeqInput([tree[n]], [ctx + i], table, ctx + i)])
            assert torch.equal(out.logits[0], t.logits[n]), (node, n)
            assert torch.equal(out.hidden[0], t.hidden[n]), (node, n)
    assert t.logits.shape == (len(tree) + 1, 49152) and t.hidden.dtype == torch.bfloat16  # + the other sequence
    assert t.argmax == t.logits.argmax(-1).tolist()  # the forward's own argmax, for greedy verification


def test_long_causal_forwards_in_chunks_equal_one_forward(tmp_path):
    """A prefill of more rows than the kernel takes runs as fused chunks (engine/backends.py,
    split_causal): three sequences, one with cached context, cut across chunk edges, logits
    rows asked out of order. Oracle: the same forward in one fused call (a larger max_rows),
    which must agree bit for bit (a row never depends on the rows beside it), KV cache too;
    and the torch fp32 path within bf16's error."""
    from engine import backends

    d = random_llama_dir(str(tmp_path), hidden=96, heads=6, kv_heads=2, layers=2, tie=False)
    r, ref = ModelRunner(d, "bfloat16"), ModelRunner(d, "float32")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 319, (90,), generator=g).tolist()
    tables = [[3, 9, 1, 14, 6, 11, 0, 8], [2, 13, 5, 7, 12, 4, 10, 15], [16, 17, 18, 19, 20, 21, 22, 23]]
    first = [SeqInput(ids[:5], list(range(5)), tables[0], 0)]
    batch = [SeqInput(ids[5:22], list(range(5, 22)), tables[0], 5, logits_rows=[16, 3, 0]),
             SeqInput(ids[30:53], list(range(23)), tables[1], 0),
             SeqInput(ids[60:71], list(range(11)), tables[2], 0, logits_rows=list(range(11)))]
    n = sum(len(s.token_ids) for s in batch)
    inp = build_model_input(batch, 4)
    pieces = backends.split_causal(inp, 13)
    assert len(pieces) == -(-n // 13) and sum(len(c.input_ids) for c, _ in pieces) == n
    assert n <= backends.PREFILL_CHUNKS * 13  # so 13-row chunks, not the torch path
    outs, caches = [], []
    for max_rows in (13, n):  # chunked, then one call
        r.fused.max_rows = max_rows
        r.allocate_kv(24, 4)
        run(r, first)
        outs.append(r.execute(inp))
        caches.append(r.kv_cache.clone())
    a, b = outs
    assert a.argmax is not None and b.argmax is not None  # both fused
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden) and a.argmax == b.argmax
    assert torch.equal(caches[0], caches[1])
    ref.allocate_kv(24, 4)
    run(ref, first)
    want = ref.execute(inp)
    assert a.logits.shape == want.logits.shape and len(a.logits) == 15
    assert (a.logits - want.logits).abs().max().item() <= 0.03 * want.logits.abs().max().item()
    assert (a.hidden.float() - want.hidden).abs().max().item() <= 0.05 * want.hidden.abs().max().item()


def test_fused_only_where_it_applies(tmp_path, monkeypatch):
    d = random_llama_dir(str(tmp_path), layers=1)
    assert ModelRunner(d, "float32").fused is None  # fp32 keeps the torch path
    monkeypatch.setenv("TREESPEC_CPU_KERNEL", "torch")
    assert ModelRunner(d, "bfloat16").fused is None
    monkeypatch.delenv("TREESPEC_CPU_KERNEL")
    r = ModelRunner(d, "bfloat16")
    assert isinstance(r.fused, FusedModel)
    # rows past PREFILL_CHUNKS * max_rows (a long prefill; max_rows lowered to 16 for it so
    # the cache stays small) take the torch path; 40 rows run fused on AMX tiles (two passes
    # over the weights: 32 rows, then 8), in 32-row chunks on AVX512-BF16 alone; all agree
    # with small chunks
    from engine.backends import PREFILL_CHUNKS

    max_rows, r.fused.max_rows = r.fused.max_rows, 16
    table, n = list(range(80)), PREFILL_CHUNKS * 16 + 8
    ids = [(7 * i) % 300 + 1 for i in range(n)]
    r.allocate_kv(80, 4)
    out = run(r, [SeqInput(ids, list(range(n)), table, 0, logits_rows=[n - 1, 39])])
    assert out.argmax is None  # the torch path gives no argmax
    long, r.fused.max_rows = out.logits, max_rows
    r.allocate_kv(80, 4)
    mid = run(r, [SeqInput(ids[:40], list(range(40)), table, 0, logits_rows=[39])]).logits
    r.allocate_kv(80, 4)
    short = chunked_logits(r, ids, 8, table)
    for got, want in [(long[0], short[n - 1]), (long[1], short[39]), (mid[0], short[39])]:
        assert (got - want).abs().max().item() <= 0.03 * want.abs().max().item()


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_bf16_speculation_equals_plain_greedy(default_dir, tokenizer, chat_prompts, kind):
    """With the fused path, bf16 speculation (the CPU default) is lossless bit for bit:
    the shipped drafters' output equals plain bf16 greedy decoding, token for token."""
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor
    from engine.sampling import SamplingParams

    executor = InProcessExecutor(default_dir, "bfloat16")
    assert executor.runner.fused is not None
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    prompts = chat_prompts[:3]
    plain = LLMEngine(EngineConfig(dtype="bfloat16", num_blocks=128, max_num_seqs=2), executor, None, tokenizer)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    cfg = EngineConfig(dtype="bfloat16", num_blocks=128, max_num_seqs=2, drafter=kind, tree_budget=8, draft_min_prob=0.0, draft_vocab_size=0)
    engine = LLMEngine(cfg, executor, load_drafter(cfg, default_dir, executor), tokenizer)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    steps = sum(o.seq.stats.verify_steps for o in outs)
    assert sum(o.seq.stats.committed for o in outs) / steps > 1.3  # drafts were really accepted
    assert engine.kv_blocks_used == 0


@pytest.mark.parametrize("int8", [False, True])
def test_fused_eagle_drafter_tracks_the_torch_drafter(default_dir, chat_prompts, int8):
    """The fused EAGLE drafter (one C call per depth, its KV cache growing past its first
    allocation) predicts the same features and trees as the torch drafter on the same weights;
    with int8 weights (the CPU default where AMX-INT8 or AVX512-VNNI is) nearly the same."""
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.executor import InProcessExecutor

    if int8 and not int8_available():
        pytest.skip("int8 drafter weights need AMX-INT8 tiles, AVX512-VNNI or the AVX2 build")
    executor = InProcessExecutor(default_dir, "bfloat16")
    cfg = EngineConfig(dtype="bfloat16", drafter="eagle", tree_budget=8, draft_min_prob=0.0, draft_int8=int8, draft_vocab_size=0)
    fused, eager = load_drafter(cfg, default_dir, executor), load_drafter(cfg, default_dir, executor)
    assert fused.fused is not None and fused.fused.int8 == int8
    eager.fused = None
    r = executor.runner
    r.allocate_kv(40, 16)
    ids = sum(chat_prompts * 10, [])[:283]  # real chat text, longer than the first allocation
    out = run(r, [SeqInput(ids[:280], list(range(280)), list(range(18)), 0)])
    nxt = int(out.logits[0].argmax())
    trees = []
    for d in (fused, eager):
        d.on_prefill("a", ids[:280], out.hidden, nxt)
        first = d.propose(["a"], [8])[0]
        d.on_verified("a", [nxt, ids[280], ids[281]], out.hidden[:3], ids[282])  # 3 more pairs
        trees.append((first, d.propose(["a"], [8])[0]))
    fs, es = fused.states["a"], eager.states["a"]
    assert fs.length == es.length == 283 and fs.kv.shape[3] >= 283 + cfg.draft_depth * cfg.draft_top_k
    cos = torch.nn.functional.cosine_similarity(fs.last.float(), es.last.float(), dim=0).item()
    assert cos > 0.995, cos
    for f_tree, e_tree in zip(*trees):
        assert len(f_tree.tokens) == len(e_tree.tokens) == 8
        assert len(set(f_tree.tokens) & set(e_tree.tokens)) >= 6


def eagle2_reference(fm, embed, vocab_ids, kv, length, pending, feats, budget, k, depth, min_prob):
    """The EAGLE-2 draft step in plain Python over FusedModel.run, one call per depth, input
    rows built with torch.cat: the oracle of the C step. Returns (tokens, parents, length,
    last hidden row, forwards run)."""
    table, calls = torch.zeros(1, 1, dtype=torch.int32), []

    def forward(ids, feat_rows, positions, slots, ctx, visible=None):
        calls.append(len(ids))
        inputs = torch.cat([embed[ids], feat_rows], dim=-1)
        n = len(ids)
        rows = [n - 1] if visible is None else list(range(n))
        return fm.run(kv, positions, slots, [0, n], [ctx], table, rows, inputs=inputs, visible=visible)

    def top(logits):  # per row: [(log-prob, token id)], best first
        vals, idx = topk_logprobs(logits, k)
        idx = idx if vocab_ids is None else vocab_ids[idx]
        return [list(zip(v, t)) for v, t in zip(vals.tolist(), idx.tolist())]

    span = list(range(length, length + len(pending)))
    hidden, logits = forward(pending, feats, span, span, length)
    length += len(pending)
    last = hidden[-1]
    nodes = [{"token": t, "parent": -1, "depth": 1, "score": lp} for lp, t in top(logits)[0]]
    frontier, frontier_feats, slot, used = list(range(k)), [last] * k, {}, 0
    for d in range(1, depth):
        best = max(nodes[i]["score"] for i in frontier)
        ranked = sorted((nd["score"] for nd in nodes), reverse=True)
        if (len(nodes) >= budget and ranked[budget - 1] >= best) or math.exp(best) < min_prob:
            break
        for j, i in enumerate(frontier):
            slot[i] = length + used + j
        used += len(frontier)

        def path(i):  # cache slots of i's forwarded ancestors, then its own
            return [] if i < 0 else path(nodes[i]["parent"]) + [slot[i]]

        hidden, logits = forward([nodes[i]["token"] for i in frontier], torch.stack(frontier_feats),
                                 [length + d - 1] * len(frontier), [slot[i] for i in frontier], length,
                                 visible=[path(i) for i in frontier])
        children = [(nodes[i]["score"] + lp, t, i, row)
                    for row, (i, cands) in enumerate(zip(frontier, top(logits))) for lp, t in cands]
        base = len(nodes)
        nodes += [{"token": t, "parent": i, "depth": d + 1, "score": sc} for sc, t, i, _ in children]
        best_k = sorted(range(len(children)), key=lambda c: -children[c][0])[:k]  # stable: ties keep order
        frontier = [base + c for c in best_k]
        frontier_feats = [hidden[children[c][3]] for c in best_k]
    kept = []
    for i in sorted(range(len(nodes)), key=lambda i: (-nodes[i]["score"], nodes[i]["depth"], i)):
        if len(kept) == budget:
            break
        if nodes[i]["parent"] == -1 or nodes[i]["parent"] in kept:
            kept.append(i)
    kept.sort(key=lambda i: (nodes[i]["depth"], i))
    parents = [-1 if nodes[i]["parent"] < 0 else kept.index(nodes[i]["parent"]) for i in kept]
    return [nodes[i]["token"] for i in kept], parents, length, last, len(calls)


@pytest.mark.parametrize("budget,min_prob", [(8, 0.35), (8, 0.0), (24, 0.0)])
def test_eagle_draft_step_in_c_equals_the_search_in_python(default_dir, chat_prompts, budget, min_prob):
    """The fused drafter's whole draft step (catch-up, EAGLE-2 search, rerank) runs in one C
    call; it must draft exactly the tree of the same search written in Python over one fused
    forward per depth, and leave the same drafter cache, step after step."""
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.executor import InProcessExecutor

    executor = InProcessExecutor(default_dir, "bfloat16")
    cfg = EngineConfig(dtype="bfloat16", drafter="eagle", tree_budget=budget, draft_min_prob=min_prob,
                       draft_vocab_size=4096)
    drafter = load_drafter(cfg, default_dir, executor)
    fm, k = drafter.fused, min(cfg.draft_top_k, budget)
    r = executor.runner
    r.allocate_kv(40, 16)
    ids = sum(chat_prompts * 4, [])[:150]
    out = run(r, [SeqInput(ids, list(range(150)), list(range(10)), 0)])  # the target's features
    drafter.on_prefill("a", ids[:120], out.hidden[:120], ids[120])
    st = drafter.states["a"]
    ref_kv = torch.zeros(2, 1, 1, 512, fm.model.kv_heads, fm.model.head_dim, dtype=torch.bfloat16)
    ref_len, sizes, at = 0, [], 120
    for accept in (0, 4, 1, 3, 1, 5, 2, 1):  # verified steps: the root and accept - 1 drafted tokens, a bonus
        if accept:
            drafter.on_verified("a", ids[at:at + accept], out.hidden[at:at + accept], ids[at + accept])
            at += accept
        pending, feats = list(st.tokens), torch.cat(st.feats).to(torch.bfloat16)
        want = eagle2_reference(fm, drafter.embed_weight, drafter.head.ids, ref_kv, ref_len, pending, feats,
                                budget, k, cfg.draft_depth, min_prob)
        before = drafter.forwards
        tree = drafter.propose(["a"], [budget])[0]
        assert (tree.tokens, tree.parents) == (want[0], want[1])
        assert drafter.forwards - before == want[4]
        ref_len = want[2]
        assert st.length == ref_len and torch.equal(st.last, want[3])
        assert torch.equal(st.kv[:, :, :, :ref_len], ref_kv[:, :, :, :ref_len])
        sizes.append(len(tree.tokens))
    assert sizes == [budget] * 8
    with pytest.raises(ValueError, match="top_k 65"):
        fm.eagle_step(st.kv, st.length, [], [], st.last, st.last_logits, None, budget, 65, 8, 0.0)
    tiny = torch.zeros(2, 1, 1, 8, fm.model.kv_heads, fm.model.head_dim, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a cache of 8 slots"):  # no room for the draft rows
        fm.eagle_step(tiny, 0, [], [], st.last, st.last_logits, None, budget, k, 8, 0.0)


def test_eagle_input_rows_gathered_by_the_kernel_equal_torch_cat(default_dir):
    """run(ids=, feats=): the kernel builds each EAGLE input row [embed[id] ; *feature] from
    addresses (rows in any order, one row twice); bit-identical to passing torch.cat's rows."""
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.executor import InProcessExecutor

    executor = InProcessExecutor(default_dir, "bfloat16")
    drafter = load_drafter(EngineConfig(dtype="bfloat16", drafter="eagle", draft_min_prob=0.0, draft_vocab_size=0), default_dir, executor)
    fm, embed = drafter.fused, drafter.embed_weight
    torch.manual_seed(0)
    feats = torch.randn(5, fm.hidden).to(torch.bfloat16)
    ids, rows = [17, 4031, 9, 17, 255], [3, 0, 4, 4, 1]
    table = torch.zeros(1, 1, dtype=torch.int32)
    pos = [0, 1, 2, 3, 4]
    results = []
    for how in ("cat", "addresses"):
        kv = torch.zeros(2, 1, 1, 64, fm.model.kv_heads, fm.model.head_dim, dtype=torch.bfloat16)
        if how == "cat":
            inputs = torch.cat([embed[ids], feats[rows]], dim=-1)
            results.append(fm.run(kv, pos, pos, [0, 5], [0], table, [0, 4], inputs=inputs))
        else:
            addresses = [feats.data_ptr() + r * feats.stride(0) * feats.element_size() for r in rows]
            results.append(fm.run(kv, pos, pos, [0, 5], [0], table, [0, 4], ids=ids, feats=addresses))
    (h0, l0), (h1, l1) = results
    assert torch.equal(h0, h1) and torch.equal(l0, l1)
    with pytest.raises(ValueError, match="one address per row"):
        fm.run(kv, pos, pos, [0, 5], [0], table, [0], ids=ids, feats=addresses[:4])


@pytest.mark.parametrize("int8", [False, True])
def test_fused_medusa_heads_match_torch(default_dir, chat_prompts, int8):
    """The fused Medusa heads (blocks and draft head in one C call, several requests at
    once) give the torch heads' logits and the same per-step trees; with int8 weights (the
    CPU default where AMX-INT8 or AVX512-VNNI is) nearly the same."""
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.executor import InProcessExecutor

    if int8 and not int8_available():
        pytest.skip("int8 drafter weights need AMX-INT8 tiles, AVX512-VNNI or the AVX2 build")
    executor = InProcessExecutor(default_dir, "bfloat16")
    cfg = EngineConfig(dtype="bfloat16", drafter="medusa", tree_budget=5, draft_int8=int8, draft_min_prob=0.0, draft_vocab_size=0)
    fused, eager = load_drafter(cfg, default_dir, executor), load_drafter(cfg, default_dir, executor)
    assert fused.fused is not None and fused.fused.int8 == int8
    eager.fused = None
    r = executor.runner
    r.allocate_kv(8, 16)
    ids = chat_prompts[0][:16]
    hidden = run(r, [SeqInput(ids, list(range(len(ids))), [0], 0)]).hidden
    x = hidden[-3:]  # three requests' features in one call
    feats, logits = fused.fused.run(x)
    k_heads = fused.model.cfg.num_heads
    with torch.inference_mode():  # x is an inference tensor; the heads' weights require grad
        ref = eager.head.logits(eager.model(x).transpose(0, 1).reshape(-1, x.shape[1])).float()  # [B * K, Vd]
    assert logits.shape == ref.shape == (3 * k_heads, fused.head.weight.shape[0])
    err = (logits - ref).abs().max().item()
    assert err <= (0.06 if int8 else 0.03) * ref.abs().max().item()
    # Where the top token differs it is a near-tie of the reference's, within twice the error
    # (what any |logits - ref| <= err allows); int8 flips more of the deep heads' near-ties
    # (2 of these 12 rows on an AMD EPYC with AVX512-VNNI, no AMX).
    picked = ref.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert (picked >= ref.max(-1).values - 2 * err).all()
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= (0.75 if int8 else 0.9)
    shared = 0
    for i in range(8):  # per-step trees from the features of the prompt's last 8 tokens
        for d in (fused, eager):
            d.on_prefill("a", ids, hidden[: len(ids) - i], 0)
        t1, t2 = fused.propose(["a"], [5])[0], eager.propose(["a"], [5])[0]
        shared += len(set(zip(t1.tokens, t1.parents)) & set(zip(t2.tokens, t2.parents)))
    assert shared >= 0.8 * 8 * 5


def test_argmax_rows_matches_torch():
    """The kernel's row argmax is torch.argmax: first maximum on ties, -inf rows, odd widths."""
    g = torch.Generator().manual_seed(3)
    for rows, n in [(1, 49152), (13, 49152), (5, 37), (3, 16)]:
        x = torch.randn(rows, n, generator=g)
        x[0, n // 3] = x[0, n // 2] = x[0, -1] = 9.0  # ties: the first wins
        if rows > 2:
            x[1] = float("-inf")
            x[2, :] = 0.0
        assert argmax_rows(x) == x.argmax(-1).tolist()
    half = torch.randn(4, 64).to(torch.bfloat16)  # not fp32: torch's own
    assert argmax_rows(half) == half.argmax(-1).tolist()


def test_topk_logprobs_matches_torch():
    """The kernel's top-k log-probabilities equal torch's topk of log_softmax (values to
    fp32 rounding, the same indices; ties are broken by the lower index)."""
    g = torch.Generator().manual_seed(4)
    for rows, n, k in [(1, 8192, 10), (4, 8192, 8), (3, 49152, 1), (2, 37, 5), (5, 100, 64)]:
        x = torch.randn(rows, n, generator=g) * 3
        vals, idx = topk_logprobs(x, k)
        ref_vals, ref_idx = torch.log_softmax(x, -1).topk(k, dim=-1)
        assert torch.equal(idx, ref_idx), (rows, n, k)
        assert torch.allclose(vals, ref_vals, atol=1e-5), (vals - ref_vals).abs().max()
    x = torch.zeros(1, 40)
    x[0, [7, 3, 30]] = 2.0  # ties: lower index first
    assert topk_logprobs(x, 3)[1].tolist() == [[3, 7, 30]]


def test_int8_gemv_is_the_quantized_product_exactly():
    """The int8 GEMV of a drafter's weights computes exactly the product it documents.
    On AMX (gemv_amx_i8) and with AVX512-VNNI (gemv_vnni_i8, where there are no tiles):
    W8A8 against integer arithmetic in float64: per-row int8 weights and inputs (round half
    to even), int32 sums, then (acc * sx) * sw, bit for bit. In the
    AVX2 build (gemv_panels_i8): int8 weights times the fp32 input, then * sw, equal to
    float64 within fp32 rounding. For single and paired (gate/up) matrices, one to 33 rows
    (both A tiles; several 3-row panel passes), several thread splits, and a zero input
    row; AVX2 also with rows that end in a padded panel. Either's error against the bf16
    product stays at int8's ~1%."""
    from engine.fused import PACK_PANELS_INT8, PACK_ROWS_INT8, PACK_TILES_INT8, build_dir, pack_arenas, quantize_rows
    from treespec_kernels import cpu_fused

    if not int8_available():
        pytest.skip("int8 drafter weights need AMX-INT8 tiles, AVX512-VNNI or the AVX2 build")
    lib = cpu_fused.load(build_dir())
    avx2 = cpu_fused.isa() == "avx2"
    amx = cpu_fused.use_amx(lib)
    kind = PACK_PANELS_INT8 if avx2 else PACK_TILES_INT8 if amx else PACK_ROWS_INT8
    g = torch.Generator().manual_seed(5)
    sizes = [(96, 576, False), (3072, 576, True), (576, 1536, False), (8192, 576, False)]
    if avx2:
        sizes += [(100, 576, False), (200, 576, True)]  # 100 rows: a padded last panel (per half)
    if kind == PACK_ROWS_INT8:
        sizes += [(102, 1152, False), (206, 576, True)]  # rows past the last 4-row tile (per thread)
    for n, k, pair in sizes:
        w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
        q, sw = quantize_rows(w)
        assert (q.float() * sw[:, None] - w.float()).abs().max() <= sw.max() / 2 + 1e-6
        arenas, raw, shares = pack_arenas(lib, 2, [(w, pair)], amx=amx, int8=[True], panels=avx2)
        try:
            assert (shares[:, 5] == kind).all()
            for m in (1, 5, 7, 17, 33):
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                if m > 1:
                    x[m // 2] = 0.0  # a zero row: scale 0, outputs 0
                y = torch.full((m, n), float("nan"))
                assert lib.fused_gemv(shares.data_ptr(), 2, k, x.data_ptr(), m, y.data_ptr(), n) == 0
                if avx2:
                    ref = (x.double() @ q.double().T) * sw.double()[None, :]
                    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (n, k, m)
                    if m > 1:
                        assert (y[m // 2] == 0).all()
                else:
                    amax = x.float().abs().amax(1)
                    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
                    xq = (x.float() * inv[:, None]).round()
                    acc = (xq.double() @ q.double().T).to(torch.int32).float()
                    assert torch.equal(y, (acc * (amax / 127)[:, None]) * sw[None, :]), (n, k, m)
                exact = x.float() @ w.float().T
                assert (y - exact).norm() / exact.norm() < 0.02
        finally:
            for addr in raw:
                lib.fused_free(addr)


def test_kv_compaction_by_the_kernel_equals_torch(default_dir):
    """The runner's C row copy (fused targets) moves the same slots as treespec_kernels.compaction.copy_slots,
    reads before writes: a chain of overlapping moves, as compaction makes, and a swap."""
    from treespec_kernels.compaction import copy_slots

    r = ModelRunner(default_dir, "bfloat16")
    assert r.fused is not None
    r.allocate_kv(8, 16)
    g = torch.Generator().manual_seed(5)
    r.kv_cache.copy_(torch.randn(r.kv_cache.shape, generator=g).to(torch.bfloat16))
    for src, dst in [([17, 19, 22, 23], [16, 17, 18, 19]), ([3, 40], [40, 3]), ([100], [5])]:
        expected = r.kv_cache.clone()
        copy_slots(expected, torch.tensor(src), torch.tensor(dst))
        r.move_kv(torch.tensor(src), torch.tensor(dst))
        assert torch.equal(r.kv_cache, expected), (src, dst)
