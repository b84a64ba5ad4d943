"""The engine's view of the model: an executor.

Two implementations share this interface: ``InProcessExecutor`` (tests, one
CPU process) and the Ray executor in actors/ (one TargetShard actor per TP rank).
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.batch import ModelInput, ModelOutput
from engine.runner import ModelRunner


class Executor:
    config: ModelConfig
    dtype: str  # "float32", "bfloat16" or "float16"

    def kv_bytes_per_block(self, block_size: int) -> int:
        raise NotImplementedError

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        raise NotImplementedError

    def execute(self, inp: ModelInput) -> ModelOutput:
        raise NotImplementedError

    def move_kv(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        raise NotImplementedError

    def embed_and_head(self):
        """(embedding weight, lm_head weight) for drafters sharing them, or None if remote."""
        return None

    def shutdown(self) -> None:
        pass


class InProcessExecutor(Executor):
    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu", config: ModelConfig | None = None,
                 load: bool = True, attention_backend: str = "auto"):
        self.runner = ModelRunner(model_dir, dtype, device, config=config, load=load,
                                  attention_backend=attention_backend)
        self.config = self.runner.config
        self.dtype = dtype

    def kv_bytes_per_block(self, block_size):
        return self.runner.kv_bytes_per_block(block_size)

    def allocate_kv(self, num_blocks, block_size):
        self.runner.allocate_kv(num_blocks, block_size)

    def execute(self, inp):
        return self.runner.execute(inp)

    def move_kv(self, src_slots, dst_slots):
        self.runner.move_kv(src_slots, dst_slots)

    def embed_and_head(self):
        m = self.runner.model
        return m.model.embed_tokens.weight, m.lm_head.weight
