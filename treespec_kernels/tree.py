"""Draft-tree metadata from parent indices (pure torch; the engine's and the kernels' input).

A draft tree of ``T`` nodes is given by ``parents`` (``[T]`` ints): ``parents[i]`` is
the index of node ``i``'s parent, ``-1`` for a root. Nodes are in topological order
(``parents[i] < i``), so node 0 is a root and every path from a root visits
increasing indices. One root is the usual case (the last committed token's
successor, or the token the target just produced); several roots (a forest) work too.

The new tokens of a sequence are the tree's nodes in index order: node ``i``'s K/V
goes to position ``context_len + i`` of the paged cache, its rotary position is
``context_len + depth[i]``, and it attends to the prefix plus its ancestors and
itself (``ancestor_mask``).
"""
from __future__ import annotations

from typing import Sequence

import torch

Parents = Sequence[int] | torch.Tensor


def _parent_list(parents: Parents) -> list[int]:
    """parents as a list of ints, validated (topological order, -1 for roots)."""
    p = parents.flatten().tolist() if isinstance(parents, torch.Tensor) else [int(x) for x in parents]
    if not p:
        raise ValueError("a tree needs at least one node")
    if not all(-1 <= x < i for i, x in enumerate(p)):
        raise ValueError(f"parents must satisfy -1 <= parents[i] < i (topological order), got {p}")
    return p


def _as_parents(parents: Parents) -> torch.Tensor:
    """parents as a CPU int64 tensor [T], validated (topological order, -1 for roots)."""
    return torch.tensor(_parent_list(parents), dtype=torch.long)


SMALL_TREE = 64  # up to this many nodes, plain Python beats a chain of tiny torch ops


def ancestor_mask(parents: Parents) -> torch.Tensor:
    """Dense ancestor mask: ``mask[i, j]`` is True iff node j is node i or one of its ancestors.

    parents: [T]. Returns bool [T, T] (lower triangular, diagonal set).
    """
    pl = _parent_list(parents)
    t = len(pl)
    if t <= SMALL_TREE:
        return torch.tensor(_ancestor_rows(pl, t), dtype=torch.bool)
    p = torch.tensor(pl, dtype=torch.long)
    idx = torch.arange(t)
    # Pointer jumping: after k rounds, mask[i] holds the ancestors at distance < 2**k
    # and jump[i] is the 2**k-th ancestor (a root points at itself, so it saturates).
    # log2(T) vectorised rounds instead of one Python step per node or per depth.
    jump = torch.where(p < 0, idx, p)
    mask = torch.eye(t, dtype=torch.bool)
    reach = 1
    while reach < t:
        mask = mask | mask[jump]
        jump = jump[jump]
        reach *= 2
    return mask


def batch_ancestor_mask(parent_rows: torch.Tensor, local: torch.Tensor, width: int) -> torch.Tensor:
    """The ancestor masks of a batch of trees, built on the tensors' device with no host sync.

    The batch's rows are the trees' nodes concatenated. parent_rows: int64 [N], the row of
    each row's parent (a root: its own row); local: int64 [N], each row's node index in its
    tree; width: at least the largest tree. Returns bool [N, width]: row r is True at the
    local index of r and of each of its ancestors (``batch_tree_mask``'s layout). log2(width)
    rounds of pointer jumping (see ``ancestor_mask``).
    """
    mask = local[:, None] == torch.arange(width, device=local.device)
    jump, reach = parent_rows, 1
    while reach < width:
        mask = mask | mask[jump]
        jump = jump[jump]
        reach *= 2
    return mask


def _ancestor_rows(pl: list[int], width: int) -> list[list[bool]]:
    """The ancestor mask as lists, in plain Python (each row is its parent's row plus itself),
    rows padded with False to ``width`` columns; for an already validated parent list."""
    rows: list[list[bool]] = []
    for i, parent in enumerate(pl):
        row = list(rows[parent]) if parent >= 0 else [False] * width
        row[i] = True
        rows.append(row)
    return rows


