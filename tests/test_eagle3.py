"""EAGLE-3: the target's layer features, the published drafter format, and lossless decoding.

Oracles: transformers' ``output_hidden_states`` for the captured features (index 0 is the
embedding output, so a layer id is the input of that layer); a plain-torch EAGLE-3 forward
written here from the format's description (no engine.drafters import) for the drafter;
plain decoding (T = 0) and the exact distribution of the first tokens (T > 0) for the engine.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, random_llama_dir
from engine.batch import SeqInput, build_model_input
from engine.config import EngineConfig, ModelConfig
from engine.drafters.eagle3 import eagle3_drafter, eagle3_feature_layers, eagle3_from_state, load_eagle3
from engine.engine import LLMEngine
from engine.executor import InProcessExecutor
from engine.runner import ModelRunner
from engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def target8(tmp_path_factory) -> str:
    """An 8-layer random target: EAGLE-3's default layers 2, L//2 = 4, L-3 = 5 differ."""
    return random_llama_dir(str(tmp_path_factory.mktemp("t8")), layers=8, seed=1)


def engine_features(runner: ModelRunner, ids: list[int]):
    """(hidden rows, logits) of one causal prefill through the engine's runner."""
    runner.allocate_kv(8, 16)
    out = runner.execute(build_model_input(
        [SeqInput(ids, list(range(len(ids))), list(range(8)), 0, logits_rows=list(range(len(ids))))], 16))
    return out.hidden, out.logits


def hf_hidden_states(model_dir: str, ids: list[int]):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    return [h[0] for h in out.hidden_states], out.logits[0]


# ------------------------------------------------------------------------------ target features


@pytest.mark.parametrize("config,layers", [
    ({}, (2, 4, 5)),  # EAGLE's default: inputs of layers 2, L//2, L-3
    ({"eagle_aux_hidden_state_layer_ids": [6, 1, 3]}, (1, 3, 6)),  # vLLM's key: layer inputs, concatenated in layer order
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 3, 6]}}, (1, 4, 7)),  # SGLang's key: layer outputs
])
def test_captured_features_are_transformers_hidden_states(target8, config, layers):
    cfg = ModelConfig.from_path(target8)
    assert eagle3_feature_layers(config, cfg) == layers
    ids = torch.randint(0, cfg.vocab_size, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    states, hf_logits = hf_hidden_states(target8, ids)
    runner = ModelRunner(target8, "float32", feature_layers=layers)
    hidden, logits = engine_features(runner, ids)
    assert hidden.shape == (len(ids), 3 * cfg.hidden_size)
    assert (hidden - torch.cat([states[i] for i in layers], -1)).abs().max().item() <= 1e-4
    assert (logits - hf_logits).abs().max().item() <= 1e-4  # logits still come from the final hidden state
    runner.set_feature_layers(None)  # back to the final normed hidden state
    hidden, _ = engine_features(runner, ids)
    assert (hidden - states[-1]).abs().max().item() <= 1e-4


def test_feature_layers_errors_and_cpu_backend(target8):
    cfg = ModelConfig.from_path(target8)
    with pytest.raises(ValueError, match="coincide"):  # 2, 3, 3 on a 6-layer target
        eagle3_feature_layers({}, ModelConfig(**{**cfg.__dict__, "num_hidden_layers": 6}))
    with pytest.raises(ValueError, match="8 layers"):
        eagle3_feature_layers({"eagle_aux_hidden_state_layer_ids": [1, 4, 8]}, cfg)
    with pytest.raises(ValueError, match="feature_layers"):
        ModelRunner(target8, "float32", feature_layers=(1, 9))
    with pytest.raises(ValueError, match="feature_layers"):
        EngineConfig(feature_layers=[])
    assert EngineConfig(feature_layers=[2, 4, 5]).feature_layers == (2, 4, 5)
    # The fused bf16 CPU kernel returns only the final hidden state: capture runs the torch forward.
    from engine.backends import ModelForward

    runner = ModelRunner(target8, "bfloat16", feature_layers=(2, 4, 5))
    assert type(runner.backend) is ModelForward and runner.fused is None


TP_WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from engine.batch import SeqInput, build_model_input
from engine.parallel import TPGroup
from engine.runner import ModelRunner
rank, world, port, model, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
if world > 1:
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=rank, world_size=world)
runner = ModelRunner(model, "float32", tp=TPGroup(rank, world), feature_layers=(2, 3, 4))
runner.allocate_kv(4, 8)
ids = list(range(3, 20))
h = runner.execute(build_model_input([SeqInput(ids, list(range(len(ids))), [0, 1, 2, 3], 0)], 8)).hidden
torch.save(h, out + "." + str(rank))
if world > 1:
    dist.destroy_process_group()
