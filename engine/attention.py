"""Attention over the paged KV cache: the per-forward metadata and the two implementations.

``upload`` turns a host ``ModelInput`` into what one forward needs on its device, once
per forward, shared by every layer: one host-to-device copy of all the step's integers
(token ids, positions, slots, block tables, context lengths, query starts, tree
parents), then the tree's ancestor mask built on the device (``batch_ancestor_mask``),
bit-packed once for the Triton kernel. No layer converts a list or waits on the host.

Attention backends (``EngineConfig.attention_backend``):
- "torch": the reference in treespec_kernels/reference.py, any device;
- "triton": the Triton kernels, on CUDA, or on CPU tensors in Triton's interpreter (slow,
  for tests: ``TRITON_INTERPRET=1``, set here when triton is not imported yet, else at the
  process's start): treespec_kernels/triton_decode.py (split-KV) for steps whose new rows x
  GQA group fit one 128-row tile (decode, tree verification: ``use_decode_kernel``),
  treespec_kernels/triton_attention.py for larger (prefill-shaped) steps;
- "auto": triton on CUDA, torch elsewhere (where a bf16 CPU model runs whole forwards
  in the fused C kernel instead: engine/backends.py).
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

import torch

from engine.config import ATTENTION_BACKENDS
from treespec_kernels.reference import attention_plan
from treespec_kernels.reference import paged_attention as torch_paged_attention
from treespec_kernels.reference import write_kv
from treespec_kernels.tree import batch_ancestor_mask, pack_mask

def resolve_attention_backend(name: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA, "torch" elsewhere; a forced backend is checked and loaded."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        triton_attention(device)  # fail at start, not at the first request
    return name


def triton_attention(device: torch.device):
    """The Triton kernel modules (tree attention, then the decode kernel, which imports the
    former's helpers); on CPU, in Triton's interpreter. Triton picks interpreted or compiled
    functions when its modules are imported (its own ``tl.zeros`` & co. included), so on CPU
    the flag must be on before anything imports triton; the flag stays set for the process,
    because triton reads it again at each launch. Returns (triton_attention, triton_decode)."""
    interpret = device.type != "cuda"
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        import triton.language as tl

        if type(tl.zeros).__name__ != "InterpretedFunction":
            raise ValueError("attention_backend='triton' on CPU runs in Triton's interpreter, which must be on "
                             "before triton is first imported: start the process with TRITON_INTERPRET=1")
    import treespec_kernels.triton_attention as module

    if (type(module._tree_attention_kernel).__name__ == "InterpretedFunction") != interpret:
        module = importlib.reload(sys.modules["treespec_kernels.triton_attention"])
    import treespec_kernels.triton_decode as decode

    if ((type(decode._decode_attention_kernel).__name__ == "InterpretedFunction") != interpret
            or decode._load_kv is not module._load_kv):  # built on a module since reloaded
        decode = importlib.reload(sys.modules["treespec_kernels.triton_decode"])
    return module, decode


def triton_ops(device: torch.device):
    """treespec_kernels.triton_ops, the fused norm / RoPE / SiLU-mul kernels the layers run
    wherever attention runs on Triton (engine/model.py), interpreted on CPU like the attention
    kernels (``triton_attention`` checks the interpreter flag)."""
    triton_attention(device)
    import treespec_kernels.triton_ops as ops

    if (type(ops._rms_norm_kernel).__name__ == "InterpretedFunction") != (device.type != "cuda"):
        ops = importlib.reload(sys.modules["treespec_kernels.triton_ops"])
    return ops


@dataclass
class AttentionMetadata:
    """What every attention layer of one forward needs, on the forward's device.

    backend: "torch" or "triton".
    slot_mapping:    [N] int64, cache slot of each new token.
    block_tables:    [B, max_blocks] int32.
    context_lens:    B ints, tokens already in the cache before this forward (host copy);
                     context_lens_t: the same as int32 [B] on the device.
    query_start_loc: B+1 ints, spans of each sequence's new tokens (host copy);
                     query_start_loc_t: int32 [B+1] on the device.
    max_query_len:   the largest span (sizes the Triton grid without a host sync).
    tree_mask:       None (causal) or bool [N, max_query_len]: row i sees its sequence's
                     context and the new tokens marked True (its tree ancestors and itself).
    packed_mask:     tree_mask bit-packed (int32 [N, words]) for the Triton kernel.
    """

    backend: str
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: list[int]
    query_start_loc: list[int]
    context_lens_t: torch.Tensor
    query_start_loc_t: torch.Tensor
    max_query_len: int
    tree_mask: torch.Tensor | None = None
    packed_mask: torch.Tensor | None = None
    kernels: tuple = None  # triton backend: the kernel modules (triton_attention, triton_decode)
    ops: object = None  # triton backend: treespec_kernels.triton_ops, the layers' fused elementwise ops
    plans: dict = field(default_factory=dict)  # built by the first layer: torch: padding and mask;
                                               # triton: the decode kernel's split count
    split_context: int | None = None  # the context the split count is chosen for (None: the
                                      # step's longest; a CUDA graph: the longest it can see)


@dataclass
class InputLayout:
    """How ``pack_input``'s flat tensor splits, and the host ints a forward keeps (they size
    no tensor the device reads, so a captured CUDA graph may hold them fixed)."""

    sizes: list[int]
    context_lens: list[int]
    query_start_loc: list[int]
    max_query_len: int
    split_context: int | None = None  # see AttentionMetadata


def pack_input(inp) -> tuple[torch.Tensor, InputLayout]:
    """inp: engine.batch.ModelInput (host) -> every integer of the step in one int64 tensor
    [token ids, positions, slots, logits rows, context lens + query starts, block tables,
    tree rows (tree steps)] and its layout."""
    qsl = list(inp.query_start_loc)
    parts = [inp.input_ids, inp.positions, inp.slot_mapping, inp.logits_indices,
             torch.tensor(inp.context_lens + qsl, dtype=torch.long), inp.block_tables.flatten().long()]
    if inp.tree_parents is not None:
        parts += list(inp.tree_rows())
    return torch.cat(parts), InputLayout([len(p) for p in parts], list(inp.context_lens), qsl, inp.max_query_len)


def unpack_input(flat: torch.Tensor, layout: InputLayout, device: torch.device, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``pack_input``'s tensor, already on ``device``, -> (input_ids [N], positions [N],
    logits_indices [M], AttentionMetadata): views and device ops only, no host sync."""
    batch, max_q = len(layout.context_lens), layout.max_query_len
    ids, pos, slots, logits_idx, lens, tables, *tree = flat.split(layout.sizes)
    lens = lens.to(torch.int32)
    mask = batch_ancestor_mask(tree[0], tree[1], max_q) if tree else None
    meta = AttentionMetadata(
        backend, slots, tables.view(batch, -1).to(torch.int32), layout.context_lens, layout.query_start_loc,
        lens[:batch], lens[batch:], max_q, mask,
        pack_mask(mask) if mask is not None and backend == "triton" else None,
        triton_attention(device) if backend == "triton" else None,
        triton_ops(device) if backend == "triton" else None,
        split_context=layout.split_context,
    )
    return ids, pos, logits_idx, meta


