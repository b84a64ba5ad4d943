"""Draft tree shapes: static trees (Medusa "choices") and EAGLE-2 dynamic selection.

A static tree is a list of *paths*; path ``[i0, i1, ..., id]`` is the node reached
by taking the i0-th candidate at depth 1, then the i1-th at depth 2, and so on
(the Medusa choices format). Lists here are kept in priority order and closed
under prefixes, so the first ``n`` paths always form a valid tree of n nodes.
"""
from __future__ import annotations

import heapq

# Rough top-k accuracy of a well-trained head by rank; depth d is discounted by DEPTH_DECAY**d.
DEFAULT_RANK_ACC = [0.55, 0.14, 0.07, 0.045, 0.03, 0.022, 0.017, 0.013, 0.01, 0.008]
DEPTH_DECAY = 0.8


# The 63-node tree Medusa's authors use for their Vicuna-7B heads (depth <= 4), copied from
# FasterDecoding/Medusa, medusa/model/medusa_choices.py ``mc_sim_7b_63``: the default fixed
# tree of published Medusa-1 heads (engine/drafters/published.py), its first tree_budget paths.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1],
    [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0],
    [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6],
    [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
    [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1],
    [1, 6], [0, 7, 0],
]


def chain(n: int) -> list[list[int]]:
    """A chain of n nodes: the top-1 candidate at every depth."""
    return [[0] * d for d in range(1, n + 1)]


def best_tree(rank_acc: list[list[float]], budget: int) -> list[list[int]]:
    """The static tree of ``budget`` nodes with the largest expected accepted length.

    rank_acc[d][r]: probability that depth-(d+1) candidate of rank r is the right
    token (measured per head after training, or the default prior). A node's
    expected contribution is the product along its path; best-first expansion
    from the root picks the top ``budget`` nodes, closed under prefixes.
    """
    out: list[list[int]] = []
    heap = [(-rank_acc[0][r], (r,)) for r in range(len(rank_acc[0]))]
    heapq.heapify(heap)
    while heap and len(out) < budget:
        neg, path = heapq.heappop(heap)
        out.append(list(path))
        d = len(path)
        if d < len(rank_acc):
            for r, a in enumerate(rank_acc[d]):
                heapq.heappush(heap, (neg * a, path + (r,)))
    return out


def default_medusa_tree(num_heads: int, budget: int) -> list[list[int]]:
    prior = [[a * DEPTH_DECAY**d for a in DEFAULT_RANK_ACC] for d in range(num_heads)]
    return best_tree(prior, budget)


def tree_from_choices(choices: list[list[int]], candidates: list[list[int]]) -> tuple[list[int], list[int]]:
    """Materialise a static tree for one sequence.

    choices: paths (priority order, prefix-closed); candidates[d]: the ranked token
    ids proposed for depth d+1. Returns (tokens, parents) in topological order,
    parents indexing into the returned nodes, -1 for children of the root.
    """
    order = sorted(range(len(choices)), key=lambda i: (len(choices[i]), choices[i]))
    index = {}
    tokens, parents = [], []
    for i in order:
        path = tuple(choices[i])
        if len(path) > len(candidates) or path[-1] >= len(candidates[len(path) - 1]):
            continue
        parent = index.get(path[:-1], -1) if len(path) > 1 else -1
        if len(path) > 1 and path[:-1] not in index:
            continue  # its parent was dropped
        index[path] = len(tokens)
        tokens.append(candidates[len(path) - 1][path[-1]])
        parents.append(parent)
    return tokens, parents


def select_dynamic(scores: list[float], parents: list[int], depths: list[int], budget: int) -> list[int]:
    """EAGLE-2 reranking: keep the ``budget`` drafted nodes with the best cumulative
    log-probability, never a node without its parent.

    All inputs are per drafted node (parents index the same lists, -1 = root).
    Returns the kept node indices in topological order (by depth, then index).
    A child never scores above its parent (log-probs are <= 0), so a single pass
    in score order, shallow first on ties, only rarely has to skip a node.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], depths[i], i))
    kept: set[int] = set()
    for i in order:
        if len(kept) == budget:
            break
        if parents[i] == -1 or parents[i] in kept:
            kept.add(i)
    return sorted(kept, key=lambda i: (depths[i], i))
