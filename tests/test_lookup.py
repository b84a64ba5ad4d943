"""Prompt lookup (engine/lookup.py): the n-gram index against a plain scan, merging chains into
trees, and the engine with lookup chains: still plain greedy, token for token, and faster per step."""
from __future__ import annotations

import random

import pytest

from engine.drafters.base import Drafter, DraftTree
from engine.lookup import MAX_NGRAM, MIN_NGRAM, NgramIndex, merge_chain
from engine.sampling import SamplingParams


def scan_continuation(tokens: list[int], k: int) -> list[int]:
    """The oracle: for the longest suffix n-gram, scan backwards for its latest earlier occurrence."""
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        if len(tokens) <= n:
            continue
        pat = tokens[-n:]
        for s in range(len(tokens) - n - 1, -1, -1):
            if tokens[s : s + n] == pat:
                return tokens[s + n : s + n + k]
    return []


@pytest.mark.parametrize("vocab", [3, 8, 50])
def test_index_equals_a_backward_scan_as_the_sequence_grows(vocab):
    rng = random.Random(vocab)
    tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
    index = NgramIndex()
    for _ in range(300):
        assert index.continuation(tokens, 6) == scan_continuation(tokens, 6), tokens
        tokens += [rng.randrange(vocab) for _ in range(rng.randrange(1, 5))]  # a step commits 1-4 tokens


def walk(tree: DraftTree, chain: list[int]) -> int:
    """How many chain tokens the tree holds as a path below the root."""
    node, depth = -1, 0
    for t in chain:
        node = next((i for i, (p, x) in enumerate(zip(tree.parents, tree.tokens)) if p == node and x == t), None)
        if node is None:
            break
        depth += 1
    return depth


def test_merge_shares_nodes_and_respects_the_limit():
    tree = DraftTree([5, 6, 7, 8], [-1, -1, 0, 2], [None, None, None, None])  # 5 -> 7 -> 8, and 6
    merged = merge_chain(tree, [5, 7, 9, 10], limit=6)
    assert merged.tokens[:4] == tree.tokens and merged.parents[:4] == tree.parents  # the drafter's nodes stay
    assert merged.tokens[4:] == [9, 10] and merged.parents[4:] == [2, 4]  # below the shared 5 -> 7
    assert merged.draft_probs == [None] * 6 and walk(merged, [5, 7, 9, 10]) == 4
    assert all(p < i for i, p in enumerate(merged.parents))  # topological
    assert len(merge_chain(tree, [1, 2, 3, 4], limit=2)) == 6  # two new nodes at most
    assert merge_chain(tree, [5, 7, 8], limit=6) is tree  # nothing new: unchanged
    assert merge_chain(None, [], limit=6) is None
    alone = merge_chain(None, [3, 4], limit=6)
    assert alone.tokens == [3, 4] and alone.parents == [-1, 0] and alone.draft_probs is None


class Silent(Drafter):
    """Proposes nothing: every accepted draft token comes from the lookup chain."""

    kind = "eagle"

    def propose(self, request_ids, budgets):
        return [DraftTree([], []) for _ in request_ids]


COPY = ("Repeat the following list exactly, twice: apples, pears, plums, cherries, "
        "apricots, peaches, figs, dates, grapes, lemons.")


@pytest.mark.parametrize("batch", [1, 3])
def test_lookup_chains_are_lossless_and_accepted(make_engine, tokenizer, chat_prompts, batch):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": COPY}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)] + chat_prompts[:batch - 1]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    plain = make_engine(max_num_seqs=batch).generate(prompts, params)
    engine = make_engine(Silent(), max_num_seqs=batch, tree_budget=1, drafter="eagle", lookup_tokens=6)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    tau = outs[0].seq.stats.committed / outs[0].seq.stats.verify_steps
    assert tau > 1.5, tau  # the copied list came from the lookup chain, several tokens a step
    assert engine.kv_blocks_used == 0
    off = make_engine(Silent(), tree_budget=1, drafter="eagle", lookup_tokens=0).generate(prompts[:1], params)[0]
    assert off.seq.stats.committed == off.seq.stats.verify_steps  # without lookup: nothing to accept
