"""Temperature > 0: speculative sampling reproduces the target's distribution exactly.

Oracle: the exact distribution of the first 3 generated tokens of a tiny random
Llama (vocabulary 6), computed by enumerating every prefix with transformers and
filtering top-k / top-p with numpy written here, independently of the engine.
The engine then samples 20,000 continuations with speculation (EAGLE dynamic
tree, Medusa per-step tree) and a chi-square test compares the counts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import random_llama_dir
from engine.config import EngineConfig
from engine.drafters.loading import load_drafter
from engine.engine import LLMEngine
from engine.executor import InProcessExecutor
from engine.batch import SamplingInput, SeqInput, build_model_input
from engine.sampling import SamplingParams, inverse_cdf
from engine.verify import verify_step
from treespec_kernels.tree import tree_depth_list
from verify_reference import verify_sampling

V = 6
PROMPT = [1, 4, 2, 5]
SAMPLES = 20_000


def filtered(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Softmax at T=1, then keep the top_k, then the smallest top_p nucleus."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return random_llama_dir(str(tmp_path_factory.mktemp("tiny")), heads=2, kv_heads=1, hidden=32, layers=1,
                            vocab=V, seed=3)


def exact_first3(model_dir, top_k, top_p, prompt=PROMPT) -> np.ndarray:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    probs = np.zeros((V, V, V))
    with torch.no_grad():
        def dist(prefix):
            return filtered(hf(torch.tensor([prompt + prefix])).logits[0, -1].numpy(), top_k, top_p)
        p1 = dist([])
        for a in range(V):
            if p1[a] == 0:
                continue
            p2 = dist([a])
            for b in range(V):
                if p2[b] == 0:
                    continue
                probs[a, b] = p1[a] * p2[b] * dist([a, b])
    return probs.reshape(-1)


def first3_counts(outs) -> np.ndarray:
    """How often each (first, second, third) generated token triple occurred: [V ** 3]."""
    counts = np.zeros(V ** 3)
    for o in outs:
        a, b, c = o.token_ids
        counts[(a * V + b) * V + c] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> float:
    n = counts.sum()
    assert counts[expected_p == 0].sum() == 0, "sampled a token the target can never produce"
    exp = expected_p * n
    big = exp >= 5  # pool sparse cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(exp[big], exp[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("kind,top_k,top_p", [("eagle", 0, 1.0), ("medusa", 3, 0.8), ("eagle", 4, 0.9),
                                              ("medusa", 0, 1.0)])
def test_engine_speculative_sampling_matches_target(tiny_dir, kind, top_k, top_p):
    executor = InProcessExecutor(tiny_dir, "float32")
    cfg = EngineConfig(model=tiny_dir, drafter=kind, draft_path="random", tree_budget=8, draft_depth=3,
                       draft_top_k=3, num_blocks=6000, block_size=4, max_num_seqs=512,
                       max_num_batched_tokens=4096, seed=11, dtype="float32", draft_min_prob=0.0, draft_vocab_size=0)
    drafter = load_drafter(cfg, tiny_dir, executor, seed=5)
    if kind == "medusa":  # untrained heads start as copies of the lm_head; make them disagree
        with torch.no_grad():
            for p in drafter.model.parameters():
                p.normal_(0, 0.5)
    engine = LLMEngine(cfg, executor, drafter)
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, top_p=top_p, ignore_eos=True)
    outs = engine.generate([PROMPT] * SAMPLES, params)
    counts = first3_counts(outs)
    assert sum(o.seq.stats.drafted for o in outs) > SAMPLES  # trees were really verified
    accepted = sum(o.seq.stats.committed - o.seq.stats.verify_steps for o in outs)
    assert accepted > SAMPLES // 10  # and draft tokens were really accepted
    assert chi2_pvalue(counts, exact_first3(tiny_dir, top_k, top_p)) > 0.001
    assert engine.kv_blocks_used == 0


def test_lookup_chains_keep_sampling_exact(tiny_dir):
    """Prompt-lookup chains (engine/lookup.py) as the only draft nodes, on a prompt that repeats
    itself so they are proposed at most steps: still exactly the target's distribution."""
    from engine.drafters.base import Drafter, DraftTree

    class Silent(Drafter):
        kind = "eagle"

        def propose(self, request_ids, budgets):
            return [DraftTree([], []) for _ in request_ids]

    prompt = [1, 4, 2, 5, 1, 4, 2, 5, 1, 4]
    executor = InProcessExecutor(tiny_dir, "float32")
    cfg = EngineConfig(model=tiny_dir, drafter="eagle", tree_budget=1, lookup_tokens=4, num_blocks=6000,
                       block_size=4, max_num_seqs=512, max_num_batched_tokens=4096, seed=13, dtype="float32", draft_min_prob=0.0, draft_vocab_size=0)
    engine = LLMEngine(cfg, executor, Silent())
    params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)
    outs = engine.generate([prompt] * SAMPLES, params)
    counts = first3_counts(outs)
    assert sum(o.seq.stats.drafted for o in outs) > SAMPLES  # lookup chains were verified
    accepted = sum(o.seq.stats.committed - o.seq.stats.verify_steps for o in outs)
    assert accepted > SAMPLES // 50, accepted  # and some of their tokens accepted (~900 of them)
    assert chi2_pvalue(counts, exact_first3(tiny_dir, 0, 1.0, prompt)) > 0.001
    assert engine.kv_blocks_used == 0


# ---------------------------------------------------------------------------------------------
# The verifier alone, on fixed distributions, with sampled drafts (q matters) and top-k picks,
# and three classic bugs that the same statistics must catch.

