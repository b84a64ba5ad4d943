"""The Ray runtime (actors/) against the in-process engine, and its failure handling.

Oracle: at temperature 0 the tokens of the Ray replica (TP shards over gloo, with or
without a drafter actor) must equal the in-process engine's plain greedy tokens.
Failures are injected by killing (SIGKILL) or freezing (SIGSTOP) actor processes.
One ray.init for the module; everything runs on CPU.
"""
import functools
import importlib.util
import json
import os
import signal
import sys
import time

import pytest
import ray
import torch

from actors.drafter import Drafter, RayDrafterProxy, start_drafter, wait_ready
from actors.executor import RayExecutor, ShardFailure
from actors.replica import Replica
from engine.build import build_engine
from engine.config import EngineConfig
from engine.drafters.base import Drafter as DrafterBase
from engine.drafters.base import DraftTree
from engine.engine import LLMEngine
from engine.executor import InProcessExecutor
from engine.sampling import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
# One torch thread per actor: the driver and the actors share the machine's few cores.
SMALL = {"cpus_per_rank": 1, "drafter_cpus": 1, "num_threads": 1, "step_timeout_s": 60, "start_timeout_s": 120}
# Drafter kinds of the default model; each must give plain greedy's tokens at T=0.
DRAFTER_KINDS = ["off"] + [k for k in ("eagle", "medusa") if importlib.util.find_spec(f"engine.drafters.{k}")]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    # Workers inherit the driver's environment: let them import engine/ and actors/.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    # Test-defined drafters travel by value (workers cannot import this module by name).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if ray.is_initialized():  # left over by another module: start clean, with our resources
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ---------------------------------------------------------------------- helpers


