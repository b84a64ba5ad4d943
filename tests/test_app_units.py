"""Parts of the Serve app that need no Ray: arguments, request validation, metrics text."""
import json

import pytest

from app.config import AppConfig
from app.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from app.tracing import traces_url


# ---------------------------------------------------------------------------------------- arguments


def test_app_args_from_command_line_strings():
    cfg = AppConfig.from_args({"tp": "3", "router": "false", "kv_cache_gib": "0.25", "num_blocks": "none",
                               "drafter": "off", "max_replicas": "4", "draft_top_k": "4"})
    engine = cfg.engine
    assert (engine.tp, cfg.router, engine.kv_cache_gib, engine.num_blocks, cfg.max_replicas) == (3, False, 0.25, None, 4)
    assert (engine.drafter, engine.draft_top_k) == ("off", 4)
    assert AppConfig.from_dict(cfg.to_dict()) == cfg  # how the deployments receive it
    assert AppConfig.from_args({}).model_name == "SmolLM2-135M-Instruct"
    assert AppConfig.from_args({"model": "/m/Llama-3.1-8B-Instruct/"}).model_name == "Llama-3.1-8B-Instruct"


def test_device_dependent_defaults():
    """Engine fields left at auto resolve per device, the same for the server and every other entry point."""
    import torch

    from engine.config import EngineConfig
    from engine.fused import fused_kernel_available
    from treespec_kernels.cpu_fused import has_amx, isa

    cpu = AppConfig.from_args({}).engine.resolve()
    assert cpu == EngineConfig().resolve()
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # bf16 where oneDNN or the fused kernel runs it; multi-row verification is cheap on AMX
    # tiles, dearer with AVX512-BF16 dot products, dearest with AVX2's fp32 multiply-adds
    assert cpu.dtype == ("bfloat16" if bf16 or fused_kernel_available() else "float32")
    assert cpu.tree_budget == ((6 if has_amx() else 4) if isa() == "avx512" else 2)
    assert cpu.draft_vocab_size == 4096  # small CPU trees: a cheaper draft head
    assert cpu.drafter == "eagle"  # the default model's shipped drafter
    gpu = AppConfig.from_args({"device": "cuda"}).engine.resolve()  # config only: nothing runs on the device here
    assert (gpu.dtype, gpu.tree_budget, gpu.drafter) == ("bfloat16", 60, "eagle")
    assert not gpu.draft_vocab_size  # all of the drafter's vocabulary
    explicit = AppConfig.from_args({"dtype": "float32", "tree_budget": "32"}).engine.resolve()
    assert (explicit.dtype, explicit.tree_budget) == ("float32", 32)
    other = AppConfig.from_args({"model": "/m/Llama-3.1-8B-Instruct"}).engine.resolve()
    assert other.drafter == "off"  # no shipped drafter for it


@pytest.mark.parametrize("args, match", [
    ({"bogus": 1}, "unknown argument"),
    ({"tp": "two"}, "not a valid int"),
    ({"tp": 1.5}, "not a valid int"),
    ({"router": "maybe"}, "not a valid bool"),
    ({"drafter": "lookahead"}, "drafter must be"),
    ({"dtype": "int8"}, "dtype"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"tree_budget": -1}, "tree_budget"),
    ({"feature_transport": "gloo"}, "feature_transport must be one of"),
    ({"feature_layers": "2,x"}, "not a valid list of ints"),
    ({"cuda_graphs": "maybe"}, "cuda_graphs must be one of"),
])
def test_app_args_rejected_with_a_reason(args, match):
    with pytest.raises(ValueError, match=match):
        AppConfig.from_args(args)


def test_list_arguments_from_the_command_line_and_yaml():
    assert AppConfig.from_args({"feature_layers": "2,15,27"}).engine.feature_layers == (2, 15, 27)
    assert AppConfig.from_args({"feature_layers": [3, 4]}).engine.feature_layers == (3, 4)


