"""Paged KV cache bookkeeping: a block allocator and per-sequence block tables.

The tensors themselves live with the model runner (one slice per TP rank, same
block ids on every rank); this file only decides which blocks a sequence owns.
A sequence's reservation covers its committed tokens *plus* the scratch slots of
the draft tree of the next step, so a step never runs out of memory half-way.
"""
from __future__ import annotations


def kv_blocks_for_memory(total_bytes: int, mem_util: float, used_bytes: int, bytes_per_block: int) -> int:
    """KV blocks that fit in ``mem_util`` of a device's ``total_bytes`` beside ``used_bytes``
    (weights, everything else resident, one step's peak activations): the one sizing rule
    of the runtime (ModelRunner.profile_kv_blocks, measured) and the planner (engine/plan.py,
    estimated)."""
    return max(0, int(total_bytes * mem_util) - used_bytes) // bytes_per_block


class OutOfBlocks(RuntimeError):
    """Not enough free KV blocks; nothing was allocated. Callers wait or refuse."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        # Pop from the end; start with low ids so fresh caches fill in order.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reserve(self, block_table: list[int], num_tokens: int) -> None:
        """Grow ``block_table`` (in place) to hold ``num_tokens`` slots, all or nothing."""
        need = self.blocks_for(num_tokens) - len(block_table)
        if need <= 0:
            return
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} KV blocks, {len(self._free)} free")
        for _ in range(need):
            block_table.append(self._free.pop())

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Free the blocks of ``block_table`` beyond the first ``num_tokens`` slots."""
        keep = self.blocks_for(num_tokens)
        while len(block_table) > keep:
            self._free.append(block_table.pop())

    def release(self, block_table: list[int]) -> None:
        self.trim(block_table, 0)
