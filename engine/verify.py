"""Verification of a batch of draft token trees against the target's logits, on the
target's device, as batched tensor ops.

A sequence's tree is its logits rows: the root (local row 0, the sequence's pending
token) and the draft nodes; ``parents[i]`` is node i's parent (-1 for the root). Row i's
logits are the target's distribution for the token *after* node i. Plain decoding and
prefill are trees of one node, so every token the engine emits is drawn here.

Temperature 0: follow the target's argmax down the tree; the next token is the argmax at
the last accepted node.

Temperature > 0: recursive rejection sampling. At the current node, children are tried in
order. A child x drafted from distribution q is accepted with probability
min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)). A child chosen
deterministically (EAGLE/Medusa top-k, prompt lookup) is a draft from the point mass at x,
so it is accepted with probability p(x) and rejection zeroes p(x) and renormalises. If
every child is rejected, the next token is drawn from what is left of p; if the accepted
node is a leaf, from its full p (the bonus token). The output distribution is exactly the
target's. Each node's test uses its own uniform and the final draw one more
(``SamplingInput.uniforms``), so a seeded request draws the same tokens on any device.

The walk goes down one depth per iteration for all sequences at once (a tree of depth D
takes D + 1 iterations, siblings at a depth one more loop each) and reads the device once,
at the end. On the host (CPU logits), greedy-only batches walk as lists instead.
"""
from __future__ import annotations

import torch

from engine.batch import ModelInput, SamplingInput
from engine.ops import argmax_rows
from engine.sampling import SamplingRows, inverse_cdf, target_probs


class TreeBatch:
    """The trees of one step as dense [B, T] tensors on the target's device (T: the most
    rows of any sequence; padding rows have parent -2, which no node index matches).

    rows:  int64 [B, T], each node's logits row (padding: 0)
    par:   int64 [B, T], parent's local index (-1 root, -2 padding)
    tok:   int64 [B, T], the node's token
    rank:  int64 [B, T], the node's place among its siblings (0 first)
    depth, siblings: host ints, the deepest node and per depth d the most children of any
           node at depth d (the walk's loop bounds, known without asking the device)
    """

    def __init__(self, inp: ModelInput, device: torch.device):
        batch = len(inp.context_lens)
        if inp.tree_parents is None:  # one root per sequence: its last row
            counts, parents = [1] * batch, torch.full((batch,), -1, dtype=torch.long)
            depth = torch.zeros(batch, dtype=torch.long)
        else:
            qsl = inp.query_start_loc
            counts, parents = [qsl[b + 1] - qsl[b] for b in range(batch)], inp.tree_parents
            assert len(inp.logits_indices) == len(parents), "a tree step verifies every row"
            depth = inp.positions - torch.repeat_interleave(torch.tensor(inp.context_lens), torch.tensor(counts))
        width = max(counts)
        offsets = torch.tensor([0] + counts[:-1]).cumsum(0)
        local = torch.arange(width)
        valid = local[None, :] < torch.tensor(counts)[:, None]
        rows = torch.where(valid, offsets[:, None] + local[None, :], 0)
        par = torch.where(valid, parents[rows], -2)
        tok = inp.input_ids[inp.logits_indices][rows]
        earlier = (par[:, :, None] == par[:, None, :]) & (local[None, :] < local[:, None])[None]
        rank = earlier.sum(-1)
        node_depth = torch.where(valid, depth[rows], -1)
        self.depth = int(node_depth.max())
        # siblings[d]: how many children the widest node at depth d has (rank + 1 of its children).
        child = node_depth > 0
        sib = torch.zeros(self.depth + 1, dtype=torch.long)
        sib.scatter_reduce_(0, node_depth[child] - 1, rank[child] + 1, "amax")
        self.siblings = sib.tolist()
        self.rows, self.par, self.tok, self.rank = torch.stack([rows, par, tok, rank]).to(device).unbind(0)


def verify_step(logits: torch.Tensor, argmax, inp: ModelInput, sampling: SamplingInput,
                as_lists: bool | None = None) -> tuple[list[list[int]], list[int]]:
    """logits: [M, V], the rows of inp.logits_indices, on the target's device; argmax: their
    row-wise argmax (a list or [M] tensor) where the forward computed it, else None.

    Returns (paths: each sequence's accepted local rows from the root, root included;
    next_tokens: the token drawn after each path), read from the device once.

    as_lists: walk greedy-only batches as Python lists on the host. None (auto) does so for
    CPU logits: there a 10-node tree's walk costs ~0.5 ms as ~80 tensor ops (dispatch, not
    math) and ~20 us as lists; on a GPU the tensor walk keeps the logits where they are.
    """
    greedy = [p.temperature == 0.0 for p in sampling.params]
    if argmax is None and any(greedy):
        argmax = argmax_rows(logits) if logits.device.type == "cpu" else logits.argmax(-1)
    if as_lists is None:
        as_lists = logits.device.type == "cpu"
    if as_lists and all(greedy):
        return _walk_greedy_lists(inp, argmax if isinstance(argmax, list) else argmax.tolist())
    paths, next_tokens = _verify_tensors(logits, argmax, inp, sampling, greedy)
    ints = torch.cat([next_tokens[:, None], paths], 1).tolist()  # the step's one wait on the device
    return [[n for n in row[1:] if n >= 0] for row in ints], [row[0] for row in ints]


