"""Prompt lookup: a free extra branch for every draft tree.

Chat answers copy their prompt (extraction, rewriting, code edits) and repeat
themselves (lists, templates, a small model's loops). So after the sequence's
last few tokens, whatever followed their latest earlier occurrence is a good
guess for what comes next (prompt lookup decoding; vLLM's and SGLang's n-gram
speculation). It costs no drafter forward: the engine merges that continuation
into the drafter's tree as one more chain below the root, sharing the nodes the
drafter already proposed, and verification stays exactly as lossless as before
(the chain's nodes are deterministic picks, point masses to the verifier).

It raises tau most on prompts whose answers copy their input (extraction, rewriting);
what it adds per drafter and tree size is measured by ``bench/speculative.py
--lookup-off-too`` (docs/benchmarks.md).
"""
from __future__ import annotations

from engine.drafters.base import DraftTree

# Longest suffix first: a 4-token match predicts better than a 2-token one; one
# token alone matches too often to be worth a row.
MAX_NGRAM, MIN_NGRAM = 4, 2


class NgramIndex:
    """Where each n-gram (MIN_NGRAM..MAX_NGRAM tokens) of a sequence last ended.

    Grows with the sequence: ``continuation`` indexes the tokens added since the
    last call, so a step costs O(new tokens), and a long prompt is indexed once.
    """

    def __init__(self):
        self.after: dict[tuple, int] = {}  # n-gram -> index of the token that followed it
        self.indexed = 0  # n-grams ending before this index are in ``after``

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest
        suffix n-gram of ``tokens`` (the whole sequence, pending token last); [] if none."""
        end = len(tokens) - 1  # the suffix itself ends here: index only n-grams ending before it
        for j in range(max(self.indexed, MIN_NGRAM - 1), end):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if j + 1 >= n:
                    self.after[tuple(tokens[j + 1 - n : j + 1])] = j + 1
        self.indexed = max(self.indexed, end)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) > n:
                at = self.after.get(tuple(tokens[-n:]))
                if at is not None:
                    return tokens[at : at + k]
        return []


def merge_chain(tree: DraftTree | None, chain: list[int], limit: int) -> DraftTree | None:
    """The tree plus ``chain`` as a path below the root, reusing nodes that already
    draft the same tokens; at most ``limit`` new nodes. Returns the tree unchanged
    (possibly None) when nothing is added."""
    tokens = list(tree.tokens) if tree is not None else []
    parents = list(tree.parents) if tree is not None else []
    child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
    node, added = -1, 0
    for t in chain:
        nxt = child.get((node, t))
        if nxt is None:
            if added == limit:
                break
            nxt = len(tokens)
            tokens.append(t)
            parents.append(node)
            child[(node, t)] = nxt
            added += 1
        node = nxt
    if added == 0:
        return tree
    probs = None
    if tree is not None and tree.draft_probs is not None:
        probs = list(tree.draft_probs) + [None] * added  # point masses to the verifier
    return DraftTree(tokens, parents, probs)
