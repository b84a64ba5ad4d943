"""Continuous batching: which sequences run in the next step, and their KV reservations.

Each step is either a prefill step (newly admitted sequences, run whole) or a
decode step (every running sequence advances; each may verify a draft tree).
Before a decode step every running sequence reserves ``num_cached + 1 + tree``
slots; if blocks run short, speculation is dropped for the step first, then the
most recently admitted sequence is preempted (its blocks freed, recomputed later).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockAllocator, OutOfBlocks
from engine.sequence import Sequence, Status


@dataclass
class StepBatch:
    kind: str  # "prefill" or "decode"
    seqs: list[Sequence]
    tree_budgets: list[int] = field(default_factory=list)  # decode: draft nodes allowed per seq


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, tree_budget_of) -> StepBatch | None:
        """tree_budget_of(seq) -> draft nodes that seq would like to verify this step."""
        batch = self._admit()
        if batch is not None:
            return batch
        if not self.running:
            return None
        budgets = [tree_budget_of(s) for s in self.running]
        while True:
            try:
                self._reserve_all(budgets)
                return StepBatch("decode", list(self.running), budgets)
            except OutOfBlocks:
                if any(budgets):
                    budgets = [0] * len(budgets)  # speculation is the first thing to go
                    continue
                if len(self.running) == 1:
                    raise  # cannot happen: admission checked the sequence fits alone
                self.preempt(self.running[-1])
                budgets.pop()

    def _admit(self) -> StepBatch | None:
        admitted, tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq) - seq.num_cached
            if admitted and tokens + n > self.max_num_batched_tokens:
                break
            try:
                # The prompt and its first sampled token; tree scratch is reserved per decode step.
                self.allocator.reserve(seq.block_table, len(seq) + 1)
            except OutOfBlocks:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            admitted.append(seq)
            tokens += n
        if not admitted:
            return None
        self.running.extend(admitted)
        return StepBatch("prefill", admitted)

    def _reserve_all(self, budgets: list[int]) -> None:
        needed = [
            self.allocator.blocks_for(s.num_cached + 1 + b) - len(s.block_table)
            for s, b in zip(self.running, budgets)
        ]
        if sum(max(0, n) for n in needed) > self.allocator.num_free:
            raise OutOfBlocks("decode step does not fit")
        for s, b in zip(self.running, budgets):
            self.allocator.reserve(s.block_table, s.num_cached + 1 + b)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV; it is recomputed when readmitted."""
        self.running.remove(seq)
        self.allocator.release(seq.block_table)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def after_step(self, seq: Sequence) -> None:
        """Give back tree scratch blocks; keep room for the pending token."""
        self.allocator.trim(seq.block_table, seq.num_cached + 1)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.release(seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
