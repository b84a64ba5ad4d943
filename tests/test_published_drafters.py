"""Published drafter checkpoints (EAGLE-1/2, Medusa-1; EAGLE-3 detection) load and draft.

Fixtures are written in each format's published layout from random tensors over a tiny
random target; the references below are plain torch written from the formats' own
descriptions (SafeAILab/EAGLE eagle/model/cnets1.py, FasterDecoding/Medusa
medusa/model/medusa_model.py), not from engine/drafters.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import ROOT, random_llama_dir
from engine.config import EngineConfig, ModelConfig
from engine.drafters.loading import load_drafter
from engine.drafters.registry import check_target, detect_format
from engine.drafters.trees import MC_SIM_7B_63
from engine.sampling import SamplingParams

H, HEADS, KV_HEADS, INTER, V = 64, 4, 2, 128, 49152  # the target's sizes (the default model's tokenizer)
LAYERS = 3  # EAGLE-3 reads three distinct layers
D = H // HEADS
EPS, THETA = 1e-6, 10000.0


@pytest.fixture(scope="module")
def target(tmp_path_factory, default_dir) -> str:
    """A tiny random Llama target with the default model's tokenizer (for the CLI)."""
    path = str(tmp_path_factory.mktemp("published") / "target")
    random_llama_dir(path, heads=HEADS, kv_heads=KV_HEADS, hidden=H, layers=LAYERS, vocab=V, seed=3)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 4096
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(default_dir, name)):
            shutil.copy(os.path.join(default_dir, name), path)
    return path


@pytest.fixture(scope="module")
def target_weights(target) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(target, "model.safetensors"))


def rounded(w: torch.Tensor) -> torch.Tensor:
    """fp16 as the published files store it (the reference reads the same values)."""
    return w.half().float()


# ------------------------------------------------------------------------------ EAGLE-1/2


