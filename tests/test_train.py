"""Drafter training end to end on a tiny random Llama: data shards, EAGLE, Medusa, engine loading, eval."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import random_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random target, a few token-id prompts and their data shards (built once for the module)."""
    from train.data import build_shards

    root = tmp_path_factory.mktemp("train")
    model = random_llama_dir(str(root / "model"), vocab=320, hidden=96, layers=2)
    g = torch.Generator().manual_seed(0)
    prompts = [(["writing", "math"][i % 2], torch.randint(3, 300, (6 + i % 5,), generator=g).tolist())
               for i in range(12)]
    data = str(root / "data")
    paths = build_shards(model, prompts, data, max_tokens=24, gen_dtype="float32", feature_dtype="float32",
                         max_num_seqs=8, shard_size=5, temperatures=(0.0, 1.0), progress=False)
    return {"root": root, "model": model, "data": data, "paths": paths, "prompts": prompts}


def test_shards_round_trip(tiny, tmp_path):
    from engine.runner import ModelRunner
    from train.data import prefill_features, read_shard, shard_paths, write_shard

    assert len(tiny["paths"]) == 3 and shard_paths(tiny["data"]) == tiny["paths"]
    rows = read_shard(tiny["paths"][0])
    assert len(rows) == 5
    r = rows[0]
    assert r["token_ids"][: r["prompt_len"]] == tiny["prompts"][0][1]
    assert r["features"].shape == (len(r["token_ids"]), 96) and r["features"].dtype == torch.bfloat16
    # Features are the target's final hidden states of the whole sequence. The shards were
    # prefilled several sequences at a time, the reference alone: fp32 GEMMs may round a
    # few values differently with the batch's shape (seen with an AVX2 BLAS), which can
    # move a stored bf16 feature by one unit in the last place (2^-7 relative), no more.
    ref = prefill_features(ModelRunner(tiny["model"], "float32"), [r["token_ids"]])[0]
    torch.testing.assert_close(r["features"].float(), ref.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)
    # Writing what was read gives the same rows back.
    write_shard(str(tmp_path / "x.parquet"), rows, 96)
    again = read_shard(str(tmp_path / "x.parquet"))
    assert [a["token_ids"] for a in again] == [a["token_ids"] for a in rows]
    # Several data sets train together: "DIR1,DIR2" lists the shards of both.
    assert shard_paths(f"{tiny['data']},{tmp_path}") == tiny["paths"]  # x.parquet is not a shard name
    os.replace(str(tmp_path / "x.parquet"), str(tmp_path / "shard-00000.parquet"))
    assert shard_paths(f"{tiny['data']},{tmp_path}") == tiny["paths"] + [str(tmp_path / "shard-00000.parquet")]
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(again, rows))


def test_resume_skips_existing_shards(tiny):
    from train.data import build_shards

    before = [os.path.getmtime(p) for p in tiny["paths"]]
    build_shards(tiny["model"], tiny["prompts"], tiny["data"], max_tokens=24, progress=False)
    assert [os.path.getmtime(p) for p in tiny["paths"]] == before


def test_unroll_mask_matches_drafting():
    from train.eagle import unroll_mask

    m = unroll_mask(4, 2)
    # Pass 2, position 2: true pairs 0..1... only q <= p-1 from pass 1, plus its own key.
    assert m[2, :4].tolist() == [True, True, False, False] and m[2, 4:].tolist() == [False, False, True, False]
    m3 = unroll_mask(5, 3)
    assert m3[4, :5].tolist() == [True, True, True, False, False]
    assert m3[4, 5:10].tolist() == [False, False, False, True, False]
    assert m3[4, 10:].tolist() == [False, False, False, False, True]


def _load(kind, tiny, out):
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter

    cfg = EngineConfig(model=tiny["model"], drafter=kind, draft_path=out, dtype="float32", draft_min_prob=0.0, draft_vocab_size=0)
    return load_drafter(cfg, tiny["model"])


