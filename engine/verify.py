"""Verification of a draft token tree against the target's logits.

A tree here is the root (the sequence's pending token, local index 0) plus draft
nodes 1..n; ``parents[i]`` is the local index of node i's parent (-1 for the root).
The target forward returned logits for every local index: row i is the target's
distribution for the token *after* node i.

Temperature 0: follow the target's argmax down the tree.
Temperature > 0: recursive rejection sampling. At the current node, children
are tried in order. A child x drafted from distribution q is accepted with
probability min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)). A child
chosen deterministically (EAGLE/Medusa top-k) is a draft from the point mass at
x, so it is accepted with probability p(x) and rejection zeroes p(x) and
renormalises. If every child is rejected, the next token is sampled from what is
left of p; if the accepted node is a leaf, from its full p (the bonus token).
The output distribution is exactly the target's.
"""
from __future__ import annotations

import torch

from engine.ops import argmax_rows
from engine.sampling import SamplingParams, target_probs


def children_of(parents: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def verify_greedy(tokens: list[int], parents: list[int], logits: torch.Tensor,
                  best: list[int] | None = None) -> tuple[list[int], int]:
    """tokens/parents: [T] (root first); logits: [T, V]; best: their row-wise argmax if the
    forward already computed it.

    Returns (accepted local indices from the root, root included; bonus token).
    """
    kids = children_of(parents)
    if best is None:
        best = argmax_rows(logits)
    path, node = [0], 0
    while True:
        nxt = next((c for c in kids[node] if tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        path.append(nxt)
        node = nxt


def verify_sampling(
    tokens: list[int],
    parents: list[int],
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    draft_probs: list[torch.Tensor | None] | None = None,
) -> tuple[list[int], int]:
    """Lossless rejection sampling over the tree.

    draft_probs[i]: the distribution [V] node i was sampled from, or None when the
    node was chosen deterministically (a point mass). Returns (path, next token).
    """
    kids = children_of(parents)
    probs = target_probs(logits, params)  # [T, V]
    path, node = [0], 0
    while True:
        p = probs[node].clone()
        accepted = None
        for c in kids[node]:
            x = tokens[c]
            q = None if draft_probs is None else draft_probs[c]
            u = torch.rand((), generator=generator).item()
            if q is None:
                if u < p[x].item():
                    accepted = c
                    break
                p[x] = 0.0
            else:
                if q[x] > 0 and u < min(1.0, (p[x] / q[x]).item()):
                    accepted = c
                    break
                p = torch.clamp(p - q, min=0.0)
            total = p.sum()
            if total <= 0:  # numerically nothing left; fall back to the target itself
                p = probs[node].clone()
            else:
                p = p / total
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        node = accepted
