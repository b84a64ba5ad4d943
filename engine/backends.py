"""Forward backends: how one rank runs a ModelInput, chosen once per ModelRunner.

- ``ModelForward``: the model's torch ops on any device, attention by the "torch"
  reference or the "triton" kernels (engine/attention.py). Every step's integers go to
  the device in one copy and the tree mask is built there, once per forward.
- ``FusedCPUForward``: a bf16 single-rank CPU model; decode and verify steps (and short
  prefills, in chunks) run as one C call each (engine/fused.py), longer prefills on the
  ``ModelForward`` beside it, where oneDNN's GEMMs are compute-bound and as fast.

Both return a ``ModelOutput`` where the forward left it: on the device for ``ModelForward``
(logits in the model's dtype), on the host for the fused kernel.
"""
from __future__ import annotations

import itertools
import logging

import torch

from engine.attention import resolve_attention_backend, upload
from engine.batch import ModelInput, ModelOutput
from engine.fused import FusedModel, target_fallback_reason

log = logging.getLogger(__name__)
_logged: set[str] = set()  # why a target skips the fused kernel, said once per process and reason


def _log_once(key: str, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


class ModelForward:
    def __init__(self, model, device: torch.device, attention: str, feature_layers: tuple[int, ...] | None = None):
        """feature_layers: None, the output's hidden rows are the final normed hidden states;
        else the inputs of these layers, concatenated (EAGLE-3's features; the logits still
        come from the final hidden state)."""
        self.model, self.device, self.attention = model, device, attention
        self.feature_layers = feature_layers

    def forward(self, inp: ModelInput, kv_cache: torch.Tensor) -> ModelOutput:
        return ModelOutput(*self.run(*upload(inp, self.device, self.attention)))

    def run(self, ids, positions, logits_indices, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward over tensors already on the device (what a CUDA graph records):
        (logits [M, V], hidden rows: the final hidden state or feature_layers' inputs)."""
        if self.feature_layers is None:
            hidden = features = self.model(ids, positions, meta)
        else:
            hidden, features = self.model.forward_features(ids, positions, meta, self.feature_layers)
        return self.model.compute_logits(hidden[logits_indices]), features


class FusedCPUForward:
    def __init__(self, fused: FusedModel, eager: ModelForward):
        self.fused, self.eager = fused, eager

    def forward(self, inp: ModelInput, kv_cache: torch.Tensor) -> ModelOutput:
        n = len(inp.input_ids)
        if n <= self.fused.max_rows:
            hidden, logits, argmax = self.fused.forward(inp, kv_cache)
            return ModelOutput(logits, hidden, argmax)
        if inp.tree_parents is None and n <= PREFILL_CHUNKS * self.fused.max_rows:
            return self._in_chunks(inp, kv_cache)
        return self.eager.forward(inp, kv_cache)

    def _in_chunks(self, inp: ModelInput, kv_cache: torch.Tensor) -> ModelOutput:
        """A causal forward of more rows than the fused kernel takes, as fused forwards of
        <= max_rows rows run in order (split_causal). A row's result does not depend on the
        other rows of a call, so this equals one big fused forward bit for bit."""
        hidden, logits, argmax = [], None, [0] * len(inp.logits_indices)
        for chunk, wanted in split_causal(inp, self.fused.max_rows):
            h, lg, am = self.fused.forward(chunk, kv_cache)
            hidden.append(h)
            if logits is None:
                logits = torch.empty(len(inp.logits_indices), lg.shape[1], dtype=lg.dtype)
            logits[wanted] = lg
            for j, a in zip(wanted, am):
                argmax[j] = a
        return ModelOutput(logits, torch.cat(hidden), argmax)


def choose_backend(model, device: torch.device, attention_backend: str = "auto", fused: bool = True,
                   feature_layers: tuple[int, ...] | None = None):
    """The forward backend of one rank: with "auto", the fused C kernel where it applies (a bf16
    single-rank CPU model on a CPU it builds for: engine/fused.py); else the model's own forward
    with the resolved attention backend. fused=False keeps the torch path (comparisons).
    feature_layers (ModelForward's): the fused kernel returns only the final hidden state, so
    capturing layer inputs keeps the torch path."""
    attention = resolve_attention_backend(attention_backend, device)
    eager = ModelForward(model, device, attention, feature_layers)
    if fused and feature_layers is not None and attention_backend == "auto" and device.type == "cpu":
        _log_once("features", "capturing the inputs of layers %s (EAGLE-3 features): the target runs its torch "
                  "forward, not the fused CPU kernel", list(feature_layers))
        fused = False
    if fused and attention_backend == "auto" and device.type == "cpu":
        reason = target_fallback_reason(model.config)
        if reason and model.lm_head.weight.dtype == torch.bfloat16:
            _log_once(reason, "the fused CPU kernel computes Llama's layer and %s: the target runs its torch "
                      "forward", reason)
        packed = FusedModel.for_target(model)
        if packed is not None:
            return FusedCPUForward(packed, eager)
    return eager


# A causal forward of up to this many times the fused kernel's max_rows runs as fused chunks
# (FusedCPUForward) rather than on the torch path: on an AMD Zen 4 without
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
    assert inp.tree_parents is None, "trees are verified in one forward"
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
            tree_parents=None,
            logits_indices=torch.tensor(local, dtype=torch.long),
        ), wanted))
    return chunks
