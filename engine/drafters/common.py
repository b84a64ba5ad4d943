"""Pieces shared by the drafters: configs on disk, the (reduced-vocabulary) draft head."""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from engine.ops import topk_logprob_lists, topk_logprobs
from engine.parallel import linear


class DraftHead(nn.Module):
    """The target's lm_head, optionally restricted to a draft vocabulary.

    A 49152-row lm_head read at every draft depth costs as much as a large part of
    a target step on CPU; restricting it to the most frequent token ids (EAGLE-3's
    d2t trick) cuts that cost by V / Vd. ``ids`` maps draft rows to target ids.

    An EAGLE-3 drafter brings its own head: ``rows_selected=True`` (lm_head_weight is already
    [Vd, H], row j drafting target id ids[j]) and ``norm``, its final RMSNorm, applied to h
    before the matmul (its next step reads the un-normed h).
    """

    packable = True  # engine.parallel.pack_cpu_weights may give it a oneDNN-packed copy

    def __init__(self, lm_head_weight: torch.Tensor, ids: torch.Tensor | None = None, norm: nn.Module | None = None,
                 rows_selected: bool = False):
        super().__init__()
        self.register_buffer("ids", None if ids is None else ids.long(), persistent=False)
        w = lm_head_weight if ids is None or rows_selected else lm_head_weight[ids.long()].clone()
        self.register_buffer("weight", w.detach(), persistent=False)
        self.norm = norm

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> logits over the draft vocabulary [..., Vd]."""
        if self.norm is not None:
            h = self.norm(h)
        return linear(self, h.to(self.weight.dtype))

    def topk(self, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """h [n, H] -> (log-probs [n, k], target token ids [n, k]), best first."""
        return self.topk_of_logits(self.logits(h).float(), k)

    def topk_of_logits(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits over the draft vocabulary [n, Vd] -> topk's (log-probs, target ids)."""
        vals, idx = topk_logprobs(logits, k)
        return vals, (idx if self.ids is None else self.ids[idx])

    def topk_lists(self, logits: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
        """topk_of_logits as lists, per row (a tree search's per-depth step)."""
        vals, idx = topk_logprob_lists(logits, k)
        if self.ids is None:
            return vals, idx
        if getattr(self, "_id_list", None) is None:
            self._id_list = self.ids.tolist()
        return vals, [[self._id_list[i] for i in row] for row in idx]


def save_drafter(path: str, config: dict, state: dict[str, torch.Tensor], dtype=torch.bfloat16) -> None:
    """Write ``config.json`` + ``model.safetensors`` (floating tensors cast to dtype)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_drafter(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"drafter directory {path!r} has no config.json")
    with open(cfg_file) as f:
        config = json.load(f)
    return config, load_file(os.path.join(path, "model.safetensors"))
