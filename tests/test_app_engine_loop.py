"""The LLM server's engine loop in one process: streaming to asyncio queues, the router's policy
applied between steps, the load report it sends, drafter failure and abort (real default model).

The drafter here is a toy (it drafts a chain repeating the pending token): enough to make the
engine verify trees, so that speculation on/off and the measurements can be observed.
"""
import asyncio

import pytest

from actors.router import SpeculationPolicy
from app.server import EngineLoop
from engine.drafters.base import Drafter, DraftTree
from engine.sampling import SamplingParams


class ChainDrafter(Drafter):
    kind = "eagle"

    def __init__(self):
        self.pending: dict[str, int] = {}
        self.fail = False

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.pending[request_id] = next_token

    def propose(self, request_ids, budgets):
        if self.fail:
            raise RuntimeError("drafter lost")
        out = []
        for rid, b in zip(request_ids, budgets):
            n = min(b, 4)
            out.append(DraftTree([self.pending[rid]] * n, list(range(-1, n - 1))))
        return out

    def on_verified(self, request_id, accepted, hidden, next_token):
        self.pending[request_id] = next_token

    def release(self, request_id):
        self.pending.pop(request_id, None)


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoTokenizer

    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor
    from engine.weights import resolve_model

    cfg = EngineConfig(drafter="eagle", tree_budget=8, max_model_len=256, num_blocks=64, max_num_seqs=4, dtype="float32", draft_min_prob=0.0, draft_vocab_size=0)
    model_dir = resolve_model("default")
    return LLMEngine(cfg, InProcessExecutor(model_dir), ChainDrafter(), AutoTokenizer.from_pretrained(model_dir))


async def _run(loop: EngineLoop, rid: str, prompt, max_tokens: int, abort_after: int | None = None):
    q = loop.submit(rid, prompt, SamplingParams(max_tokens=max_tokens), None)
    tokens, updates = [], []
    while True:
        upd = await asyncio.wait_for(q.get(), 60)
        updates.append(upd)
        tokens += upd.new_token_ids
        if abort_after is not None and len(tokens) >= abort_after and not upd.finished:
            loop.abort(rid)
            abort_after = None
        if upd.finished:
            return tokens, updates


def test_policy_applied_between_steps_and_reported(engine):
    loop = EngineLoop(engine)
    policy = SpeculationPolicy()
    prompt = engine.tokenize_chat([{"role": "user", "content": "Count from one to ten."}])
    try:
        spec_tokens, updates = asyncio.run(_run(loop, "a", prompt, 16))
        assert updates[0].step_kind == "prefill" and updates[-1].finished and len(spec_tokens) == 16
        assert updates[-1].tree_budget == 8 and updates[-1].stats["drafted"] > 0
        load = loop.load()
        assert load.drafter == "eagle" and load.drafter_healthy and load.tree_budget == 8
        assert load.spec_seq_steps > 0 and load.spec_tokens >= load.spec_seq_steps
        assert any(n > 0 for _, n, _, _, _ in load.step_times)
        # The toy drafter's trees are (almost) never accepted; the router learns that from the report.
        tau = load.spec_tokens / load.spec_seq_steps
        assert tau < 1.5
        d = policy.observe("r", load, now=0)
        assert policy.replicas["r"].acceptance[8][0] == pytest.approx(tau)
        assert not d.speculate and "costs more" in d.reason

        # The router says off: the next steps verify no trees; greedy output is unchanged (lossless).
        loop.set_policy(False, 0)
        plain_tokens, updates = asyncio.run(_run(loop, "b", prompt, 16))
        assert plain_tokens == spec_tokens
        assert updates[-1].tree_budget == 0 and updates[-1].stats["drafted"] == 0
        load = loop.load()
        assert load.tree_budget == 0 and load.spec_seq_steps == 0
        assert all(n == 0 for _, n, _, _, _ in load.step_times)

        # Back on; then the drafter fails mid-request: the request finishes, the report says unhealthy,
        # and the router turns speculation off for this replica at once.
        loop.set_policy(True, 8)
        engine.drafter.fail = True
        tokens, _ = asyncio.run(_run(loop, "c", prompt, 8))
        assert tokens == spec_tokens[:8]
        load = loop.load()
        assert not load.drafter_healthy
        d = policy.observe("r", load, now=1)
        assert not d.speculate and d.tree_budget == 0 and "unhealthy" in d.reason

        # Abort frees the request's KV blocks.
        tokens, updates = asyncio.run(_run(loop, "d", prompt, 200, abort_after=2))
        assert updates[-1].finish_reason == "abort" and len(tokens) < 200
        assert engine.allocator.num_used == 0 and loop.active == 0
    finally:
        loop.stop()
        engine.drafter.fail = False
        engine.set_drafter(engine.drafter)


def test_a_failing_request_does_not_stop_the_loop(engine):
    """A fault in one request ends that request with its error; the loop and the other request go on."""
    loop = EngineLoop(engine)
    prompt = engine.tokenize_chat([{"role": "user", "content": "Count from one to ten."}])
    real_commit = engine._commit

    def commit(seq, tokens):
        if seq.request_id == "bad" and seq.num_output >= 3:
            raise ValueError("injected fault")
        return real_commit(seq, tokens)

    async def both():
        return await asyncio.gather(_run(loop, "bad", prompt, 16), _run(loop, "good", prompt, 16))

    engine._commit = commit
    try:
        (_, bad_updates), (good_tokens, good_updates) = asyncio.run(both())
        assert bad_updates[-1].finish_reason == "error" and "ValueError: injected fault" in bad_updates[-1].error
        assert good_updates[-1].finish_reason == "length" and len(good_tokens) == 16
        assert loop.thread.is_alive() and loop.error is None
        assert engine.allocator.num_used == 0 and loop.active == 0
    finally:
        del engine._commit
        loop.stop()