def tree_depth(parents: Parents) -> torch.Tensor:
    """Depth of each node (roots 0): the position offset of node i is ``depth[i]``.

    parents: [T]. Returns int64 [T].
    """
    pl = _parent_list(parents)
    if len(pl) <= SMALL_TREE:
        return torch.tensor(_depths(pl), dtype=torch.long)
    return ancestor_mask(pl).sum(dim=1) - 1


def tree_depth_list(parents: Parents) -> list[int]:
    """tree_depth as a list, in plain Python (what the engine needs per step for a few nodes)."""
    return _depths(_parent_list(parents))


def _depths(pl: list[int]) -> list[int]:
    """tree_depth_list of an already validated parent list."""
    depth: list[int] = []
    for parent in pl:  # topological order: a parent's depth is known first
        depth.append(depth[parent] + 1 if parent >= 0 else 0)
    return depth


def tree_paths(parents: Parents) -> list[list[int]]:
    """Root-to-leaf paths (node indices, root first), one per leaf, leaves in index order."""
    p = _as_parents(parents)
    mask = ancestor_mask(p)
    is_leaf = torch.ones(p.numel(), dtype=torch.bool)
    is_leaf[p[p >= 0]] = False
    # The ancestors of a leaf have increasing indices along the path (topological order).
    return [mask[leaf].nonzero().flatten().tolist() for leaf in is_leaf.nonzero().flatten().tolist()]


def tree_paths_tensor(parents: Parents) -> torch.Tensor:
    """Root-to-leaf paths padded with -1: int64 [n_leaves, max_depth + 1]."""
    paths = tree_paths(parents)
    out = torch.full((len(paths), max(len(path) for path in paths)), -1, dtype=torch.long)
    for row, path in enumerate(paths):
        out[row, : len(path)] = torch.tensor(path)
    return out


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask along its last dim: bit ``j % 32`` of word ``j // 32`` is column j.

    mask: bool [..., T]. Returns int32 [..., ceil(T / 32)] on mask's device (any
    device; no host sync), the format of ``triton_attention.paged_attention_packed``.
    """
    t = mask.shape[-1]
    n_words = max(1, (t + 31) // 32)
    bits = torch.zeros(*mask.shape[:-1], n_words * 32, dtype=torch.int64, device=mask.device)
    bits[..., :t] = mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(32, device=mask.device)
    words = (bits.view(*mask.shape[:-1], n_words, 32) * weights).sum(dim=-1)
    # Bit 31 is int32's sign bit: wrap into the signed range before the cast.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_mask(words: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: int32 [..., W] -> bool [..., t]."""
    shifts = torch.arange(32, device=words.device)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :t].bool()


def batch_tree_mask(parents_list: Sequence[Parents], device: torch.device | str | None = None) -> torch.Tensor:
    """The ``tree_mask`` argument of ``paged_attention`` for a batch of trees.

    parents_list: B parent arrays (T_b nodes each; the batch's queries are their
    nodes concatenated in order). Returns bool [N, max_T], N = sum(T_b): row
    ``start_b + i`` holds node i's ancestor mask in columns ``0 .. T_b - 1``.
    """
    masks = [ancestor_mask(p) for p in parents_list]
    max_t = max(m.shape[0] for m in masks)
    out = torch.zeros(sum(m.shape[0] for m in masks), max_t, dtype=torch.bool)
    start = 0
    for m in masks:
        out[start : start + m.shape[0], : m.shape[0]] = m
        start += m.shape[0]
    return out.to(device) if device is not None else out


def batch_tree_positions(
    parents_list: Sequence[Parents], context_lens: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Rotary position of every query of the batch: ``context_lens[b] + depth``. int64 [N]."""
    if isinstance(context_lens, torch.Tensor):
        context_lens = context_lens.tolist()
    return torch.cat([tree_depth(p) + c for p, c in zip(parents_list, context_lens, strict=True)])
