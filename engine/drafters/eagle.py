"""EAGLE drafter (EAGLE-1 architecture) with EAGLE-2 dynamic trees.

The drafter predicts the target's next *feature* (final hidden state) from the
current feature and the next token: at position i its input is
``fc(concat(embed(t[i+1]), f[i]))``, one Llama decoder layer follows (or
``num_layers``: a deeper drafter, grown from a trained one by appending
identity-initialised layers), and the target's own lm_head turns the predicted feature into token probabilities.
It shares the target's embedding and lm_head and keeps its own KV cache per
request, extended with the accepted tokens (and their true target features)
after every step.

EAGLE-2 tree: expand the top_k children of each frontier node, keep the global
top_k by cumulative log-probability as the next frontier, repeat ``depth``
times, then rerank everything drafted and keep the best ``budget`` nodes.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.drafters.base import Drafter, DraftTree
from engine.drafters.common import DraftHead
from engine.drafters.trees import select_dynamic
from engine.model import MLP, RMSNorm, RotaryEmbedding
from engine.config import ModelConfig
from engine.parallel import TPGroup, linear


@dataclass
class EagleConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    draft_vocab_size: int | None = None  # None: the full vocabulary
    num_layers: int = 1  # decoder layers; EAGLE-1/2 use one
    draft_vocab_order: str = "id"  # "frequency": draft_vocab_ids most frequent first (prefixes are top-N sets)
    # Published EAGLE-1/2 layouts (engine/drafters/published.py): layer 0 without an input
    # RMSNorm (its input is fc's output; later layers keep theirs), fc without a bias
    # (EAGLE for Llama 3), and the RoPE scaling of the drafter's config.
    input_norm: bool = True
    fc_bias: bool = True
    rope_scaling: dict | None = None

    @classmethod
    def from_target(cls, target: ModelConfig, draft_vocab_size: int | None = None,
                    num_layers: int = 1) -> "EagleConfig":
        return cls(target.hidden_size, target.num_attention_heads, target.num_key_value_heads, target.head_dim,
                   target.intermediate_size, target.vocab_size, target.rms_norm_eps, target.rope_theta,
                   target.max_position_embeddings, draft_vocab_size, num_layers)

    def to_dict(self) -> dict:
        return {"kind": "eagle", **self.__dict__}

    @classmethod
    def from_dict(cls, d: dict) -> "EagleConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class EagleLayer(nn.Module):
    """One Llama decoder layer with its own (dropped-per-step) KV; x [B, n, H]."""

    def __init__(self, cfg: EagleConfig, dtype=torch.float32, index: int = 0):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        # EAGLE-1/2 as published: layer 0 reads fc's output un-normed (an identity, no weight).
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype) if cfg.input_norm or index else nn.Identity()
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * cfg.head_dim, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * cfg.head_dim, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * cfg.head_dim, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, h, bias=False, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        mcfg = ModelConfig(cfg.vocab_size, h, cfg.intermediate_size, 1, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim)
        self.mlp = MLP(mcfg, TPGroup(), dtype)
        # The engine's parallel linears allocate uninitialised weights (they are normally
        # loaded); a drafter built from scratch needs nn.Linear's initialisation.
        with torch.no_grad():
            for lin in (self.mlp.gate_up_proj, self.mlp.down_proj):
                bound = lin.weight.shape[1] ** -0.5
                lin.weight.uniform_(-bound, bound)

    def make_identity(self) -> None:
        """Zero both residual branches' output projections: the layer passes x through unchanged,
        so a layer appended to a trained drafter starts from the old drafter's predictions."""
        with torch.no_grad():
            self.o_proj.weight.zero_()
            self.mlp.down_proj.weight.zero_()

    def forward(self, x, rope, positions, mask, past_k=None, past_v=None):
        a, k, v = draft_attention(self, self.input_layernorm(x), rope, positions, mask, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


def draft_attention(layer, x, rope, positions, mask, past_k=None, past_v=None):
    """A drafter layer's self-attention over its own KV: x [B, n, in] (already normed) through
    layer.q/k/v_proj, rope, the past K/V [B, n_kv, P, D] + these, and layer.o_proj.
    Returns (output [B, n, H], k, v [B, n_kv, P + n, D])."""
    c = layer.cfg
    b, n, _ = x.shape
    q = linear(layer.q_proj, x).view(b * n, c.num_attention_heads, c.head_dim)
    k = linear(layer.k_proj, x).view(b * n, c.num_key_value_heads, c.head_dim)
    v = linear(layer.v_proj, x).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
    q, k = rope(positions.reshape(-1), q, k)
    q = q.view(b, n, -1, c.head_dim).transpose(1, 2)
    k = k.view(b, n, -1, c.head_dim).transpose(1, 2)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1),
                                       enable_gqa=c.num_attention_heads != c.num_key_value_heads)
    return linear(layer.o_proj, o.transpose(1, 2).reshape(b, n, -1)), k, v


