"""Greedy decoding against transformers.generate, batching and KV bookkeeping."""
from __future__ import annotations

import pytest
import torch

from engine.sampling import SamplingParams


def test_greedy_matches_transformers_generate(make_engine, hf_model, chat_prompts):
    engine = make_engine(max_num_seqs=1)
    params = SamplingParams(max_tokens=64)
    full_length = 0
    for prompt in chat_prompts[1:7]:
        ours = engine.generate([prompt], params)[0].token_ids
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
        assert ours == ref[0, len(prompt):].tolist()
        full_length += len(ours) == 64
    assert full_length >= 5  # at least 5 prompts compared over all 64 tokens
    assert engine.kv_blocks_used == 0


def test_batched_requests_joining_at_different_steps(make_engine, chat_prompts):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = make_engine(max_num_seqs=1)
    expected = [alone.generate([p], params)[0].token_ids for p in chat_prompts[:4]]

    engine = make_engine(max_num_seqs=4)
    results: dict[str, list[int]] = {}
    join_at = {0: [0], 3: [1, 2], 7: [3]}  # step -> prompts that arrive then
    ids = {}
    step = 0
    while step <= max(join_at) or engine.has_unfinished():
        for i in join_at.get(step, []):
            ids[engine.add_request(chat_prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        step += 1
    assert {ids[r]: t for r, t in results.items()} == dict(enumerate(expected))
    assert engine.kv_blocks_used == 0


def test_preemption_under_kv_pressure_keeps_outputs(make_engine, chat_prompts):
    """With too few blocks for everyone, sequences are preempted and recomputed, not corrupted."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = [make_engine(max_num_seqs=1).generate([p], params)[0].token_ids for p in chat_prompts[:3]]
    engine = make_engine(max_num_seqs=3, num_blocks=12, block_size=8)
    outs = engine.generate(chat_prompts[:3], params)
    assert [o.token_ids for o in outs] == expected
    assert engine.kv_blocks_used == 0


def test_abort_frees_blocks(make_engine, chat_prompts):
    engine = make_engine(max_num_seqs=2)
    a = engine.add_request(chat_prompts[0], SamplingParams(max_tokens=50))
    b = engine.add_request(chat_prompts[1], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv_blocks_used > 0
    engine.abort(a)
    finished = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o.finish_reason
    assert finished == {a: "abort", b: "length"}
    assert engine.kv_blocks_used == 0


def test_request_errors(make_engine):
    from engine.engine import RequestError

    engine = make_engine(max_model_len=64)
    with pytest.raises(RequestError, match="context"):
        engine.add_request(list(range(100)), SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="vocab"):
        engine.add_request([10**9], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    small = make_engine(num_blocks=2, block_size=4)
    with pytest.raises(RequestError, match="KV cache 2 blocks"):
        small.add_request(list(range(20)), SamplingParams())


def test_seeded_sampling_is_reproducible(make_engine, chat_prompts):
    engine = make_engine()
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = engine.generate([chat_prompts[2]], p)[0].token_ids
    b = engine.generate([chat_prompts[2]], p)[0].token_ids
    c = engine.generate([chat_prompts[2]], SamplingParams(max_tokens=16, temperature=1.0, seed=7,
                                                          ignore_eos=True))[0].token_ids
    assert a == b and a != c


def test_top_p_below_fp32_range_keeps_the_likeliest_token():
    """A top_p too small for fp32 (5e-324 rounds to 0 there; schemathesis sent it) still
    keeps the likeliest token: the distribution is one-hot on the argmax, not NaN."""
    from engine.sampling import SamplingParams, target_probs

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for top_p in (5e-324, 1e-45, 1e-9):
        probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 50).float()), top_p