def test_builder_options():
    from app.builder import app_builder

    app = app_builder({"max_replicas": "3", "min_replicas": "1", "target_ongoing_requests": "4"})
    server = app._bound_deployment.init_args[0]  # Ingress.bind(server, config)
    auto = server._bound_deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    fixed = app_builder({"num_replicas": "2"})._bound_deployment.init_args[0]._bound_deployment
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None
    assert fixed.max_ongoing_requests == 16 + 32 + 1


# ---------------------------------------------------------------------------------------- requests


def _err(cls, body) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse(cls, raw)
    return info.value


def test_builder_refuses_a_model_the_engine_cannot_serve(tmp_path):
    """An unsupported architecture or a TP degree the heads do not split into stops the build
    with the engine's one-line reason, before any replica starts."""
    import json

    from app.builder import app_builder
    from engine.architectures import UnsupportedModel

    config = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="architecture Qwen3MoeForCausalLM is not supported"):
        app_builder({"model": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match="tp=3 must divide the 2 attention heads"):
        app_builder({"model": str(tmp_path), "tp": "3", "executor": "ray"})
    assert app_builder({"model": str(tmp_path)}) is not None


def test_request_validation():
    ok = parse(ChatCompletionRequest, json.dumps({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "stop": "x", "temperature": 0, "speculation": "off"}).encode())
    assert ok.messages[0].text() == "ab" and ok.requested_max_tokens == 5 and ok.stop == ["x"]
    assert ok.sampling()["temperature"] == 0.0
    assert parse(CompletionRequest, b'{"prompt": ["only one"]}').prompt == "only one"
    assert parse(CompletionRequest, b'{"prompt": [1, 2, 3]}').prompt == [1, 2, 3]

    assert _err(CompletionRequest, b"{not json").code == "invalid_json"
    assert _err(CompletionRequest, b"\xff\xfe").code == "invalid_json"
    assert _err(CompletionRequest, [1]).status == 400
    for body, param in [
        ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "speculation": "always"}, "speculation"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "echo": True}, "echo"),
    ]:
        e = _err(CompletionRequest, body)
        assert e.status == 400 and e.param == param, (body, e.body())
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    for body, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ]:
        e = _err(ChatCompletionRequest, body)
        assert e.status == 400 and e.param.startswith(param), (body, e.body())


def test_api_error_headers_and_roundtrip():
    e = APIError(429, "busy", type="rate_limit_error", code="queue_full", retry_after=0.3)
    assert e.headers() == {"Retry-After": "1"}
    assert APIError.from_dict(e.to_dict()).body() == e.body()
    assert traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert traces_url("http://h:4318/v1/traces/") == "http://h:4318/v1/traces"


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_text_has_request_and_replica_metrics():
    from app.metrics import RequestMetrics

    m = RequestMetrics("m")
    m.request("/v1/completions", 200)
    m.finished(10, 5, 0.2, 0.03, 2.5)
    view = {"r1": {"decision": {"speculate": True, "tree_budget": 16},
                   "load": {"running": 2, "waiting": 1, "kv_used": 30, "kv_total": 100, "acceptance_ema": 2.4,
                            "drafter_healthy": True, "speculating": True, "tree_budget": 16}}}
    text = m.render(view).decode()
    for line in ['treespec_requests_total{model="m",route="/v1/completions",status="200"} 1.0',
                 'treespec_prompt_tokens_total{model="m"} 10.0',
                 'treespec_completion_tokens_total{model="m"} 5.0',
                 'treespec_time_to_first_token_seconds_count{model="m"} 1.0',
                 'treespec_time_per_output_token_seconds_count{model="m"} 1.0',
                 'treespec_mean_accepted_tokens_sum{model="m"} 2.5',
                 'treespec_replica_tree_budget{model="m",replica="r1"} 16.0',
                 'treespec_replica_speculate{model="m",replica="r1"} 1.0',
                 'treespec_replica_router_tree_budget{model="m",replica="r1"} 16.0',
                 'treespec_replica_queue_depth{model="m",replica="r1"} 1.0',
                 'treespec_replica_kv_blocks_used{model="m",replica="r1"} 30.0']:
        assert line in text, line