def _walk_greedy_lists(inp: ModelInput, best: list[int]) -> tuple[list[list[int]], list[int]]:
    """The greedy walk on the host: best[r] is the argmax of logits row r."""
    if inp.tree_parents is None:  # one root per sequence
        return [[0] for _ in inp.context_lens], best
    qsl, parents, tokens = inp.query_start_loc, inp.tree_parents.tolist(), inp.input_ids.tolist()
    paths, next_tokens = [], []
    for b in range(len(inp.context_lens)):
        start, end = qsl[b], qsl[b + 1]
        kids: list[list[int]] = [[] for _ in range(end - start)]
        for i in range(1, end - start):
            kids[parents[start + i]].append(i)
        path, node = [0], 0
        while True:
            want = best[start + node]
            node = next((c for c in kids[node] if tokens[start + c] == want), None)
            if node is None:
                break
            path.append(node)
        paths.append(path)
        next_tokens.append(best[start + path[-1]])
    return paths, next_tokens


def _verify_tensors(logits, argmax, inp: ModelInput, sampling: SamplingInput, greedy: list[bool]):
    """The batched walk on the logits' device: (paths int64 [B, D + 1], -1 after each path's
    end; next_tokens int64 [B])."""
    device = logits.device
    trees = TreeBatch(inp, device)
    batch, m = trees.rows.shape[0], logits.shape[0]
    paths = torch.full((batch, trees.depth + 1), -1, dtype=torch.long, device=device)
    paths[:, 0] = 0
    if any(greedy):
        best = torch.as_tensor(argmax, device=device)[trees.rows]
        greedy_paths, next_tokens = _walk_greedy(trees, best, paths.clone())
    else:
        greedy_paths, next_tokens = paths, torch.zeros(batch, dtype=torch.long, device=device)
    if all(greedy):
        return greedy_paths, next_tokens
    sampled = torch.tensor([b for b in range(batch) if not greedy[b]], device=device)
    uniforms = sampling.uniforms.to(device, non_blocking=True)
    draft = None
    if sampling.draft_probs is not None:
        q_rows, q_probs = sampling.draft_probs
        q_index = torch.full((m,), -1, dtype=torch.long)
        q_index[q_rows] = torch.arange(len(q_rows))
        draft = (q_index.to(device)[trees.rows][sampled], q_probs.to(device))
    s_paths, s_next = _walk_sampling(
        logits, trees, sampled, uniforms[:m][trees.rows[sampled]], uniforms[m:][sampled],
        SamplingRows.of([p for p, g in zip(sampling.params, greedy) if not g], device), draft,
        paths[sampled].clone(),
    )
    return greedy_paths.index_copy(0, sampled, s_paths), next_tokens.index_copy(0, sampled, s_next)


def _walk_greedy(trees: TreeBatch, best: torch.Tensor, paths: torch.Tensor):
    """best: [B, T] the argmax after each node. Follow the child whose token is the argmax."""
    cur = torch.zeros(len(paths), dtype=torch.long, device=paths.device)
    active = torch.ones(len(paths), dtype=torch.bool, device=paths.device)
    for d in range(trees.depth):
        want = best.gather(1, cur[:, None])
        match = (trees.par == cur[:, None]) & (trees.tok == want) & active[:, None]
        found = match.any(1)
        child = match.to(torch.int32).argmax(1)  # the first matching child (lowest index)
        cur = torch.where(found, child, cur)
        paths[:, d + 1] = torch.where(found, child, -1)
        active &= found
    return paths, best.gather(1, cur[:, None])[:, 0]


def _walk_sampling(logits, trees: TreeBatch, sampled, node_u, final_u, params: SamplingRows, draft, paths):
    """Recursive rejection sampling for the sequences ``sampled`` (their rows of the trees'
    tensors); node_u: [S, T] each node's uniform, final_u: [S]; draft: None or (q_index
    [S, T] into q_probs [Q, V], -1: a point mass). Returns (paths [S, D+1], next [S])."""
    rows, par, tok, rank = (t[sampled] for t in (trees.rows, trees.par, trees.tok, trees.rank))
    n = len(sampled)
    cur = torch.zeros(n, dtype=torch.long, device=logits.device)
    active = torch.ones(n, dtype=torch.bool, device=logits.device)
    final = None  # [S, V]: what is left of p where each sequence stopped
    for d in range(trees.depth + 1):
        p = target_probs(logits[rows.gather(1, cur[:, None])[:, 0]], params)
        left = p
        accepted = torch.zeros(n, dtype=torch.bool, device=logits.device)
        chosen = cur
        for k in range(trees.siblings[d]):
            cand = (par == cur[:, None]) & (rank == k) & (active & ~accepted)[:, None]
            has = cand.any(1)
            child = cand.to(torch.int32).argmax(1)[:, None]
            x = tok.gather(1, child)
            u = node_u.gather(1, child)[:, 0]
            px = left.gather(1, x)[:, 0]
            rejected_left = left.scatter(1, x, 0.0)  # a point mass: p(x) <- 0
            ratio = px
            if draft is not None:
                q_index = draft[0].gather(1, child)[:, 0]
                is_q = q_index >= 0
                q = draft[1][q_index.clamp(min=0)]
                qx = q.gather(1, x)[:, 0]
                ratio = torch.where(is_q, torch.where(qx > 0, (px / qx).clamp(max=1.0), -1.0), px)
                rejected_left = torch.where(is_q[:, None], (left - q).clamp(min=0.0), rejected_left)
            ok = has & (u < ratio)
            accepted |= ok
            chosen = torch.where(ok, child[:, 0], chosen)
            total = rejected_left.sum(-1, keepdim=True)
            rejected_left = torch.where(total > 0, rejected_left / total, p)  # nothing left: the target itself
            left = torch.where((has & ~ok)[:, None], rejected_left, left)
        stop = active & ~accepted
        final = left if final is None else torch.where(stop[:, None], left, final)
        if d < trees.depth:
            paths[:, d + 1] = torch.where(accepted, chosen, -1)
        cur, active = chosen, accepted
    return paths, inverse_cdf(final, final_u)