class EagleModel(nn.Module):
    """fc + ``num_layers`` decoder layers (EAGLE uses one). Batched: x [B, n, H]; a KV prefix may be passed in."""

    def __init__(self, cfg: EagleConfig, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=cfg.fc_bias, dtype=dtype)
        self.layers = nn.ModuleList(EagleLayer(cfg, dtype, i) for i in range(cfg.num_layers))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        for p in self.parameters():
            p.requires_grad_(True)

    @staticmethod
    def upgrade_state(state: dict) -> dict:
        """Map the one-layer layout of earlier files (``q_proj.weight`` ...) to ``layers.0.q_proj.weight``."""
        return {(k if k.startswith(("fc.", "layers.", "draft_vocab_ids")) else f"layers.0.{k}"): v
                for k, v in state.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(self.upgrade_state(state_dict), strict=strict, assign=assign)

    def forward(self, tok_emb, feats, positions, mask, past_k=None, past_v=None):
        """tok_emb, feats: [B, n, H]; positions: [B, n]; mask: bool [B, n, P + n].

        past_k/v: [L, B, n_kv, P, D] or None (L = num_layers).
        Returns (out [B, n, H], k, v [L, B, n_kv, P+n, D]).
        """
        x = linear(self.fc, torch.cat([tok_emb, feats.to(tok_emb.dtype)], dim=-1))
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, self.rope, positions, mask,
                            None if past_k is None else past_k[i], None if past_v is None else past_v[i])
            ks.append(k)
            vs.append(v)
        if len(ks) == 1:  # the usual one-layer drafter: a view, not another copy of its whole KV cache
            return x, ks[0].unsqueeze(0), vs[0].unsqueeze(0)
        return x, torch.stack(ks), torch.stack(vs)


@dataclass
class _State:
    k: torch.Tensor | None = None  # [layers, 1, n_kv, L, D]
    v: torch.Tensor | None = None
    kv: torch.Tensor | None = None  # fused path: [2, layers, 1, capacity, n_kv, D], one block
    last_logits: torch.Tensor | None = None  # fused path: draft-head logits of `last` [1, Vd]
    length: int = 0  # pairs (feature, next token) in the KV cache
    feats: list = field(default_factory=list)  # pending pairs not yet run: features [n_i, H] chunks ...
    tokens: list = field(default_factory=list)  # ... and the token that follows each
    last: torch.Tensor | None = None  # [H] drafter output at the last processed pair