def eagle_weights(seed: int, bias: bool, hidden: int = H, vocab: int = V, fc_std: float = 0.08) -> dict:
    """Random EAGLE-1/2 tensors under the published names (fp16-representable)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.08):
        return rounded(torch.randn(*shape, generator=g) * std)

    w = {"fc.weight": rnd(hidden, 2 * hidden, std=fc_std),
         "layers.0.self_attn.q_proj.weight": rnd(HEADS * D, hidden),
         "layers.0.self_attn.k_proj.weight": rnd(KV_HEADS * D, hidden),
         "layers.0.self_attn.v_proj.weight": rnd(KV_HEADS * D, hidden),
         "layers.0.self_attn.o_proj.weight": rnd(hidden, HEADS * D),
         "layers.0.mlp.gate_proj.weight": rnd(INTER, hidden),
         "layers.0.mlp.up_proj.weight": rnd(INTER, hidden),
         "layers.0.mlp.down_proj.weight": rnd(hidden, INTER),
         "layers.0.post_attention_layernorm.weight": rounded(1 + torch.randn(hidden, generator=g) * 0.1),
         "embed_tokens.weight": rnd(vocab, hidden)}  # published files may carry the target's embedding
    if bias:
        w["fc.bias"] = rnd(hidden)
    return w


def write_eagle(path: str, weights: dict, file: str, bias: bool, hidden: int = H, vocab: int = V) -> str:
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bias": bias, "hidden_size": hidden,
              "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": 1, "rms_norm_eps": EPS, "rope_theta": THETA, "vocab_size": vocab,
              "max_position_embeddings": 2048, "torch_dtype": "float16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    half = {k: v.half().contiguous() for k, v in weights.items()}
    if file == "pytorch_model.bin":
        torch.save(half, os.path.join(path, file))
    else:
        save_file(half, os.path.join(path, file))
    return path


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [n, heads, D]: Llama's rotate-half RoPE."""
    inv = 1.0 / THETA ** (torch.arange(0, D, 2).float() / D)
    ang = positions.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def eagle_reference(w: dict, embed: torch.Tensor, lm_head: torch.Tensor, tokens: list[int], feats: torch.Tensor,
                    input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Draft logits [n, V] of EAGLE-1/2 as published: fc over cat(embed(token), feature), one
    causal Llama decoder layer whose input is not normed, no final norm, the target's lm_head.
    input_norm: a norm weight to apply anyway (the control: a wrong architecture must differ)."""
    p = "layers.0."
    x = torch.cat([embed[tokens], feats], -1) @ w["fc.weight"].T
    if "fc.bias" in w:
        x = x + w["fc.bias"]
    n = len(tokens)
    hn = x if input_norm is None else rms(x, input_norm)
    pos = torch.arange(n)
    q = rope((hn @ w[p + "self_attn.q_proj.weight"].T).view(n, HEADS, D), pos)
    k = rope((hn @ w[p + "self_attn.k_proj.weight"].T).view(n, KV_HEADS, D), pos)
    v = (hn @ w[p + "self_attn.v_proj.weight"].T).view(n, KV_HEADS, D)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, HEADS * D)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
        w[p + "mlp.down_proj.weight"].T
    return x @ lm_head.T


def eagle_cfg(target: str, path: str, **kw) -> EngineConfig:
    kw = {"model": target, "drafter": "eagle", "draft_path": path, "dtype": "float32", "tree_budget": 3,
          "draft_depth": 1, "draft_top_k": 3, "draft_min_prob": 0.0, "draft_vocab_size": 0, **kw}
    return EngineConfig(**kw)


EAGLE_VARIANTS = [("pytorch_model.bin", True), ("pytorch_model.bin", False), ("model.safetensors", True),
                  ("model.safetensors", False)]


@pytest.mark.parametrize("file,bias", EAGLE_VARIANTS)
def test_eagle_logits_equal_reference(tmp_path, target, target_weights, file, bias):
    """Our drafter on a published EAGLE-1/2 file gives the reference's draft logits (fp32, 1e-4),
    through the model and through the drafter's own bookkeeping (prefill, then one draft depth)."""
    w = eagle_weights(seed=1, bias=bias)
    path = write_eagle(str(tmp_path / "eagle"), w, file, bias)
    fmt = detect_format(path)
    assert (fmt.kind, fmt.name, os.path.basename(fmt.files[0])) == ("eagle", "eagle", file)
    drafter = load_drafter(eagle_cfg(target, path), target)
    assert drafter.model.cfg.input_norm is False and drafter.model.cfg.fc_bias is bias
    embed, lm_head = target_weights["model.embed_tokens.weight"], target_weights["lm_head.weight"]
    g = torch.Generator().manual_seed(2)
    n = 7
    tokens = torch.randint(0, V, (n + 1,), generator=g).tolist()
    feats = torch.randn(n, H, generator=g)
    ref = eagle_reference(w, embed, lm_head, tokens[1:], feats)  # pair i: feature i, token i + 1

    causal = torch.ones(1, n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        out, _, _ = drafter.model(embed[tokens[1:]][None], feats[None], torch.arange(n)[None], causal)
        ours = drafter.head.logits(out[0]).float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    drafter.on_prefill("r", tokens[:n], feats, tokens[n])
    tree = drafter.propose(["r"], [3])[0]
    assert tree.tokens == ref[-1].topk(3).indices.tolist() and tree.parents == [-1, -1, -1]


@pytest.mark.skipif(os.environ.get("TREESPEC_CPU_KERNEL") == "torch", reason="fused kernel disabled")
def test_eagle_fused_cpu_drafter_reads_its_input_un_normed(tmp_path, target, target_weights):
    """bf16 on a CPU the fused kernel runs on: the published layer 0 (no input norm) drafts
    in C with the reference's logits, to bf16 rounding; a normed input would be far off."""
    from engine.fused import fused_kernel_available

    if not fused_kernel_available():
        pytest.skip("the fused CPU kernel does not run here")
    w = eagle_weights(seed=4, bias=False, fc_std=0.4)  # fc's output far from unit RMS: a norm would show
    path = write_eagle(str(tmp_path / "eagle"), w, "model.safetensors", False)
    drafter = load_drafter(eagle_cfg(target, path, dtype="bfloat16", draft_int8=False), target)
    assert drafter.fused is not None
    embed, lm_head = target_weights["model.embed_tokens.weight"], target_weights["lm_head.weight"]
    g = torch.Generator().manual_seed(5)
    n = 6
    tokens = torch.randint(0, V, (n + 1,), generator=g).tolist()
    feats = torch.randn(n, H, generator=g)
    drafter.on_prefill("r", tokens[:n], feats.to(torch.bfloat16), tokens[n])
    drafter.propose(["r"], [3])
    ours = drafter.states["r"].last_logits[0]  # the fused step's logits of the last pair
    ref = eagle_reference(w, embed, lm_head, tokens[1:], feats)[-1]
    wrong = eagle_reference(w, embed, lm_head, tokens[1:], feats, input_norm=torch.ones(H))[-1]

    def rel(a):
        return ((a - ref).norm() / ref.norm()).item()

    assert rel(ours) < 0.03 and rel(wrong) > 0.2, (rel(ours), rel(wrong))


def greedy_equal(target: str, drafter, budget: int) -> list:
    """Speculative decoding with ``drafter`` equals plain greedy decoding (lookup off)."""
    from engine.engine import LLMEngine
    from engine.executor import InProcessExecutor

    executor = InProcessExecutor(target, "float32")
    prompts = [[1, 50, 900, 7, 3000, 12], [5, 5, 6, 7, 8, 9, 10, 2000, 44]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    base = dict(model=target, dtype="float32", num_blocks=64, max_num_seqs=2, lookup_tokens=0)
    plain = LLMEngine(EngineConfig(**base, tree_budget=0, drafter="off"), executor, None).generate(prompts, params)
    engine = LLMEngine(EngineConfig(**base, tree_budget=budget, drafter=drafter.kind), executor, drafter)
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(o.seq.stats.drafted > 0 for o in spec)  # trees really were verified
    assert engine.kv_blocks_used == 0
    return spec


@pytest.mark.parametrize("file,bias", [("pytorch_model.bin", True), ("model.safetensors", False)])
def test_eagle_engine_equals_greedy(tmp_path, target, file, bias):
    path = write_eagle(str(tmp_path / "eagle"), eagle_weights(seed=6, bias=bias), file, bias)
    drafter = load_drafter(eagle_cfg(target, path, tree_budget=6, draft_depth=3, draft_top_k=3), target)
    greedy_equal(target, drafter, 6)


# ------------------------------------------------------------------------------ Medusa-1

MEDUSA_HEADS = 4


def medusa_weights(seed: int, heads: int = MEDUSA_HEADS, blocks: int = 1, vocab: int = V,
                   hidden: int = H) -> dict[str, torch.Tensor]:
    """Random Medusa-1 tensors as medusa_lm_head.pt holds them: ``{i}.{j}.linear.*`` and each
    head's own lm_head ``{i}.{blocks}.weight``."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for i in range(heads):
        for j in range(blocks):
            w[f"{i}.{j}.linear.weight"] = rounded(torch.randn(hidden, hidden, generator=g) * 0.1)
            w[f"{i}.{j}.linear.bias"] = rounded(torch.randn(hidden, generator=g) * 0.1)
        w[f"{i}.{blocks}.weight"] = rounded(torch.randn(vocab, hidden, generator=g) * 0.1)
    return w


def write_medusa(path: str, weights: dict, stated_heads: int = 2, file: str = "medusa_lm_head.pt") -> str:
    """A Medusa-1 directory whose config.json understates the heads, as medusa-vicuna-7b-v1.3's does."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"medusa_num_heads": stated_heads, "medusa_num_layers": 1,
                   "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}, f)
    half = {k: v.half() for k, v in weights.items()}
    if file.endswith(".pt"):
        torch.save(half, os.path.join(path, file))
    else:
        save_file(half, os.path.join(path, file))
    return path


def medusa_reference(w: dict, feature: torch.Tensor, heads: int, blocks: int = 1) -> torch.Tensor:
    """Per-head logits [K, V]: residual blocks x + SiLU(linear(x)), then the head's own lm_head."""
    out = []
    for i in range(heads):
        x = feature
        for j in range(blocks):
            x = x + F.silu(x @ w[f"{i}.{j}.linear.weight"].T + w[f"{i}.{j}.linear.bias"])
        out.append(x @ w[f"{i}.{blocks}.weight"].T)
    return torch.stack(out)


def medusa_cfg(target: str, path: str, **kw) -> EngineConfig:
    return EngineConfig(**{"model": target, "drafter": "medusa", "draft_path": path, "dtype": "float32",
                           "tree_budget": 10, "draft_vocab_size": 0, **kw})


@pytest.mark.parametrize("file", ["medusa_lm_head.pt", "medusa_lm_head.safetensors"])
def test_medusa_heads_equal_reference(tmp_path, target, caplog, file):
    w = medusa_weights(seed=7)
    path = write_medusa(str(tmp_path / "medusa"), w, file=file)
    fmt = detect_format(path)
    assert (fmt.kind, fmt.name) == ("medusa", "medusa1")
    with caplog.at_level(logging.WARNING, logger="engine.drafters.published"):
        drafter = load_drafter(medusa_cfg(target, path), target)
    assert any("medusa_num_heads=2" in r.getMessage() and f"hold {MEDUSA_HEADS} heads" in r.getMessage()
               for r in caplog.records), caplog.text
    assert drafter.model.cfg.num_heads == MEDUSA_HEADS and drafter.fused is None  # own lm_heads: torch path
    feature = torch.randn(H, generator=torch.Generator().manual_seed(8))
    ref = medusa_reference(w, feature, MEDUSA_HEADS)
    with torch.no_grad():
        ours = drafter.model.head_logits(drafter.model(feature[None]))[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    drafter.on_prefill("r", [1, 2, 3], feature[None].repeat(3, 1), 4)
    tree = drafter.propose(["r"], [10])[0]
    first = [tok for tok, par in zip(tree.tokens, tree.parents) if par == -1]
    assert first == ref[0].topk(len(first)).indices.tolist()  # depth 1: head 0's ranks 0, 1, ...


def test_medusa_default_tree_is_mc_sim_7b_63_capped(tmp_path, target):
    path = write_medusa(str(tmp_path / "medusa"), medusa_weights(seed=9))
    for budget, nodes in ((10, 10), (60, 60), (100, 63)):
        drafter = load_drafter(medusa_cfg(target, path, tree_budget=budget), target)
        assert not drafter.dynamic and drafter.choices == MC_SIM_7B_63[:nodes]
    assert len(MC_SIM_7B_63) == 63 and max(map(len, MC_SIM_7B_63)) <= 4
    seen = set()
    for c in MC_SIM_7B_63:  # every prefix comes first: any first n paths are a tree
        assert len(c) == 1 or tuple(c[:-1]) in seen
        seen.add(tuple(c))
    three = write_medusa(str(tmp_path / "three"), medusa_weights(seed=9, heads=3), stated_heads=3)
    drafter = load_drafter(medusa_cfg(target, three, tree_budget=100), target)
    assert drafter.choices == [c for c in MC_SIM_7B_63 if len(c) <= 3]  # no head for depth 4


def test_medusa_engine_equals_greedy(tmp_path, target, target_weights):
    # Heads whose lm_head is the target's and whose block is zero predict the next token
    # again: accepted wherever the target repeats itself, rejected elsewhere.
    w = medusa_weights(seed=10)
    for i in range(MEDUSA_HEADS):
        w[f"{i}.0.linear.weight"].zero_()
        w[f"{i}.0.linear.bias"].zero_()
        w[f"{i}.1.weight"] = rounded(target_weights["lm_head.weight"])
    path = write_medusa(str(tmp_path / "medusa"), w)
    drafter = load_drafter(medusa_cfg(target, path, tree_budget=8), target)
    greedy_equal(target, drafter, 8)


# ------------------------------------------------------------------------------ detection


def write_eagle3(path: str, aux_ids: list[int] = (0, 1, 2)) -> str:
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": H, "intermediate_size": INTER,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1,
              "vocab_size": V, "draft_vocab_size": 1000, "rms_norm_eps": EPS}
    config["eagle_aux_hidden_state_layer_ids"] = list(aux_ids)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    z = torch.zeros
    save_file({"fc.weight": z(H, 3 * H), "midlayer.self_attn.q_proj.weight": z(HEADS * D, 2 * H),
               "d2t": z(1000, dtype=torch.int64), "lm_head.weight": z(1000, H)}, os.path.join(path, "model.safetensors"))
    return path


def test_each_format_is_detected(tmp_path, target):
    from engine.drafters.common import save_drafter
    from engine.drafters.eagle import EagleConfig, EagleModel

    ours = str(tmp_path / "ours")
    cfg = EagleConfig.from_target(ModelConfig.from_path(target))
    save_drafter(ours, cfg.to_dict(), EagleModel(cfg).state_dict())
    found = {
        "ours": detect_format(ours),
        "eagle-bin": detect_format(write_eagle(str(tmp_path / "e1"), eagle_weights(1, True), "pytorch_model.bin", True)),
        "eagle-st": detect_format(write_eagle(str(tmp_path / "e2"), eagle_weights(1, False), "model.safetensors",
                                              False)),
        "eagle3": detect_format(write_eagle3(str(tmp_path / "e3"))),
        "medusa": detect_format(write_medusa(str(tmp_path / "m"), medusa_weights(1))),
    }
    assert {k: (f.kind, f.name, f.published) for k, f in found.items()} == {
        "ours": ("eagle", "treespec", False), "eagle-bin": ("eagle", "eagle", True),
        "eagle-st": ("eagle", "eagle", True), "eagle3": ("eagle3", "eagle3", True),
        "medusa": ("medusa", "medusa1", True)}
    assert found["eagle-bin"].shapes["fc.weight"] == (H, 2 * H)
    target_cfg = ModelConfig.from_path(target)
    for f in found.values():
        check_target(f, target_cfg)
    from engine.drafters.loading import default_drafter

    assert default_drafter(target, draft_path=str(tmp_path / "m")) == "medusa"  # drafter="auto"
    assert EngineConfig(model=target, draft_path=str(tmp_path / "e1")).resolve().drafter == "eagle"


def test_no_drafter_found_names_what_is_missing(tmp_path, target):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no drafter found: no config.json; weight files: none of "
                                         "model.safetensors, pytorch_model.bin"):
        detect_format(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "something"}))
    with pytest.raises(ValueError) as err:
        detect_format(str(empty))
    msg = str(err.value)
    assert str(empty) in msg and "no drafter found" in msg
    assert all(s in msg for s in ("'kind'", "'medusa_num_heads'", "'draft_vocab_size'", "medusa_lm_head.pt"))
    # A Llama config whose weights are a model's, not an EAGLE head (e.g. the target itself):
    with pytest.raises(ValueError, match="is no EAGLE-1/2 drafter: it lacks fc.weight"):
        detect_format(target)
    # The right config, no weights:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="a Medusa-1 config.json but no weight file: none of "
                                         "medusa_lm_head.safetensors, medusa_lm_head.pt, model.safetensors"):
        detect_format(str(bare))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(str(tmp_path / "nowhere"))