"""


def test_tensor_parallel_ranks_capture_whole_features(tmp_path):
    """The residual stream is replicated after every all-reduce: each rank holds the full features."""
    from test_tp import free_port

    d = random_llama_dir(str(tmp_path / "m"), layers=7, heads=6, kv_heads=2)
    script = tmp_path / "worker.py"
    script.write_text(TP_WORKER.format(root=ROOT))
    for world in (1, 2):
        port = str(free_port())
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), port, d, str(tmp_path / f"w{world}")],
                                  stderr=subprocess.PIPE, text=True) for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
    single = torch.load(tmp_path / "w1.0")
    assert single.shape == (17, 3 * 96)
    for rank in (0, 1):
        assert (torch.load(tmp_path / f"w2.{rank}") - single).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------ the drafter


def published_eagle3(target: ModelConfig, *, hidden: int | None = None, draft_vocab: int, heads=4, kv_heads=2,
                     own_embed: bool = False, seed: int = 0, **extra) -> tuple[dict, dict]:
    """A random EAGLE-3 drafter in the published layout: (config.json dict, state dict)."""
    g = torch.Generator().manual_seed(seed)
    h, ht, V = hidden or target.hidden_size, target.hidden_size, target.vocab_size
    hd, inter = h // heads, 2 * h

    def w(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    ids = torch.randperm(V, generator=g)[:draft_vocab].sort().values  # the draft vocabulary (target ids)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    state = {
        "fc.weight": w(h, 3 * ht, std=0.08),
        "midlayer.hidden_norm.weight": 1 + w(h, std=0.1), "midlayer.input_layernorm.weight": 1 + w(h, std=0.1),
        "midlayer.post_attention_layernorm.weight": 1 + w(h, std=0.1),
        "midlayer.self_attn.q_proj.weight": w(heads * hd, 2 * h), "midlayer.self_attn.k_proj.weight": w(kv_heads * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * hd, 2 * h), "midlayer.self_attn.o_proj.weight": w(h, heads * hd),
        "midlayer.mlp.gate_proj.weight": w(inter, h), "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
        "norm.weight": 1 + w(h, std=0.1), "lm_head.weight": w(draft_vocab, h, std=0.5),
        "d2t": ids - torch.arange(draft_vocab), "t2d": t2d,
    }
    if own_embed:
        state["embed_tokens.weight"] = w(V, h, std=1.0)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": h, "intermediate_size": inter,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 1,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "vocab_size": V,
              "draft_vocab_size": draft_vocab, **extra}
    if h != ht:
        config["target_hidden_size"] = ht
    return config, state


class ReferenceEagle3:
    """EAGLE-3 from the format's description, in plain torch: one decoder layer over
    cat(input_layernorm(embed(token)), hidden_norm(g)), residual g; g = fc(target features)
    first, then the layer's own earlier output; logits = lm_head(norm(out)); target id =
    draft id + d2t[draft id]."""

    def __init__(self, config: dict, state: dict, embed: torch.Tensor):
        self.c, self.s = config, state
        self.embed = state.get("embed_tokens.weight", embed)
        self.nh, self.nkv = config["num_attention_heads"], config["num_key_value_heads"]
        self.d = config["hidden_size"] // self.nh
        self.ks, self.vs = [], []  # per cached position: [nkv, d]

    def rms(self, x, name):
        return self.s[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"]))

    def rope(self, x, pos):  # x [n, heads, d]; rotate-half, as transformers' Llama
        inv = 1.0 / (self.c["rope_theta"] ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
        f = (torch.tensor(pos, dtype=torch.float64)[:, None] * inv).float()
        cos, sin = torch.cat([f.cos(), f.cos()], -1)[:, None], torch.cat([f.sin(), f.sin()], -1)[:, None]
        half = torch.cat([-x[..., self.d // 2:], x[..., : self.d // 2]], -1)
        return x * cos + half * sin

    def step(self, tokens: list[int], g: torch.Tensor, pos: list[int]) -> torch.Tensor:
        """New positions (token, g [m, H]) appended causally after the cache -> out [m, H]."""
        p, m, n = self.s, "midlayer.", len(tokens)
        x = torch.cat([self.rms(self.embed[tokens], m + "input_layernorm.weight"),
                       self.rms(g, m + "hidden_norm.weight")], -1)
        q = self.rope((x @ p[m + "self_attn.q_proj.weight"].T).view(n, self.nh, self.d), pos)
        k = self.rope((x @ p[m + "self_attn.k_proj.weight"].T).view(n, self.nkv, self.d), pos)
        v = (x @ p[m + "self_attn.v_proj.weight"].T).view(n, self.nkv, self.d)
        past = len(self.ks)
        self.ks += list(k)
        self.vs += list(v)
        K, Vv = torch.stack(self.ks), torch.stack(self.vs)  # [P + n, nkv, d]
        rep = self.nh // self.nkv
        rows = []
        for i in range(n):
            heads = []
            for hh in range(self.nh):
                kk, vv = K[: past + i + 1, hh // rep], Vv[: past + i + 1, hh // rep]
                heads.append(torch.softmax(kk @ q[i, hh] / self.d ** 0.5, -1) @ vv)
            rows.append(torch.cat(heads))
        h = g + torch.stack(rows) @ p[m + "self_attn.o_proj.weight"].T
        y = self.rms(h, m + "post_attention_layernorm.weight")
        mlp = (torch.nn.functional.silu(y @ p[m + "mlp.gate_proj.weight"].T) * (y @ p[m + "mlp.up_proj.weight"].T))
        return h + mlp @ p[m + "mlp.down_proj.weight"].T

    def logits(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out [H] -> (draft logits [Vd], the target id of each draft row [Vd])."""
        vd = self.c["draft_vocab_size"]
        return self.rms(out, "norm.weight") @ self.s["lm_head.weight"].T, torch.arange(vd) + self.s["d2t"]