def test_eagle_training_lowers_loss_and_loads(tiny):
    from train.eagle import parse_args, train

    out = str(tiny["root"] / "eagle")
    res = train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", out, "--max-steps", "80",
                            "--draft-vocab", "128", "--batch-tokens", "256", "--lr", "2e-3", "--val-frac", "0.1",
                            "--save-every", "0"]))
    assert res["last_loss"] < 0.8 * res["first_loss"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["kind"] == "eagle" and cfg["draft_vocab_size"] == 128
    drafter = _load("eagle", tiny, out)
    assert drafter.head.weight.shape[0] == 128
    tree = None
    drafter.on_prefill("r", tiny["prompts"][0][1], torch.randn(len(tiny["prompts"][0][1]), 96), 5)
    tree = drafter.propose(["r"], [10])[0]
    assert 0 < len(tree) <= 10
    cfg2 = _continue_training(train, parse_args, tiny, out, res, ["--batch-tokens", "256", "--val-frac", "0.1"])
    assert cfg2["train"]["init_from"]["steps"] == 80 and cfg2["draft_vocab_size"] == 128


def test_draft_vocabulary_is_ranked_and_can_be_capped(tiny, tmp_path, caplog):
    """Training stores the draft vocabulary most frequent first (counted here independently
    over the training split); the engine's draft_vocab_size keeps its top N; --draft-vocab with
    --init-from re-selects the vocabulary of a trained drafter."""
    from collections import Counter

    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from safetensors.torch import load_file
    from train.common import load_examples, split
    from train.eagle import parse_args, train

    # The vocabulary comes from the training split (the eagle test above holds out 10%).
    train_ex, _ = split(load_examples(tiny["data"]), 0.1, 0)
    counts = Counter(t for e in train_ex for t in e.tokens[e.prompt_len:].tolist())
    out = str(tiny["root"] / "eagle")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["draft_vocab_order"] == "frequency"
    ids = load_file(os.path.join(out, "model.safetensors"))["draft_vocab_ids"].tolist()
    # Frequencies never rise along the list (EOS, forced first, aside).
    freq = [counts[i] for i in ids if i != ids[0]]
    assert freq == sorted(freq, reverse=True) and freq[0] == max(counts.values())

    capped = load_drafter(EngineConfig(model=tiny["model"], drafter="eagle", draft_path=out,
                                       draft_vocab_size=40, dtype="float32", draft_min_prob=0.0), tiny["model"])
    assert capped.head.ids.tolist() == ids[:40] and capped.head.weight.shape[0] == 40

    # A vocabulary stored in id order (earlier files) cannot be cut to its top N: kept whole.
    old = str(tmp_path / "eagle-id-order")
    shutil.copytree(out, old)
    json.dump({**cfg, "draft_vocab_order": "id"}, open(os.path.join(old, "config.json"), "w"))
    with caplog.at_level("WARNING"):
        whole = load_drafter(EngineConfig(model=tiny["model"], drafter="eagle", draft_path=old,
                                          draft_vocab_size=40, dtype="float32", draft_min_prob=0.0), tiny["model"])
    assert whole.head.weight.shape[0] == len(ids) and "not ranked" in caplog.text

    resized = str(tmp_path / "eagle-64")
    train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", resized, "--max-steps", "1",
                      "--lr", "0", "--save-every", "0", "--batch-tokens", "256", "--init-from", out,
                      "--draft-vocab", "64"]))
    assert load_file(os.path.join(resized, "model.safetensors"))["draft_vocab_ids"].tolist() == ids[:64]


def _continue_training(train, parse_args, tiny, out: str, first: dict, extra: list[str]) -> dict:
    """--init-from continues from the trained drafter at ``out``: its first loss is already
    low and its draft vocabulary is kept. Returns the new drafter's config."""
    from safetensors.torch import load_file

    more = out + "-more"
    res = train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", more, "--max-steps", "5",
                            "--lr", "5e-4", "--save-every", "0", "--init-from", out] + extra))
    assert res["first_loss"] < 0.8 * first["first_loss"]
    before, after = (load_file(os.path.join(d, "model.safetensors")) for d in (out, more))
    assert torch.equal(before["draft_vocab_ids"], after["draft_vocab_ids"])
    return json.load(open(os.path.join(more, "config.json")))


