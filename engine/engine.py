"""LLMEngine: requests in, tokens out, one batched step at a time.

Each ``step()``: the scheduler picks a prefill or a decode batch; for a decode
batch the drafter (if any) proposes a token tree per speculating sequence, the
target verifies all trees in one forward (tree attention), each sequence
accepts its own path plus a bonus token, and only accepted tokens stay in the
KV cache (compaction). ``add_request``/``abort`` may be called from other
threads; they take effect at the next step.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.config import CPU_KV_CACHE_GIB, EngineConfig
from engine.detok import Detokenizer
from engine.drafters.base import DraftTree
from engine.executor import Executor
from engine.kv_cache import BlockAllocator
from engine.lookup import NgramIndex, merge_chain
from engine.batch import SamplingInput, SeqInput, build_model_input
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from treespec_kernels.compaction import compaction_slots
from treespec_kernels.tree import tree_depth_list

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine can never serve (too long, bad parameters)."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    seq: Sequence | None = field(default=None, repr=False)
    new_text: str = ""  # text now safe to stream (whole characters, stop strings cut); "" without detokenization


@dataclass
class EngineLoad:
    """A snapshot of one engine's load and speculation state (what a replica reports)."""

    running: int  # sequences in the running batch
    waiting: int  # admitted to the engine, waiting for KV blocks or a batch slot
    max_num_seqs: int
    kv_used: int  # KV blocks
    kv_total: int
    drafter: str | None  # the drafter's kind, None without one
    drafter_format: str | None  # the format it was loaded from (engine/drafters/registry.py)
    drafter_healthy: bool
    max_tree_budget: int  # the configured (largest) tree budget
    tree_budget: int  # the budget in force now (0: not speculating)


@dataclass
class StepStats:
    kind: str
    batch_size: int
    tokens: int  # tokens committed this step
    tree_nodes: int  # draft nodes verified this step
    draft_time: float
    verify_time: float


# The engine's front door: what a serving layer (app/, actors/replica.py) may call or read.
# Everything else (scheduler, allocator, executor, drafter) is the engine's own business;
# tests/test_engine_api.py holds app/ to this list.
ENGINE_API = frozenset({
    "add_request", "abort", "step", "has_unfinished", "is_admitted",
    "set_policy", "tree_budget_in_force", "load_report", "last_step", "tokenizer", "tokenize_chat",
})