@pytest.mark.parametrize("variant", ["shared-embedding", "own-embedding-wider"])
def test_drafter_equals_reference(variant):
    """fc over the target's features, then two steps fed the drafter's own output: logits and
    target ids equal the reference, and EagleDrafter's chain (top_k=1) drafts its argmaxes."""
    target = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    own = variant != "shared-embedding"
    config, state = published_eagle3(target, hidden=48 if own else None, draft_vocab=20, own_embed=own)
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(50, 32, generator=g)
    n = 7
    feats = torch.randn(n, 3 * 32, generator=g)
    seq = torch.randint(0, 50, (n + 1,), generator=g).tolist()  # feature i is token seq[i]'s; seq[n] pending

    ref = ReferenceEagle3(config, state, embed)
    out = ref.step(seq[1:], feats @ state["fc.weight"].T, list(range(n)))
    ref_logits, ref_tokens, last = [], [], out[-1:]
    for depth in range(3):
        lg, ids = ref.logits(last[0])
        ref_logits.append(lg)
        ref_tokens.append(int(ids[lg.argmax()]))
        if depth < 2:
            last = ref.step([ref_tokens[-1]], last, [n + depth])

    model = eagle3_from_state(config, state, target)
    drafter = eagle3_drafter(model, None if own else embed, torch.float32, "cpu", top_k=1, depth=3)
    assert torch.equal(drafter.head.ids, ref.logits(out[-1])[1])
    emb = drafter.embed_weight
    mask = torch.ones(1, n, n, dtype=torch.bool).tril()
    o, k, v = model(emb[seq[1:]][None], feats[None], torch.arange(n)[None], mask)
    ours = [drafter.head.logits(o[0, -1])]
    last = o[:, -1:]
    for depth in range(2):
        mask = torch.ones(1, 1, n + depth + 1, dtype=torch.bool)
        last, k, v = model(emb[[ref_tokens[depth]]][None], last, torch.tensor([[n + depth]]), mask, k, v)
        ours.append(drafter.head.logits(last[0, 0]))
    for a, b in zip(ours, ref_logits):
        assert (a - b).abs().max().item() <= 1e-4

    drafter.on_prefill("r", seq[:n], feats, seq[n])
    tree = drafter.propose(["r"], [3])[0]
    assert tree.tokens == ref_tokens and tree.parents == [-1, 0, 1]