def test_medusa_training_lowers_loss_and_loads(tiny):
    from train.medusa import parse_args, train

    out = str(tiny["root"] / "medusa")
    res = train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", out, "--max-steps", "40",
                            "--draft-vocab", "128", "--batch", "64", "--lr", "3e-3", "--val-frac", "0.2",
                            "--heads", "3", "--save-every", "0"]))
    assert res["last_loss"] < 0.8 * res["first_loss"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["kind"] == "medusa" and len(cfg["rank_acc"]) == 3 and len(cfg["rank_acc"][0]) == 10
    drafter = _load("medusa", tiny, out)
    drafter.on_prefill("r", [1, 2], torch.randn(2, 96), 5)
    assert len(drafter.propose(["r"], [8])[0]) == 8
    cfg2 = _continue_training(train, parse_args, tiny, out, res, ["--batch", "64", "--val-frac", "0.2"])
    assert cfg2["num_heads"] == 3 and cfg2["train"]["init_from"]["steps"] == 40


def test_medusa_heads_grow_deeper_without_changing_predictions(tiny, tmp_path):
    """--layers 2 from a trained 1-block drafter appends identity blocks: before any
    update the heads predict exactly what the 1-block heads did."""
    from train.medusa import parse_args, train

    out = str(tiny["root"] / "medusa")
    deeper = str(tmp_path / "medusa2")
    train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", deeper, "--max-steps", "1",
                      "--lr", "0", "--save-every", "0", "--val-frac", "0.2", "--init-from", out, "--layers", "2"]))
    assert json.load(open(os.path.join(deeper, "config.json")))["num_layers"] == 2
    one, two = _load("medusa", tiny, out), _load("medusa", tiny, deeper)
    assert len(two.model.heads[0]) == 2 and len(one.model.heads[0]) == 1
    h = torch.randn(5, 96)
    torch.testing.assert_close(two.model(h), one.model(h), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer"):
        train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", str(tmp_path / "x"),
                          "--max-steps", "1", "--init-from", deeper, "--layers", "1"]))


def test_eagle_grows_deeper_without_changing_predictions(tiny, tmp_path):
    """--layers 2 from a trained 1-layer EAGLE drafter appends an identity layer: before any
    update it predicts exactly what the 1-layer drafter did, at every draft depth; files in
    the earlier flat one-layer layout still load."""
    from engine.drafters.eagle import EagleModel
    from train.eagle import parse_args, train

    out = str(tiny["root"] / "eagle")
    deeper = str(tmp_path / "eagle2")
    train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", deeper, "--max-steps", "1",
                      "--lr", "0", "--save-every", "0", "--val-frac", "0.2", "--batch-tokens", "256",
                      "--init-from", out, "--layers", "2"]))
    assert json.load(open(os.path.join(deeper, "config.json")))["num_layers"] == 2
    one, two = _load("eagle", tiny, out), _load("eagle", tiny, deeper)
    assert len(two.model.layers) == 2 and len(one.model.layers) == 1
    emb, feats = torch.randn(1, 6, 96), torch.randn(1, 6, 96)
    pos, mask = torch.arange(6).unsqueeze(0), torch.ones(6, 6, dtype=torch.bool).tril().unsqueeze(0)
    with torch.no_grad():
        out1, k1, _ = one.model(emb, feats, pos, mask)
        out2, k2, _ = two.model(emb, feats, pos, mask)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    assert k1.shape[0] == 1 and k2.shape[0] == 2  # one KV cache per layer
    prompt = tiny["prompts"][1][1]
    trees = []
    for d in (one, two):
        d.on_prefill("r", prompt, torch.randn(len(prompt), 96, generator=torch.Generator().manual_seed(1)), 7)
        trees.append(d.propose(["r"], [12])[0])
    assert trees[0].tokens == trees[1].tokens and trees[0].parents == trees[1].parents
    # The flat layout of earlier one-layer files (q_proj.weight, ... at the top level).
    flat = {k.removeprefix("layers.0."): v for k, v in one.model.state_dict().items()}
    assert "q_proj.weight" in flat
    legacy = EagleModel(one.model.cfg)
    legacy.load_state_dict(flat)
    assert all(torch.equal(a, b) for a, b in zip(legacy.state_dict().values(), one.model.state_dict().values()))
    with pytest.raises(ValueError, match="fewer"):
        train(parse_args(["--data", tiny["data"], "--model", tiny["model"], "--out", str(tmp_path / "x"),
                          "--max-steps", "1", "--init-from", deeper, "--layers", "1"]))


