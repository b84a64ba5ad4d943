"""Speculative decoding at temperature 0 equals plain greedy decoding, token for token (fp32)."""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.drafters.loading import load_drafter
from engine.sampling import SamplingParams
from treespec_kernels.reference import gather_kv
from scripted_drafter import ScriptedDrafter

MAX_TOKENS = 128
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def references(executor, tokenizer, chat_prompts):
    """Plain greedy continuations of 8 prompts (batched plain decoding == alone, see test_decoding)."""
    from engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(num_blocks=256, max_num_seqs=8, dtype="float32"), executor, None, tokenizer)
    outs = engine.generate(chat_prompts, GREEDY)
    return {tuple(p): p + o.token_ids for p, o in zip(chat_prompts, outs)}


def run(make_engine, drafter, prompts, batch, budget):
    engine = make_engine(drafter, max_num_seqs=batch, tree_budget=budget, drafter=drafter.kind)
    outs = engine.generate(prompts, GREEDY)
    assert engine.kv_blocks_used == 0
    return engine, outs


@pytest.mark.parametrize("batch", [1, 4])
def test_scripted_trees_equal_greedy(make_engine, references, chat_prompts, batch):
    """Long accepted paths, mid-tree rejections, decoys: output is still plain greedy."""
    drafter = ScriptedDrafter(references, vocab=49152, seed=batch)
    engine, outs = run(make_engine, drafter, chat_prompts, batch, budget=24)
    for p, o in zip(chat_prompts, outs):
        assert p + o.token_ids == references[tuple(p)]
    tau = sum(o.seq.stats.committed for o in outs) / sum(o.seq.stats.verify_steps for o in outs)
    assert tau > 2.0  # the paths really were accepted, several tokens per step


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
@pytest.mark.parametrize("batch", [1, 4])
def test_real_drafters_equal_greedy(make_engine, executor, default_dir, references, chat_prompts, kind, batch):
    """The shipped EAGLE (dynamic tree) and Medusa (per-step tree) drafters, on the fp32
    target they were not trained for: some drafts accepted, some rejected, output lossless."""
    # Small trees and the CPU server's 4096-row draft head keep the drafters cheap on the
    # torch path (a full fp32 head streams 113 MB a depth); the scripted test covers large trees.
    cfg = EngineConfig(drafter=kind, tree_budget=4, draft_depth=2, draft_top_k=2, draft_vocab_size=4096, dtype="float32", draft_min_prob=0.0)
    drafter = load_drafter(cfg, default_dir, executor)
    prompts = chat_prompts if batch > 1 else chat_prompts[:4]  # batch 1: 4x the steps a token
    engine, outs = run(make_engine, drafter, prompts, batch, budget=4)
    for p, o in zip(prompts, outs):
        assert p + o.token_ids == references[tuple(p)]
        assert o.seq.stats.drafted > 0  # trees really were verified
    accepted = sum(o.seq.stats.committed - o.seq.stats.verify_steps for o in outs)
    rejected = sum(o.seq.stats.drafted for o in outs) - accepted
    assert accepted > 0 and rejected > 0  # both paths of verification ran


def test_mixed_speculating_and_plain_sequences(make_engine, references, chat_prompts):
    """Sequences that speculate and sequences that do not share the same steps."""
    engine = make_engine(ScriptedDrafter(references, vocab=49152, seed=3), max_num_seqs=4, tree_budget=16,
                         drafter="eagle")
    ids = [engine.add_request(p, GREEDY, speculation="off" if i % 2 else None) for i, p in enumerate(chat_prompts[:4])]
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    for i, (rid, p) in enumerate(zip(ids, chat_prompts)):
        assert p + done[rid].token_ids == references[tuple(p)]
        assert (done[rid].seq.stats.drafted == 0) == bool(i % 2)


