"""The served app and the CLI with published drafters: an EAGLE-3 and a Medusa-1 directory, as their
authors lay them out, behind `serve run app:deployment draft_path=...`, asked with the
official openai client. Oracle: at temperature 0 the answer equals the target's plain
greedy decoding in process (speculation is lossless); /v1/models names the drafter's
kind and format, and the replica reports its drafter healthy and drafting.
"""
import json
import os
import time

import httpx
import openai
import pytest
from ray import serve
from safetensors.torch import save_file

from conftest import serve_cluster, wait_healthy
from engine.build import build_engine
from engine.config import EngineConfig, ModelConfig
from engine.sampling import SamplingParams
from test_eagle3 import published_eagle3
from test_published_drafters import generate, medusa_weights, target, write_medusa  # noqa: F401 (target: a fixture)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def drafters(tmp_path_factory, target):  # noqa: F811 (the imported fixture)
    root = tmp_path_factory.mktemp("published-served")
    eagle3 = str(root / "eagle3")
    os.makedirs(eagle3)
    config, state = published_eagle3(ModelConfig.from_path(target), draft_vocab=2000, seed=7)
    with open(os.path.join(eagle3, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(eagle3, "model.safetensors"))
    medusa = write_medusa(str(root / "medusa"), medusa_weights(5))
    return {"eagle3": eagle3, "medusa": medusa}


@pytest.fixture(scope="module")
def cluster():
    with serve_cluster(8, include_dashboard=False) as (base, _):
        yield base


def plain_answer(target: str, max_tokens: int) -> str:
    engine = build_engine(EngineConfig(model=target, dtype="float32", drafter="off"))
    prompt = engine.tokenize_chat(QUESTION)
    out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens))[0]
    return out.seq.output_text


@pytest.mark.parametrize("kind, fmt", [("eagle3", "eagle3"), ("medusa", "medusa1")])
def test_served_published_drafter_answers_like_plain_decoding(cluster, target, drafters, kind, fmt):  # noqa: F811
    from app import deployment

    app = deployment({"model": target, "draft_path": drafters[kind], "dtype": "float32", "tree_budget": "8",
                      "draft_min_prob": "0", "torch_threads": "2", "report_interval_s": "0.5"})
    serve.run(app, name=kind, route_prefix=f"/{kind}")
    base = f"{cluster}/{kind}"
    wait_healthy(base)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        (card,) = client.models.list().data
        assert card.model_extra["drafter"]["kind"] == kind and card.model_extra["drafter"]["format"] == fmt
        reply = client.chat.completions.create(model=card.id, messages=QUESTION, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content == plain_answer(target, 16)
        deadline = time.time() + 60
        while not (reps := httpx.get(base + "/v1/speculation", timeout=10).json()["replicas"]):
            assert time.time() < deadline, "no replica reported to the router"
            time.sleep(0.5)
        (rep,) = reps.values()
        assert rep["load"]["drafter"] == kind and rep["load"]["drafter_format"] == fmt
        assert rep["load"]["drafter_healthy"]
    finally:
        serve.delete(kind)


@pytest.mark.parametrize("kind, fmt", [("eagle3", "eagle3"), ("medusa", "medusa1")])
def test_cli_takes_a_published_directory_and_reports_its_format(target, drafters, kind, fmt):  # noqa: F811
    r = generate("--model", target, "--speculation", kind, "--draft", drafters[kind], "--max-tokens", "8",
                 "--prompt", "Hi", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["drafter"] == kind and out["draft_format"] == fmt and 1 <= out["tokens"] <= 8