def test_medusa_per_step_tree_follows_head_confidence(tiny):
    """The per-step tree holds the budget's best nodes by product of head probabilities,
    closed under prefixes; a fixed ``choices`` tree stays as given."""
    from engine.drafters.medusa import MedusaDrafter
    from engine.drafters.trees import chain

    drafter = _load("medusa", tiny, str(tiny["root"] / "medusa"))
    h = torch.randn(96)
    drafter.on_prefill("r", [1, 2], h.unsqueeze(0), 5)
    budget = 7
    tree = drafter.propose(["r"], [budget])[0]
    assert len(tree) == budget and all(p < i for i, p in enumerate(tree.parents))
    # Independent oracle: enumerate every path of the heads' top candidates, score it by
    # the product of probabilities, and compare the best `budget` path scores.
    with torch.no_grad():
        probs = torch.softmax(drafter.head.logits(drafter.model(h.unsqueeze(0))[:, 0]).float(), -1)  # [K, Vd]
    top_p = probs.topk(budget, -1).values
    paths = {(): 1.0}
    for d in range(probs.shape[0]):
        paths.update({p + (r,): s * float(top_p[d, r]) for p, s in list(paths.items()) if len(p) == d
                      for r in range(budget)})
    best = sorted((s for p, s in paths.items() if p), reverse=True)[:budget]
    row = {int(t): r for r, t in enumerate(drafter.head.ids)}  # target id -> draft-vocabulary row
    depth, score = [], []
    for tok, parent in zip(tree.tokens, tree.parents):
        depth.append(0 if parent < 0 else depth[parent] + 1)
        score.append((1.0 if parent < 0 else score[parent]) * float(probs[depth[-1], row[tok]]))
    got = sorted(score, reverse=True)
    assert got == pytest.approx(best, rel=1e-4)
    fixed = MedusaDrafter(drafter.model, drafter.head, choices=chain(3))
    fixed.on_prefill("r", [1, 2], h.unsqueeze(0), 5)
    assert fixed.propose(["r"], [budget])[0].parents == [-1, 0, 1]


def test_eval_runs_on_a_few_prompts(tiny):
    from train.eval import evaluate, plot, write_markdown

    drafts = {"eagle": str(tiny["root"] / "eagle"), "medusa": str(tiny["root"] / "medusa")}
    if not all(os.path.exists(os.path.join(d, "config.json")) for d in drafts.values()):
        pytest.skip("needs the trained drafters of the tests above")
    prompts = {"writing": [tiny["prompts"][0][1]], "math": [tiny["prompts"][1][1]]}
    res = evaluate(tiny["model"], ["eagle", "medusa"], drafts, [0.0, 1.0], prompts, max_tokens=8, tree_budget=12)
    for kind in ("eagle", "medusa"):
        for t in ("0.0", "1.0"):
            r = res[kind][t]["all"]
            assert 1.0 <= r["tau"] <= 13 and r["steps"] > 0 and len(r["accept_ge"]) == 8
    write_markdown(res, str(tiny["root"] / "acc.md"), {"tree_budget": 12})
    plot(res, str(tiny["root"] / "acc.png"))
    assert os.path.getsize(tiny["root"] / "acc.png") > 1000


def test_eagle_trains_for_a_qwen3_target(tmp_path):
    """Another family end to end: data shards from a Qwen3 target (q/k head norms, biases), an
    EAGLE head trained on them, served by the engine at T=0 with plain decoding's tokens."""
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.sampling import SamplingParams
    from tests.conftest import random_model_dir
    from train.data import build_shards
    from train.eagle import parse_args, train

    model = random_model_dir(str(tmp_path / "model"), "qwen3", vocab=320, hidden=96, layers=2, seed=4,
                             attention_bias=True)
    g = torch.Generator().manual_seed(1)
    prompts = [("writing", torch.randint(3, 300, (6 + i % 5,), generator=g).tolist()) for i in range(8)]
    data = str(tmp_path / "data")
    build_shards(model, prompts, data, max_tokens=24, gen_dtype="float32", feature_dtype="float32",
                 max_num_seqs=8, shard_size=8, temperatures=(0.0,), progress=False)
    out = str(tmp_path / "eagle")
    res = train(parse_args(["--data", data, "--model", model, "--out", out, "--max-steps", "60",
                            "--batch-tokens", "256", "--lr", "2e-3", "--val-frac", "0.1", "--save-every", "0"]))
    assert res["last_loss"] < 0.8 * res["first_loss"]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = [p for _, p in prompts[:3]]
    outs = {}
    for drafter in ("off", "eagle"):
        engine = build_engine(EngineConfig(model=model, dtype="float32", drafter=drafter,
                                           draft_path=out if drafter == "eagle" else None, tree_budget=8,
                                           draft_min_prob=0.0, draft_vocab_size=0, lookup_tokens=0, num_blocks=64))
        done = engine.generate(ids, params)
        outs[drafter] = [o.token_ids for o in done]
        if drafter == "eagle":
            steps = sum(o.seq.stats.verify_steps for o in done)
            assert sum(o.seq.stats.committed for o in done) > 1.3 * steps  # the trained head is accepted
    assert outs["eagle"] == outs["off"]
