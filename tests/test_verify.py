"""engine/verify.py's batched walk against the node-by-node oracle (tests/verify_reference.py).

Random batches of random trees, greedy and sampling sequences mixed (temperature, top-k,
top-p per sequence), point-mass and sampled drafts: for the same uniforms both must accept
the same path and draw the same next token, on the tensor walk (what a GPU runs) and, for
greedy-only batches, on the host's list walk too. That the oracle (and so the walk) keeps the
target's distribution is the chi-square tests' job (tests/test_speculative_sampling.py).
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.batch import SamplingInput, SeqInput, build_model_input
from engine.sampling import SamplingParams
from engine.verify import verify_step
from treespec_kernels.tree import tree_depth_list
from verify_reference import verify_greedy, verify_sampling

V = 12


def random_tree(rng: random.Random, n: int) -> list[int]:
    """parents of n nodes, root first (-1); bushy near the root, chains deeper."""
    return [-1] + [rng.randrange(max(0, i - 3), i) if rng.random() < 0.6 else rng.randrange(i) for i in range(1, n)]


def random_case(seed: int, with_draft_probs: bool):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    seqs, logits, params, trees, draft = [], [], [], [], {}
    for b in range(rng.randint(1, 6)):
        n = rng.choice([1, 1, 2, 5, 9, 17])
        parents = random_tree(rng, n)
        lg = torch.randn(n, V, generator=gen) * rng.choice([0.5, 2.0, 4.0])
        tokens = [rng.randrange(V)]
        for i in range(1, n):  # half the children carry the parent's argmax: greedy paths get long
            tokens.append(int(lg[parents[i]].argmax()) if rng.random() < 0.5 else rng.randrange(V))
        probs = [None] * n
        if with_draft_probs:
            for i in range(1, n):
                if rng.random() < 0.5:
                    probs[i] = torch.softmax(torch.randn(V, generator=gen), -1)
        p = rng.choice([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
                        SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.3, top_p=0.8),
                        SamplingParams(temperature=1.0, top_k=5, top_p=0.6)])
        depth = tree_depth_list(parents)
        table = list(range(4 * b, 4 * b + 4))
        seqs.append(SeqInput(tokens, [7 + d for d in depth], table, 7,
                             tree_parents=parents if n > 1 else None, logits_rows=list(range(n))))
        logits.append(lg)
        params.append(p)
        trees.append((tokens, parents, probs))
    inp = build_model_input(seqs, block_size=16)
    m = len(inp.logits_indices)
    uniforms = torch.rand(m + len(seqs), generator=gen)
    rows, qs, start = [], [], 0
    for tokens, parents, probs in trees:
        for i, q in enumerate(probs):
            if q is not None:
                rows.append(start + i)
                qs.append(q)
        start += len(tokens)
    draft = (torch.tensor(rows), torch.stack(qs)) if rows else None
    return inp, torch.cat(logits), SamplingInput(params, uniforms, draft), trees


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_batched_walk_equals_the_node_by_node_oracle(with_draft_probs):
    accepted = {True: 0, False: 0}  # nodes accepted by greedy / by sampling sequences
    for seed in range(150):
        inp, logits, sampling, trees = random_case(seed, with_draft_probs)
        paths, next_tokens = verify_step(logits, None, inp, sampling, as_lists=False)
        m, start = len(logits), 0
        for b, (tokens, parents, probs) in enumerate(trees):
            n = len(tokens)
            lg = logits[start:start + n]
            if sampling.params[b].greedy:
                want = verify_greedy(tokens, parents, lg)
            else:
                u = torch.cat([sampling.uniforms[start:start + n], sampling.uniforms[m + b:m + b + 1]])
                want = verify_sampling(tokens, parents, lg, sampling.params[b], u, probs)
            assert (paths[b], next_tokens[b]) == want, (seed, b)
            accepted[sampling.params[b].greedy] += len(want[0]) - 1
            start += n
    assert min(accepted.values()) > 40, accepted  # the cases really walk down trees


@pytest.mark.parametrize("as_lists", [False, True])
def test_greedy_walks_follow_the_given_argmax(as_lists):
    """Greedy-only batches, on the tensor walk and the host's list walk: the oracle's paths,
    and a forward that returns its argmax (the fused CPU kernel) is what the walk follows."""
    for seed in range(40):
        inp, logits, sampling, trees = random_case(seed, False)
        sampling.params = [SamplingParams(temperature=0.0)] * len(sampling.params)
        got = verify_step(logits, None, inp, sampling, as_lists=as_lists)
        assert got == verify_step(logits, logits.argmax(-1).tolist(), inp, sampling, as_lists=as_lists)
        shifted = ((logits.argmax(-1) + 1) % V).tolist()  # a different "argmax": followed as given
        paths, next_tokens = verify_step(logits, shifted, inp, sampling, as_lists=as_lists)
        start = 0
        for b, (tokens, parents, _) in enumerate(trees):
            assert (got[0][b], got[1][b]) == verify_greedy(tokens, parents, logits[start:start + len(tokens)])
            path = paths[b]
            assert next_tokens[b] == shifted[start + path[-1]]
            assert all(tokens[c] == shifted[start + p] and parents[c] == p for p, c in zip(path, path[1:]))
            start += len(tokens)
