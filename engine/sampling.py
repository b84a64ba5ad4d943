"""Sampling parameters and the target distribution they define.

``target_probs`` is the single definition of "the distribution we sample from"
(temperature, then top-k, then top-p). Every token the engine samples comes out of
engine/verify.py, where plain decoding is a tree of one node: speculation samples
exactly what plain decoding would.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch



@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    detokenize: bool = True  # stream text (RequestOutput.new_text); stop strings need it

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.temperature < 1e-5:  # logits / 1e-300 overflow to inf and NaN probabilities: treat as greedy
            self.temperature = 0.0
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplingRows:
    """Sampling parameters per row of a [R, V] logits tensor, on the logits' device.

    temperature, top_p: float32 [R] (temperature > 0); top_k: int64 [R] (0: off).
    k_max and nucleus are known on the host, so filtering never waits on the device.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    k_max: int  # the largest top_k (0: no row filters by top-k)
    nucleus: bool  # some row has top_p < 1

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> SamplingRows:
        return cls(
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            max(p.top_k for p in params), any(p.top_p < 1.0 for p in params),
        )

    def select(self, rows: torch.Tensor) -> SamplingRows:
        """The parameters of the given rows (k_max and nucleus stay bounds)."""
        return SamplingRows(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.k_max, self.nucleus)


def target_probs(logits: torch.Tensor, params: SamplingParams | SamplingRows) -> torch.Tensor:
    """logits [R, V] -> probabilities [R, V] (fp32) after temperature, top-k, top-p: one
    SamplingParams for every row, or SamplingRows, one set per row."""
    if isinstance(params, SamplingParams):
        params = SamplingRows.of([params] * len(logits), logits.device)
    vocab = logits.shape[-1]
    logits = logits.float() / params.temperature[:, None]
    k_max = min(params.k_max, vocab)
    if k_max:
        # The k-th largest logit of each row; rows without top-k (0, or >= V) keep everything.
        kth = logits.topk(k_max, dim=-1).values.gather(1, (params.top_k.clamp(1, k_max) - 1)[:, None])
        kth = kth.masked_fill(((params.top_k == 0) | (params.top_k >= vocab))[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.nucleus:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p. The first token always stays,
        # explicitly: a top_p below fp32's smallest number (5e-324) compares as 0 here.
        drop = (sorted_p.cumsum(-1) - sorted_p >= params.top_p[:, None]) & (params.top_p < 1.0)[:, None]
        drop[:, 0] = False
        kept = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
        nucleus = (params.top_p < 1.0)[:, None]
        probs = torch.where(nucleus, kept / kept.sum(-1, keepdim=True), probs)
    return probs


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [R, V] (non-negative, any positive total) from uniforms u [R]
    in [0, 1): the first token whose cumulative mass exceeds u x total. A token of mass 0 is
    never drawn, even where rounding leaves the total's last bits above every cumulative sum."""
    cdf = probs.cumsum(-1)
    drawn = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(drawn, last)