class EagleDrafter(Drafter):
    """The EAGLE-2 search over a feature-predicting drafter: an EagleModel, or an EAGLE-3
    model (engine/drafters/eagle3.py: the same call contract; it reads the target's features
    for committed tokens and its own outputs for drafted ones, and its head normalizes first)."""

    kind = "eagle"

    def __init__(self, model: EagleModel, embed_weight: torch.Tensor, head: DraftHead, top_k: int = 8,
                 depth: int = 6, min_expand_prob: float = 0.0, fused=None):
        self.model = model.eval()
        self.fused = fused  # engine.fused.FusedModel of model + head, or None (torch)
        self.embed_weight = embed_weight
        self.head = head
        self.top_k, self.depth = top_k, depth
        self.min_expand_prob = min_expand_prob
        self.states: dict[str, _State] = {}
        self.forwards = 0  # drafter forwards run so far (catch-ups and draft depths): bench/draft_stop.py

    # -------------------------------------------------------------- bookkeeping

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        st = self.states[request_id] = _State()
        st.feats = [hidden]
        st.tokens = list(token_ids[1:]) + [next_token]

    def on_verified(self, request_id, accepted, hidden, next_token):
        st = self.states.get(request_id)
        if st is None:
            return
        st.feats.append(hidden)
        st.tokens += list(accepted[1:]) + [next_token]

    def release(self, request_id):
        self.states.pop(request_id, None)

    # -------------------------------------------------------------- drafting

    def _embed(self, tokens) -> torch.Tensor:
        return F.embedding(torch.as_tensor(tokens, dtype=torch.long, device=self.embed_weight.device), self.embed_weight)

    def _catch_up(self, sts: list[_State]) -> tuple:
        """Run every request's pending (feature, token) pairs through the drafter, causally,
        as one padded batch. Returns the batch's KV (k, v: [layers, B, n_kv, P, D]) and which
        of its P slots each request sees (seen: bool [B, P]): its cached pairs, left-aligned,
        then its new ones after the longest cache. Each request keeps its own compact cache."""
        c, B = self.model.cfg, len(sts)
        lengths, n = [st.length for st in sts], [len(st.tokens) for st in sts]
        past, nmax = max(lengths), max(n)
        dtype, dev = self.model.fc.weight.dtype, self.model.fc.weight.device
        k = v = None
        if past:
            k = torch.zeros(c.num_layers, B, c.num_key_value_heads, past, c.head_dim, dtype=dtype, device=dev)
            v = torch.zeros_like(k)
            for b, st in enumerate(sts):
                if st.length:
                    k[:, b, :, : st.length], v[:, b, :, : st.length] = st.k[:, 0], st.v[:, 0]
        seen = torch.arange(past) < torch.tensor(lengths)[:, None]
        if nmax == 0:
            return k, v, seen
        emb = torch.zeros(B, nmax, c.hidden_size, dtype=dtype, device=dev)
        # The target's features: its final hidden state (EAGLE), or three layers' inputs side by
        # side (EAGLE-3, 3 x the target's hidden size), which the model's fc projects.
        width = next(f.shape[-1] for st in sts for f in st.feats)
        feats = torch.zeros(B, nmax, width, dtype=dtype, device=dev)
        pos = torch.tensor(lengths)[:, None].repeat(1, nmax)
        real = torch.arange(nmax) < torch.tensor(n)[:, None]  # [B, nmax]
        for b, st in enumerate(sts):
            if n[b]:
                emb[b, : n[b]] = self._embed(st.tokens)
                feats[b, : n[b]] = torch.cat(st.feats).to(dtype)
                pos[b, : n[b]] += torch.arange(n[b])
        causal = torch.ones(nmax, nmax, dtype=torch.bool).tril()
        # Padding rows see only themselves (a softmax over nothing would be NaN); no real row sees them.
        new = (causal & real[:, None, :]) | torch.eye(nmax, dtype=torch.bool)
        mask = torch.cat([seen[:, None, :] & real[:, :, None], new], dim=2)
        out, k, v = self.model(emb, feats, pos.to(dev), mask.to(dev), k, v)
        self.forwards += 1
        for b, st in enumerate(sts):
            if n[b]:
                keep = torch.cat([torch.arange(st.length), past + torch.arange(n[b])])
                st.k, st.v = k[:, b: b + 1, :, keep], v[:, b: b + 1, :, keep]
                st.length += n[b]
                st.last = out[b, n[b] - 1]
                st.feats, st.tokens = [], []
        return k, v, torch.cat([seen, real], dim=1)

    @torch.inference_mode()
    def propose(self, request_ids, budgets):
        trees = [DraftTree([], []) for _ in request_ids]
        todo = [(i, self.states[r], b) for i, (r, b) in enumerate(zip(request_ids, budgets))
                if r in self.states and b > 0]
        if self.fused is not None:  # one C call per request (FusedModel.eagle_step)
            for i, st, b in todo:
                trees[i] = self._propose_fused(st, b, min(self.top_k, b))
        elif todo:
            for (i, _, _), tree in zip(todo, self._propose_batch([st for _, st, _ in todo], [b for _, _, b in todo])):
                trees[i] = tree
        return trees

    def _propose_batch(self, sts: list[_State], budgets: list[int]) -> list[DraftTree]:
        """The EAGLE-2 search of B requests at once (the torch path: GPUs, fp32 on CPU): one
        padded catch-up, then per depth one drafter forward of every request's frontier."""
        B, H = len(sts), self.model.cfg.hidden_size
        dtype, dev = self.model.fc.weight.dtype, self.model.fc.weight.device
        ks = [min(self.top_k, b) for b in budgets]  # wider than the budget cannot pay: only `budget` nodes are kept
        kmax = max(ks)
        fk, fv, seen = self._catch_up(sts)  # the drafter cache grows with forwarded draft nodes, then is dropped
        logp, toks = self.head.topk(torch.stack([st.last for st in sts]), kmax)
        # Per request, every drafted node: token, parent (-1 root), cumulative log-prob, depth.
        tokens = [row[:k] for row, k in zip(toks.tolist(), ks)]
        scores = [row[:k] for row, k in zip(logp.tolist(), ks)]
        parents, depths = [[-1] * k for k in ks], [[1] * k for k in ks]
        frontier = [list(range(k)) for k in ks]
        front_feat = [st.last.expand(k, -1) for st, k in zip(sts, ks)]  # the feature each frontier node's pair carries
        # Forwarded draft rows sit in the cache after `past`, kmax slots per depth; anc[b, r]:
        # request b's row r's ancestors among them, itself included (a new frontier row is its
        # parent's row plus itself). Rows a request does not fill see only themselves.
        anc = torch.zeros(B, self.depth * kmax, self.depth * kmax, dtype=torch.bool)
        fwd_index = [{} for _ in range(B)]  # node -> forwarded row
        lengths = [st.length for st in sts]
        active = [True] * B
        for d in range(1, self.depth):
            # Exact early stop: a child never outscores its parent, so once the budget-th
            # best score so far is at least the best frontier score, no deeper node can
            # make the final selection (ties go to the shallower node). Each depth is a
            # drafter forward plus a head read, the main drafting cost on CPU.
            active = [a and not self._stop(scores[b], frontier[b], budgets[b]) for b, a in enumerate(active)]
            if not any(active):
                break
            m = (d - 1) * kmax  # rows forwarded so far (padded)
            rows = torch.arange(m, m + kmax)
            anc[:, rows, rows] = True
            emb = torch.zeros(B, kmax, H, dtype=dtype, device=dev)
            feat = torch.zeros_like(emb)
            real = torch.zeros(B, kmax, dtype=torch.bool)
            for b in range(B):
                if not active[b]:
                    continue
                n_f = len(frontier[b])
                if d > 1:  # depth-1 nodes hang off the root, which the cache already holds
                    anc[b, m: m + n_f] |= anc[b, [fwd_index[b][parents[b][node]] for node in frontier[b]]]
                emb[b, :n_f] = self._embed([tokens[b][i] for i in frontier[b]])
                feat[b, :n_f] = front_feat[b]
                real[b, :n_f] = True
                for j, node in enumerate(frontier[b]):
                    fwd_index[b][node] = m + j
            pos = torch.tensor(lengths)[:, None].expand(B, kmax) + (d - 1)
            mask = torch.cat([seen[:, None, :] & real[:, :, None], anc[:, m: m + kmax, : m + kmax]], dim=2)
            out, fk, fv = self.model(emb, feat, pos.to(dev), mask.to(dev), fk, fv)
            self.forwards += 1
            child_logp, child_tok = self.head.topk(out[real.to(dev)], kmax)
            child_logp, child_tok = child_logp.tolist(), child_tok.tolist()
            at = 0
            for b in range(B):
                if not active[b]:
                    continue
                n_f, k = len(frontier[b]), ks[b]
                lp = [row[:k] for row in child_logp[at: at + n_f]]
                tk = [row[:k] for row in child_tok[at: at + n_f]]
                at += n_f
                frontier[b], parent_rows = self._grow(tokens[b], parents[b], scores[b], depths[b], frontier[b],
                                                      lp, tk, d)
                front_feat[b] = out[b][parent_rows]
        return [self._select(tokens[b], parents[b], scores[b], depths[b], budgets[b]) for b in range(B)]

    @staticmethod
    def _grow(tokens, parents, scores, depths, frontier, child_logp, child_tok, d) -> tuple[list[int], list[int]]:
        """Add the frontier's children (log-probs, ids: lists [F][k]) at depth d + 1 to the node
        lists (in place); return the next frontier (the k best by cumulative log-prob) and, for
        each of its nodes, the row of its parent in this depth's forward. Plain lists: at most
        k * k candidates, where a few torch ops would cost more than the arithmetic."""
        k = len(child_tok[0])
        cum = [scores[node] + lp for node, row in zip(frontier, child_logp) for lp in row]
        best = heapq.nlargest(min(k, len(cum)), range(len(cum)), key=cum.__getitem__)
        base = len(tokens)
        tokens += [t for row in child_tok for t in row]
        scores += cum
        parents += [node for node in frontier for _ in range(k)]
        depths += [d + 1] * len(cum)
        return [base + i for i in best], [i // k for i in best]

    @staticmethod
    def _select(tokens, parents, scores, depths, budget) -> DraftTree:
        keep = select_dynamic(scores, parents, depths, budget)
        new_index = {old: new for new, old in enumerate(keep)}
        return DraftTree([tokens[i] for i in keep], [new_index.get(parents[i], -1) for i in keep])

    def _stop(self, scores: list[float], frontier: list[int], budget: int) -> bool:
        """Whether expanding the frontier one more depth cannot pay."""
        best_frontier = max(scores[i] for i in frontier)
        if len(scores) >= budget and sorted(scores, reverse=True)[budget - 1] >= best_frontier:
            return True
        # Cost-aware stop (draft_min_prob): a deeper node is accepted at most as often
        # as its parent's path (draft confidence tracks the acceptance rate, as the
        # EAGLE-2 paper measures), so when the best frontier path's probability is
        # below what one more drafter forward costs in tokens, it cannot pay for itself.
        return math.exp(best_frontier) < self.min_expand_prob

    # -------------------------------------------------------------- fused CPU path

    def _reserve(self, st: _State, tokens: int) -> None:
        """Grow the request's drafter KV cache to hold `tokens` positions (doubling)."""
        if st.kv is not None and st.kv.shape[3] >= tokens:
            return
        c = self.model.cfg
        cap = max(tokens, 256, 2 * (st.kv.shape[3] if st.kv is not None else 0))
        kv = torch.zeros(2, c.num_layers, 1, cap, c.num_key_value_heads, c.head_dim, dtype=torch.bfloat16)
        if st.kv is not None:
            kv[:, :, :, : st.length] = st.kv[:, :, :, : st.length]
        st.kv = kv

    @staticmethod
    def _rows(x: torch.Tensor) -> list[int]:
        """Addresses of the rows of a contiguous bf16 [n, H] tensor: the fused drafter gathers
        its input rows [embedding ; feature] from them in C."""
        step, base = x.stride(0) * x.element_size(), x.data_ptr()
        return [base + r * step for r in range(x.shape[0])]

    def _propose_fused(self, st: _State, budget: int, k: int) -> DraftTree:
        """The catch-up and the EAGLE-2 search of the torch path in one C call
        (FusedModel.eagle_step), each depth one fused drafter forward. Draft rows go to cache
        positions after the request's pairs (overwritten by the next catch-up); a row sees
        the pairs, its forwarded ancestors and itself."""
        n = len(st.tokens)
        # Room for the pending pairs and the draft rows forwarded after them.
        self._reserve(st, st.length + n + self.depth * self.top_k)
        if st.last is None:
            st.last = torch.empty(self.fused.hidden, dtype=torch.bfloat16)
            st.last_logits = torch.empty(1, self.fused.vocab, dtype=torch.float32)
        chunks = [f if f.dtype == torch.bfloat16 and f.is_contiguous() else f.to(torch.bfloat16).contiguous()
                  for f in st.feats]  # the target's hidden rows: bf16 already on the fused path
        feats = [a for f in chunks for a in self._rows(f)]
        tokens, parents, forwards = self.fused.eagle_step(st.kv, st.length, st.tokens, feats, st.last, st.last_logits,
                                                          self.head.ids, budget, k, self.depth, self.min_expand_prob)
        self.forwards += forwards
        st.length += n
        st.feats, st.tokens = [], []
        return DraftTree(tokens, parents)
