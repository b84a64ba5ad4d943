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

    def __init__(self, cfg: EagleConfig, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
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
        c = self.cfg
        b, n, _ = x.shape
        hn = self.input_layernorm(x)
        q = linear(self.q_proj, hn).view(b * n, c.num_attention_heads, c.head_dim)
        k = linear(self.k_proj, hn).view(b * n, c.num_key_value_heads, c.head_dim)
        v = linear(self.v_proj, hn).view(b, n, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope(positions.reshape(-1), q, k)
        q = q.view(b, n, -1, c.head_dim).transpose(1, 2)
        k = k.view(b, n, -1, c.head_dim).transpose(1, 2)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1),
                                           enable_gqa=c.num_attention_heads != c.num_key_value_heads)
        x = x + linear(self.o_proj, o.transpose(1, 2).reshape(b, n, -1))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class EagleModel(nn.Module):
    """fc + ``num_layers`` decoder layers (EAGLE uses one). Batched: x [B, n, H]; a KV prefix may be passed in."""

    def __init__(self, cfg: EagleConfig, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True, dtype=dtype)
        self.layers = nn.ModuleList(EagleLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
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
        return F.embedding(torch.as_tensor(tokens, dtype=torch.long), self.embed_weight)

    def _catch_up(self, st: _State) -> None:
        """Run the pending (feature, token) pairs through the drafter, causally."""
        n = len(st.tokens)
        if n == 0:
            return
        feats = torch.cat(st.feats).unsqueeze(0)
        emb = self._embed(st.tokens).unsqueeze(0)
        pos = torch.arange(st.length, st.length + n).unsqueeze(0)
        mask = torch.ones(n, st.length + n, dtype=torch.bool).tril(st.length).unsqueeze(0)
        out, st.k, st.v = self.model(emb, feats, pos, mask, st.k, st.v)
        self.forwards += 1
        st.length += n
        st.last = out[0, -1]
        st.feats, st.tokens = [], []

    @torch.inference_mode()
    def propose(self, request_ids, budgets):
        return [self._propose_one(r, b) for r, b in zip(request_ids, budgets)]

    def _propose_one(self, request_id: str, budget: int) -> DraftTree:
        st = self.states.get(request_id)
        if st is None or budget <= 0:
            return DraftTree([], [])
        k = min(self.top_k, budget)  # wider than the budget cannot pay: only `budget` nodes are kept
        if self.fused is not None:
            return self._propose_fused(st, budget, k)
        self._catch_up(st)
        # Every drafted node: token, parent (-1 root), cumulative log-prob, depth.
        logp, toks = self.head.topk(st.last.unsqueeze(0), k)
        tokens, parents = toks[0].tolist(), [-1] * k
        scores, depths = logp[0].tolist(), [1] * k
        frontier = list(range(k))
        front_feat = st.last.expand(k, -1)  # the feature each frontier node's pair carries
        fk, fv = st.k, st.v  # cache grows with forwarded draft nodes, then is dropped
        # anc[r]: forwarded node r's ancestors among the forwarded nodes, itself included;
        # a new frontier row is its parent's row plus itself. At most k nodes per depth.
        anc = torch.zeros(self.depth * k, self.depth * k, dtype=torch.bool)
        fwd_index: dict[int, int] = {}  # node -> forwarded row
        m = 0  # nodes forwarded so far
        for d in range(1, self.depth):
            # Exact early stop: a child never outscores its parent, so once the budget-th
            # best score so far is at least the best frontier score, no deeper node can
            # make the final selection (ties go to the shallower node). Each depth is a
            # drafter forward plus a head read, the main drafting cost on CPU.
            if self._stop(scores, frontier, budget):
                break
            n_f = len(frontier)
            if d > 1:  # depth-1 nodes hang off the root, which the cache already holds
                anc[m: m + n_f] = anc[[fwd_index[parents[node]] for node in frontier]]
            rows = torch.arange(m, m + n_f)
            anc[rows, rows] = True
            mask = torch.cat([torch.ones(n_f, st.length, dtype=torch.bool), anc[m: m + n_f, : m + n_f]], dim=1)
            emb = self._embed([tokens[i] for i in frontier]).unsqueeze(0)
            pos = torch.full((1, n_f), st.length + d - 1)
            out, fk, fv = self.model(emb, front_feat.unsqueeze(0), pos, mask.unsqueeze(0), fk, fv)
            self.forwards += 1
            for j, node in enumerate(frontier):
                fwd_index[node] = m + j
            m += n_f
            child_logp, child_tok = self.head.topk(out[0], k)
            frontier, rows = self._grow(tokens, parents, scores, depths, frontier, child_logp.tolist(),
                                        child_tok.tolist(), d)
            front_feat = out[0][rows]
        return self._select(tokens, parents, scores, depths, budget)

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