def test_kv_cache_equals_plain_decoding(make_engine, references, chat_prompts):
    """After many speculative steps with rejections, the cache holds exactly the plain-decoding KV."""
    prompt = chat_prompts[1]
    spec = make_engine(ScriptedDrafter(references, vocab=49152, seed=5), tree_budget=24, drafter="eagle")
    plain = make_engine()
    rid_s = spec.add_request(prompt, GREEDY)
    rid_p = plain.add_request(prompt, GREEDY)
    seq_s = spec._requests[rid_s]
    seq_p = plain._requests[rid_p]
    for _ in range(15):
        spec.step()
    while seq_p.num_output < seq_s.num_output:
        plain.step()
    assert seq_s.tokens == seq_p.tokens and seq_s.num_cached == seq_p.num_cached
    n = seq_s.num_cached
    for ls, lp in zip(spec.executor.runner.model.layers, plain.executor.runner.model.layers):
        for name in ("k_cache", "v_cache"):
            a = gather_kv(getattr(ls.self_attn, name), torch.tensor(seq_s.block_table), n)
            b = gather_kv(getattr(lp.self_attn, name), torch.tensor(seq_p.block_table), n)
            assert torch.allclose(a, b, atol=1e-4)
    for e in (spec, plain):
        while e.has_unfinished():
            e.step()
        assert e.kv_blocks_used == 0


