"""One rank's model and KV cache (the forward's inputs and outputs: engine/batch.py).

How a forward runs (the model's torch ops with torch or Triton attention, or the fused
CPU kernel) is the runner's backend, chosen once (engine/backends.py).
"""
from __future__ import annotations

import bisect

import torch

from engine.backends import choose_backend
from engine.batch import ModelInput, ModelOutput, SamplingInput, SeqInput, StepOutput, build_model_input
from engine.config import ModelConfig
from engine.graphs import BATCH_BUCKETS, ROW_BUCKETS, GraphForward
from engine.kv_cache import kv_blocks_for_memory
from engine.model import CausalLM
from engine.parallel import TPGroup, pack_cpu_weights
from engine.verify import verify_step
from engine.weights import load_weights
from treespec_kernels.compaction import copy_slots

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CudaMemory:
    """A CUDA device's memory as profile_kv_blocks reads it (torch's allocator statistics and
    the driver's free/total, which also sees the context and other processes)."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def in_use(self) -> int:
        """Bytes not free on the device, after returning the allocator's cached blocks."""
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def transient_peak(self) -> int:
        """Bytes allocated at the peak since reset_peak beyond what is allocated now."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)


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
        feature_layers: tuple[int, ...] | None = None,
        cuda_graphs: str = "off",
        max_model_len: int = 0,
    ):
        """attention_backend: "auto", "torch" or "triton" (engine/attention.py); with "auto" a
        bf16 single-rank CPU model runs its forwards in the fused C kernel (engine/backends.py).
        feature_layers: EngineConfig.feature_layers (the hidden rows a forward returns).
        cuda_graphs, max_model_len: EngineConfig's; with graphs on, decode and verify steps run
        padded to buckets (engine/graphs.py), captured as CUDA graphs on a CUDA device."""
        self.tp = tp or TPGroup()
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.config = config or ModelConfig.from_path(model_dir)
        with torch.device(self.device):
            self.model = CausalLM(self.config, self.tp, self.dtype)
        if load:
            load_weights(self.model, model_dir)
        self.model.eval()
        if load and pack_weights and self.device.type == "cpu":
            pack_cpu_weights(self.model)  # bf16 only; a no-op for other dtypes
        self.attention_backend, self.loaded = attention_backend, load
        self.cuda_graphs, self.max_model_len = cuda_graphs, max_model_len
        self.set_feature_layers(feature_layers)
        self.block_size = 0
        self.num_blocks = 0
        self.memory = CudaMemory(self.device) if self.device.type == "cuda" else None  # profile_kv_blocks

    def set_feature_layers(self, layers: tuple[int, ...] | None) -> None:
        """Which hidden rows forwards return: None, the final normed hidden state [N, H]; else
        the inputs of these decoder layers, concatenated [N, len(layers) * H] (EAGLE-3). Chooses
        the backend again (the fused CPU kernel captures no layer inputs)."""
        if layers is not None:
            layers = tuple(int(i) for i in layers)
            n = self.config.num_hidden_layers
            if not layers or any(not 0 <= i < n for i in layers):
                raise ValueError(f"feature_layers {list(layers)}: need layer ids in [0, {n}) of this {n}-layer model")
        self.feature_layers = layers
        self.backend = choose_backend(self.model, self.device, self.attention_backend, fused=self.loaded,
                                      feature_layers=layers)
        self.fused = getattr(self.backend, "fused", None)  # the C kernel's packed model, when it runs

    def kv_bytes_per_block(self, block_size: int) -> int:
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * block_size * len(self.model.layers)

    def profile_kv_blocks(self, mem_util: float, block_size: int, max_rows: int) -> int | None:
        """How many KV blocks this rank holds in ``mem_util`` of its device: what is resident
        now (weights, the CUDA context, anything else on the device) plus the transient peak
        of a forward over ``max_rows`` rows with logits for all of them (the largest verify
        step), measured by running it on a scratch cache. None where the device's memory is
        not measured (CPU: the engine then takes ``kv_cache_gib``)."""
        memory = self.memory
        if memory is None:
            return None
        scratch = -(-max_rows // block_size)
        self.allocate_kv(scratch, block_size)
        positions = [i % self.config.max_position_embeddings for i in range(max_rows)]
        inp = build_model_input([SeqInput([0] * max_rows, positions, list(range(scratch)), 0,
                                          logits_rows=list(range(max_rows)))], block_size)
        memory.reset_peak()
        with torch.inference_mode():
            logits = self.forward(inp).logits.float()  # verification reads fp32 probabilities
        del logits
        transient = memory.transient_peak()
        self.kv_cache = None
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        resident = memory.in_use()
        return kv_blocks_for_memory(memory.total(), mem_util, resident + transient, self.kv_bytes_per_block(block_size))

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """One [num_blocks, block_size, n_kv_local, head_dim] K and V tensor per layer.

        They are views of one [2, num_layers, ...] tensor, so KV compaction moves
        every layer's slots in one gather + scatter instead of two per layer.
        """
        self.num_blocks, self.block_size = num_blocks, block_size
        self.backend = getattr(self.backend, "eager", self.backend) if isinstance(self.backend, GraphForward) \
            else self.backend  # graphs hold the old cache's pointers: wrap the new one afresh below
        graphs = self._graphs_on()
        if graphs:
            num_blocks += 1  # the trash block padding rows write to (engine/graphs.py)
        attn = self.model.layers[0].self_attn
        shape = (2, len(self.model.layers), num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        if graphs:
            width = -(-(self.max_model_len + ROW_BUCKETS[-1]) // block_size) + 1
            self.backend = GraphForward(self.backend, width, self.num_blocks, block_size, capture=self.device.type == "cuda")

    def _graphs_on(self) -> bool:
        """cuda_graphs "on" everywhere (on CPU: the same padding, run eagerly); "auto" on CUDA with
        Triton attention (the torch reference plans attention from host ints, so it cannot be
        captured); never beside the fused CPU kernel, which has no launches to save."""
        if self.cuda_graphs == "off" or self.fused is not None or not self.max_model_len:
            return False
        if self.cuda_graphs == "on":
            return True
        return self.device.type == "cuda" and getattr(self.backend, "attention", None) == "triton"

    @torch.inference_mode()
    def warm_up(self, max_seqs: int, rows_per_seq: int, prefill_rows: int, always: bool = False) -> list[tuple]:
        """Run the step shapes serving will run before the first request, so that their
        one-time costs are paid while the replica is still starting: Triton compiles each
        kernel variant (prefill-shaped, and decode-shaped per rows-per-sequence bucket), CUDA
        graphs are captured for every (batch, rows) bucket serving can reach, and the first
        all-reduce sets up NCCL's communicators. Every rank of a TP group must call it.

        max_seqs: the most sequences a step batches; rows_per_seq: the most rows one sequence
        brings to a step (1 + tree budget + lookup tokens); prefill_rows: the longest prefill
        forward (max_num_batched_tokens, capped by the KV cache). Writes garbage K/V into the
        first blocks: call it before any sequence owns a block. Only on CUDA, where there is
        something to compile or capture (always: also elsewhere, for tests). Returns the
        shapes run: ("prefill", rows) and ("step", sequences, rows per sequence)."""
        if getattr(self, "kv_cache", None) is None or (self.device.type != "cuda" and not always):
            return []
        bs = self.block_size
        per_seq_blocks = min(self.num_blocks, -(-(1 + ROW_BUCKETS[-1]) // bs))
        prefill_rows = min(prefill_rows, self.num_blocks * bs)
        shapes: list[tuple] = [("prefill", prefill_rows)]
        top_rows = ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, min(rows_per_seq, ROW_BUCKETS[-1]))]
        rows = [r for r in ROW_BUCKETS if r <= min(top_rows, per_seq_blocks * bs - 1)]
        # Compiled kernels depend on the rows per sequence only; a graph is recorded per batch too.
        batches = [1]
        if isinstance(self.backend, GraphForward):
            top_batch = BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, min(max_seqs, BATCH_BUCKETS[-1]))]
            batches = [b for b in BATCH_BUCKETS if b <= top_batch]
        shapes += [("step", b, r) for b in batches for r in rows]
        table = list(range(per_seq_blocks))
        for shape in shapes:
            if shape[0] == "prefill":
                seqs = [SeqInput([0] * prefill_rows, [i % self.config.max_position_embeddings
                                                      for i in range(prefill_rows)],
                                 list(range(-(-prefill_rows // bs))), 0)]
            else:  # one cached token, then a plain decode step (r = 1) or a chain-shaped tree of r rows
                _, b, r = shape
                seqs = [SeqInput([0] * r, list(range(1, r + 1)), table, 1,
                                 tree_parents=list(range(-1, r - 1)) if r > 1 else None,
                                 logits_rows=list(range(r)))] * b
            self.forward(build_model_input(seqs, bs))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return shapes

    @torch.inference_mode()
    def forward(self, inp: ModelInput) -> ModelOutput:
        """The forward alone; its output stays where the backend left it."""
        return self.backend.forward(inp, self.kv_cache)

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> ModelOutput:
        """The forward's full output on the host: fp32 logits of every logits row, every
        hidden row (training data, tests, benchmarks; a served step calls ``step``)."""
        out = self.forward(inp)
        return ModelOutput(out.logits.float().cpu(), out.hidden.cpu(), out.argmax)

    @torch.inference_mode()
    def step(self, inp: ModelInput, sampling: SamplingInput, hidden_to_host: bool = True) -> StepOutput:
        """A served step: the forward, then verification and sampling on this device
        (engine/verify.py); only the paths and the next tokens come to the host, and the
        requested hidden rows: to the host for a remote replica (hidden_to_host), else left on
        this device for a drafter beside it (the in-process executor)."""
        out = self.forward(inp)
        paths, next_tokens = verify_step(out.logits, out.argmax, inp, sampling)
        hidden = None
        if sampling.hidden == "all":
            hidden = out.hidden
        elif sampling.hidden == "accepted":
            starts = inp.logits_indices.tolist() if inp.tree_parents is None else inp.query_start_loc
            rows = [starts[b] + n for b, path in enumerate(paths) for n in path]
            hidden = out.hidden[torch.tensor(rows, device=out.hidden.device)]
        if hidden is not None and hidden_to_host:
            hidden = hidden.cpu()
        return StepOutput(paths, next_tokens, hidden)

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