def test_published_state_errors():
    target = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config, state = published_eagle3(target, draft_vocab=20)
    bad = {**state, "midlayer.self_attn.q_proj.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match=r"midlayer.self_attn.q_proj.weight: shape \(32, 32\), the config needs \(32, 64\)"):
        eagle3_from_state(config, bad, target)
    with pytest.raises(ValueError, match="missing.*fc.weight"):
        eagle3_from_state(config, {k: v for k, v in state.items() if k != "fc.weight"}, target)
    with pytest.raises(ValueError, match="unexpected.*fc.bias"):
        eagle3_from_state(config, {**state, "fc.bias": torch.zeros(32)}, target)
    with pytest.raises(ValueError, match="target_hidden_size"):
        eagle3_from_state({**config, "target_hidden_size": 64}, state, target)
    wide_cfg, wide = published_eagle3(target, hidden=48, draft_vocab=20)  # no embed_tokens, hidden != target's
    with pytest.raises(ValueError, match="embed_tokens"):
        eagle3_from_state(wide_cfg, wide, target)
    with pytest.raises(ValueError, match="d2t"):
        eagle3_from_state(config, {**state, "d2t": state["d2t"] + 40}, target)


# ------------------------------------------------------------------------------ in the engine


def eagle3_engine(model_dir: str, *, layer_ids=None, draft_vocab: int, top_k: int, depth: int, budget: int,
                  seed: int = 0, **cfg):
    """An in-process engine whose target captures the drafter's layers and whose drafter is a
    random published EAGLE-3 checkpoint, loaded with load_eagle3 (no tokenizer)."""
    target = ModelConfig.from_path(model_dir)
    extra = {} if layer_ids is None else {"eagle_aux_hidden_state_layer_ids": layer_ids}
    config, state = published_eagle3(target, draft_vocab=draft_vocab, heads=2, kv_heads=1, seed=seed, **extra)
    executor = InProcessExecutor(model_dir, "float32", feature_layers=eagle3_feature_layers(config, target))
    drafter = load_eagle3(state, config, target, executor.embed_and_head()[0], torch.float32, "cpu",
                          top_k=top_k, depth=depth, min_prob=0.0)
    engine_cfg = EngineConfig(model=model_dir, dtype="float32", drafter="eagle", tree_budget=budget,
                              draft_top_k=top_k, draft_depth=depth, lookup_tokens=0, draft_min_prob=0.0, **cfg)
    return LLMEngine(engine_cfg, executor, drafter), drafter, state


def test_greedy_speculation_equals_plain_decoding(tmp_path):
    d = random_llama_dir(str(tmp_path / "m"), layers=7, hidden=64, heads=4, kv_heads=2, vocab=40, seed=2)
    engine, drafter, state = eagle3_engine(d, draft_vocab=30, top_k=4, depth=4, budget=10, num_blocks=128,
                                           max_num_seqs=4)
    trees, propose = [], drafter.propose

    def recording(ids, budgets):
        out = propose(ids, budgets)
        trees.extend(out)
        return out

    drafter.propose = recording
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 14, 20)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outs = engine.generate(prompts, params)
    plain = LLMEngine(EngineConfig(model=d, dtype="float32", drafter="off", num_blocks=128, max_num_seqs=4),
                      InProcessExecutor(d, "float32"), None).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert engine.kv_blocks_used == 0
    drafted = sum(o.seq.stats.drafted for o in outs)
    steps = sum(o.seq.stats.verify_steps for o in outs)
    accepted = sum(o.seq.stats.committed for o in outs) - steps
    assert drafted >= 5 * steps and max(len(t) for t in trees) == 10  # trees of several nodes, to the budget
    assert 0 < accepted < drafted  # some drafts accepted, some rejected
    vocab = set((torch.arange(30) + state["d2t"]).tolist())
    assert all(set(t.tokens) <= vocab for t in trees)  # only draft-vocabulary tokens, mapped by d2t


def test_sampling_with_eagle3_matches_target(tmp_path):
    """T = 1: the first three tokens' distribution is the target's (chi-square against the exact one)."""
    from test_speculative_sampling import PROMPT, V, chi2_pvalue, exact_first3, first3_counts

    d = random_llama_dir(str(tmp_path / "m"), heads=2, kv_heads=1, hidden=32, layers=3, vocab=V, seed=3)
    samples = 8000
    engine, _, _ = eagle3_engine(d, layer_ids=[0, 1, 2], draft_vocab=4, top_k=3, depth=3, budget=8, seed=5,
                                 num_blocks=3000, block_size=4, max_num_seqs=512, max_num_batched_tokens=4096)
    outs = engine.generate([PROMPT] * samples, SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True))
    assert sum(o.seq.stats.drafted for o in outs) > samples
    accepted = sum(o.seq.stats.committed - o.seq.stats.verify_steps for o in outs)
    assert accepted > samples // 10
    assert chi2_pvalue(first3_counts(outs), exact_first3(d, 0, 1.0)) > 0.001
    assert engine.kv_blocks_used == 0
