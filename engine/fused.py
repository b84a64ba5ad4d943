"""The fused CPU forward for decode, verification and EAGLE drafting (treespec_kernels/cpu_fused.c).

A one-token decode step of a small model on a CPU is bound by reading every weight
once; the eager torch path adds ~2,000 small ops on top. ``FusedModel`` copies a
bf16 model's matrices into one arena per thread (each thread's rows of every matrix,
in the order the forward uses them) and runs a whole forward for a few rows in one C
call of at most ``max_rows`` rows (32, or 256 on AMX tiles and in the AVX2 build); a
prefill of up to ``PREFILL_CHUNKS`` times that runs as such calls in order
(engine/backends.py), and longer ones stay on the torch path, where oneDNN's GEMMs are
compute-bound and as fast.

``FusedModel.for_target(model)`` packs the target (None, and the caller
keeps torch, when the model or machine does not qualify or ``TREESPEC_CPU_KERNEL=torch``);
``FusedModel.for_eagle(...)`` packs an EAGLE drafter with its draft head and
``FusedMedusa.for_medusa(...)`` Medusa's heads, both with int8 weights where the CPU has
AMX-INT8 or AVX512-VNNI, or in the AVX2 build (``EngineConfig.draft_int8``): a drafter
call is bound by its weight bytes.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import os

import torch

from engine.model import rope_attention_factor
from engine.weights import cache_root
from treespec_kernels import cpu_fused

# Rows per forward up to which the fused path beats oneDNN's packed GEMMs: with AVX512-BF16
# dot products it turns compute-bound past ~32 rows; on AMX tiles (which stream the weights
# once per 32 rows) it measured 1.3-2x faster than the torch path from 36 to 256 rows here.
# The AVX2 build takes up to 256 rows too: torch has no fast bf16 GEMM on such CPUs (a
# 128-token bf16 chunk took 1.44 s on the torch path of an AMD Zen 3, 0.26 s in fp32).
MAX_ROWS = 32
MAX_ROWS_AMX = 256

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class _Model(ctypes.Structure):  # mirrors `Model` in treespec_kernels/cpu_fused.c
    _fields_ = [(n, _i64) for n in ("hidden", "heads", "kv_heads", "head_dim", "inter", "layers", "vocab",
                                     "threads", "fc_in", "amx_attention")] + [
        ("eps", _f32), ("scale", _f32),
        ("shares", _ptr), ("norms", _ptr), ("embed", _ptr), ("inv_freq", _ptr), ("fc_bias", _ptr)]


class _Batch(ctypes.Structure):  # mirrors `Batch` in treespec_kernels/cpu_fused.c
    _fields_ = [
        ("kv", _ptr), ("num_blocks", _i64), ("block_size", _i64), ("M", _i64),
        ("ids", _ptr), ("positions", _ptr), ("slots", _ptr), ("row_seq", _ptr),
        ("block_tables", _ptr), ("max_blocks", _i64), ("context_lens", _ptr), ("qsl", _ptr),
        ("tree_mask", _ptr), ("mask_cols", _i64), ("vis_ptr", _ptr), ("vis_slots", _ptr), ("inputs", _ptr),
        ("R", _i64), ("logit_rows", _ptr), ("hidden_out", _ptr), ("logits", _ptr), ("argmax", _ptr),
        ("feats", _ptr)]


class _EagleStep(ctypes.Structure):  # mirrors `EagleStep` in treespec_kernels/cpu_fused.c
    _fields_ = [
        ("kv", _ptr), ("capacity", _i64), ("length", _i64), ("n_new", _i64), ("new_ids", _ptr), ("new_feats", _ptr),
        ("last_hidden", _ptr), ("last_logits", _ptr), ("vocab_ids", _ptr), ("budget", _i64), ("top_k", _i64),
        ("depth", _i64), ("min_prob", ctypes.c_double), ("tokens", _ptr), ("parents", _ptr), ("n_out", _i64),
        ("forwards", _i64)]


def build_dir() -> str:
    """Where the kernel library is compiled to (once per source hash)."""
    return os.path.join(cache_root(), "kernels")


def fused_disabled_reason(weight: torch.Tensor, world_size: int = 1, attention: tuple | None = None) -> str | None:
    """None when a model with this weight dtype/device can run fused here, else why not.
    attention: (head_dim, heads, kv_heads) of a model with attention layers."""
    if os.environ.get("TREESPEC_CPU_KERNEL", "auto") == "torch":
        return "TREESPEC_CPU_KERNEL=torch"
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return "needs a bf16 CPU model"
    if world_size != 1:
        return "needs tensor-parallel world size 1"
    if attention is not None and (attention[0] % 16 or attention[0] > 256 or attention[1] % attention[2]):
        return "needs head_dim % 16 == 0, head_dim <= 256 and whole GQA groups"
    return cpu_fused.unsupported_reason()


def target_fallback_reason(cfg) -> str | None:
    """Why the kernel cannot run this target's layers (an engine.config.ModelConfig), or None.
    The kernel computes Llama's layer: no projection biases, no per-head q/k norms."""
    extras = [name for name, on in (("QKV biases", cfg.qkv_bias), ("an o_proj bias", cfg.o_bias),
                                    ("q/k head norms", cfg.qk_norm),
                                    ("YaRN's attention factor", rope_attention_factor(cfg.rope_scaling) != 1.0))
              if on]
    return f"{cfg.family} has {' and '.join(extras)}" if extras else None


