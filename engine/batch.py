"""What one step sends to the target and what comes back.

``SeqInput`` is one sequence's share of a step; ``build_model_input`` flattens a batch of
them into a ``ModelInput``. With a ``SamplingInput`` it crosses the executor boundary (to
a Ray actor per TP rank in actors/); the target verifies and samples on its own device and
only a ``StepOutput`` comes back (accepted rows, next tokens, the drafter's features).
``ModelOutput`` is a forward's full output (every logits row, every hidden row), for
training data, tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec_kernels.tree import batch_tree_mask


@dataclass
class ModelInput:
    """The new tokens of B sequences, flattened to N rows (host tensors; the executor's input).

    input_ids, positions, slot_mapping: [N] int64
    block_tables: [B, max_blocks] int32
    context_lens, query_start_loc: B and B+1 ints
    tree_parents: None (every sequence causal) or int64 [N]: each row's parent, as an index
        into its own sequence's rows (-1: a root). A causal sequence in a tree batch is a chain.
    logits_indices: [M] rows whose logits the caller wants
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_start_loc: list[int]
    tree_parents: torch.Tensor | None
    logits_indices: torch.Tensor

    @property
    def max_query_len(self) -> int:
        qsl = self.query_start_loc
        return max(b - a for a, b in zip(qsl[:-1], qsl[1:]))

    def tree_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(parent_rows, local) int64 [N]: each row's parent as a batch row (a root: itself) and
        its index within its sequence; the input of treespec_kernels.tree.batch_ancestor_mask."""
        qsl = self.query_start_loc
        lengths = torch.tensor([b - a for a, b in zip(qsl[:-1], qsl[1:])])
        start = torch.repeat_interleave(torch.tensor(qsl[:-1], dtype=torch.long), lengths)
        rows = torch.arange(len(start))
        return torch.where(self.tree_parents < 0, rows, start + self.tree_parents), rows - start

    def tree_mask(self) -> torch.Tensor | None:
        """bool [N, max_query_len] on the host: row i sees the new tokens of its sequence marked
        True (its tree ancestors and itself); None when causal. (A device builds the same mask
        from tree_rows with batch_ancestor_mask; on the host, for a few small trees, Python
        lists are ~5x faster than its tensor ops.)"""
        if self.tree_parents is None:
            return None
        qsl, parents = self.query_start_loc, self.tree_parents.tolist()
        return batch_tree_mask([parents[a:b] for a, b in zip(qsl[:-1], qsl[1:])])


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [M, V] fp32, rows of logits_indices
    hidden: torch.Tensor  # [N, hidden], final hidden state of every row (drafter features)
    argmax: list[int] | None = None  # [M] each logits row's argmax, where the forward gave it


@dataclass
class SamplingInput:
    """How the target turns one step's logits into tokens (host tensors, beside a ModelInput).

    Each sequence's logits rows (ModelInput.logits_indices, in order) are its tree, shaped by
    ModelInput.tree_parents (without tree_parents, each sequence has one row: a root). The
    target walks every tree (engine/verify.py) and draws the token after the accepted path.

    params:    one SamplingParams per sequence (temperature 0: greedy).
    uniforms:  float32 [M + B] in [0, 1): one per logits row (the acceptance test of that
               node), then one per sequence (its final draw). Drawn by the engine from each
               request's generator, so seeded requests repeat on any executor and device.
    draft_probs: None, or (rows int64 [Q], probs [Q, V]): the distributions the nodes at
               those logits rows were sampled from; every other node is a point mass.
    hidden:    which final hidden rows come back: "all" (every row of the forward),
               "accepted" (the rows of the accepted paths) or "none".
    """

    params: list
    uniforms: torch.Tensor
    draft_probs: tuple[torch.Tensor, torch.Tensor] | None = None
    hidden: str = "accepted"


@dataclass
class StepOutput:
    """What the target returns from a step: small ints and the drafter's features.

    paths:       per sequence, the accepted local rows from the root (root included).
    next_tokens: per sequence, the token drawn after its path (the bonus token).
    hidden:      None, or [R, hidden]: SamplingInput.hidden "all": every row of the forward;
                 "accepted": the rows of the paths, sequence by sequence, root first. On the
                 target's device in process; on the host from a remote shard; or a handle
                 to rows left on the shard for a drafter actor (actors/shard.py
                 RemoteFeatures): the engine only slices it and passes it to its drafter.
    """

    paths: list[list[int]]
    next_tokens: list[int]
    hidden: torch.Tensor | None


@dataclass
class SeqInput:
    """One sequence's share of a forward: tokens to run and where they go."""

    token_ids: list[int]
    positions: list[int]
    block_table: list[int]
    context_len: int  # tokens already cached before this forward
    tree_parents: list[int] | None = None  # None: causal; else parent index per token (-1 root)
    logits_rows: list[int] | None = None  # local rows whose logits are wanted; None: last only


def build_model_input(seqs: list[SeqInput], block_size: int) -> ModelInput:
    """Flatten per-sequence inputs into one ModelInput."""
    # Plain lists, one tensor each at the end: this runs every step, for a few rows.
    ids, pos, slots, qsl, logits_idx, tables, parents = [], [], [], [0], [], [], []
    any_tree = any(s.tree_parents is not None for s in seqs)
    max_blocks = max(len(s.block_table) for s in seqs)
    for s in seqs:
        t = len(s.token_ids)
        ids += s.token_ids
        pos += s.positions
        # New tokens go to cache positions context_len .. context_len+t-1 (tree scratch for trees).
        for i in range(t):
            p = s.context_len + i
            slots.append(s.block_table[p // block_size] * block_size + p % block_size)
        tables.append(list(s.block_table) + [0] * (max_blocks - len(s.block_table)))
        rows = s.logits_rows if s.logits_rows is not None else [t - 1]
        logits_idx += [qsl[-1] + r for r in rows]
        qsl.append(qsl[-1] + t)
        if any_tree:
            parents += s.tree_parents if s.tree_parents is not None else range(-1, t - 1)  # causal: a chain
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(pos, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=[s.context_len for s in seqs],
        query_start_loc=qsl,
        tree_parents=torch.tensor(parents, dtype=torch.long) if any_tree else None,
        logits_indices=torch.tensor(logits_idx, dtype=torch.long),
    )