def tree_case():
    """A root with 3 children (one of which has 2 children): 6 tokens of vocabulary 5."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g) * 1.5  # target logits at root, child0, child1, child2
    q_root = torch.softmax(torch.randn(5, generator=g), -1)
    return logits, q_root


def draw_tree(q_root, rng: torch.Generator, sampled: bool):
    """Children of the root: 3 drafts, sampled i.i.d. from q (or top-3 of q, point masses)."""
    if sampled:
        kids = torch.multinomial(q_root, 3, replacement=True, generator=rng).tolist()
        probs = [q_root] * 3
    else:
        kids = q_root.topk(3).indices.tolist()
        probs = [None] * 3
    return kids, probs


def engine_verifier(cases):
    """engine/verify.py's batched walk on every case at once (one tree per sequence).
    cases: (tokens, parents, logits, params, uniforms [T + 1], draft_probs) per tree."""
    seqs, rows, qs, start = [], [], [], 0
    for tokens, parents, _, _, _, probs in cases:
        seqs.append(SeqInput(tokens, tree_depth_list(parents), [0], 0, tree_parents=parents,
                             logits_rows=list(range(len(tokens)))))
        rows += [start + i for i, q in enumerate(probs) if q is not None]
        qs += [q for q in probs if q is not None]
        start += len(tokens)
    uniforms = torch.cat([c[4][:-1] for c in cases] + [torch.stack([c[4][-1] for c in cases])])
    draft = (torch.tensor(rows), torch.stack(qs)) if rows else None
    paths, next_tokens = verify_step(torch.cat([c[2] for c in cases]), None, build_model_input(seqs, 16),
                                     SamplingInput([c[3] for c in cases], uniforms, draft))
    return list(zip(paths, next_tokens))


def one_by_one(verify):
    """A verifier of one tree as a verifier of many."""
    return lambda cases: [verify(*case) for case in cases]


def buggy_accept_with_p(tokens, parents, logits, params, uniforms, draft_probs):
    """Bug 1: accept a sampled draft with probability p(x) instead of min(1, p(x)/q(x))."""
    probs = torch.softmax(logits / params.temperature, -1)
    p = probs[0].clone()
    for c in (1, 2, 3):
        x = tokens[c]
        if uniforms[c] < p[x]:
            return [0, c], int(inverse_cdf(probs[c][None], uniforms[-1:])[0])
        p = torch.clamp(p - draft_probs[c], min=0)
        p = p / p.sum()
    return [0], int(inverse_cdf(p[None], uniforms[-1:])[0])


def buggy_keep_rejected_mass(tokens, parents, logits, params, uniforms, draft_probs):
    """Bug 2: after rejecting, sample from the untouched target instead of the residual."""
    probs = torch.softmax(logits / params.temperature, -1)
    for c in (1, 2, 3):
        x = tokens[c]
        q = draft_probs[c]
        if uniforms[c] < min(1.0, (probs[0][x] / q[x]).item()):
            return [0, c], int(inverse_cdf(probs[c][None], uniforms[-1:])[0])
    return [0], int(inverse_cdf(probs[0][None], uniforms[-1:])[0])


def buggy_bonus_from_root(cases):
    """Bug 3: the bonus token after an accepted child comes from the root's distribution."""
    results = []
    for (tokens, parents, logits, params, uniforms, probs), (path, nxt) in zip(cases, engine_verifier(cases)):
        if len(path) > 1:
            nxt = int(inverse_cdf(torch.softmax(logits[0], -1)[None], uniforms[-1:])[0])
        results.append((path, nxt))
    return results


def two_token_counts(verify, sampled: bool, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """verify: a verifier of many trees (engine_verifier, or one_by_one(a verifier of one))."""
    logits, q_root = tree_case()
    params = SamplingParams(temperature=1.0)
    rng = torch.Generator().manual_seed(1)
    cases = []
    for _ in range(n):
        kids, probs = draw_tree(q_root, rng, sampled)
        # Rows 1..3 hold the target's distribution after each child: use a per-token table.
        table = torch.cat([logits[0:1], logits[1:4][torch.tensor(kids) % 3]])
        cases.append(([0] + kids, [-1, 0, 0, 0], table, params, torch.rand(5, generator=rng), [None] + probs))
    counts = np.zeros(25)
    for (tokens, *_), (path, nxt) in zip(cases, verify(cases)):
        first = tokens[path[1]] if len(path) > 1 else nxt
        second = nxt if len(path) > 1 else int(torch.multinomial(torch.softmax(logits[1 + first % 3], -1), 1,
                                                                 generator=rng))
        counts[first * 5 + second] += 1
    p0 = torch.softmax(logits[0], -1)
    exact = np.array([p0[a] * torch.softmax(logits[1 + a % 3], -1)[b] for a in range(5) for b in range(5)])
    return counts, exact


@pytest.mark.parametrize("verify", [engine_verifier, one_by_one(verify_sampling)], ids=["engine", "reference"])
@pytest.mark.parametrize("sampled", [True, False])
def test_verifier_is_lossless(verify, sampled):
    counts, exact = two_token_counts(verify, sampled)
    assert chi2_pvalue(counts, exact) > 0.001


@pytest.mark.parametrize("bug", [one_by_one(buggy_accept_with_p), one_by_one(buggy_keep_rejected_mass),
                                 buggy_bonus_from_root], ids=["accept_with_p", "keep_rejected_mass", "bonus_from_root"])
def test_statistics_catch_classic_bugs(bug):
    counts, exact = two_token_counts(bug, sampled=True)
    assert chi2_pvalue(counts, exact) < 0.001
