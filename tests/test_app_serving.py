"""The served application end to end: real Ray Serve on loopback, the real default model.

Serve starts once for the module (app args as `serve run app:deployment ...` would
pass them, small limits so overload is reachable), with an in-process OTLP/HTTP
receiver as the trace endpoint. Clients: the `openai` package for the API,
httpx for the bad-input matrix, overload and disconnects.
"""
import gzip
import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ray import serve

from conftest import free_port, replica_status, serve_cluster, wait_healthy, wait_replica_idle

MODEL = "SmolLM2-135M-Instruct"
CONTEXT = 512
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class OTLPReceiver:
    """A tiny OTLP/HTTP collector: decodes each POSTed ExportTraceServiceRequest into span dicts."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                               ExportTraceServiceResponse)

        self.spans: list[dict] = []
        self.posts = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver.collect(self.path, self.headers.get("Content-Type"), req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def collect(self, path, content_type, req) -> None:
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        self.posts += 1
        for rs in req.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        kind = a.value.WhichOneof("value")
                        attrs[a.key] = getattr(a.value, kind) if kind else None
                    self.spans.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex() or None, "name": s.name, "service": service,
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano, "attrs": attrs,
                    })

    def trace(self, trace_id: str, names: set, timeout: float = 30.0) -> dict:
        """name -> span of that trace, once all ``names`` arrived."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = {s["name"]: s for s in list(self.spans) if s["trace_id"] == trace_id}
            if names <= set(got):
                return got
            time.sleep(0.2)
        raise AssertionError(f"spans {names - set(got)} of trace {trace_id} never arrived; got {sorted(got)}")

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def served():
    from app import deployment

    receiver = OTLPReceiver()
    metrics_port = free_port()
    try:
        with serve_cluster(8, _metrics_export_port=metrics_port) as (base, _):
            # Exactly what `serve run app:deployment key=value ...` hands the builder: strings.
            # drafter=off: this app checks the plain path; drafters are exercised by the "tight" app below.
            app = deployment({"drafter": "off", "dtype": "float32",
                              "max_num_seqs": "2", "max_waiting": "2", "max_model_len": str(CONTEXT),
                              "queue_timeout_s": "20", "report_interval_s": "0.5", "torch_threads": "2",
                              "otlp_endpoint": receiver.endpoint, "trace_export_delay_ms": "200"})
            serve.run(app, name="treespec", route_prefix="/")
            wait_healthy(base, timeout=120)
            yield {"base": base, "receiver": receiver, "ray_metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                   "openai": openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)}
    finally:
        receiver.close()


# ---------------------------------------------------------------------------------------- the API


def test_models_and_health(served):
    models = served["openai"].models.list()
    assert [m.id for m in models.data] == [MODEL]
    status = replica_status(served["base"])
    assert status["kv_total"] > 0 and status["drafter"] is None and not status["drafter_healthy"]
    card = httpx.get(served["base"] + "/v1/models", timeout=10).json()["data"][0]
    assert card["drafter"] == {"kind": "off"} and status["drafter_format"] is None


def test_chat_streaming_equals_non_streaming(served):
    client = served["openai"]
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 10 and 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text, "greedy streaming and non-streaming give the same text"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3, "tokens arrive incrementally"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completions_stream_and_not(served):
    client = served["openai"]
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens <= 6 and out.usage.prompt_tokens == 5
    assert out.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    # Token ids as the prompt; per-request speculation override accepted.
    ids = client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=3, temperature=0,
                                    extra_body={"speculation": "off"})
    assert ids.usage.prompt_tokens == 5


