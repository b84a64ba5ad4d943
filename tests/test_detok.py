"""Text out of the engine: incremental detokenization and stop strings, handled in one place.

The oracles are the tokenizer's own decode of whole token lists and a plain
(non-speculative) run whose text is searched for the stop string.
"""
from __future__ import annotations

import pytest

from engine.detok import Detokenizer
from engine.sampling import SamplingParams
from scripted_drafter import ScriptedDrafter


def test_incremental_detokenization_multibyte(tokenizer):
    text = "Hello wörld! 日本語のテキスト 🎉🚀 naïve café — done."
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("<|im_start|>assistant\n")
    d = Detokenizer(tokenizer, prompt)
    parts = [d.add([i]) for i in ids] + [d.finish()]
    assert "".join(parts) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in parts), "no half characters are ever emitted"
    assert sum(1 for p in parts if p == "") > 0, "some tokens are only part of a character"
    # Several tokens at once (a speculative step) give the same text.
    d2 = Detokenizer(tokenizer, prompt)
    chunks = [ids[i:i + 3] for i in range(0, len(ids), 3)]
    assert "".join(d2.add(c) for c in chunks) + d2.finish() == text


def test_stop_strings_are_cut_and_never_leak(tokenizer):
    text = "The answer is 42. STOP here and never again."
    ids = tokenizer.encode(text)
    d = Detokenizer(tokenizer, None, stop=["STOP", "never"])
    parts = []
    for i in ids:
        parts.append(d.add([i]))
        if d.stopped:
            break
    parts.append(d.finish())
    out = "".join(parts)
    assert out == "The answer is 42. "
    assert d.stopped
    # A stop string split across tokens is held back until it is decided.
    d = Detokenizer(tokenizer, None, stop=["42."])
    emitted = ""
    for i in ids:
        emitted += d.add([i])
        assert "42" not in emitted
    assert emitted + d.finish() == "The answer is "
    # No stop string: nothing is held back at the end.
    d = Detokenizer(tokenizer, None, stop=["zzz"])
    assert "".join(d.add([i]) for i in ids) + d.finish() == text


def _stream(engine, prompt, params):
    """Run one request step by step; returns (final output, the concatenated streamed text)."""
    rid = engine.add_request(prompt, params)
    streamed, final = [], None
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            streamed.append(o.new_text)
            final = o
    return final, "".join(streamed)


def _cut_at(tokenizer, token_ids, word) -> int:
    """How many tokens a stop string lets through: the first prefix whose text contains it."""
    return next(k for k in range(1, len(token_ids) + 1)
                if word in tokenizer.decode(token_ids[:k], skip_special_tokens=True))


@pytest.mark.parametrize("speculate", [False, True])
def test_engine_stops_at_the_token_that_completes_a_stop_string(make_engine, tokenizer, chat_prompts, speculate):
    prompt = chat_prompts[2]
    plain = make_engine().generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))[0]
    text = tokenizer.decode(plain.token_ids, skip_special_tokens=True)
    word = " ".join(text.split()[5:7])  # two words: a stop string that spans tokens
    assert word and text.find(word) > 0
    drafter = ScriptedDrafter({tuple(prompt): prompt + plain.token_ids}, vocab=49152, seed=3) if speculate else None
    engine = make_engine(drafter, drafter="eagle" if speculate else "off", tree_budget=24)
    out, streamed = _stream(engine, prompt, SamplingParams(max_tokens=48, ignore_eos=True, stop=[word]))
    assert out.finished and out.finish_reason == "stop"
    assert out.token_ids == plain.token_ids[:_cut_at(tokenizer, plain.token_ids, word)]
    assert streamed == out.seq.output_text == text[:text.find(word)]
    if speculate:  # several tokens a step: the cut fell inside an accepted path
        assert out.seq.stats.committed > out.seq.stats.verify_steps
    assert engine.kv_blocks_used == 0


def test_engine_streams_the_whole_text_and_eos_adds_none(make_engine, tokenizer, chat_prompts):
    engine = make_engine()
    out, streamed = _stream(engine, chat_prompts[0], SamplingParams(max_tokens=40))
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_ids  # "Paris.<|im_end|>"
    assert streamed == tokenizer.decode(out.token_ids, skip_special_tokens=True) == out.seq.output_text
    assert "<|im_end|>" not in streamed
    # A stop token id ends the request like EOS, and its text is not streamed.
    stop_id = out.token_ids[3]
    out2, streamed2 = _stream(engine, chat_prompts[0], SamplingParams(max_tokens=40, stop_token_ids=[stop_id]))
    assert out2.finish_reason == "stop" and out2.token_ids == out.token_ids[:4]
    assert streamed2 == tokenizer.decode(out.token_ids[:3])


def test_detokenize_off_gives_tokens_only_and_refuses_stop_strings(make_engine, chat_prompts):
    from engine.engine import RequestError

    engine = make_engine()
    out, streamed = _stream(engine, chat_prompts[0], SamplingParams(max_tokens=8, detokenize=False))
    assert len(out.token_ids) > 0 and streamed == "" and out.seq.output_text == ""
    with pytest.raises(RequestError, match="stop strings need detokenization"):
        engine.add_request(chat_prompts[0], SamplingParams(stop=["x"], detokenize=False))
