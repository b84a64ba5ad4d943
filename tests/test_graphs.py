"""The static-shape (CUDA graph) runner's padding: a padded step equals the plain one.

engine/graphs.py pads a decode or verify step to a bucket (B', T') before it is replayed as
a CUDA graph. On CPU the same padded forward runs eagerly; the oracle is the unpadded forward
of the same model on a copy of the same KV cache: equal logits and hidden rows, and the same
KV cache outside the trash block, for every bucket the tests reach.
"""
import random

import pytest
import torch

from engine.batch import SeqInput, build_model_input
from engine.graphs import BATCH_BUCKETS, ROW_BUCKETS, GraphForward, bucket_of, pad_input
from engine.runner import ModelRunner

BLOCK = 4
BLOCKS = 48  # the engine's blocks; block 48 is the trash block
WIDTH = 24  # block-table entries per sequence: 96 tokens, the longest context + 64 rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import random_llama_dir

    return random_llama_dir(str(tmp_path_factory.mktemp("graphs")), heads=4, kv_heads=2, hidden=64, layers=2)


@pytest.fixture(scope="module")
def runner(model_dir):
    runner = ModelRunner(model_dir, "float32", "cpu", attention_backend="torch")
    runner.allocate_kv(BLOCKS + 1, BLOCK)
    return runner