def test_stop_string_and_sampling(served):
    client = served["openai"]
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stop=[" Paris"])
    assert out.choices[0].finish_reason == "stop" and "Paris" not in out.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stop=[" Paris"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    a, b = (client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0.9, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content, "a seed makes sampling repeatable"


# ---------------------------------------------------------------------------------------- bad input

LONG = "hello " * (CONTEXT + 10)


@pytest.mark.parametrize("route, body, status, param", [
    ("/v1/chat/completions", b"{nope", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream": "true"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 2}, None, None),  # empty content: ok
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", [QUESTION], 400, None),
    ("/v1/completions", {"prompt": LONG, "stream": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 10**7]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "speculation": "turbo"}, 400, "speculation"),
    ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n"),
])
def test_bad_input_is_a_4xx_with_an_openai_error(served, route, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served["base"] + route, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    if status is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


def test_unknown_routes_and_methods(served):
    assert httpx.get(served["base"] + "/v1/nothing").status_code == 404
    r = httpx.get(served["base"] + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# ---------------------------------------------------------------------------------------- load


def _stream(base, max_tokens, hold=None):
    """One streaming request; returns (status, headers, content chunks seen) or, run to the end,
    (200, headers, completion tokens from the usage chunk)."""
    body = {"messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.headers, r.text
        n, usage = 0, None
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                n += 1
            if line.startswith("data: {") and '"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
            if hold is not None and n >= hold:
                return 200, r.headers, n  # leaves the with-block: the connection closes mid-stream
        return 200, r.headers, usage["completion_tokens"]


def test_overload_gets_429_or_503_with_retry_after(served):
    # max_num_seqs=2 + max_waiting=2 per replica: of 9 concurrent requests some must be refused.
    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda _: _stream(served["base"], 24), range(9)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429, 503}, statuses
    refused = [r for r in results if r[0] != 200]
    assert refused and len(refused) < 9, statuses
    for status, headers, text in refused:
        assert int(headers.get("retry-after", 0)) >= 1 and json.loads(text)["error"]["type"] in ("rate_limit_error",
                                                                                        "server_error"), (status, text)
    assert all(n == 24 for s, _, n in results if s == 200), "admitted requests run to the end"
    wait_replica_idle(served["base"])


def test_client_disconnect_aborts_and_frees_kv_blocks(served):
    base = served["base"]
    wait_replica_idle(base)
    seen = {}

    def watch():
        while "stop" not in seen:
            st = replica_status(base)
            seen["max_kv"] = max(seen.get("max_kv", 0), st["kv_used"])
            time.sleep(0.1)

    t = threading.Thread(target=watch)
    t.start()
    t0 = time.time()
    status, _, n = _stream(base, 400, hold=3)  # would take a long while; we leave after 3 chunks
    assert status == 200 and n == 3
    st = wait_replica_idle(base, timeout=15)
    seen["stop"] = True
    t.join()
    assert seen["max_kv"] > 0, "the request held KV blocks while it ran"
    assert time.time() - t0 < 8 and st["kv_used"] == 0, "400 tokens take far longer: it was aborted"
    # A non-streaming request whose client gives up is cancelled too.
    body = {"messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json=body, timeout=2.0)
    assert wait_replica_idle(base, timeout=5)["kv_used"] == 0, "400 tokens take far longer: it was aborted"
    # The replica still serves.
    out = served["openai"].chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, temperature=0)
    assert out.choices[0].message.content


@pytest.fixture(scope="module")
def tight(served):
    """A second application on the same Serve instance: a 16-block KV cache (256 tokens) and an
    untrained EAGLE drafter that always speculates (router=false: the router would switch it off)."""
    from app import deployment

    serve.run(deployment({"num_blocks": "16", "dtype": "float32",
                          "max_model_len": "256", "max_num_seqs": "4", "queue_timeout_s": "0.5",
                          "torch_threads": "2", "router": "false", "drafter": "eagle", "draft_path": "random",
                          "tree_budget": "8"}), name="tight", route_prefix="/tight")
    base = served["base"] + "/tight"
    wait_healthy(base, timeout=120)
    yield base
    serve.delete("tight")


def test_no_kv_memory_gets_503_with_retry_after(tight):
    big = {"prompt": [314] * 200, "max_tokens": 20, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, tight + "/v1/completions", json=big, timeout=120)
        deadline = time.time() + 30
        while replica_status(tight)["kv_used"] < 13:  # the big prompt (and its tree scratch) holds 14 of 16 blocks
            assert time.time() < deadline and not first.done(), "the big request never started"
            time.sleep(0.02)
        small = {"prompt": [314] * 60, "max_tokens": 4, "temperature": 0, "stream": True}  # needs 5 blocks
        r = httpx.post(tight + "/v1/completions", json=small, timeout=60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["code"] == "no_capacity"
        done = first.result()
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 20
    r = httpx.post(tight + "/v1/completions", json={**small, "stream": False}, timeout=60)
    assert r.status_code == 200, "with the memory back the same request runs"
    assert replica_status(tight)["kv_used"] == 0
    # Speculation through the whole stack is lossless: greedy text equals the plain replica's.
    plain = httpx.post(tight.removesuffix("/tight") + "/v1/chat/completions", timeout=60,
                       json={"messages": QUESTION, "max_tokens": 12, "temperature": 0}).json()
    spec = httpx.post(tight + "/v1/chat/completions", timeout=60,
                      json={"messages": QUESTION, "max_tokens": 12, "temperature": 0}).json()
    assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert spec["speculation"]["draft_nodes"] > 0 and spec["speculation"]["tree_budget"] == 8
    assert plain["speculation"]["draft_nodes"] == 0
    # router=false: the replica still reports, marked as not applying the router's advice.
    deadline = time.time() + 10
    while not (reps := httpx.get(tight + "/v1/speculation", timeout=10).json()["replicas"]):
        assert time.time() < deadline
        time.sleep(0.5)
    (rep,) = reps.values()
    assert rep["load"]["policy_applied"] is False and rep["load"]["kv_total"] == 16
    assert rep["load"]["drafter"] == "eagle" and rep["load"]["speculating"] is True


# ---------------------------------------------------------------------------------------- observability


def test_trace_follows_the_request(served):
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = httpx.post(served["base"] + "/v1/chat/completions", timeout=60,
                   headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                   json={"messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    names = {"POST /v1/chat/completions", "llm.request", "speculation.policy", "llm.queue", "llm.prefill",
             "llm.decode"}
    spans = served["receiver"].trace(trace_id, names)
    ingress, request = spans["POST /v1/chat/completions"], spans["llm.request"]
    assert ingress["parent"] == parent and ingress["service"] == "treespec-ingress"
    assert request["parent"] == ingress["span_id"] and request["service"] == "treespec-llm-server"
    for name in ("speculation.policy", "llm.queue", "llm.prefill", "llm.decode"):
        assert spans[name]["parent"] == request["span_id"], name
    q, p, d = spans["llm.queue"], spans["llm.prefill"], spans["llm.decode"]
    assert request["start"] <= q["start"] <= q["end"] <= p["start"] + 1000 and p["end"] <= d["end"] + 1000
    assert d["attrs"]["treespec.completion_tokens"] == 6 and d["attrs"]["treespec.speculation.mode"] == "off"
    assert d["attrs"]["treespec.decode_steps"] >= 1 and "treespec.mean_accepted_tokens" in d["attrs"]
    assert spans["speculation.policy"]["attrs"]["treespec.tree_budget"] == 0
    assert ingress["attrs"]["gen_ai.usage.output_tokens"] == 6
    # Without a traceparent the ingress starts a new trace.
    before = len(served["receiver"].spans)
    served["openai"].completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    deadline = time.time() + 30
    while not any(s["name"] == "POST /v1/completions" for s in served["receiver"].spans[before:]):
        assert time.time() < deadline
        time.sleep(0.2)
    root = next(s for s in served["receiver"].spans[before:] if s["name"] == "POST /v1/completions")
    assert root["parent"] is None and root["trace_id"] != trace_id


def test_speculation_view_and_metrics(served):
    base = served["base"]
    assert httpx.post(base + "/v1/completions", json={"prompt": "x", "top_k": "3"}).status_code == 400
    view = httpx.get(base + "/v1/speculation", timeout=10).json()
    assert view["router"] is True and len(view["replicas"]) == 1
    (rep,) = view["replicas"].values()
    # This replica runs without a drafter: the router never lets it speculate.
    assert rep["decision"]["speculate"] is False and rep["decision"]["reason"] == "no drafter"
    assert rep["load"]["kv_total"] > 0 and rep["step_time_model"]["a"] > 0
    text = httpx.get(base + "/metrics", timeout=10).text
    for name in ("treespec_requests_total", "treespec_prompt_tokens_total", "treespec_completion_tokens_total",
                 "treespec_time_to_first_token_seconds_bucket", "treespec_time_per_output_token_seconds_bucket",
                 "treespec_replica_speculate", "treespec_replica_tree_budget", "treespec_replica_queue_depth",
                 "treespec_replica_kv_blocks_used", "treespec_replica_kv_blocks_total"):
        assert name in text, name
    assert 'route="/v1/completions",status="400"' in text, "refusals are counted"
    # The same metrics through Ray's metrics agent (what a cluster's Prometheus scrapes).
    deadline, names = time.time() + 45, set()
    want = {"ray_treespec_requests_total", "ray_treespec_time_to_first_token_seconds_bucket",
            "ray_treespec_replica_kv_blocks_used", "ray_treespec_replica_tree_budget"}
    while not want <= names:
        assert time.time() < deadline, f"missing from Ray's metrics: {want - names}"
        time.sleep(1)
        try:
            text = httpx.get(served["ray_metrics"], timeout=5).text
        except httpx.HTTPError:
            continue
        names = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_treespec_")}
