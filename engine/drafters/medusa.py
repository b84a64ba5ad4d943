"""Medusa drafter: K heads on the target's last hidden state, a static tree.

Head i is a residual SiLU block followed by the shared lm_head; from the feature
of the last committed token (whose lm_head output gave the pending token) it
predicts the token i+1 places after the pending one. Candidates of every depth
depend only on that one feature, so the tree is static: a list of paths of
top-k ranks (engine/drafters/trees.py), by default chosen to maximise the
expected accepted length under the heads' measured top-k accuracies.
"""
from __future__ import annotations

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
    draft_vocab_size: int | None = None
    rank_acc: list | None = None  # measured [head][rank] top-k accuracy; shapes the default tree

    def to_dict(self) -> dict:
        return {"kind": "medusa", **self.__dict__}

    @classmethod
    def from_dict(cls, d: dict) -> "MedusaConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ResBlock(nn.Module):
    def __init__(self, h: int, dtype):
        super().__init__()
        self.linear = nn.Linear(h, h, dtype=dtype)
        nn.init.zeros_(self.linear.weight)  # starts as identity: head i begins as the lm_head itself

    def forward(self, x):
        return x + F.silu(linear(self.linear, x))


class MedusaModel(nn.Module):
    def __init__(self, cfg: MedusaConfig, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(ResBlock(cfg.hidden_size, dtype) for _ in range(cfg.num_heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> per-head features [K, ..., H] (apply the lm_head after)."""
        return torch.stack([head(hidden) for head in self.heads])


class MedusaDrafter(Drafter):
    kind = "medusa"

    def __init__(self, model: MedusaModel, head: DraftHead, choices: list[list[int]] | None = None,
                 max_nodes: int = 64):
        self.model = model.eval()
        self.head = head
        cfg = model.cfg
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
            feats = self.model(h.to(self.head.weight.dtype).unsqueeze(0))[:, 0]  # [K, H]
            _, cand = self.head.topk(feats, self.top_k)  # [K, top_k]
            tokens, parents = tree_from_choices(self.choices[:budget], cand.tolist())
            trees.append(DraftTree(tokens, parents))
        return trees
