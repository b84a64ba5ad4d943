"""Tree verification written node by node, on one tree, as the oracle for engine/verify.py.

The same algorithm as the engine's batched walk (see its docstring), in the plainest form:
a Python loop over the children of the current node. It takes the same uniforms as the
engine (one per node's acceptance test, one for the final draw: ``uniforms[T]``) so both
must pick the same path and the same next token; the chi-square tests in
tests/test_speculative_sampling.py check that either is exactly the target's distribution.
"""
from __future__ import annotations

import torch

from engine.sampling import SamplingParams, inverse_cdf, target_probs


def children_of(parents: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def verify_greedy(tokens: list[int], parents: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
    """tokens/parents: [T] (root first); logits: [T, V]. Returns (path, next token)."""
    kids, best = children_of(parents), logits.argmax(-1).tolist()
    path, node = [0], 0
    while True:
        nxt = next((c for c in kids[node] if tokens[c] == best[node]), None)
        if nxt is None:
            return path, best[node]
        path.append(nxt)
        node = nxt


def verify_sampling(tokens: list[int], parents: list[int], logits: torch.Tensor, params: SamplingParams,
                    uniforms: torch.Tensor, draft_probs: list[torch.Tensor | None] | None = None
                    ) -> tuple[list[int], int]:
    """uniforms: [T + 1]; draft_probs[i]: the distribution node i was sampled from, or None
    (a point mass). Returns (path, next token)."""
    kids = children_of(parents)
    probs = target_probs(logits, params)
    path, node = [0], 0
    while True:
        p = probs[node].clone()
        accepted = None
        for c in kids[node]:
            x, u = tokens[c], uniforms[c].item()
            q = None if draft_probs is None else draft_probs[c]
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
            p = probs[node].clone() if total <= 0 else p / total  # nothing left: the target itself
        if accepted is None:
            return path, int(inverse_cdf(p[None], uniforms[len(tokens):len(tokens) + 1])[0])
        path.append(accepted)
        node = accepted
