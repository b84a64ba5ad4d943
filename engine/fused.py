"""The fused CPU forward for decode and verification steps (kernels/cpu_fused.c).

A one-token decode step of a small model on a CPU is bound by reading every weight
once; the eager torch path adds ~2,000 small ops on top. ``FusedDecoder`` copies a
bf16, single-rank model's matrices into one arena per thread (each thread's rows of
every matrix, in the order the forward uses them) and runs a whole forward for a few
rows in one C call. Prefill chunks longer than ``max_rows`` stay on the torch path,
where oneDNN's GEMMs are compute-bound and faster.

Use ``FusedDecoder.create(model)``: it returns None (and the caller keeps torch) when
the model or machine does not qualify, or when ``TREESPEC_CPU_KERNEL=torch``.
"""
from __future__ import annotations

import ctypes
import os

import torch

from kernels import cpu_fused

MAX_ROWS = 32  # more rows than this: oneDNN's packed GEMMs win (compute-bound)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def fused_disabled_reason(model) -> str | None:
    """None when ``model`` can run fused here, else why not."""
    if os.environ.get("TREESPEC_CPU_KERNEL", "auto") == "torch":
        return "TREESPEC_CPU_KERNEL=torch"
    cfg = model.config
    w = model.lm_head.weight
    if w.device.type != "cpu" or w.dtype != torch.bfloat16:
        return "needs a bf16 CPU model"
    if model.tp.world_size != 1:
        return "needs tensor-parallel world size 1"
    if cfg.head_dim % 16 or cfg.num_attention_heads % cfg.num_key_value_heads:
        return "needs head_dim % 16 == 0 and whole GQA groups"
    return cpu_fused.unsupported_reason()


class FusedDecoder:
    """Packs a bf16 LlamaForCausalLM (world size 1) and runs forwards of <= max_rows rows."""

    def __init__(self, model, threads: int, build_dir: str, max_rows: int = MAX_ROWS):
        self.lib = cpu_fused.load(build_dir)
        self.model, self.threads, self.max_rows = model, threads, max_rows
        cfg = model.config
        self.hidden, self.vocab = cfg.hidden_size, cfg.vocab_size
        layers = model.layers
        mats = []  # (weight [N, K], pair) in forward order; pair: gate/up halves split together
        for layer in layers:
            mats += [(layer.self_attn.qkv_proj.weight, False), (layer.self_attn.o_proj.weight, False),
                     (layer.mlp.gate_up_proj.weight, True), (layer.mlp.down_proj.weight, False)]
        mats.append((model.lm_head.weight, False))

        def split(n: int) -> list[int]:  # thread bounds, on multiples of 4 rows (the GEMV tile)
            return [0] + [min(n, (n * t // threads + 3) // 4 * 4) for t in range(1, threads)] + [n]

        sizes = [0] * threads
        plan = []  # per matrix, per thread: (rows, out0, n0, out1, n1)
        for w, pair in mats:
            n, k = w.shape
            half = n // 2 if pair else n
            b = split(half)
            per = []
            for t in range(threads):
                lo, hi = b[t], b[t + 1]
                segs = [(lo, hi), (half + lo, half + hi)] if pair else [(lo, hi)]
                per.append(segs)
                sizes[t] += sum(h - l for l, h in segs) * k
            plan.append(per)
        # One arena per thread, on huge pages; kept alive by self.arenas.
        self.arenas, self._raw = [], []
        for t in range(threads):
            addr = self.lib.fused_alloc(sizes[t] * 2)
            if not addr:
                raise MemoryError("fused_alloc failed")
            self._raw.append(addr)
            buf = (ctypes.c_char * (sizes[t] * 2)).from_address(addr)
            self.arenas.append(torch.frombuffer(buf, dtype=torch.bfloat16))
        shares = torch.zeros(len(mats) * threads, 5, dtype=torch.int64)
        offsets = [0] * threads
        with torch.no_grad():
            for m, ((w, _), per) in enumerate(zip(mats, plan)):
                k = w.shape[1]
                for t, segs in enumerate(per):
                    start = offsets[t]
                    row = [self.arenas[t].data_ptr() + 2 * start]
                    for lo, hi in segs:
                        n = hi - lo
                        self.arenas[t][offsets[t]: offsets[t] + n * k] = w[lo:hi].reshape(-1)
                        offsets[t] += n * k
                        row += [lo, n]
                    row += [0, 0] * (2 - len(segs))
                    shares[m * threads + t] = torch.tensor(row, dtype=torch.int64)
        self.shares = shares
        self.norms = [t.detach().contiguous() for layer in layers
                      for t in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        self.norms.append(model.model.norm.weight.detach().contiguous())
        self.norm_ptrs = torch.tensor([_ptr(t) for t in self.norms], dtype=torch.int64)
        self.embed = model.model.embed_tokens.weight.detach().contiguous()
        self.inv_freq = model.model.rope.inv_freq.float().contiguous()
        self.eps_scale = torch.tensor([cfg.rms_norm_eps, cfg.head_dim ** -0.5], dtype=torch.float32)
        self.cfg = [cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                    cfg.intermediate_size, len(layers), cfg.vocab_size, threads]

    @classmethod
    def create(cls, model, build_dir: str, threads: int | None = None) -> "FusedDecoder | None":
        threads = threads or torch.get_num_threads()
        if fused_disabled_reason(model) is not None:
            return None
        return cls(model, threads, build_dir)

    def __del__(self):
        for addr in getattr(self, "_raw", []):
            self.lib.fused_free(addr)
        self._raw = []

    def forward(self, inp, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inp: engine.runner.ModelInput with N <= max_rows rows; kv_cache: the runner's
        bf16 [2, layers, blocks, block_size, kv_heads, head_dim] tensor.
        Returns hidden bf16 [N, hidden] and logits fp32 [len(logits_indices), vocab]."""
        n = len(inp.input_ids)
        qsl = torch.tensor(inp.query_start_loc, dtype=torch.int32)
        row_seq = torch.repeat_interleave(torch.arange(len(qsl) - 1, dtype=torch.int32), qsl.diff())
        ctx = torch.tensor(inp.context_lens, dtype=torch.int32)
        tables = inp.block_tables.to(torch.int32).contiguous()
        ids = inp.input_ids.contiguous()
        pos = inp.positions.contiguous()
        slots = inp.slot_mapping.contiguous()
        mask = None if inp.tree_mask is None else inp.tree_mask.to(torch.uint8).contiguous()
        rows = inp.logits_indices.contiguous()
        cfg = torch.tensor(self.cfg + [kv_cache.shape[2], kv_cache.shape[3]], dtype=torch.int64)
        hidden = torch.empty(n, self.hidden, dtype=torch.bfloat16)
        logits = torch.empty(len(rows), self.vocab, dtype=torch.float32)
        rc = self.lib.fused_forward(
            _ptr(cfg), _ptr(self.eps_scale), _ptr(self.shares), _ptr(self.norm_ptrs),
            _ptr(self.embed), _ptr(self.inv_freq), _ptr(kv_cache),
            n, _ptr(ids), _ptr(pos), _ptr(slots), _ptr(row_seq), _ptr(tables), tables.shape[1],
            _ptr(ctx), _ptr(qsl), None if mask is None else _ptr(mask), 0 if mask is None else mask.shape[1],
            len(rows), _ptr(rows), _ptr(hidden), _ptr(logits),
        )
        if rc != 0:
            raise MemoryError("fused CPU forward could not allocate its scratch memory")
        return hidden, logits