def random_tree(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def decode_step(runner, rng: random.Random, batch: int, rows: list[int], tree: bool):
    """Prefill `batch` random sequences in disjoint blocks, then a step of rows[b] new rows
    each (a random tree, or one causal row). Returns the step's ModelInput."""
    seqs, steps, next_block = [], [], 0
    for b in range(batch):
        prompt = rng.randrange(3, 20)
        need = -(-(prompt + rows[b]) // BLOCK)
        table = list(range(next_block, next_block + need))
        next_block += need
        ids = [rng.randrange(runner.config.vocab_size) for _ in range(prompt)]
        seqs.append(SeqInput(ids, list(range(prompt)), table, 0))
        parents = random_tree(rows[b], rng) if tree else None
        depth = [0] * rows[b]
        if parents:
            for i in range(1, rows[b]):
                depth[i] = depth[parents[i]] + 1
        else:
            depth = list(range(rows[b]))
        steps.append(SeqInput([rng.randrange(runner.config.vocab_size) for _ in range(rows[b])],
                              [prompt + d for d in depth], table, prompt, tree_parents=parents,
                              logits_rows=list(range(rows[b]))))
    assert next_block <= BLOCKS
    runner.forward(build_model_input(seqs, BLOCK))  # fill the caches
    return build_model_input(steps, BLOCK)


CASES = [  # (batch, rows per sequence, tree)
    (1, [1], False), (3, [1, 1, 1], False), (2, [5, 8], True), (4, [3, 1, 6, 2], True),
    (5, [16, 9, 1, 4, 11], True), (1, [33], True), (9, [2] * 9, True),
]


@pytest.mark.parametrize("batch, rows, tree", CASES)
def test_padded_step_equals_plain_step(runner, batch, rows, tree):
    rng = random.Random(batch * 100 + sum(rows))
    inp = decode_step(runner, rng, batch, rows, tree)
    bucket = bucket_of(inp)
    assert bucket is not None and bucket[0] >= batch and bucket[1] >= max(rows)
    saved = runner.kv_cache.clone()
    plain = runner.forward(inp)
    after_plain = runner.kv_cache.clone()
    runner.kv_cache.copy_(saved)
    runner.kv_cache[:, :, BLOCKS] = 0
    graphs = GraphForward(runner.backend, WIDTH, BLOCKS, BLOCK, capture=False)
    assert max(inp.context_lens) + bucket[1] <= WIDTH * BLOCK  # else the step would run unpadded
    padded = graphs.forward(inp, runner.kv_cache)
    assert torch.allclose(padded.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(padded.hidden, plain.hidden, atol=1e-5, rtol=1e-5)
    # Every real slot holds the same K/V; only the trash block took the padding rows' writes.
    assert torch.allclose(runner.kv_cache[:, :, :BLOCKS], after_plain[:, :, :BLOCKS], atol=1e-6)
    if bucket != (batch, max(rows)) or min(rows) != max(rows):
        assert runner.kv_cache[:, :, BLOCKS].abs().sum() > 0  # the padding rows wrote there


def test_padding_layout():
    inp = build_model_input([SeqInput([7, 8, 9], [5, 6, 6], [0, 1], 5, [-1, 0, 0], [0, 1, 2]),
                             SeqInput([4], [2], [2], 2, None, [0])], BLOCK)
    padded, rows, logits_rows = pad_input(inp, (4, 4), WIDTH, BLOCKS, BLOCK)
    assert rows.tolist() == [0, 1, 2, 4] and logits_rows.tolist() == [0, 1, 2, 4]
    assert padded.query_start_loc == [0, 4, 8, 12, 16] and padded.context_lens == [5, 2, 0, 0]
    assert padded.tree_parents.tolist() == [-1, 0, 0, -1] + [-1] * 12
    assert padded.slot_mapping.tolist()[:5] == [5, 6, 7, BLOCKS * BLOCK, 2 * BLOCK + 2]
    assert padded.block_tables.shape == (4, WIDTH) and padded.block_tables[2].tolist() == [BLOCKS] * WIDTH


def test_prefills_and_oversized_steps_have_no_bucket():
    prefill = build_model_input([SeqInput([1, 2, 3], [0, 1, 2], [0], 0)], BLOCK)
    assert bucket_of(prefill) is None
    wide = build_model_input([SeqInput([1] * (ROW_BUCKETS[-1] + 1), list(range(3, ROW_BUCKETS[-1] + 4)),
                                       list(range(20)), 3)], BLOCK)
    assert bucket_of(wide) is None
    many = build_model_input([SeqInput([1], [3], [0], 3)] * (BATCH_BUCKETS[-1] + 1), BLOCK)
    assert bucket_of(many) is None


@pytest.mark.parametrize("drafter", ["eagle", "off"])
def test_engine_with_graph_runner_equals_plain(model_dir, drafter):
    """cuda_graphs="on" on CPU: every decode and verify step runs padded (eagerly); at T=0 the
    tokens equal the plain engine's, with speculation and without."""
    from engine.config import EngineConfig
    from engine.drafters.loading import load_drafter
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor
    from engine.sampling import SamplingParams

    prompts = [[5, 17, 42, 8, 99, 3], [250, 7, 7, 64], [11, 12]]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    outs, padded_steps = {}, 0
    for graphs in ("off", "on"):
        cfg = EngineConfig(model=model_dir, dtype="float32", num_blocks=64, max_model_len=128, cuda_graphs=graphs,
                           drafter=drafter, draft_path="random" if drafter != "off" else None, tree_budget=8,
                           lookup_tokens=0, draft_min_prob=0.0, draft_vocab_size=0, attention_backend="torch")
        executor = InProcessExecutor(model_dir, "float32", "cpu", attention_backend="torch", cuda_graphs=graphs,
                                     max_model_len=cfg.max_model_len)
        engine = LLMEngine(cfg, executor, load_drafter(cfg, model_dir, executor) if drafter != "off" else None)
        if graphs == "on":
            # The warm-up's garbage K/V (written before any sequence owns a block) changes nothing.
            shapes = executor.runner.warm_up(cfg.max_num_seqs, 9, 40, always=True)
            assert shapes == [("prefill", 40)] + [("step", b, r) for b in (1, 2, 4, 8, 16) for r in (1, 2, 4, 8, 16)]
            backend = executor.runner.backend
            assert isinstance(backend, GraphForward)
            forward = backend.forward

            def counted(inp, kv, forward=forward):
                nonlocal padded_steps
                padded_steps += bucket_of(inp) is not None
                return forward(inp, kv)

            backend.forward = counted
        done = engine.generate(prompts, params)
        outs[graphs] = [o.token_ids for o in done]
        if drafter != "off":
            assert sum(o.seq.stats.drafted for o in done) > 0
    assert outs["on"] == outs["off"]
    assert padded_steps >= 5  # decode steps really ran padded


def test_engine_warms_up_the_shapes_it_will_serve(model_dir, monkeypatch):
    """LLMEngine asks every rank to warm up (compiles, graph captures, NCCL) at start, for its
    batch, its largest tree step and its longest prefill; on CPU the runner skips it (nothing
    to compile or capture), and without graphs one sequence per row bucket is enough."""
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.executor import InProcessExecutor

    calls = []
    monkeypatch.setattr(InProcessExecutor, "warm_up", lambda self, *args: calls.append(args))
    build_engine(EngineConfig(model=model_dir, dtype="float32", num_blocks=64, max_num_seqs=3, drafter="eagle",
                              draft_path="random", tree_budget=8, lookup_tokens=6, max_num_batched_tokens=512))
    build_engine(EngineConfig(model=model_dir, dtype="float32", num_blocks=64, drafter="off"))
    assert calls == [(3, 15, 512), (16, 1, 2048)]
    monkeypatch.undo()
    runner = ModelRunner(model_dir, "float32", "cpu", attention_backend="torch")
    runner.allocate_kv(8, 4)
    assert runner.warm_up(4, 9, 64) == []  # CPU: nothing to pay for
    shapes = runner.warm_up(4, 9, 64, always=True)
    assert shapes == [("prefill", 32)] + [("step", 1, r) for r in (1, 2, 4, 8, 16)]  # 8 blocks of 4 tokens
