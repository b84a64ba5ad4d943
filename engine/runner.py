"""One rank's model and KV cache (the forward's inputs and outputs: engine/batch.py).

How a forward runs (the model's torch ops with torch or Triton attention, or the fused
CPU kernel) is the runner's backend, chosen once (engine/backends.py).
"""
from __future__ import annotations

import torch

from engine.backends import choose_backend
from engine.batch import ModelInput, ModelOutput
from engine.config import ModelConfig
from engine.model import LlamaForCausalLM
from engine.parallel import TPGroup, pack_cpu_weights
from engine.weights import load_weights
from treespec_kernels.compaction import copy_slots

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        attention_backend: str = "auto",
    ):
        """attention_backend: "auto", "torch" or "triton" (engine/attention.py); with "auto" a
        bf16 single-rank CPU model runs its forwards in the fused C kernel (engine/backends.py)."""
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
        self.backend = choose_backend(self.model, self.device, attention_backend, fused=load)
        self.fused = getattr(self.backend, "fused", None)  # the C kernel's packed model, when it runs
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
        return self.backend.forward(inp, self.kv_cache)

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
