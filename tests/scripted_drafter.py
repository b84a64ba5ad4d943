"""A drafter for tests that knows the right answer and hides it among decoys.

It proposes, below the pending token, a path that follows a reference
continuation (plain greedy output) for a random number of steps, sometimes
breaking it with a wrong token, with random decoy siblings at every depth and
the true child at a random sibling position. Speculation must then accept long
paths, reject mid-tree, and compact KV from scattered scratch slots, which
random drafters (acceptance near zero) never exercise.
"""
from __future__ import annotations

import random

from engine.drafters.base import Drafter, DraftTree


class ScriptedDrafter(Drafter):
    kind = "eagle"

    def __init__(self, references: dict[tuple, list[int]], vocab: int, seed: int = 0, max_depth: int = 6,
                 siblings: int = 3):
        self.references = references  # prompt tuple -> prompt + greedy continuation
        self.vocab, self.max_depth, self.siblings = vocab, max_depth, siblings
        self.rng = random.Random(seed)
        self.seqs: dict[str, list[int]] = {}
        self.refs: dict[str, list[int]] = {}

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.seqs[request_id] = list(token_ids) + [next_token]
        self.refs[request_id] = next((r for p, r in self.references.items() if list(p) == token_ids[: len(p)]), [])

    def on_verified(self, request_id, accepted, hidden, next_token):
        self.seqs[request_id] += list(accepted[1:]) + [next_token]

    def release(self, request_id):
        self.seqs.pop(request_id, None)

    def propose(self, request_ids, budgets):
        return [self._tree(r, b) for r, b in zip(request_ids, budgets)]

    def _tree(self, rid, budget) -> DraftTree:
        seq, ref = self.seqs.get(rid), self.refs.get(rid, [])
        if seq is None:
            return DraftTree([], [])
        truth = ref[len(seq): len(seq) + self.rng.randint(0, self.max_depth)]
        if truth and self.rng.random() < 0.3:  # break the chain somewhere
            i = self.rng.randrange(len(truth))
            truth[i] = (truth[i] + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
        tokens, parents, parent = [], [], -1
        for t in truth:
            kids = [t] + [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, self.siblings))]
            kids = [k for i, k in enumerate(kids) if i == 0 or k != t]
            self.rng.shuffle(kids)
            if len(tokens) + len(kids) > budget:
                break
            for k in kids:
                tokens.append(k)
                parents.append(parent)
                if k == t:
                    true_index = len(tokens) - 1
            parent = true_index
        return DraftTree(tokens, parents)