def test_drafter_failure_falls_back_to_plain(make_engine, references, chat_prompts):
    class Broken(ScriptedDrafter):
        def propose(self, request_ids, budgets):
            raise RuntimeError("drafter crashed")

    engine = make_engine(Broken(references, vocab=49152), tree_budget=8, drafter="eagle")
    out = engine.generate([chat_prompts[0]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert chat_prompts[0] + out.token_ids == references[tuple(chat_prompts[0])][: len(chat_prompts[0]) + 20]
    assert not engine.drafter_healthy and engine.kv_blocks_used == 0


def test_eagle_cost_aware_stop_drafts_fewer_depths(make_engine, executor, default_dir, references, chat_prompts):
    """draft_min_prob stops the EAGLE-2 search early: fewer drafter forwards, output still plain greedy."""
    forwards = {}
    for min_prob in (0.0, 0.4):
        cfg = EngineConfig(drafter="eagle", tree_budget=5, draft_min_prob=min_prob, dtype="float32", draft_vocab_size=0)  # the shipped drafter
        drafter = load_drafter(cfg, default_dir, executor)
        engine, outs = run(make_engine, drafter, chat_prompts[:2], 1, budget=5)
        for p, o in zip(chat_prompts, outs):
            assert p + o.token_ids == references[tuple(p)]
        forwards[min_prob] = drafter.forwards  # catch-ups and draft depths
    assert forwards[0.4] < forwards[0.0]
    with pytest.raises(ValueError, match="draft_min_prob"):
        EngineConfig(draft_min_prob=1.0)


@pytest.mark.parametrize("fail_at", [0, 10])  # in its prefill step, or in a speculative decode step
def test_a_failing_request_ends_alone(make_engine, references, chat_prompts, fail_at):
    """A bug that hits one request (here an injected fault) finishes it with "error"; the batch's
    other requests still equal plain greedy, no KV block or drafter state leaks, and the engine serves on."""
    drafter = ScriptedDrafter(references, vocab=49152, seed=7)
    engine = make_engine(drafter, max_num_seqs=4, tree_budget=16, drafter="eagle")
    real_commit = engine._commit

    def commit(seq, tokens):
        if seq.request_id == "bad" and seq.num_output >= fail_at:
            raise RuntimeError("injected fault")
        return real_commit(seq, tokens)

    engine._commit = commit
    ids = [engine.add_request(p, GREEDY, request_id="bad" if i == 1 else None)
           for i, p in enumerate(chat_prompts[:4])]
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    bad = done.pop("bad")
    assert bad.finish_reason == "error" and "injected fault" in bad.seq.error
    assert bad.seq.num_output >= fail_at and (bad.seq.num_output == 0) == (fail_at == 0)
    for rid, p in zip(ids, chat_prompts[:4]):
        if rid != "bad":
            assert done[rid].finish_reason == "length" and p + done[rid].token_ids == references[tuple(p)]
            assert done[rid].seq.stats.verify_steps < MAX_TOKENS  # trees were accepted alongside the failure
    assert engine.kv_blocks_used == 0 and "bad" not in drafter.seqs
    out = engine.generate([chat_prompts[5]], GREEDY)[0]
    assert chat_prompts[5] + out.token_ids == references[tuple(chat_prompts[5])]


def test_eagle_search_of_a_batch_equals_one_request_at_a_time(executor, default_dir, chat_prompts):
    """The torch path drafts all requests of a step together (padded caches of different
    lengths, one drafter forward per depth); each request must get the tree, the cache and
    the output feature it gets alone, step after step, with fewer drafter forwards."""
    cfg = EngineConfig(drafter="eagle", tree_budget=8, draft_vocab_size=4096, dtype="float32", draft_min_prob=0.0)
    batched, alone = load_drafter(cfg, default_dir, executor), load_drafter(cfg, default_dir, executor)
    assert batched.fused is None  # fp32: the torch path
    g = torch.Generator().manual_seed(0)
    hidden = executor.runner.config.hidden_size
    ids = {f"r{i}": chat_prompts[i][: 20 + 15 * i] for i in range(3)}  # three cache lengths
    for rid, toks in ids.items():
        feats = torch.randn(len(toks), hidden, generator=g)
        for d in (batched, alone):
            d.on_prefill(rid, toks, feats, toks[-1])
    budgets = [8, 3, 12]
    for step, accept in enumerate([(1, 3, 2), (4, 1, 1), (2, 2, 5)]):
        before = (batched.forwards, alone.forwards)
        together = batched.propose(list(ids), budgets)
        one_by_one = [alone.propose([rid], [b])[0] for rid, b in zip(ids, budgets)]
        for t, o, b in zip(together, one_by_one, budgets):
            assert (t.tokens, t.parents) == (o.tokens, o.parents) and len(t) == b
        assert batched.forwards - before[0] < alone.forwards - before[1]
        for rid, n in zip(ids, accept):
            a, o = batched.states[rid], alone.states[rid]
            assert a.length == o.length and torch.allclose(a.k, o.k, atol=1e-5) and torch.allclose(a.last, o.last,
                                                                                                  atol=1e-5)
            toks = torch.randint(0, 4096, (n + 1,), generator=g).tolist()
            feats = torch.randn(n, hidden, generator=g)
            for d in (batched, alone):
                d.on_verified(rid, toks[:n], feats, toks[n])
    assert [len(t) for t in batched.propose(["r0", "gone"], [0, 5])] == [0, 0]  # no budget, unknown request


@pytest.mark.parametrize("kind", ["eagle", "medusa"])
def test_drafter_lives_beside_the_target_tensors(tmp_path, kind):
    """A drafter built for a target follows the device of the target's shared embedding and
    lm_head (on a GPU, the target's device). This machine has no second device, so the target
    here is a stand-in whose tensors are on the meta device: every parameter and buffer of the
    drafter, its head and its embedding must be there too, not on the CPU."""
    from conftest import random_llama_dir
    from engine.config import ModelConfig

    d = random_llama_dir(str(tmp_path / "m"), layers=1)
    cfg = ModelConfig.from_path(d)

    class MetaTarget:
        dtype = "float32"

        def embed_and_head(self):
            return (torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta"),
                    torch.empty(cfg.vocab_size, cfg.hidden_size, device="meta"))

    drafter = load_drafter(EngineConfig(model=d, drafter=kind, draft_path="random", dtype="float32",
                                        tree_budget=4, draft_vocab_size=0), d, MetaTarget())
    tensors = [*drafter.model.parameters(), *drafter.model.buffers(), *drafter.head.buffers()]
    if kind == "eagle":
        tensors.append(drafter.embed_weight)
    assert tensors and {t.device.type for t in tensors} == {"meta"}
    assert drafter.fused is None  # the fused C drafters are for CPU tensors only
