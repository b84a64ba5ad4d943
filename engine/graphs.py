"""Static-shape forwards of decode and verify steps, replayed as CUDA graphs.

A CUDA graph replays a recorded forward with no per-kernel launch cost, but only on the
shapes and buffers it was recorded with. So a decode or verify step of B sequences with at
most T rows each is padded to a bucket (B', T') with B' in BATCH_BUCKETS and T' in
ROW_BUCKETS, and laid out densely: sequence b owns rows b*T' .. b*T' + T' - 1.

    real rows       the sequence's own rows, first, unchanged;
    padding rows    after them (and every row of sequences B .. B'-1): token 0, position 0,
                    parent -1 in a tree step (a root: nobody's ancestor, so no real row
                    attends to it), K/V written to the trash block;
    trash block     one KV block past those the engine allocates (``trash_block``),
                    never in a sequence's block table; padding sequences' tables point
                    only to it.

Real rows see exactly what they see unpadded, so a padded step equals the plain one: the
same padding runs eagerly on any device (``GraphForward(capture=False)``, what the CPU
tests check for every bucket), and on CUDA each bucket's forward is captured once and
replayed with the step's integers copied into its static input buffer.

Only steps whose sequences all have rows in ROW_BUCKETS' range take this path; prefills run
eagerly (their shapes vary too much to bucket, and their launch overhead is a small share of
a long forward).
"""
from __future__ import annotations

import bisect
import logging

import torch

from engine.batch import ModelInput, ModelOutput

log = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # rows per sequence: the pending token + its draft tree


def bucket_of(inp: ModelInput) -> tuple[int, int] | None:
    """(B', T') of a decode/verify step, or None when it has no bucket (run it eagerly)."""
    qsl = inp.query_start_loc
    batch, rows = len(qsl) - 1, inp.max_query_len
    if batch > BATCH_BUCKETS[-1] or rows > ROW_BUCKETS[-1] or min(inp.context_lens) == 0:
        return None  # too big, or a prefill (a sequence with nothing cached yet)
    return (BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, batch)],
            ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)])


def pad_input(inp: ModelInput, bucket: tuple[int, int], table_width: int, trash_block: int,
              block_size: int) -> tuple[ModelInput, torch.Tensor, torch.Tensor]:
    """inp padded to ``bucket`` (see the module docstring); block tables ``table_width`` wide.

    Returns (padded input, real_rows [N], real_logits [M]): where each of inp's rows and
    logits rows sits in the padded forward's hidden rows and logits rows. Every padded row
    is a logits row, so the padded logits rows are the padded rows.
    """
    b_pad, t_pad = bucket
    qsl, batch = inp.query_start_loc, len(inp.query_start_loc) - 1
    n_pad = b_pad * t_pad
    lengths = torch.tensor([b - a for a, b in zip(qsl[:-1], qsl[1:])])
    seq_of_row = torch.repeat_interleave(torch.arange(batch), lengths)
    local = torch.arange(len(inp.input_ids)) - torch.tensor(qsl[:-1])[seq_of_row]
    real_rows = seq_of_row * t_pad + local  # [N]

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((n_pad,), fill, dtype=values.dtype)
        out[real_rows] = values
        return out

    trash_slot = trash_block * block_size
    tables = torch.full((b_pad, table_width), trash_block, dtype=torch.int32)
    tables[:batch, : inp.block_tables.shape[1]] = inp.block_tables
    parents = None
    if inp.tree_parents is not None or t_pad > 1:
        # Causal sequences of a tree step are chains; padding rows are roots.
        chain = local - 1 if inp.tree_parents is None else inp.tree_parents
        parents = scatter(chain, -1)
    padded = ModelInput(
        input_ids=scatter(inp.input_ids, 0),
        positions=scatter(inp.positions, 0),
        slot_mapping=scatter(inp.slot_mapping, trash_slot),
        block_tables=tables,
        context_lens=list(inp.context_lens) + [0] * (b_pad - batch),
        query_start_loc=[i * t_pad for i in range(b_pad + 1)],
        tree_parents=parents,
        logits_indices=torch.arange(n_pad),
    )
    return padded, real_rows, real_rows[inp.logits_indices]


class GraphForward:
    """A forward backend (engine/backends.py) that runs bucketed steps padded, as CUDA graphs
    when ``capture`` (a CUDA device), else eagerly (the same padding; what CPU tests check).

    eager: the ModelForward it pads for (and runs everything without a bucket on).
    table_width: block-table entries per sequence: enough for the longest context plus
        ROW_BUCKETS[-1] rows (steps beyond it run eagerly).
    trash_block, block_size: the KV block padding rows write to (see the module docstring).
    """

    def __init__(self, eager, table_width: int, trash_block: int, block_size: int, capture: bool):
        self.eager, self.table_width = eager, table_width
        self.trash_block, self.block_size, self.capture = trash_block, block_size, capture
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def forward(self, inp: ModelInput, kv_cache: torch.Tensor) -> ModelOutput:
        bucket = bucket_of(inp)
        # Attention reads each sequence's new rows, padding rows included, through its block
        # table: the padded table must reach past the last padding row.
        if bucket is None or max(inp.context_lens) + bucket[1] > self.table_width * self.block_size:
            return self.eager.forward(inp, kv_cache)
        padded, rows, logits_rows = pad_input(inp, bucket, self.table_width, self.trash_block, self.block_size)
        if self.capture:
            graph = self.graphs.get(bucket)
            if graph is None:
                try:
                    graph = self.graphs[bucket] = _Graph(self.eager, padded, kv_cache)
                except Exception as exc:  # serve on without graphs rather than fail the step
                    log.warning("CUDA graph capture of bucket %s failed (%s); running eagerly from now on",
                                bucket, exc)
                    self.capture = False
                    return self.eager.forward(inp, kv_cache)
            logits, hidden = graph.run(padded)
        else:
            out = self.eager.forward(padded, kv_cache)
            logits, hidden = out.logits, out.hidden
        device = hidden.device
        return ModelOutput(logits[logits_rows.to(device)], hidden[rows.to(device)])


class _Graph:
    """One bucket's forward, captured: its inputs live in one static int64 buffer on the device."""

    def __init__(self, eager, example: ModelInput, kv_cache: torch.Tensor):
        from engine.attention import pack_input, unpack_input

        self.eager = eager
        flat, self.layout = pack_input(example)
        self.flat = flat.to(eager.device)
        # Every replay runs the shapes captured here; the decode kernel's KV splits are chosen
        # for the longest context the bucket's block tables reach.
        self.layout.split_context = example.block_tables.shape[1] * kv_cache.shape[3]

        def run():
            return eager.run(*unpack_input(self.flat, self.layout, eager.device, eager.attention))

        stream = torch.cuda.Stream(eager.device)
        stream.wait_stream(torch.cuda.current_stream(eager.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, the allocator settles
                run()
        torch.cuda.current_stream(eager.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run()

    def run(self, padded: ModelInput) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.attention import pack_input

        flat, _ = pack_input(padded)
        self.flat.copy_(flat, non_blocking=True)
        self.graph.replay()
        return self.out
