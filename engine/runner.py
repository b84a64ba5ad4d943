"""One rank's model and KV cache, and the tensors one forward consumes.

``ModelInput`` is what crosses the executor boundary (to a Ray actor per TP rank
in actors/); ``ModelOutput`` comes back from rank 0.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from treespec_kernels.compaction import copy_slots
from treespec_kernels.tree import ancestor_rows
from engine.config import ModelConfig
from engine.fused import FusedModel
from engine.model import LlamaForCausalLM
from engine.parallel import TPGroup, pack_cpu_weights
from engine.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInput:
    """The new tokens of B sequences, flattened to N rows.

    input_ids, positions, slot_mapping: [N] int64
    block_tables: [B, max_blocks] int32
    context_lens, query_start_loc: B and B+1 ints
    tree_mask: None (causal) or bool [N, max_T]
    logits_indices: [M] rows whose logits the caller wants
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_start_loc: list[int]
    tree_mask: torch.Tensor | None
    logits_indices: torch.Tensor

    def metadata(self, device) -> AttentionMetadata:
        return AttentionMetadata(
            self.slot_mapping.to(device),
            self.block_tables.to(device),
            self.context_lens,
            self.query_start_loc,
            None if self.tree_mask is None else self.tree_mask.to(device),
        )


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [M, V] fp32, rows of logits_indices
    hidden: torch.Tensor  # [N, hidden], final hidden state of every row (drafter features)
    argmax: list[int] | None = None  # [M] each logits row's argmax, where the forward gave it


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
    ids, pos, slots, qsl, logits_idx, tables, mask = [], [], [], [0], [], [], []
    any_tree = any(s.tree_parents is not None for s in seqs)
    max_t = max(len(s.token_ids) for s in seqs)
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
            mask += (ancestor_rows(s.tree_parents, max_t) if s.tree_parents is not None else
                     [[j <= i for j in range(max_t)] for i in range(t)])  # causal rows
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(pos, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=[s.context_len for s in seqs],
        query_start_loc=qsl,
        tree_mask=torch.tensor(mask, dtype=torch.bool) if any_tree else None,
        logits_indices=torch.tensor(logits_idx, dtype=torch.long),
    )


# A causal forward of up to this many times the fused kernel's max_rows runs as fused chunks
# (ModelRunner._execute_in_chunks) rather than on the torch path: on an AMD Zen 4 without
# AMX (max_rows 32) a 40-token prompt took 45 ms in 32-row chunks against 63 ms in torch's
# bf16 GEMMs, 100 tokens 93 vs 99 ms, and 160 tokens alike (144 vs 146 ms).
PREFILL_CHUNKS = 4


def split_causal(inp: ModelInput, max_rows: int) -> list[tuple[ModelInput, list[int]]]:
    """Cut a causal forward into forwards of <= max_rows rows, to run in order.

    A sequence longer than the room left in a chunk is cut, and its later pieces start
    where the earlier ones left off (context_len grows by what they cached), so the KV cache
    and every row come out as in one forward. Returns (chunk, wanted) pairs: wanted[i] is
    the index in inp.logits_indices of the chunk's logits row i.
    """
    assert inp.tree_mask is None, "trees are verified in one forward"
    qsl, wanted_at = inp.query_start_loc, {int(r): j for j, r in enumerate(inp.logits_indices.tolist())}
    pieces: list[list[tuple[int, int, int]]] = [[]]  # per chunk: (sequence, first row, end row), local rows
    room = max_rows
    for b in range(len(inp.context_lens)):
        start, n = 0, qsl[b + 1] - qsl[b]
        while start < n:
            if room == 0:
                pieces.append([])
                room = max_rows
            end = min(n, start + room)
            pieces[-1].append((b, start, end))
            room -= end - start
            start = end
    chunks = []
    for chunk in pieces:
        rows = torch.cat([torch.arange(qsl[b] + s, qsl[b] + e) for b, s, e in chunk])
        local, wanted = [], []
        for i, r in enumerate(rows.tolist()):
            if r in wanted_at:
                local.append(i)
                wanted.append(wanted_at[r])
        chunks.append((ModelInput(
            input_ids=inp.input_ids[rows],
            positions=inp.positions[rows],
            slot_mapping=inp.slot_mapping[rows],
            block_tables=inp.block_tables[[b for b, _, _ in chunk]],
            context_lens=[inp.context_lens[b] + s for b, s, _ in chunk],
            query_start_loc=[0] + list(itertools.accumulate(e - s for _, s, e in chunk)),
            tree_mask=None,
            logits_indices=torch.tensor(local, dtype=torch.long),
        ), wanted))
    return chunks


