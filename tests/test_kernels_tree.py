"""Tree metadata (treespec_kernels/tree.py) against naive parent walks; no triton here."""
import os
import random
import subprocess
import sys

import pytest
import torch

from treespec_kernels.tree import (
    ancestor_mask,
    batch_ancestor_mask,
    batch_tree_mask,
    batch_tree_positions,
    pack_mask,
    tree_depth,
    tree_depth_list,
    tree_paths,
    tree_paths_tensor,
    unpack_mask,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_tree(kind: str, t: int, rng: random.Random) -> list[int]:
    """Parent indices of a tree of t nodes, topological order."""
    if kind == "chain":
        return [i - 1 for i in range(t)]
    if kind == "wide":
        return [-1] + [0] * (t - 1)
    if kind == "deep":  # mostly a chain, with some branches
        return [-1] + [i - 1 if rng.random() < 0.8 else rng.randrange(i) for i in range(1, t)]
    return [-1] + [rng.randrange(i) for i in range(1, t)]


def ancestors(parents: list[int], i: int) -> list[int]:
    """Root-to-node path of node i by walking parent links."""
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


TREES = [
    ("single", 1),
    ("chain", 2),
    ("random", 17),
    ("wide", 64),
    ("deep", 128),
    ("random", 128),
    ("chain", 200),
    ("random", 300),
]


@pytest.mark.parametrize("kind,t", TREES)
def test_mask_depth_paths_match_parent_walk(kind, t):
    parents = random_tree(kind, t, random.Random(t))
    mask = ancestor_mask(parents)
    depth = tree_depth(parents)
    assert mask.dtype == torch.bool and mask.shape == (t, t)
    depths = tree_depth_list(parents)  # the engine's list form
    for i in range(t):
        path = ancestors(parents, i)
        assert mask[i].nonzero().flatten().tolist() == path
        assert depth[i].item() == depths[i] == len(path) - 1

    leaves = sorted(set(range(t)) - set(parents))
    paths = tree_paths(parents)
    assert paths == [ancestors(parents, leaf) for leaf in leaves]
    padded = tree_paths_tensor(parents)
    assert padded.shape == (len(leaves), int(depth.max()) + 1)
    for row, path in zip(padded.tolist(), paths):
        assert row == path + [-1] * (padded.shape[1] - len(path))


def test_batch_ancestor_mask_matches_parent_walk():
    """The engine's per-forward mask: several trees (and a forest) as one batch of rows."""
    rng = random.Random(7)
    trees = [random_tree(kind, t, rng) for kind, t in TREES[:6]] + [[-1, 0, -1, 2, 1]]
    width = max(len(p) for p in trees) + 5
    parent_rows, local, start = [], [], 0
    for p in trees:
        parent_rows += [start + x if x >= 0 else start + i for i, x in enumerate(p)]
        local += range(len(p))
        start += len(p)
    mask = batch_ancestor_mask(torch.tensor(parent_rows), torch.tensor(local), width)
    assert mask.shape == (start, width) and mask.dtype == torch.bool
    row = 0
    for p in trees:
        for i in range(len(p)):
            assert mask[row].nonzero().flatten().tolist() == ancestors(p, i)
            row += 1
    assert torch.equal(mask[:, :128], batch_tree_mask(trees)[:, :128])


def test_forest_and_tensor_input():
    parents = torch.tensor([-1, 0, -1, 2, 1])
    assert tree_depth(parents).tolist() == [0, 1, 0, 1, 2]
    assert tree_paths(parents) == [[2, 3], [0, 1, 4]]


@pytest.mark.parametrize("bad", [[0], [-1, 1], [-1, 2, 0], [-1, -2], []])
def test_invalid_parents_raise(bad):
    for f in (ancestor_mask, tree_depth_list):
        with pytest.raises(ValueError):
            f(bad)


@pytest.mark.parametrize("t", [1, 31, 32, 33, 64, 130])
def test_pack_roundtrip(t):
    mask = torch.rand(7, t) < 0.5
    mask[:, -1] = True  # bit 31 of the last word when t % 32 == 0: the int32 sign bit
    words = pack_mask(mask)
    assert words.dtype == torch.int32 and words.shape == (7, (t + 31) // 32)
    assert torch.equal(unpack_mask(words, t), mask)
    # Bit layout: column j is bit j % 32 of word j // 32.
    j = t - 1
    assert ((words[:, j // 32].long() >> (j % 32)) & 1).bool().all()


def test_batch_tree_mask_and_positions():
    rng = random.Random(0)
    parents_list = [random_tree("random", 5, rng), [-1], random_tree("chain", 3, rng)]
    mask = batch_tree_mask(parents_list)
    assert mask.shape == (9, 5)
    start = 0
    for parents in parents_list:
        t = len(parents)
        assert torch.equal(mask[start : start + t, :t], ancestor_mask(parents))
        assert not mask[start : start + t, t:].any()
        start += t
    pos = batch_tree_positions(parents_list, [10, 0, 4])
    assert pos.tolist() == (tree_depth(parents_list[0]) + 10).tolist() + [0] + [4, 5, 6]


def test_cpu_path_does_not_import_triton():
    code = (
        "import sys, treespec_kernels, treespec_kernels.reference, treespec_kernels.tree, treespec_kernels.compaction\n"
        "assert 'triton' not in sys.modules, 'triton imported on the CPU path'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