def kv_cache_blocks(config: EngineConfig, executor: Executor) -> int:
    """The KV cache's blocks: num_blocks if set, else kv_cache_gib's worth, else (auto) what
    gpu_memory_utilization of each device leaves after the weights and a profiled forward of
    the largest step (all its rows' logits: max_num_seqs x (1 + tree + lookup) rows, or a
    full prefill batch), else, where device memory is not measured (CPU), CPU_KV_CACHE_GIB."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_block = executor.kv_bytes_per_block(config.block_size)
    if config.kv_cache_gib is None:
        rows = max(config.max_num_batched_tokens,
                   config.max_num_seqs * (1 + (config.tree_budget or 0) + config.lookup_tokens))
        blocks = executor.profile_kv_blocks(config.gpu_memory_utilization, config.block_size, rows)
        if blocks is not None:
            if blocks < 1:
                raise ValueError(f"no memory left for the KV cache at gpu_memory_utilization="
                                 f"{config.gpu_memory_utilization}: raise it, or lower max_num_seqs / tree_budget")
            return blocks
    return max(1, int((config.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30 // per_block))


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor, drafter=None, tokenizer=None):
        """Entry points build engines with ``engine.build.build_engine``, which loads the target,
        the drafter and the tokenizer; this constructor takes them ready-made.

        config: resolved here (``EngineConfig.resolve``, dtype "auto" from the executor's).
        executor: the target model (in-process or TP shard actors).
        drafter: an engine Drafter (engine/drafters/base.py), or None for no speculation.
        tokenizer: a Hugging Face tokenizer, or None (token-id prompts only, no text out).
        """
        self.config = config = config.resolve(executor.dtype)
        self.executor = executor
        self.model_config = executor.config
        self.tokenizer = tokenizer
        num_blocks = kv_cache_blocks(config, executor)
        executor.allocate_kv(num_blocks, config.block_size)
        # Compiles, graph captures and NCCL setup happen here, before the replica reports healthy.
        speculative_rows = config.tree_budget + config.lookup_tokens if drafter is not None else 0
        executor.warm_up(config.max_num_seqs, 1 + speculative_rows,
                         min(config.max_num_batched_tokens, config.max_model_len))
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        # One sequence alone must always fit, or a long generation could wedge the cache; a model
        # with a sliding window is served exactly up to its window (engine/architectures.py).
        self.max_model_len = min(config.max_model_len, num_blocks * config.block_size - 1,
                                 self.model_config.max_context)
        if (self.model_config.sliding_window or config.max_model_len) < config.max_model_len:
            log.warning("serving contexts up to %d tokens, this %s model's sliding window (max_model_len %d)",
                        self.model_config.max_context, self.model_config.family, config.max_model_len)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs, config.max_num_batched_tokens)
        self.drafter = drafter
        self.drafter_healthy = drafter is not None  # false after a failure, until replaced
        self.speculate = config.tree_budget > 0  # the policy (router) flips this; needs a healthy drafter
        self.tree_budget = config.tree_budget
        self.lookup_tokens = config.lookup_tokens  # prompt-lookup nodes on top of the drafter's tree
        self.eos_ids = set(self.model_config.eos_token_id)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._requests: dict[str, Sequence] = {}
        self._inbox: list = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.last_step: StepStats | None = None

    # ------------------------------------------------------------------ requests

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    speculation: str | None = None) -> str:
        """prompt: token ids or text. Raises RequestError for requests that can never run."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt)
        prompt = list(prompt)
        if not prompt:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt):
            raise RequestError("prompt token ids must be in [0, vocab_size)")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.max_model_len} "
                f"(max_model_len {self.config.max_model_len}, KV cache {self.allocator.num_blocks} blocks "
                f"of {self.config.block_size}, positions {self.model_config.max_context})"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, prompt, params)
        if speculation not in (None, "auto"):
            seq.speculation = speculation
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise RequestError("stop strings need detokenization (a tokenizer and detokenize=True)")
        if self.tokenizer is not None and params.detokenize:
            seq.detok = Detokenizer(self.tokenizer, prompt, params.stop)
        with self._lock:
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            self._requests[request_id] = seq
            self._inbox.append(("add", seq))
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox) or self.scheduler.has_work()

    def is_admitted(self, request_id: str) -> bool:
        """In the running batch (its KV blocks reserved), not waiting for memory or a slot."""
        return any(s.request_id == request_id for s in list(self.scheduler.running))

    # ------------------------------------------------------------------ policy and load

    def set_policy(self, speculate: bool, tree_budget: int) -> None:
        """The speculation policy from the next step on (call from the stepping thread).

        tree_budget: draft nodes per sequence, at most the configured one; speculation also
        needs a healthy drafter, so this never turns it on without one.
        """
        self.speculate = bool(speculate)
        self.tree_budget = max(0, min(int(tree_budget), self.config.tree_budget)) if speculate else 0

    @property
    def tree_budget_in_force(self) -> int:
        return self.tree_budget if (self.speculate and self.drafter_healthy) else 0

    @property
    def drafter_kind(self) -> str | None:
        return getattr(self.drafter, "kind", None) if self.drafter is not None else None

    def load_report(self) -> EngineLoad:
        kind = self.drafter_kind
        return EngineLoad(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            max_num_seqs=self.config.max_num_seqs, kv_used=self.allocator.num_used,
            kv_total=self.allocator.num_blocks, drafter=kind,
            drafter_format=getattr(self.drafter, "format", None) if kind else None,
            drafter_healthy=bool(self.drafter_healthy and kind),
            max_tree_budget=self.config.tree_budget, tree_budget=self.tree_budget_in_force,
        )

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        outs = []
        for kind, item in inbox:
            if kind == "add":
                self.scheduler.add(item)
            else:
                seq = self._requests.get(item)
                if seq is not None and not seq.finished:
                    self._finish(seq, "abort")
                    outs.append(self._output(seq, []))
        return outs

    # ------------------------------------------------------------------ step

    def _tree_budget(self, seq: Sequence) -> int:
        """Draft nodes (and KV slots) to reserve for seq: the drafter's budget plus the lookup chain."""
        if not (self.speculate and self.drafter_healthy) or seq.speculation == "off" or self.tree_budget <= 0:
            return 0
        if seq.speculation not in (None, self.drafter.kind):
            return 0  # asked for a drafter this replica does not have
        return self.tree_budget + self.lookup_tokens

    def step(self) -> list[RequestOutput]:
        outputs = self._drain_inbox()
        batch = self.scheduler.schedule(self._tree_budget)
        if batch is None:
            return outputs
        if batch.kind == "prefill":
            outputs += self._prefill(batch.seqs)
        else:
            outputs += self._decode(batch.seqs, batch.tree_budgets)
        return outputs

    def _prefill(self, seqs: list[Sequence]) -> list[RequestOutput]:
        t0 = time.perf_counter()
        inputs = []
        for s in seqs:
            toks = s.tokens[s.num_cached :]
            inputs.append(SeqInput(toks, list(range(s.num_cached, len(s))), s.block_table, s.num_cached))
        inp = build_model_input(inputs, self.config.block_size)
        out = self.executor.execute(inp, self._sampling_input(seqs, [1] * len(seqs), None, "all"))
        outputs = []
        for b, s in enumerate(seqs):
            start, end = inp.query_start_loc[b], inp.query_start_loc[b + 1]
            s.num_cached = len(s)
            try:
                token = out.next_tokens[b]
                if out.hidden is not None:
                    self._call_drafter("on_prefill", s.request_id, s.tokens, out.hidden[start:end], token)
                if s.stats.first_token is None:
                    s.stats.first_token = time.perf_counter()
                outputs.append(self._commit(s, [token]))
            except Exception as exc:  # one request's bug must not end the others (or the engine)
                outputs.append(self._fail(s, exc))
        self.last_step = StepStats("prefill", len(seqs), len(seqs), 0, 0.0, time.perf_counter() - t0)
        return outputs

    def _sampling_input(self, seqs: list[Sequence], rows: list[int], trees: list[DraftTree | None] | None,
                        hidden: str) -> SamplingInput:
        """What the target needs to verify and sample: per-sequence parameters, and for each
        sampling sequence rows[b] + 1 uniforms from its own generator (greedy ones draw none)."""
        m = sum(rows)
        uniforms = torch.zeros(m + len(seqs))  # [rows' tests, then each sequence's final draw]
        start, draft_rows, draft_probs = 0, [], []
        for b, (s, n) in enumerate(zip(seqs, rows)):
            if not s.params.greedy:
                u = torch.rand(n + 1, generator=s.generator or self.generator)
                uniforms[start:start + n], uniforms[m + b] = u[:n], u[n]
            tree = trees[b] if trees is not None else None
            if tree is not None and tree.draft_probs is not None:
                for i, q in enumerate(tree.draft_probs):
                    if q is not None:
                        draft_rows.append(start + 1 + i)  # node i of the tree is local row i + 1
                        draft_probs.append(q)
            start += n
        draft = (torch.tensor(draft_rows), torch.stack(draft_probs)) if draft_rows else None
        if not self.drafter_healthy:
            hidden = "none"
        return SamplingInput([s.params for s in seqs], uniforms, draft, hidden)

    def _decode(self, seqs: list[Sequence], budgets: list[int]) -> list[RequestOutput]:
        t0 = time.perf_counter()
        trees: list[DraftTree | None] = [None] * len(seqs)
        spec = [i for i, b in enumerate(budgets) if b > 0]
        if spec:
            lookup = self.lookup_tokens
            try:
                drafted = self.drafter.propose([seqs[i].request_id for i in spec],
                                               [max(1, budgets[i] - lookup) for i in spec])
                for i, tree in zip(spec, drafted):
                    trees[i] = tree
            except Exception as exc:  # a failing drafter must not take the replica down
                self.on_drafter_failure(exc)
            if lookup:
                for i in spec:
                    s = seqs[i]
                    s.ngrams = s.ngrams or NgramIndex()
                    trees[i] = merge_chain(trees[i], s.ngrams.continuation(s.tokens, lookup), lookup)
        t1 = time.perf_counter()
        inputs = []
        for s, tree in zip(seqs, trees):
            tokens, parents = [s.tokens[-1]], [-1]
            if tree is not None and tree.tokens:
                tokens += tree.tokens
                parents += [p + 1 for p in tree.parents]  # shift: local 0 is the root
            depth = tree_depth_list(parents) if len(parents) > 1 else [0]
            inputs.append(SeqInput(
                tokens, [s.num_cached + d for d in depth], s.block_table, s.num_cached,
                tree_parents=parents if len(tokens) > 1 else None,
                logits_rows=list(range(len(tokens))),
            ))
        inp = build_model_input(inputs, self.config.block_size)
        sampling = self._sampling_input(seqs, [len(si.token_ids) for si in inputs], trees, "accepted")
        out = self.executor.execute(inp, sampling)
        outputs, prefixes, nodes, committed, features = [], [], 0, 0, 0
        paths = out.paths
        for b, (s, si, path) in enumerate(zip(seqs, inputs, paths)):
            prefix = s.num_cached
            nodes += len(si.token_ids) - 1
            try:
                bonus = out.next_tokens[b]
                accepted = [si.token_ids[n] for n in path[1:]] + [bonus]
                if out.hidden is not None:
                    self._call_drafter("on_verified", s.request_id, [si.token_ids[n] for n in path],
                                       out.hidden[features:features + len(path)], bonus)
                s.num_cached += len(path)
                s.stats.verify_steps += 1
                s.stats.drafted += len(si.token_ids) - 1
                out_ = self._commit(s, accepted)
                s.stats.committed += len(out_.new_token_ids)
                committed += len(out_.new_token_ids)
            except Exception as exc:  # one request's bug must not end the others (or the engine)
                paths[b] = [0]  # its blocks are freed: nothing of it to compact
                out_ = self._fail(s, exc)
            features += len(path)
            prefixes.append(prefix)
            outputs.append(out_)
        # Compaction: node path[j] was written at num_cached + path[j]; move it to num_cached + j.
        if any(node != j for path in paths for j, node in enumerate(path)):
            src, dst = compaction_slots(inp.block_tables, prefixes, paths, self.config.block_size)
            self.executor.move_kv(src, dst)
        t2 = time.perf_counter()
        for s in seqs:
            if not s.finished:
                self.scheduler.after_step(s)
                s.stats.draft_time += (t1 - t0) / len(seqs)
                s.stats.verify_time += (t2 - t1) / len(seqs)
        self.last_step = StepStats("decode", len(seqs), committed, nodes, t1 - t0, t2 - t1)
        return outputs

    def _call_drafter(self, method: str, *args) -> None:
        if not self.drafter_healthy:
            return
        try:
            getattr(self.drafter, method)(*args)
        except Exception as exc:
            self.on_drafter_failure(exc)

    def on_drafter_failure(self, exc: Exception) -> None:
        """Keep serving without speculation; the owner (actors/) may bring the drafter back."""
        log.warning("drafter failed, speculation off: %s", exc)
        self.drafter_healthy = False

    def set_drafter(self, drafter) -> None:
        """Install a (new) drafter; requests it has not seen simply get no tree."""
        self.drafter = drafter
        self.drafter_healthy = drafter is not None

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Finish one request with "error" (its blocks and drafter state freed); the rest carry on."""
        log.error("request %s failed", seq.request_id, exc_info=exc)
        seq.error = f"{type(exc).__name__}: {exc}"
        if not seq.finished:
            self._finish(seq, "error")
        return self._output(seq, [])

    def fail_all(self, reason: str = "error") -> list[RequestOutput]:
        """Finish every unfinished request with ``reason`` (e.g. the executor lost a shard).

        Their KV blocks and drafter state are freed; the engine can serve new requests
        once its executor works again.
        """
        with self._lock:
            self._inbox = []
            seqs = list(self._requests.values())
        outputs = []
        for seq in seqs:
            self._finish(seq, reason)
            outputs.append(self._output(seq, []))
        return outputs

    # ------------------------------------------------------------------ commit / finish

    def _commit(self, seq: Sequence, tokens: list[int]) -> RequestOutput:
        """Append tokens one at a time, stopping at EOS, stop ids/strings, max_tokens or context end.

        The text of the committed tokens is decoded here too; a token that ends the request by its id
        (EOS, a stop token id) adds no text. With stop strings each token is decoded as it is committed,
        so the request ends at the token that completes one; without, the step's tokens are decoded at once.
        """
        new, text = [], []
        p, detok = seq.params, seq.detok
        for t in tokens:
            seq.output_token_ids.append(t)
            new.append(t)
            reason = None
            if (t in self.eos_ids and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
            elif p.stop:
                text.append(detok.add([t]))
                if detok.stopped:
                    reason = "stop"
            if reason is None and (seq.num_output >= p.max_tokens or len(seq) >= self.max_model_len):
                reason = "length"
            if reason:
                self._finish(seq, reason)
                break
        if detok is not None:
            if not p.stop:
                text.append(detok.add(new[:-1] if seq.finish_reason == "stop" else new))
            if seq.finished:
                text.append(detok.finish())
        return self._output(seq, new, "".join(text))

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        seq.stats.finished = time.perf_counter()
        self._call_drafter("release", seq.request_id)
        with self._lock:
            self._requests.pop(seq.request_id, None)

    def _output(self, seq: Sequence, new: list[int], new_text: str = "") -> RequestOutput:
        return RequestOutput(seq.request_id, new, list(seq.output_token_ids), seq.finished, seq.finish_reason,
                             seq.num_prompt, seq, new_text)

    # ------------------------------------------------------------------ convenience

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts (token lists or text) to completion; outputs in prompt order."""
        from tqdm import tqdm

        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not progress)
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
                    bar.update(1)
        bar.close()
        return [final[i] for i in ids]

    @property
    def kv_blocks_used(self) -> int:
        return self.allocator.num_used
