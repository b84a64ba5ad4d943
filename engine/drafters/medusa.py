"""Medusa drafter: K heads on the target's last hidden state, no drafting loop.

Head i is a stack of residual SiLU blocks (one in Medusa-1; ``num_layers``)
followed by the shared lm_head (published Medusa-1 heads: each its own, ``head_lm``);
from the feature of the last committed token (whose lm_head output gave the pending
token) it predicts the token i+1 places after the pending one. Candidates of every depth depend only on that one
feature, so one forward of the heads drafts the whole tree: a list of paths of
top-k ranks (engine/drafters/trees.py), chosen best-first by this step's head
probabilities, or fixed (Medusa's "choices").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.drafters.base import Drafter, DraftTree
from engine.drafters.common import DraftHead
from engine.parallel import linear
from engine.drafters.trees import best_tree, default_medusa_tree, tree_from_choices


@dataclass
class MedusaConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    draft_vocab_size: int | None = None
    draft_vocab_order: str = "id"  # "frequency": draft_vocab_ids most frequent first (prefixes are top-N sets)
    rank_acc: list | None = None  # measured [head][rank] top-k accuracy; shapes the default tree
    head_lm: bool = False  # each head ends in its own lm_head [V, H] (published Medusa-1), not the target's
    choices: list | None = None  # the fixed tree the heads ship with (Medusa paths); None: per-step trees

    def to_dict(self) -> dict:
        return {"kind": "medusa", **self.__dict__}

    @classmethod
    def from_dict(cls, d: dict) -> "MedusaConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


MAX_WIDTH = 10  # candidates per head a per-step tree may use (as many as rank_acc measures)


class ResBlock(nn.Module):
    def __init__(self, h: int, dtype):
        super().__init__()
        self.linear = nn.Linear(h, h, dtype=dtype)
        # Starts as the identity (silu(0) = 0): a fresh head begins as the lm_head itself,
        # and a block added to a trained head leaves its predictions unchanged at first.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(linear(self.linear, x))


class MedusaModel(nn.Module):
    def __init__(self, cfg: MedusaConfig, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(nn.Sequential(*(ResBlock(cfg.hidden_size, dtype) for _ in range(cfg.num_layers)))
                                   for _ in range(cfg.num_heads))
        self.lm_heads = (nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
                                       for _ in range(cfg.num_heads)) if cfg.head_lm else None)

    @staticmethod
    def upgrade_state(state: dict) -> dict:
        """Map the one-block layout of earlier files (``heads.i.linear.*``) to ``heads.i.0.linear.*``."""
        return {re.sub(r"^heads\.(\d+)\.linear\.", r"heads.\1.0.linear.", k): v for k, v in state.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self.upgrade_state(state_dict), strict=strict, assign=assign)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> per-head features [K, ..., H] (apply the lm_head after)."""
        return torch.stack([head(hidden) for head in self.heads])

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-head features [K, ..., H] -> logits [K, ..., V], each through its head's own
        lm_head (``head_lm``)."""
        return torch.stack([linear(lm, f) for lm, f in zip(self.lm_heads, feats)])


class MedusaDrafter(Drafter):
    """Medusa heads with a per-step tree (default) or a fixed one (``choices``, else the
    tree the heads ship with, ``MedusaConfig.choices``: published Medusa-1 heads).

    Per-step tree: the same best-first expansion as the static tree (trees.best_tree),
    but ranked by this step's head probabilities instead of the heads' average rank
    accuracies, so a confident step drafts deeper and an unsure one wider (EAGLE-2's
    reranking applied to Medusa's candidates). Held-out tau rose by 0.01-0.02 at tree
    budgets 4, 8 and 60 over the static tree of the measured rank accuracies.
    """

    kind = "medusa"

    def __init__(self, model: MedusaModel, head: DraftHead, choices: list[list[int]] | None = None,
                 max_nodes: int = 64, dynamic: bool | None = None, fused=None):
        self.model = model.eval()
        self.head = head
        self.fused = fused  # engine.fused.FusedMedusa of model + head, or None (torch)
        cfg = model.cfg
        self.dynamic = choices is None if dynamic is None else dynamic
        if choices is None and cfg.choices:  # the heads' own fixed tree, as deep as there are heads
            choices = [c for c in cfg.choices if len(c) <= cfg.num_heads][:max_nodes]
            self.dynamic = bool(dynamic)
        if choices is None:
            choices = (best_tree(cfg.rank_acc, max_nodes) if cfg.rank_acc
                       else default_medusa_tree(cfg.num_heads, max_nodes))
        self.choices = choices
        self.top_k = 1 + max(max(c) for c in choices)
        self.last: dict[str, torch.Tensor] = {}

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.last[request_id] = hidden[-1]

    def on_verified(self, request_id, accepted, hidden, next_token):
        if request_id in self.last:
            self.last[request_id] = hidden[-1]

    def release(self, request_id):
        self.last.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, request_ids, budgets):
        trees = []
        for rid, budget in zip(request_ids, budgets):
            h = self.last.get(rid)
            if h is None or budget <= 0:
                trees.append(DraftTree([], []))
                continue
            if self.fused is not None:  # blocks and head in one C call
                logits = self.fused.run(h.unsqueeze(0))[1]  # [K, Vd]
            else:
                feats = self.model(h.to(self.head.weight).unsqueeze(0))[:, 0]  # [K, H]
                logits = (self.head.logits(feats) if self.model.lm_heads is None
                          else self.model.head_logits(feats)).float()
            if self.dynamic:
                k = min(budget, MAX_WIDTH, self.head.weight.shape[0])  # a tiny vocabulary caps the width
                logp, cand = self.head.topk_lists(logits, k)  # [K][k]
                choices = best_tree([[math.exp(x) for x in row] for row in logp], budget)
            else:
                _, cand = self.head.topk_lists(logits, self.top_k)  # [K][top_k]
                choices = self.choices[:budget]
            tokens, parents = tree_from_choices(choices, cand)
            trees.append(DraftTree(tokens, parents))
        return trees
