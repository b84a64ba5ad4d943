"""A request's state inside the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqStats:
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    verify_steps: int = 0  # decode steps of this sequence (speculative or not)
    committed: int = 0  # tokens committed by those steps (bonus included)
    drafted: int = 0  # draft tree nodes proposed
    draft_time: float = 0.0
    verify_time: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """tau: tokens committed per verification step, bonus included."""
        return self.committed / self.verify_steps if self.verify_steps else 0.0


class Sequence:
    """Tokens, KV blocks and status of one request.

    Invariant between steps: the KV cache holds ``tokens[:num_cached]`` and the
    last token ``tokens[-1]`` (sampled, not yet forwarded) is *pending*.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None  # why the engine ended it (finish_reason "error"), if it knows
        self.block_table: list[int] = []
        self.num_cached = 0
        self.stats = SeqStats()
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.speculation: str | None = None  # per-request override: None=engine default, "off", ...
        self.ngrams = None  # engine.lookup.NgramIndex, made at its first speculative step
        self.detok = None  # engine.detok.Detokenizer, when the engine has a tokenizer and params.detokenize

    @property
    def output_text(self) -> str:
        """The text emitted so far ("" without detokenization)."""
        return self.detok.emitted if self.detok is not None else ""

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