def upload(inp, device: torch.device, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              AttentionMetadata]:
    """inp: engine.batch.ModelInput (host). Returns (input_ids [N], positions [N],
    logits_indices [M], AttentionMetadata), all on ``device``."""
    flat, layout = pack_input(inp)
    if flat.device != device:
        flat = flat.to(device, non_blocking=True)  # the forward's one host-to-device copy
    return unpack_input(flat, layout, device, backend)


def attend(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [N, H, D] -> [N, H, D]."""
    group = q.shape[1] // k_cache.shape[2]  # query heads per KV head
    if meta.backend == "triton":
        tree_kernel, decode_kernel = meta.kernels
        if not decode_kernel.use_decode_kernel(meta.max_query_len, group):
            return tree_kernel.paged_attention_packed(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens_t, meta.query_start_loc_t,
                meta.packed_mask, scale, meta.max_query_len,
            )
        splits = meta.plans.get(group)
        if splits is None:  # the same for every layer: chosen once per forward, from host ints
            batch, longest = len(meta.context_lens), meta.split_context or max(meta.context_lens, default=0)
            splits = meta.plans[group] = decode_kernel.splits_for(q, k_cache, batch, meta.max_query_len, longest)
        return decode_kernel.paged_attention_decode(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens_t, meta.query_start_loc_t,
            meta.packed_mask, scale, meta.max_query_len, splits=splits,
        )
    key = (group, q.dtype)
    plan = meta.plans.get(key)
    if plan is None:
        plan = meta.plans[key] = attention_plan(
            meta.context_lens, meta.query_start_loc, meta.tree_mask, key[0], q.dtype, q.device,
            meta.block_tables, k_cache.shape[1],
        )
    return torch_paged_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, meta.tree_mask, scale,
        plan,
    )


__all__ = ["ATTENTION_BACKENDS", "AttentionMetadata", "attend", "resolve_attention_backend", "upload", "write_kv"]