def write_tiny_model(path: str, seed: int = 0) -> str:
    """A random Llama checkpoint (config.json + safetensors with HF names), 4 heads / 2 KV heads."""
    from safetensors.torch import save_file

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "eos_token_id": 0,
    }
    g = torch.Generator().manual_seed(seed)
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * d

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    t = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": 1 + rnd(h), "lm_head.weight": rnd(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
            p + "input_layernorm.weight": 1 + rnd(h), p + "post_attention_layernorm.weight": 1 + rnd(h),
        }
    os.makedirs(path, exist_ok=True)
    save_file({k: x.contiguous() for k, x in t.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


class OracleDrafter(DrafterBase):
    """Drafts the known greedy continuation (a chain) plus one wrong sibling per level.

    Every chain node is accepted, so speculation visibly speeds up the run; the wrong
    siblings exercise tree verification. ``stall_after``: propose sleeps ``stall_s``
    from that call on (a stuck drafter).
    """

    kind = "oracle"

    def __init__(self, references: list[list[int]], depth: int = 3, stall_after: int | None = None,
                 stall_s: float = 0.0):
        self.references, self.depth = references, depth
        self.stall_after, self.stall_s = stall_after, stall_s
        self.calls = 0
        self.tokens: dict[str, list[int]] = {}  # committed tokens + the pending one

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        assert hidden.shape[0] == len(token_ids)
        self.tokens[request_id] = list(token_ids) + [next_token]

    def propose(self, request_ids, budgets):
        self.calls += 1
        if self.stall_after is not None and self.calls > self.stall_after:
            time.sleep(self.stall_s)
        trees = []
        for rid, budget in zip(request_ids, budgets):
            seq = self.tokens.get(rid, [])
            ref = next((r for r in self.references if r[: len(seq)] == seq), [])
            chain = ref[len(seq) : len(seq) + min(self.depth, budget // 2)]
            tokens, parents = [], []
            for j, tok in enumerate(chain):
                parent = len(tokens) - 2 if j else -1  # the previous chain node (siblings sit after it)
                tokens += [tok, (tok + 1) % 384]
                parents += [parent, parent]
            trees.append(DraftTree(tokens, parents))
        return trees

    def on_verified(self, request_id, accepted, hidden, next_token):
        assert hidden.shape[0] == len(accepted)
        self.tokens[request_id] += list(accepted[1:]) + [next_token]

    def release(self, request_id):
        self.tokens.pop(request_id, None)


class FeatureLogDrafter(OracleDrafter):
    """The oracle's trees; logs a checksum of every feature row it is given, in call order."""

    def __init__(self, references):
        super().__init__(references)
        self.log: list[tuple] = []

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.log.append(("prefill", tuple(token_ids), hidden.double().sum(-1).tolist()))
        super().on_prefill(request_id, token_ids, hidden, next_token)

    def on_verified(self, request_id, accepted, hidden, next_token):
        self.log.append(("verified", tuple(accepted), hidden.double().sum(-1).tolist()))
        super().on_verified(request_id, accepted, hidden, next_token)


def drafter_log(actor) -> list[tuple]:
    return ray.get(actor.__ray_call__.remote(lambda self: self.drafter.log), timeout=30)


def in_process_tokens(model_dir: str, prompts, params=GREEDY, **cfg) -> list[list[int]]:
    config = EngineConfig(model=model_dir, num_blocks=64, tree_budget=0, **cfg, dtype="float32")
    engine = LLMEngine(config, executor=InProcessExecutor(model_dir))
    return [o.token_ids for o in engine.generate(prompts, params)]


def run_until(replica, request_ids, deadline_s: float) -> dict:
    """Step until every request finished; fail (never hang) past deadline_s."""
    final, t0 = {}, time.monotonic()
    while len(final) < len(request_ids):
        assert time.monotonic() - t0 < deadline_s, f"requests not finished within {deadline_s}s"
        for out in replica.step():
            if out.finished:
                final[out.request_id] = out
    return final


def spec_steps(outputs) -> float:
    """Mean tokens committed per decode step (tau) over finished outputs."""
    steps = sum(o.seq.stats.verify_steps for o in outputs)
    return sum(o.seq.stats.committed for o in outputs) / max(1, steps)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, prompts, their in-process greedy outputs, full reference sequences)."""
    path = write_tiny_model(str(tmp_path_factory.mktemp("tiny")))
    prompts = [[5, 17, 42, 8, 99, 3], [250, 7, 7, 64]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = in_process_tokens(path, prompts, params, max_model_len=256)
    return path, prompts, params, outs, [p + o for p, o in zip(prompts, outs)]


def tiny_config(path, **kw) -> EngineConfig:
    return EngineConfig(model=path, num_blocks=64, max_model_len=256, **kw, dtype="float32", draft_min_prob=0.0, draft_vocab_size=0)


# ---------------------------------------------------------------------- same tokens


@pytest.fixture(scope="module")
def default_reference():
    from engine.weights import default_model_dir

    engine = build_engine(EngineConfig(num_blocks=64, tree_budget=0, dtype="float32"))
    prompts = [engine.tokenize_chat([{"role": "user", "content": "What is the capital of France?"}]),
               engine.tokenizer.encode("def fibonacci(n):")]
    outs = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    return default_model_dir(), prompts, outs


def draft_path(kind: str) -> str | None:
    """The shipped drafter of the default model, else an untrained one (still lossless)."""
    from engine.drafters.loading import shipped_drafter_dir

    return None if os.path.exists(os.path.join(shipped_drafter_dir(kind), "config.json")) else "random"


@pytest.mark.parametrize("speculation", DRAFTER_KINDS)
@pytest.mark.parametrize("tp", [1, 3])
def test_default_model_matches_in_process(default_reference, tp, speculation):
    model_dir, prompts, expected = default_reference
    spec = {} if speculation == "off" else {"drafter": speculation, "draft_path": draft_path(speculation)}
    replica = Replica(EngineConfig(tp=tp, num_blocks=64, tree_budget=16 if spec else 0, **spec, dtype="float32", draft_min_prob=0.0, draft_vocab_size=0),
                      executor_options=SMALL, drafter_required=True)
    try:
        outs = replica.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert all(o.finish_reason == "length" for o in outs)
        if spec:  # the drafter actor did draft (an untrained one has few tokens accepted)
            assert replica.metrics()["drafter"] == "ok"
            assert all(o.seq.stats.drafted > 0 for o in outs)
    finally:
        replica.shutdown()


class WideTreeDrafter(DrafterBase):
    """60-node trees: the known greedy continuation as a chain of 3, and 57 decoys below it."""

    kind = "eagle"

    def __init__(self, references: list[list[int]], nodes: int = 60, chain: int = 3):
        self.references, self.nodes, self.chain = references, nodes, chain
        self.tokens: dict[str, list[int]] = {}

    def on_prefill(self, request_id, token_ids, hidden, next_token):
        self.tokens[request_id] = list(token_ids) + [next_token]

    def on_verified(self, request_id, accepted, hidden, next_token):
        self.tokens[request_id] += list(accepted[1:]) + [next_token]

    def release(self, request_id):
        self.tokens.pop(request_id, None)

    def propose(self, request_ids, budgets):
        trees = []
        for rid in request_ids:
            seq = self.tokens[rid]
            ref = next((r for r in self.references if r[: len(seq)] == seq), seq)
            chain = (ref[len(seq): len(seq) + self.chain] + [7] * self.chain)[: self.chain]
            decoys = self.nodes - self.chain
            tokens = chain + [(100 + i) % 997 for i in range(decoys)]
            parents = list(range(-1, self.chain - 1)) + [i % self.chain for i in range(decoys)]
            trees.append(DraftTree(tokens, parents))
        return trees


def test_step_sends_back_kilobytes_not_logits(default_reference):
    """What crosses the shard-to-replica boundary per decode step (default model, tp=1 on the
    Ray executor, 60-node trees, batch 4): the accepted rows' hidden states and a few ints,
    bounded by accepted rows x hidden x itemsize + 2 KB, not the [rows, vocab] logits."""
    import pickle

    model_dir, prompts, expected = default_reference
    sizes = []  # (bytes returned, accepted rows, forward rows) per decode step

    class MeasuredExecutor(RayExecutor):
        def _call(self, method, *args, **kw):
            values = super()._call(method, *args, **kw)
            if method == "execute" and args and args[0] is not None:
                packed = values[0]
                rows = sum(len(p) for p in packed[0])
                sizes.append((len(pickle.dumps(packed, protocol=5)), rows, len(args[0][0]["input_ids"][0])))
            return values

    config = EngineConfig(num_blocks=160, tree_budget=60, lookup_tokens=0, max_num_batched_tokens=512,
                          dtype="float32", draft_min_prob=0.0, draft_vocab_size=0)
    executor = MeasuredExecutor(config, **SMALL)
    try:
        refs = [p + o for p, o in zip(prompts, expected)]
        engine = LLMEngine(config, executor, WideTreeDrafter(refs))
        outs = engine.generate(prompts * 2, GREEDY)
        assert [o.token_ids for o in outs] == expected * 2
    finally:
        executor.shutdown()
    hidden_bytes = executor.config.hidden_size * 4
    decode = [(b, a, n) for b, a, n in sizes if n == 4 * 61]
    assert len(decode) >= 2
    for returned, accepted, rows in decode:
        assert returned <= accepted * hidden_bytes + 2048, (returned, accepted)
    worst = max(decode)
    print(f"\nbytes back per decode step: {worst[0]} ({worst[1]} accepted rows); the forward's "
          f"fp32 logits alone would be {worst[2] * executor.config.vocab_size * 4}")
    assert max(a for _, a, _ in decode) > 8  # the chains were accepted: rows were really sent back


def test_tiny_model_tp2_matches_in_process(tiny):
    path, prompts, params, expected, _ = tiny
    config = tiny_config(path, tp=2, tree_budget=0)
    executor = RayExecutor(config, **SMALL)
    try:
        engine = LLMEngine(config, executor=executor)  # the engine, unchanged, on Ray shards
        assert [o.token_ids for o in engine.generate(prompts, params)] == expected
        assert len(set(executor.shard_pids())) == 2
    finally:
        executor.shutdown()


def test_tiny_model_tp2_with_drafter_actor(tiny):
    path, prompts, params, expected, refs = tiny
    replica = Replica(tiny_config(path, tp=2, tree_budget=8), drafter_factory=functools.partial(OracleDrafter, refs),
                      executor_options=SMALL)
    try:
        outs = replica.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected
        assert spec_steps(outs) > 2.5  # the oracle's chains were accepted
    finally:
        replica.shutdown()


def test_qwen3_target_with_eagle3_drafter_actor_on_tp2_shards(tmp_path):
    """Another family on shard actors: a Qwen3 target (QKV and o_proj biases, q/k head norms)
    split over two ranks, a random EAGLE-3 drafter actor reading three of its layers' inputs
    from rank 0: the tokens of plain greedy decoding in one process."""
    from conftest import random_model_dir

    path = random_model_dir(str(tmp_path / "qwen3"), "qwen3", heads=4, kv_heads=2, hidden=64, layers=7, vocab=384,
                            seed=3, attention_bias=True)
    prompts, params = [[5, 17, 42, 8, 99, 3], [250, 7, 7, 64]], SamplingParams(max_tokens=16, ignore_eos=True)
    expected = in_process_tokens(path, prompts, params, max_model_len=256)
    replica = Replica(tiny_config(path, tp=2, drafter="eagle3", draft_path="random", tree_budget=8, draft_top_k=4,
                                  draft_depth=4, lookup_tokens=0),
                      executor_options=SMALL, drafter_required=True)
    try:
        outs = replica.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected
        assert sum(o.seq.stats.drafted for o in outs) > 0  # trees drafted from the shards' features
        assert replica.engine.executor.config.architecture == "Qwen3ForCausalLM"
    finally:
        replica.shutdown()


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wire_format_round_trip(dtype):
    from engine.batch import SamplingInput, SeqInput, StepOutput, build_model_input
    from actors.shard import pack_output, pack_step, unpack_output, unpack_step

    inp = build_model_input([SeqInput([1, 2, 3], [4, 5, 5], [7], 4, tree_parents=[-1, 0, 0]),
                             SeqInput([9], [2], [3], 2)], 16)
    sampling = SamplingInput([SamplingParams(temperature=0.5, seed=3), SamplingParams()], torch.rand(6),
                             (torch.tensor([1]), torch.rand(1, 11).to(dtype)), "all")
    back_inp, back = unpack_step(ray.cloudpickle.loads(ray.cloudpickle.dumps(pack_step(inp, sampling))))
    for k, v in vars(inp).items():
        assert torch.equal(v, getattr(back_inp, k)) if isinstance(v, torch.Tensor) else v == getattr(back_inp, k)
    assert back.params == sampling.params and torch.equal(back.uniforms, sampling.uniforms)
    assert back.hidden == "all" and torch.equal(back.draft_probs[1], sampling.draft_probs[1])
    for hidden in (torch.randn(4, 8).to(dtype), None):
        out = StepOutput([[0, 2], [0]], [5, 6], hidden)
        back = unpack_output(ray.cloudpickle.loads(ray.cloudpickle.dumps(pack_output(out))))
        assert back.paths == out.paths and back.next_tokens == out.next_tokens
        assert hidden is None and back.hidden is None or back.hidden.dtype == dtype and torch.equal(back.hidden, hidden)
    from actors.drafter import _pack_tree, _unpack_tree

    tree = DraftTree([3, 4], [-1, 0], [torch.rand(7).to(dtype), None])
    back = _unpack_tree(ray.cloudpickle.loads(ray.cloudpickle.dumps(_pack_tree(tree))))
    assert back.tokens == tree.tokens and torch.equal(back.draft_probs[0], tree.draft_probs[0])


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match="must divide the 9 attention heads"):
        RayExecutor(EngineConfig(tp=2))


def test_bad_device_is_refused():
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")


def test_unplaceable_replica_fails_in_bounded_time(tiny):
    t0 = time.monotonic()
    with pytest.raises(ShardFailure, match="could not place"):
        RayExecutor(tiny_config(tiny[0], tp=2), cpus_per_rank=64, start_timeout_s=2)
    assert time.monotonic() - t0 < 15


# ---------------------------------------------------------------------- drafter failures


@pytest.mark.parametrize("tp", [1, 2])
def test_features_go_from_rank0_straight_to_the_drafter(tiny, tp):
    """feature_transport=shm: rank 0 returns no features; the drafter actor receives the same
    rows as through the host (the oracle: the host path's log), and the tokens are plain greedy's."""
    path, prompts, params, expected, refs = tiny
    logs, returned = {}, {}
    for transport in ("host", "shm"):
        replica = Replica(tiny_config(path, tp=tp, tree_budget=8),
                          drafter_factory=functools.partial(FeatureLogDrafter, refs),
                          executor_options=SMALL | {"feature_transport": transport}, drafter_required=True)
        executor, seen = replica.engine.executor, []
        call = executor._call

        def recording(method, *args, **kw):
            values = call(method, *args, **kw)
            if method == "execute":
                seen.append(values[0][2] is not None)  # rank 0's StepOutput carried features
            return values

        executor._call = recording
        try:
            outs = replica.generate(prompts, params)
            assert [o.token_ids for o in outs] == expected
            assert spec_steps(outs) > 2.5
            assert replica.metrics()["feature_transport"] == transport
            logs[transport], returned[transport] = drafter_log(replica._drafter), seen
        finally:
            replica.shutdown()
    assert all(returned["host"]) and not any(returned["shm"])
    assert len(logs["shm"]) == len(logs["host"]) > 2 * len(prompts)
    assert logs["shm"] == logs["host"]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("treespec-")]  # every segment freed


def test_shared_memory_transport_round_trip():
    from multiprocessing import resource_tracker, shared_memory

    from actors.transport import PREFIX, SharedMemoryTransport

    dead = subprocess_pid_that_exited()
    orphan = shared_memory.SharedMemory(name=f"{PREFIX}{dead}-0f0f", create=True, size=64)  # a killed sender's
    orphan.close()
    resource_tracker.unregister(orphan._name, "shared_memory")  # as if its creator had died
    sender, receiver = SharedMemoryTransport(), SharedMemoryTransport()
    assert not os.path.exists(f"/dev/shm/{PREFIX}{dead}-0f0f")  # swept
    tensors = [torch.randn(5, 7).to(torch.bfloat16), torch.arange(3), torch.zeros(0, 4), torch.randn(2)]
    meta = sender.extract_tensor_transport_metadata("a1b2c3", tensors)
    got = receiver.recv_multiple_tensors("a1b2c3", meta, None)
    assert [t.dtype for t in got] == [t.dtype for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(got, tensors))
    sender.garbage_collect("a1b2c3", meta, tensors)
    assert not os.path.exists(f"/dev/shm/{PREFIX}{os.getpid()}-a1b2c3")


def subprocess_pid_that_exited() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_feature_transport_must_fit_the_device(tiny):
    with pytest.raises(ValueError, match="cuda_ipc is for GPU"):
        RayExecutor(tiny_config(tiny[0], tp=1), feature_transport="cuda_ipc", **SMALL)
    with pytest.raises(ValueError, match="feature_transport must be one of"):
        RayExecutor(tiny_config(tiny[0], tp=1), feature_transport="pigeon", **SMALL)


@pytest.mark.parametrize("transport", ["host", "shm"])
def test_drafter_killed_mid_generation_then_restored(tiny, transport):
    path, prompts, params, expected, refs = tiny
    replica = Replica(tiny_config(path, tp=1, tree_budget=8), drafter_factory=functools.partial(OracleDrafter, refs),
                      executor_options=SMALL | {"feature_transport": transport}, restore_interval_s=0.2)
    try:
        shards = replica.engine.executor.shard_pids()
        ids = [replica.add_request(p, params) for p in prompts]
        for _ in range(3):  # prefill + two speculative steps
            replica.step()
        assert replica.metrics()["drafter"] == "ok"
        os.kill(ray.get(replica._drafter.pid.remote(), timeout=10), signal.SIGKILL)
        final = run_until(replica, ids, 60)
        assert [final[i].token_ids for i in ids] == expected  # finished, without speculation, correctly
        m = replica.metrics()
        assert m["drafter_failures"] == 1 and "drafter" in m["last_error"]

        t0 = time.monotonic()  # a new drafter actor comes up in the background ...
        while replica.metrics()["drafter"] != "ok":
            assert time.monotonic() - t0 < 60, replica.metrics()
            replica.step()
            time.sleep(0.05)
        assert replica.metrics()["drafter_restores"] == 1
        outs = replica.generate(prompts, params)  # ... and new requests speculate again
        assert [o.token_ids for o in outs] == expected
        assert spec_steps(outs) > 2.5
        # The drafter's death took no shard with it (a failed direct transfer only fails the drafter).
        assert replica.engine.executor.shard_pids() == shards
        assert replica.metrics()["feature_transport"] == transport and replica.metrics()["shard_failures"] == 0
    finally:
        replica.shutdown()


def test_stuck_drafter_times_out(tiny):
    path, prompts, params, expected, refs = tiny
    factory = functools.partial(OracleDrafter, refs, stall_after=2, stall_s=30)
    replica = Replica(tiny_config(path, tp=1, tree_budget=8), drafter_factory=factory, executor_options=SMALL,
                      drafter_timeout_s=0.5, restore_interval_s=600)
    try:
        ids = [replica.add_request(p, params) for p in prompts]
        t0 = time.monotonic()
        final = run_until(replica, ids, 30)
        assert [final[i].token_ids for i in ids] == expected
        m = replica.metrics()
        assert m["drafter_failures"] == 1 and "timed out" in m["last_error"]
        assert m["drafter"] == "down" and not m["speculating"]
        assert time.monotonic() - t0 < 20  # one 0.5 s timeout, not a 30 s stall
    finally:
        replica.shutdown()


def broken_drafter():
    raise RuntimeError("no drafter weights here")


def test_drafter_that_cannot_load_leaves_replica_serving(tiny):
    path, prompts, params, expected, _ = tiny
    replica = Replica(tiny_config(path, tp=1, tree_budget=8), drafter_factory=broken_drafter,
                      executor_options=SMALL, restore_interval_s=600)
    try:
        outs = replica.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected
        m = replica.metrics()
        assert m["drafter"] == "down" and "no drafter weights here" in m["last_error"]
    finally:
        replica.shutdown()


def test_proxy_skips_requests_the_drafter_never_saw(tiny):
    refs = tiny[4]
    actor, ready = start_drafter(functools.partial(OracleDrafter, refs), num_cpus=0)
    proxy = RayDrafterProxy(actor, wait_ready(ready, 60))
    try:
        proxy.on_prefill("a", refs[0][:6], torch.zeros(6, 64), refs[0][6])
        trees = proxy.propose(["a", "unknown"], [8, 8])
        assert trees[0].tokens[0] == refs[0][7] and trees[1].tokens == []
        proxy.on_verified("unknown", [1], torch.zeros(1, 64), 2)  # ignored, not an error
        proxy.release("a")
        assert proxy.propose(["a"], [8])[0].tokens == []
    finally:
        ray.kill(actor)
    assert isinstance(Drafter, ray.actor.ActorClass)


# ---------------------------------------------------------------------- shard failures


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_shard_failure_errors_requests_then_rebuilds(tiny, how):
    path, prompts, params, expected, _ = tiny
    step_timeout = 3.0
    replica = Replica(tiny_config(path, tp=2, tree_budget=0), drafter_factory=None,
                      executor_options=SMALL | {"step_timeout_s": step_timeout})
    try:
        ids = [replica.add_request(p, params) for p in prompts]
        for _ in range(3):
            replica.step()
        pid = replica.engine.executor.shard_pids()[1]
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        final = {}
        while len(final) < len(ids):  # the failing step, bounded by the step timeout
            assert time.monotonic() - t0 < step_timeout + 10, "shard failure not detected in time"
            final |= {o.request_id: o for o in replica.step() if o.finished}
        assert {o.finish_reason for o in final.values()} == {"error"}
        m = replica.metrics()
        assert m["shard_failures"] == 1 and m["shards"] == "rebuilding"
        assert "shard" in m["last_error"] and ("timed out" in m["last_error"]) == (how == "freeze")

        outs = replica.generate(prompts[:1], params)  # rebuilt at the next step, then served
        assert outs[0].token_ids == expected[0] and outs[0].finish_reason == "length"
        m = replica.metrics()
        assert m["rebuilds"] == 1 and m["shards"] == "ok"
        assert pid not in replica.engine.executor.shard_pids()
    finally:
        replica.shutdown()
        if how == "freeze":
            try:
                os.kill(pid, signal.SIGKILL)  # ray.kill already did, normally
            except ProcessLookupError:
                pass


def test_engine_has_no_ray_import():
    import subprocess

    code = "import sys, engine.engine, engine.executor, engine.runner; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": REPO})