def test_drafters_that_do_not_fit_the_target_are_refused(tmp_path, target):
    small = write_eagle(str(tmp_path / "small"), eagle_weights(1, True, hidden=32), "pytorch_model.bin", True,
                        hidden=32)
    with pytest.raises(ValueError, match=r"hidden size is 32 \(fc.weight\), the target's 64"):
        load_drafter(eagle_cfg(target, small), target)
    other_vocab = write_eagle(str(tmp_path / "vocab"), eagle_weights(1, True, vocab=320), "model.safetensors", True,
                              vocab=320)
    with pytest.raises(ValueError, match=f"vocabulary has 320 tokens, the target's {V}"):
        load_drafter(eagle_cfg(target, other_vocab), target)
    medusa = write_medusa(str(tmp_path / "medusa"), medusa_weights(1, vocab=320))
    with pytest.raises(ValueError, match=f"vocabulary has 320 tokens, the target's {V}"):
        load_drafter(medusa_cfg(target, medusa), target)
    medusa_h = write_medusa(str(tmp_path / "medusa_h"), medusa_weights(1, hidden=32))
    with pytest.raises(ValueError, match="hidden size is 32"):
        load_drafter(medusa_cfg(target, medusa_h), target)
    with pytest.raises(ValueError, match="holds a medusa drafter"):  # the kind asked for is checked too
        load_drafter(eagle_cfg(target, medusa), target)
    far = write_eagle3(str(tmp_path / "far"), aux_ids=[0, 1, 9])
    with pytest.raises(ValueError, match=r"\[0, 1, 9\].*3 layers"):  # the target has 3 layers
        check_target(detect_format(far), ModelConfig.from_path(target))


# ------------------------------------------------------------------------------ CLI


def generate(*args):
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_serves_a_published_eagle_drafter(tmp_path, target):
    path = write_eagle(str(tmp_path / "eagle"), eagle_weights(11, False), "pytorch_model.bin", False)
    r = generate("--model", target, "--draft", path, "--max-tokens", "8", "--prompt", "Hello", "--json",
                 "--tree-budget", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["drafter"] == "eagle" and 1 <= out["tokens"] <= 8

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    r = generate("--model", target, "--draft", str(bad), "--max-tokens", "8", "--prompt", "Hello")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and "no drafter found" in lines[0], \
        r.stderr[-1000:]