def fused_kernel_available() -> bool:
    """Whether bf16 CPU models can run the fused kernel here (not disabled, a build fits)."""
    return os.environ.get("TREESPEC_CPU_KERNEL", "auto") != "torch" and cpu_fused.unsupported_reason() is None


def _t(x) -> int:
    return 0 if x is None else x.data_ptr()


def _ints(values, ctype=ctypes.c_int64):
    """A C array of ints from a list, or an integer tensor made contiguous in that type:
    (object to keep alive during the call, its address). Small per-step metadata is built
    as ctypes arrays: a torch op costs several microseconds, and a step makes dozens."""
    if isinstance(values, torch.Tensor):
        dtype = torch.int64 if ctype is ctypes.c_int64 else torch.int32
        t = values if values.dtype == dtype and values.is_contiguous() else values.to(dtype).contiguous()
        return t, t.data_ptr()
    arr = (ctype * max(1, len(values)))(*values)
    return arr, ctypes.addressof(arr)


def _tile_pack(w: torch.Tensor) -> torch.Tensor:
    """bf16 or int8 [n, K] -> flat, in gemv_amx's / gemv_amx_i8's layout (treespec_kernels/cpu_fused.c):
    16-row blocks in pairs, per tile of 64 bytes of columns (32 bf16, 64 int8) the pair's
    two [16 column groups, 16 rows, g] tiles, g the columns in 4 bytes (2 bf16, 4 int8).
    n % 16 == 0, K % (16 * g) == 0."""
    n, k = w.shape
    g = 4 // w.element_size()
    kc, size = 16 * g, 256 * g  # columns and elements per tile
    tiles = w.reshape(n // 16, 16, k // kc, 16, g).permute(0, 2, 3, 1, 4).reshape(n // 16, k // kc, size)
    pairs = tiles[: n // 32 * 2].reshape(n // 32, 2, k // kc, size).transpose(1, 2)
    return torch.cat([pairs.reshape(-1), tiles[n // 32 * 2:].reshape(-1)])


def fits_tiles(w: torch.Tensor, pair: bool, int8: bool = False) -> bool:
    """Whether gemv_amx (int8: gemv_amx_i8) can run this matrix: rows % 16 (each half of a
    pair), columns % 32 (int8: % 64)."""
    return (w.shape[0] // (2 if pair else 1)) % 16 == 0 and w.shape[1] % (64 if int8 else 32) == 0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, K] -> (int8 [n, K], fp32 scales [n]): symmetric per row, w ~ scale * q."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.where(scale[:, None] > 0, w / scale.clamp(min=1e-30)[:, None], torch.zeros_like(w))
    return q.round().clamp(-127, 127).to(torch.int8), scale


PACK_ROWS, PACK_TILES, PACK_TILES_INT8, PACK_PANELS, PACK_PANELS_INT8, PACK_ROWS_INT8 = 0, 1, 2, 3, 4, 5  # Share.amx
_INT8_KINDS = (PACK_TILES_INT8, PACK_PANELS_INT8, PACK_ROWS_INT8)

# Row order inside a 16-row panel (treespec_kernels/cpu_fused_avx2.h): slot 2i holds row i and slot
# 2i + 1 row 8 + i, so one load's low halves of each dword are rows 0-7, high halves 8-15.
_PANEL_ORDER = [r for i in range(8) for r in (i, 8 + i)]


def _pad16(w: torch.Tensor) -> torch.Tensor:
    """Rows zero-padded to a multiple of 16 (whole panels)."""
    pad = -w.shape[0] % 16
    return torch.cat([w, w.new_zeros(pad, *w.shape[1:])]) if pad else w


def _panel_pack(w: torch.Tensor) -> torch.Tensor:
    """bf16 [n, K] -> flat, in gemv_panels' layout: 16-row panels (the last zero-padded),
    each [K][16] with its rows in _PANEL_ORDER; int8 [n, K] -> gemv_panels_i8's, rows in order."""
    k = w.shape[1]
    panels = _pad16(w).reshape(-1, 16, k)
    if w.dtype != torch.int8:
        panels = panels[:, _PANEL_ORDER]
    return panels.transpose(1, 2).reshape(-1)


# How each packing lays out a segment's rows (the int8 ones quantized per row first);
# PACK_ROWS(_INT8) keep them in order.
_LAYOUT = {PACK_TILES: _tile_pack, PACK_TILES_INT8: _tile_pack, PACK_PANELS: _panel_pack, PACK_PANELS_INT8: _panel_pack}


def pack_arenas(lib, threads: int, mats: list, amx: bool = False,
                int8: list[bool] | None = None, panels: bool = False) -> tuple[list, list, torch.Tensor]:
    """Copy matrices [(weight [N, K], pair)] into one arena per thread, in order: thread t
    gets rows on multiples of 4 (the GEMV tile); with pair, the two halves' rows of the same
    columns (gate and up). amx: matrices that fit AMX tiles are split on multiples of 32
    and tile-packed for gemv_amx (the choice is per matrix, never per call, so a row's
    result never depends on the rows beside it); int8[m] (with amx): matrix m, if it fits int8
    tiles, is quantized per row and packed for gemv_amx_i8, their fp32 row scales after
    the share's weights (a drafter's option: treespec_kernels/cpu_fused.c); without amx, an int8[m]
    matrix with columns % 64 is quantized the same way and kept row-major for gemv_vnni_i8
    (AVX512-VNNI), its fp32 row scales and then int32 row sums after the weights; panels (the AVX2 build,
    treespec_kernels/cpu_fused_avx2.h): every matrix split on multiples of 16 rows and packed as
    16-row panels, each segment padded to whole panels, int8[m] ones quantized per row
    (their padded scales after the share's panels). Returns (arena tensors,
    their addresses to free, shares [M * T, 6]: per matrix and thread, the arena address,
    up to two (first output row, rows), and the packing, PACK_*)."""

    def split(n: int, g: int) -> list[int]:
        return [0] + [min(n, (n * t // threads + g - 1) // g * g) for t in range(1, threads)] + [n]

    sizes, plan = [0] * threads, []  # bytes
    for m, (w, pair) in enumerate(mats):
        n, k = w.shape
        half = n // 2 if pair else n
        kind = PACK_ROWS
        if panels:
            kind = PACK_PANELS_INT8 if int8 and int8[m] else PACK_PANELS
        elif amx and int8 and int8[m] and fits_tiles(w, pair, int8=True):
            kind = PACK_TILES_INT8
        elif amx and fits_tiles(w, pair):
            kind = PACK_TILES
        elif not amx and int8 and int8[m] and k % 64 == 0:
            kind = PACK_ROWS_INT8
        in_panels = kind in (PACK_PANELS, PACK_PANELS_INT8)
        b = split(half, 16 if in_panels else 4 if kind in (PACK_ROWS, PACK_ROWS_INT8) else 32)
        per = []
        for t in range(threads):
            segs = [(b[t], b[t + 1]), (half + b[t], half + b[t + 1])] if pair else [(b[t], b[t + 1])]
            per.append(segs)
            rows = sum((h - l + 15) // 16 * 16 if in_panels else h - l for l, h in segs)
            # bf16: 2 bytes a weight; int8: 1, plus its row scale (fp32), plus in rows its sum (int32)
            sizes[t] += rows * (2 * k if kind not in _INT8_KINDS else k + 8 if kind == PACK_ROWS_INT8 else k + 4)
        plan.append((kind, per))
    arenas, raw = [], []
    for t in range(threads):  # on huge pages; the caller frees `raw` with fused_free
        addr = lib.fused_alloc(max(sizes[t], 2))
        if not addr:
            raise MemoryError("fused_alloc failed")
        raw.append(addr)
        buf = (ctypes.c_char * max(sizes[t], 2)).from_address(addr)
        arenas.append(torch.frombuffer(buf, dtype=torch.uint8))
    shares = torch.zeros(len(mats) * threads, 6, dtype=torch.int64)
    offsets = [0] * threads

    def put(t: int, data: torch.Tensor) -> None:
        data = data.contiguous().reshape(-1).view(torch.uint8)
        arenas[t][offsets[t]: offsets[t] + data.numel()] = data
        offsets[t] += data.numel()

    with torch.no_grad():
        for m, ((w, _), (kind, per)) in enumerate(zip(mats, plan)):
            for t, segs in enumerate(per):
                row = [arenas[t].data_ptr() + offsets[t]]
                scales, sums = [], []
                for lo, hi in segs:
                    layout = _LAYOUT.get(kind, lambda x: x)
                    if kind in _INT8_KINDS:
                        q, sc = quantize_rows(w[lo:hi])
                        put(t, layout(q))
                        scales.append(_pad16(sc) if kind == PACK_PANELS_INT8 else sc)
                        if kind == PACK_ROWS_INT8:
                            sums.append(q.sum(1, dtype=torch.int32))
                    else:
                        put(t, layout(w[lo:hi].to(torch.bfloat16)))
                    row += [lo, hi - lo]
                for sc in scales + sums:  # after the share's weights, where gemv_share looks
                    put(t, sc)
                row += [0, 0] * (2 - len(segs)) + [kind]
                shares[m * threads + t] = torch.tensor(row, dtype=torch.int64)
    return arenas, raw, shares


class _Packed:
    """Weights in per-thread arenas (``pack_arenas``), freed with the object."""

    def _pack(self, threads: int, mats: list, int8: list[bool] | None = None) -> None:
        self.lib = cpu_fused.load(build_dir())
        self.arenas, self._raw, self.shares = pack_arenas(self.lib, threads, mats, cpu_fused.use_amx(self.lib),
                                                          int8 if cpu_fused.int8_weights(self.lib) else None,
                                                          panels=cpu_fused.isa() == "avx2")
        kinds = self.shares[:, 5]
        self.amx = bool(((kinds == PACK_TILES) | (kinds == PACK_TILES_INT8)).any())  # some matrix runs on AMX tiles
        self.int8 = bool(torch.isin(kinds, torch.tensor(_INT8_KINDS)).any())
        self.panels = bool(((kinds == PACK_PANELS) | (kinds == PACK_PANELS_INT8)).any())  # the AVX2 build

    def __del__(self):
        for addr in getattr(self, "_raw", []):
            self.lib.fused_free(addr)
        self._raw = []


class FusedModel(_Packed):
    """Packed weights of a Llama decoder or an EAGLE drafter, and its fused forward.

    layers: per layer (qkv [QKV, H], o [H, heads * D], gate_up [2I, H], down [H, I],
    input norm [H] or None (the layer reads its input un-normed), post-attention norm [H]);
    head [V, H]; final_norm [H] or None;
    fc [H, fc_in] and fc_bias [H] for an EAGLE input projection, else None.
    """

    def __init__(self, threads: int, *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 eps: float, layers: list, head: torch.Tensor, final_norm, embed, inv_freq: torch.Tensor,
                 fc=None, fc_bias=None, max_rows: int | None = None, int8: bool = False):
        self.threads = threads
        self.hidden, self.vocab = hidden, head.shape[0]
        mats = []  # (weight [N, K], pair) in forward order; pair: gate/up halves split together
        for qkv, o, gate_up, down, _, _ in layers:
            mats += [(qkv, False), (o, False), (gate_up, True), (down, False)]
        mats.append((head, False))
        flags = [int8] * len(mats)
        if fc is not None:
            # fc reads the target's hidden state, whose few huge channels would set each row's
            # int8 scale and flatten the rest (held-out tau fell 1.6% with it in int8, none
            # without); at 1.3 MB it stays bf16.
            mats.append((fc, False))
            flags.append(False)
        self._pack(threads, mats, flags)
        self.max_rows = max_rows or (MAX_ROWS_AMX if self.amx or self.panels else MAX_ROWS)
        self.keep = [None if t is None else t.detach().contiguous() for layer in layers for t in layer[4:]]
        self.keep.append(final_norm.detach().contiguous() if final_norm is not None else None)
        self.norm_ptrs = torch.tensor([_t(t) for t in self.keep], dtype=torch.int64)
        self.embed = embed.detach().to(torch.bfloat16).contiguous() if embed is not None else None
        self.inv_freq = inv_freq.float().contiguous()
        self.fc_bias = fc_bias.detach().to(torch.bfloat16).contiguous() if fc_bias is not None else None
        intermediate = layers[0][3].shape[1]
        # Attention on AMX tiles too, for any row count (qk_scores_amx, values_amx).
        self.amx_attention = (cpu_fused.use_amx(self.lib) and head_dim % 32 == 0 and head_dim <= 256
                              and heads // kv_heads <= 16)
        self.model = _Model(hidden, heads, kv_heads, head_dim, intermediate, len(layers), self.vocab, threads,
                            0 if fc is None else fc.shape[1], int(self.amx_attention), eps, head_dim ** -0.5,
                            _t(self.shares), _t(self.norm_ptrs), _t(self.embed), _t(self.inv_freq), _t(self.fc_bias))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def for_target(cls, model, threads: int | None = None) -> "FusedModel | None":
        """A bf16 engine.model.CausalLM of world size 1, or None where it cannot run fused."""
        cfg = model.config
        if target_fallback_reason(cfg) or fused_disabled_reason(model.lm_head.weight, model.tp.world_size,
                                 (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads)):
            return None
        layers = [(L.self_attn.qkv_proj.weight, L.self_attn.o_proj.weight, L.mlp.gate_up_proj.weight,
                   L.mlp.down_proj.weight, L.input_layernorm.weight, L.post_attention_layernorm.weight)
                  for L in model.layers]
        return cls(threads or torch.get_num_threads(), hidden=cfg.hidden_size,
                   heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                   eps=cfg.rms_norm_eps, layers=layers, head=model.lm_head.weight, final_norm=model.model.norm.weight,
                   embed=model.model.embed_tokens.weight, inv_freq=model.model.rope.inv_freq)

    @classmethod
    def for_eagle(cls, model, head_weight: torch.Tensor, threads: int | None = None,
                  int8: bool = False, embed: torch.Tensor | None = None) -> "FusedModel | None":
        """An EagleModel (engine/drafters/eagle.py) with its draft head's rows, or None.
        int8: int8 weights on AMX-INT8 or AVX512-VNNI or in the AVX2 build (``pack_arenas``); embed: the target's
        bf16 embedding [V, H] (kept by reference), for ``run(ids=, feats=)``."""
        c = model.cfg
        if model.rope.attention_factor != 1.0 or fused_disabled_reason(
                model.fc.weight, attention=(c.head_dim, c.num_attention_heads, c.num_key_value_heads)):
            return None  # the kernel's RoPE has no cos/sin factor (YaRN)
        with torch.no_grad():
            layers = [(torch.cat([L.q_proj.weight, L.k_proj.weight, L.v_proj.weight]), L.o_proj.weight,
                       L.mlp.gate_up_proj.weight, L.mlp.down_proj.weight,
                       getattr(L.input_layernorm, "weight", None),  # None: no input norm (published EAGLE-1/2)
                       L.post_attention_layernorm.weight) for L in model.layers]
        return cls(threads or torch.get_num_threads(), hidden=c.hidden_size, heads=c.num_attention_heads,
                   kv_heads=c.num_key_value_heads, head_dim=c.head_dim, eps=c.rms_norm_eps, layers=layers,
                   head=head_weight, final_norm=None, embed=embed, inv_freq=model.rope.inv_freq,
                   fc=model.fc.weight, fc_bias=model.fc.bias, int8=int8)

    # ------------------------------------------------------------------ forwards

    def run(self, kv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, query_start_loc: list[int],
            context_lens: list[int], block_tables: torch.Tensor, logit_rows: torch.Tensor, *, ids=None, inputs=None,
            tree_mask=None, visible: list[list[int]] | None = None,
            argmax: torch.Tensor | None = None, feats: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of N rows (shapes: ``Batch`` in treespec_kernels/cpu_fused.c).

        kv: bf16 [2, layers, blocks, block_size, kv_heads, head_dim]; positions, slots: int64 [N];
        positions, slots and logit_rows may also be lists (cheaper than a tensor for a few rows);
        ids: int64 [N] or a list (a target) or inputs: bf16 [N, fc_in] (an EAGLE drafter), or for
        an EAGLE drafter ids and feats, N addresses of bf16 [fc_in - hidden] feature rows: the
        kernel gathers each input row [embed[id] ; feature] itself (the caller keeps the feature
        rows alive; no torch ops per call); tree_mask: bool
        [N, max_T] or None (causal); visible: per row, the slots it sees after its sequence's
        context (overrides tree_mask); argmax: int64 [R] to fill with each logits row's first
        maximum (computed while the rows are still in cache). Returns hidden bf16 [N, hidden],
        logits fp32 [R, vocab].
        """
        keep = []  # the arrays behind the addresses, alive until the call returns

        def ptr(values, ctype=ctypes.c_int64) -> int:
            owner, address = _ints(values, ctype)
            keep.append(owner)
            return address

        n, i32 = len(positions), ctypes.c_int32
        qsl = list(query_start_loc)
        row_seq = [b for b in range(len(qsl) - 1) for _ in range(qsl[b + 1] - qsl[b])]
        mask = None if tree_mask is None else tree_mask.to(torch.uint8).contiguous()
        vis_ptr = vis_slots = 0
        if visible is not None:
            vis_ptr = ptr(list(itertools.accumulate((len(v) for v in visible), initial=0)), i32)
            vis_slots = ptr([s for v in visible for s in v])
        inputs = None if inputs is None else inputs.to(torch.bfloat16).contiguous()
        hidden = torch.empty(n, self.hidden, dtype=torch.bfloat16)
        logits = torch.empty(len(logit_rows), self.vocab, dtype=torch.float32)
        if feats is not None and (self.embed is None or ids is None or len(feats) != n):
            raise ValueError("feats needs ids, one address per row, and a model built with its embedding")
        batch = _Batch(_t(kv), kv.shape[2], kv.shape[3], n, 0 if ids is None else ptr(ids), ptr(positions), ptr(slots), ptr(row_seq, i32),
                       ptr(block_tables, i32), block_tables.shape[1], ptr(context_lens, i32), ptr(qsl, i32),
                       _t(mask), 0 if mask is None else mask.shape[1], vis_ptr, vis_slots,
                       _t(inputs), len(logit_rows), ptr(logit_rows), _t(hidden), _t(logits), _t(argmax),
                       0 if feats is None else ptr(feats))
        if self.lib.fused_forward(ctypes.byref(self.model), ctypes.byref(batch)) != 0:
            raise MemoryError("fused CPU forward could not allocate its scratch memory")
        return hidden, logits

    def eagle_step(self, kv: torch.Tensor, length: int, ids: list[int], feats: list[int], last_hidden: torch.Tensor,
                   last_logits: torch.Tensor, vocab_ids: torch.Tensor | None, budget: int, top_k: int, depth: int,
                   min_prob: float) -> tuple[list[int], list[int], int]:
        """One EAGLE-2 draft step of an EAGLE drafter in one C call (eagle_propose in
        treespec_kernels/cpu_fused.c): the pending pairs (token ids, addresses of their bf16 feature
        rows) run after the ``length`` cached ones, then the tree search and the rerank.

        kv: the request's cache [2, layers, 1, capacity, kv_heads, head_dim], room for
        length + len(ids) + depth * top_k slots; last_hidden bf16 [hidden] and last_logits
        fp32 [1, vocab] hold the last pair's output (written here when ids are given, read
        as the root otherwise); vocab_ids: int64 [vocab] token id of each head row, or None.
        Returns the tree, tokens and parents (-1: the root; parents first), and the number of
        drafter forwards run.
        """
        i64 = ctypes.c_int64
        tokens, parents = (i64 * budget)(), (i64 * budget)()
        ids_arr, ids_p = _ints(ids)
        feats_arr, feats_p = _ints(feats)
        vocab_ids = None if vocab_ids is None else vocab_ids.to(torch.int64).contiguous()
        step = _EagleStep(_t(kv), kv.shape[3], length, len(ids), ids_p, feats_p, _t(last_hidden), _t(last_logits),
                          _t(vocab_ids), budget, top_k, depth, min_prob, ctypes.addressof(tokens),
                          ctypes.addressof(parents), 0, 0)
        rc = self.lib.eagle_propose(ctypes.byref(self.model), ctypes.byref(step))
        if rc == -1:
            raise MemoryError("the EAGLE draft step could not allocate its scratch memory")
        if rc != 0:
            raise ValueError(f"bad EAGLE draft step sizes: budget {budget}, top_k {top_k} (1..64), depth {depth}, "
                             f"a cache of {kv.shape[3]} slots for {length + len(ids)} pairs and the draft rows")
        n = step.n_out
        return tokens[:n], parents[:n], step.forwards

    def copy_slots(self, kv: torch.Tensor, src, dst) -> None:
        """treespec_kernels.compaction.copy_slots for a contiguous CPU cache [..., blocks, block_size, n_kv, D]:
        slot dst[m] <- slot src[m] in every layer's K and V, all reads first."""
        planes = math.prod(kv.shape[:-4])
        per_plane = kv.shape[-4] * kv.shape[-3]
        src_arr, src_p = _ints(src)
        dst_arr, dst_p = _ints(dst)
        if self.lib.fused_copy_rows(kv.data_ptr(), planes, per_plane, kv.shape[-2] * kv.shape[-1] * kv.element_size(),
                                    src_p, dst_p, len(src)) != 0:
            raise MemoryError("KV compaction could not allocate its row buffer")

    def forward(self, inp, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """A target forward: inp is an engine.batch.ModelInput of <= max_rows rows.
        Returns hidden, logits and each logits row's argmax (for greedy verification)."""
        argmax = torch.empty(len(inp.logits_indices), dtype=torch.int64)
        hidden, logits = self.run(kv_cache, inp.positions, inp.slot_mapping, inp.query_start_loc, inp.context_lens,
                                  inp.block_tables, inp.logits_indices, ids=inp.input_ids, tree_mask=inp.tree_mask(),
                                  argmax=argmax)
        return hidden, logits, argmax.tolist()


class _Medusa(ctypes.Structure):  # mirrors `Medusa` in treespec_kernels/cpu_fused.c
    _fields_ = [(n, _i64) for n in ("hidden", "heads", "layers", "vocab", "threads")] + [
        ("shares", _ptr), ("bias", _ptr)]


class FusedMedusa(_Packed):
    """Medusa heads (residual blocks) and the draft head: one C call per proposal."""

    def __init__(self, threads: int, model, head: torch.Tensor, int8: bool = False):
        cfg = model.cfg
        self.hidden, self.vocab, self.heads = head.shape[1], head.shape[0], cfg.num_heads
        blocks = [[h[layer].linear for h in model.heads] for layer in range(cfg.num_layers)]  # [layer][head]
        with torch.no_grad():
            mats = [(torch.cat([b.weight for b in blocks[0]]), False)]  # first blocks, stacked
            mats += [(b.weight, False) for layer in blocks[1:] for b in layer]
            mats.append((head, False))
            self.bias = torch.cat([b.bias for layer in blocks for b in layer]).to(torch.bfloat16).contiguous()
        self._pack(threads, mats, [int8] * len(mats))
        self.medusa = _Medusa(self.hidden, self.heads, cfg.num_layers, self.vocab, threads,
                              _t(self.shares), _t(self.bias))

    @classmethod
    def for_medusa(cls, model, head_weight: torch.Tensor, threads: int | None = None,
                   int8: bool = False) -> "FusedMedusa | None":
        """A MedusaModel (engine/drafters/medusa.py) with its draft head's rows, or None.
        int8: int8 weights on AMX-INT8 or AVX512-VNNI or in the AVX2 build (``pack_arenas``)."""
        if fused_disabled_reason(model.heads[0][0].linear.weight) or model.lm_heads is not None:
            return None  # heads with their own lm_heads (published Medusa-1): the kernel reads one shared head
        return cls(threads or torch.get_num_threads(), model, head_weight, int8)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, H] -> head features bf16 [B * heads, H] (row b * heads + i), draft logits
        fp32 [B * heads, Vd]."""
        x = x.to(torch.bfloat16).contiguous()
        feats = torch.empty(x.shape[0] * self.heads, self.hidden, dtype=torch.bfloat16)
        logits = torch.empty(x.shape[0] * self.heads, self.vocab, dtype=torch.float32)
        if self.lib.medusa_forward(ctypes.byref(self.medusa), x.shape[0], _t(x), _t(feats), _t(logits)) != 0:
            raise MemoryError("fused Medusa forward could not allocate its scratch memory")
        return feats, logits
