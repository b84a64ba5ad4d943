"""The drafter interface."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """Draft nodes below a sequence's pending token (the root, not listed here).

    tokens:  [n] token ids, in topological order (a parent comes before its children).
    parents: [n] parent index among these nodes, -1 for a child of the root.
    draft_probs: per node, the distribution [V] it was sampled from, or None when
        nodes were picked deterministically (top-k), which verification treats as
        point masses.
    """

    tokens: list[int]
    parents: list[int]
    draft_probs: list | None = None

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter:
    """Per-request drafting state lives inside the drafter, keyed by request id.

    Call order for one request: on_prefill once (and again after a preemption),
    then per decode step propose (optional) and on_verified, finally release.
    """

    kind: str = "none"
    format: str = "none"  # the checkpoint format it came from (engine/drafters/registry.py) or "random"

    def on_prefill(self, request_id: str, token_ids: list[int], hidden: torch.Tensor, next_token: int) -> None:
        """token_ids: [n] the whole sequence so far (cache order); hidden: [n, H] target
        features of those tokens; next_token: the pending token sampled after them."""

    def propose(self, request_ids: list[str], budgets: list[int]) -> list[DraftTree]:
        """One tree per request, at most budgets[i] nodes each."""
        raise NotImplementedError

    def on_verified(self, request_id: str, accepted: list[int], hidden: torch.Tensor, next_token: int) -> None:
        """accepted: [k] tokens now committed to the target's KV cache this step (the old
        pending token first); hidden: [k, H] their target features; next_token: the new
        pending token (bonus)."""

    def release(self, request_id: str) -> None:
        """Forget a finished, aborted or preempted request."""