class ModelRunner:
    """Builds this rank's model shard, loads its weights and owns its KV cache slice."""

    def __init__(
        self,
        model_dir: str,
        dtype: str = "float32",
        device: str = "cpu",
        tp: TPGroup | None = None,
        config: ModelConfig | None = None,
        load: bool = True,
        pack_weights: bool = True,
        fused: bool = True,
    ):
        self.tp = tp or TPGroup()
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.config = config or ModelConfig.from_path(model_dir)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(self.config, self.tp, self.dtype)
        if load:
            load_weights(self.model, model_dir)
        self.model.eval()
        if load and pack_weights and self.device.type == "cpu":
            pack_cpu_weights(self.model)  # bf16 only; a no-op for other dtypes
        # Decode and verify steps of a bf16 single-rank CPU model run as one C call.
        # fused=False keeps the torch path (comparisons); the kernel's own conditions are in
        # engine/fused.py (bf16, world size 1, AVX512-BF16 or AVX2 + FMA, a C compiler:
        # treespec_kernels/cpu_fused.py).
        self.fused = (FusedModel.for_target(self.model)
                      if fused and load and self.device.type == "cpu" else None)
        self.block_size = 0
        self.num_blocks = 0

    def kv_bytes_per_block(self, block_size: int) -> int:
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * block_size * len(self.model.layers)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """One [num_blocks, block_size, n_kv_local, head_dim] K and V tensor per layer.

        They are views of one [2, num_layers, ...] tensor, so KV compaction moves
        every layer's slots in one gather + scatter instead of two per layer.
        """
        self.num_blocks, self.block_size = num_blocks, block_size
        attn = self.model.layers[0].self_attn
        shape = (2, len(self.model.layers), num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> ModelOutput:
        dev = self.device
        if self.fused is not None and len(inp.input_ids) <= self.fused.max_rows:
            hidden, logits, argmax = self.fused.forward(inp, self.kv_cache)
            return ModelOutput(logits, hidden, argmax)
        if (self.fused is not None and inp.tree_mask is None
                and len(inp.input_ids) <= PREFILL_CHUNKS * self.fused.max_rows):
            return self._execute_in_chunks(inp)
        hidden = self.model(inp.input_ids.to(dev), inp.positions.to(dev), inp.metadata(dev))
        logits = self.model.compute_logits(hidden[inp.logits_indices.to(dev)])
        return ModelOutput(logits.float().cpu(), hidden.cpu())

    def _execute_in_chunks(self, inp: ModelInput) -> ModelOutput:
        """A causal forward of more rows than the fused kernel takes, as fused forwards of
        <= max_rows rows run in order (split_causal). A row's result does not depend on the
        other rows of a call, so this equals one big fused forward bit for bit."""
        hidden, logits, argmax = [], None, [0] * len(inp.logits_indices)
        for chunk, wanted in split_causal(inp, self.fused.max_rows):
            h, lg, am = self.fused.forward(chunk, self.kv_cache)
            hidden.append(h)
            if logits is None:
                logits = torch.empty(len(inp.logits_indices), lg.shape[1], dtype=lg.dtype)
            logits[wanted] = lg
            for j, a in zip(wanted, am):
                argmax[j] = a
        return ModelOutput(logits, torch.cat(hidden), argmax)

    @torch.inference_mode()
    def move_kv(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy K/V of flat cache slots src [M] to dst [M] in every layer (KV compaction).

        The gather happens before the scatter, so overlapping ranges are safe.
        """
        if len(src_slots) == 0:
            return
        if self.fused is not None:  # the kernel library is loaded: a few memcpys per layer
            self.fused.copy_slots(self.kv_cache, src_slots, dst_slots)
            return
        copy_slots(self.kv_cache, src_slots.to(self.device), dst_slots.to(self.device))
