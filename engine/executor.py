"""The engine's view of the model: an executor.

Two implementations share this interface: ``InProcessExecutor`` (tests, one
CPU process) and the Ray executor in actors/ (one TargetShard actor per TP rank).
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.batch import ModelInput, SamplingInput, StepOutput
from engine.runner import ModelRunner


class Executor:
    config: ModelConfig
    dtype: str  # "float32", "bfloat16" or "float16"

    def kv_bytes_per_block(self, block_size: int) -> int:
        raise NotImplementedError

    def profile_kv_blocks(self, mem_util: float, block_size: int, max_rows: int) -> int | None:
        """KV blocks that fit in mem_util of every rank's device after a profiled forward of
        max_rows rows (ModelRunner.profile_kv_blocks); None where memory is not measured (CPU)."""
        raise NotImplementedError

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        raise NotImplementedError

    def warm_up(self, max_seqs: int, rows_per_seq: int, prefill_rows: int) -> None:
        """Pay every rank's one-time costs (kernel compiles, CUDA graph captures, NCCL setup)
        before the first request (ModelRunner.warm_up); after allocate_kv, before any request."""
        raise NotImplementedError

    def execute(self, inp: ModelInput, sampling: SamplingInput) -> StepOutput:
        """One step: the forward, then verification and sampling where the target's tensors
        are (engine/verify.py); the small result comes back."""
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
                 load: bool = True, attention_backend: str = "auto", feature_layers: tuple[int, ...] | None = None,
                 cuda_graphs: str = "off", max_model_len: int = 0):
        self.runner = ModelRunner(model_dir, dtype, device, config=config, load=load,
                                  attention_backend=attention_backend, feature_layers=feature_layers,
                                  cuda_graphs=cuda_graphs, max_model_len=max_model_len)
        self.config = self.runner.config
        self.dtype = dtype

    def kv_bytes_per_block(self, block_size):
        return self.runner.kv_bytes_per_block(block_size)

    def profile_kv_blocks(self, mem_util, block_size, max_rows):
        return self.runner.profile_kv_blocks(mem_util, block_size, max_rows)

    def allocate_kv(self, num_blocks, block_size):
        self.runner.allocate_kv(num_blocks, block_size)

    def warm_up(self, max_seqs, rows_per_seq, prefill_rows):
        self.runner.warm_up(max_seqs, rows_per_seq, prefill_rows)

    def execute(self, inp, sampling):
        return self.runner.step(inp, sampling, hidden_to_host=False)  # the drafter is in this process

    def move_kv(self, src_slots, dst_slots):
        self.runner.move_kv(src_slots, dst_slots)

    def embed_and_head(self):
        m = self.runner.model
        return m.model.embed_tokens.weight, m.lm_head.weight
