"""Ingress: the OpenAI-compatible HTTP API (FastAPI inside a Serve deployment).

Routes: POST /v1/chat/completions, POST /v1/completions (stream or not),
GET /v1/models, GET /health, GET /v1/speculation (the router's decisions and
the load each replica reported), GET /metrics (Prometheus text).

In front of every route sits app/security.py's Guard: with API keys in the
replica's environment, every route but /health needs one (401); request bodies
are bounded in size (413) and upload time (408) before a route parses them.

For each completion request the ingress validates the body (OpenAI error body
and a 4xx on any mistake), opens the trace span (the client's ``traceparent``
is its parent), calls ``LLMServer.generate`` through a streaming handle and
turns its events into one JSON response or SSE ``data:`` chunks ending in
``data: [DONE]``. If the client goes away, or takes no data of a stream for
``stream_idle_timeout_s``, the handle call is cancelled and the server aborts
the request, freeing its KV blocks.
"""

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.trace import SpanKind, Status, StatusCode
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import AppConfig
from app.metrics import RequestMetrics
from app.protocol import (SSE_DONE, APIError, ChatCompletionRequest, CompletionRequest, new_id, now, parse,
                          sse)
from app.security import KEYS_ENV, KEYS_FILE_ENV, Guard, guard_settings
from app.tracing import Tracing, extract, inject

log = logging.getLogger("ray.serve")

api = FastAPI(title="treespec", description="OpenAI-compatible API with tree-based speculative decoding")


def _replica_guard():
    """The Guard's settings: those of the Ingress instance this replica runs (its keys, its limits)."""
    return serve.get_replica_context().servable_object.guard


api.add_middleware(Guard, settings=_replica_guard)

# Metrics label for a path (refusals can name any path; labels must stay few).
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/v1/speculation", "/metrics")


def _route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return JSONResponse(err.body(), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    err = APIError(400, f"invalid request: {exc.errors()[0].get('msg', exc)}")
    return JSONResponse(err.body(), status_code=400)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):  # a bug, never bad input
    log.exception("unhandled error on %s", request.url.path)
    err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


def _body_schema(model) -> dict:
    """openapi_extra for a route that parses its own body: the request model's JSON schema, $refs inlined.

    The handlers read the raw body (to answer OpenAI-style errors); this publishes the schema anyway,
    so /openapi.json describes the request bodies for clients and schema-driven tests.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _server_failure(exc: BaseException) -> APIError:
    """A failed handle call -> the error the client sees."""
    from ray.exceptions import RayTaskError

    name = type(exc).__name__
    if name == "BackPressureError":
        return APIError(503, "all replicas are busy; retry later", type="server_error", code="overloaded",
                        retry_after=1)
    if isinstance(exc, RayTaskError):
        log.error("LLM server raised: %s", exc)
        return APIError(500, "internal error in the LLM server", type="server_error")
    if isinstance(exc, asyncio.TimeoutError):
        return APIError(503, "the LLM server did not answer in time; retry", type="server_error", code="timeout",
                        retry_after=1)
    return APIError(503, f"LLM server unavailable ({name}); retry", type="server_error", code="unavailable",
                    retry_after=1)


class _Stalled(Exception):
    pass


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that gives up on a client that takes no data for ``idle_s``: it closes the
    event generator (whose ``finally`` cancels the generation, so the server aborts the request and
    frees its KV blocks) and ends the response. ``on_stall`` runs first (marks the span)."""

    def __init__(self, content, idle_s: float, on_stall, **kw):
        super().__init__(content, **kw)
        self.idle_s, self.on_stall = idle_s, on_stall

    async def stream_response(self, send) -> None:
        async def timed(message):
            try:
                async with asyncio.timeout(self.idle_s):
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().stream_response(timed)
        except _Stalled:
            self.on_stall()
            await self.body_iterator.aclose()


def _cancel(gen) -> None:
    """Cancel a handle call; the server's generator then aborts the request (freeing its KV blocks)."""
    try:
        gen.cancel()
    except Exception:  # it already failed (e.g. backpressure) or finished: nothing to cancel
        pass


def _drafter_card(cfg: AppConfig) -> dict:
    """The drafter the replicas load (kind, checkpoint format, path): /v1/models shows it; each
    replica's report in /v1/speculation says whether its drafter is up."""
    from engine.drafters.loading import draft_format

    try:
        engine = cfg.engine.resolve()
        if engine.drafter == "off":
            return {"kind": "off"}
        return {"kind": engine.drafter, "format": draft_format(engine), "path": engine.draft_path}
    except (ValueError, FileNotFoundError) as exc:  # the replicas report the same error in their logs
        return {"kind": cfg.engine.drafter, "error": str(exc)[:300]}


@serve.deployment(name="Ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, server, config: dict):
        self.cfg = cfg = AppConfig.from_dict(config)
        self.server = server
        self.stream = server.options(stream=True)
        self.model = cfg.model_name
        self.model_ids = {self.model, "default" if cfg.engine.model == "default" else cfg.engine.model}
        self.tracing = Tracing("treespec-ingress", cfg.otlp_endpoint, cfg.trace_export_delay_ms)
        self.metrics = RequestMetrics(self.model)
        # Keys from this replica's environment (serve run passes its shell's; a cluster sets them on every
        # node); a bad key file, or require_api_keys without keys, stops the replica with the reason.
        self.guard = guard_settings(cfg, refused=lambda path, status: self.metrics.request(_route_label(path),
                                                                                           status))
        if len(self.guard.keys):
            log.info("API keys: %d configured (%s / %s); every route but /health needs one", len(self.guard.keys),
                     KEYS_ENV, KEYS_FILE_ENV)
        else:
            log.warning("no API key is set (%s, %s): the API is open to anyone who reaches the HTTP proxy",
                        KEYS_ENV, KEYS_FILE_ENV)
        self.limits = {"max_messages": cfg.max_messages, "max_stop_sequences": cfg.max_stop_sequences,
                       "max_prompt_tokens": cfg.engine.max_model_len}
        self.app_name = serve.get_replica_context().app_name
        self.created = now()
        self.drafter = _drafter_card(cfg)
        # Waiting longer than this for the next event means the server is stuck, not busy.
        self.stall_s = cfg.queue_timeout_s + 120.0

    # ------------------------------------------------------------------ OpenAI routes

    @api.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        return await self._complete(request, ChatCompletionRequest, chat=True)

    @api.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(self, request: Request):
        return await self._complete(request, CompletionRequest, chat=False)

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        if model_id not in self.model_ids:
            err = self._unknown_model(model_id)
            return JSONResponse(err.body(), status_code=err.status)
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "treespec",
                "max_model_len": self.cfg.engine.max_model_len, "drafter": self.drafter}

    @api.get("/health")
    async def health(self):
        try:
            status = await asyncio.wait_for(self.server.status.remote(), 10)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503,
                                headers={"Retry-After": "5"})
        return {"status": "ok", "model": self.model, "replica": status}

    @api.get("/v1/speculation")
    async def speculation(self):
        """Per LLM replica: the router's decision (speculate, tree budget, why, goodput estimates) and load."""
        return {"router": self.cfg.router, "replicas": await self._router_view()}

    @api.get("/metrics")
    async def metrics(self):
        view = await self._router_view()
        return Response(self.metrics.render(view), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _router_view(self) -> dict:
        from actors.router import find_router

        router = find_router(self.app_name)
        if router is None:
            return {}
        try:
            return await asyncio.wait_for(router.view.remote(), 5)
        except Exception:
            return {}

    # ------------------------------------------------------------------ completions

    def _unknown_model(self, name: str) -> APIError:
        return APIError(404, f"The model `{name}` does not exist; this server has `{self.model}`.", param="model",
                        code="model_not_found")

    async def _complete(self, request: Request, schema, chat: bool):
        route = request.url.path
        received = time.perf_counter()
        carrier = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
        span = self.tracing.tracer.start_span(f"POST {route}", context=extract(carrier), kind=SpanKind.SERVER,
                                              attributes={"http.request.method": "POST", "url.path": route,
                                                          "gen_ai.request.model": self.model})
        streaming = False
        try:
            body = parse(schema, await request.body(), self.limits)
            if body.model is not None and body.model not in self.model_ids:
                raise self._unknown_model(body.model)
            rid = new_id("chatcmpl" if chat else "cmpl")
            span.set_attributes({"treespec.request_id": rid, "treespec.stream": body.stream,
                                 "treespec.speculation.requested": body.speculation})
            payload = {"request_id": rid, "sampling": body.sampling(), "max_tokens": body.requested_max_tokens,
                       "default_max_tokens": None if chat else 16, "speculation": body.speculation,
                       "trace": inject(span)}
            if chat:
                payload["messages"] = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                       for m in body.messages]
            else:
                payload["prompt"] = body.prompt
            try:
                gen = self.stream.generate.remote(payload)
            except Exception as exc:  # e.g. BackPressureError: the handle's queue is full
                raise _server_failure(exc) from None
            try:
                first = await self._next(gen)
                if first["event"] == "error":
                    raise APIError.from_dict(first)
                ctx = {"id": rid, "chat": chat, "route": route, "received": received, "gen": gen, "span": span,
                       "prompt_tokens": first["prompt_tokens"], "created": now()}
                if body.stream:
                    include_usage = bool(body.stream_options and body.stream_options.include_usage)
                    streaming = True  # from here on _sse owns the generation and the span
                    return _SSEResponse(self._sse(ctx, include_usage), self.cfg.stream_idle_timeout_s,
                                        lambda: self._stalled(ctx), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
                return await self._collect(ctx)
            except BaseException:  # client gone (the handler is cancelled) or an error: stop the generation
                if not streaming:
                    _cancel(gen)
                raise
        except APIError as err:
            span.set_attribute("http.response.status_code", err.status)
            span.set_status(Status(StatusCode.ERROR, err.message))
            self.metrics.request(route, err.status)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers())
        finally:
            if not streaming:
                span.end()

    async def _next(self, gen) -> dict:
        try:
            return await asyncio.wait_for(gen.__anext__(), self.stall_s)
        except StopAsyncIteration:
            raise APIError(503, "the LLM server closed the stream early; retry", type="server_error",
                           retry_after=1) from None
        except APIError:
            raise
        except Exception as exc:
            raise _server_failure(exc) from None

    def _finished(self, ctx: dict, end: dict, first_at: float | None, n_out: int) -> dict:
        usage = {"prompt_tokens": end["prompt_tokens"], "completion_tokens": end["completion_tokens"],
                 "total_tokens": end["prompt_tokens"] + end["completion_tokens"]}
        t_end = time.perf_counter()
        ttft = (first_at - ctx["received"]) if first_at is not None else None
        tpot = (t_end - first_at) / (n_out - 1) if first_at is not None and n_out > 1 else None
        spec = end.get("speculation") or {}
        self.metrics.finished(usage["prompt_tokens"], usage["completion_tokens"], ttft, tpot,
                              spec.get("mean_accepted_tokens") or None)
        span = ctx["span"]
        span.set_attributes({"gen_ai.usage.input_tokens": usage["prompt_tokens"],
                             "gen_ai.usage.output_tokens": usage["completion_tokens"],
                             "treespec.finish_reason": end["finish_reason"],
                             "treespec.mean_accepted_tokens": spec.get("mean_accepted_tokens", 0.0),
                             "http.response.status_code": 200})
        if ttft is not None:
            span.set_attribute("treespec.ttft_s", ttft)
        return usage

    async def _collect(self, ctx: dict) -> JSONResponse:
        parts, first_at, n_out = [], None, 0
        while True:
            ev = await self._next(ctx["gen"])
            if ev["event"] == "error":
                raise APIError.from_dict(ev)
            if ev["event"] == "delta":
                if first_at is None and ev["tokens"]:
                    first_at = time.perf_counter()
                n_out += ev["tokens"]
                parts.append(ev["text"])
            elif ev["event"] == "end":
                break
        usage = self._finished(ctx, ev, first_at, n_out)
        text = "".join(parts)
        if ctx["chat"]:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": ev["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev["finish_reason"]}
            obj = "text_completion"
        self.metrics.request(ctx["route"], 200)
        return JSONResponse({"id": ctx["id"], "object": obj, "created": ctx["created"], "model": self.model,
                             "choices": [choice], "usage": usage, "speculation": ev.get("speculation")})

    def _chunk(self, ctx: dict, text: str | None, finish: str | None, include_usage: bool,
               role: bool = False) -> dict:
        if ctx["chat"]:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        chunk = {"id": ctx["id"], "object": obj, "created": ctx["created"], "model": self.model, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def _stalled(self, ctx: dict) -> None:
        ctx["stalled"] = True
        log.warning("request %s: the client took no data for %gs; its generation is cancelled", ctx["id"],
                    self.cfg.stream_idle_timeout_s)

    async def _sse(self, ctx: dict, include_usage: bool):
        first_at, n_out, status, span = None, 0, 499, ctx["span"]
        try:
            if ctx["chat"]:
                yield sse(self._chunk(ctx, None, None, include_usage, role=True))
            while True:
                try:
                    ev = await self._next(ctx["gen"])
                except APIError as err:
                    ev = {"event": "error", **err.to_dict()}
                if ev["event"] == "error":
                    status = ev["status"]
                    span.set_status(Status(StatusCode.ERROR, ev["message"]))
                    yield sse(APIError.from_dict(ev).body())
                    break
                if ev["event"] == "delta":
                    if first_at is None and ev["tokens"]:
                        first_at = time.perf_counter()
                    n_out += ev["tokens"]
                    if ev["text"]:
                        yield sse(self._chunk(ctx, ev["text"], None, include_usage))
                elif ev["event"] == "end":
                    usage = self._finished(ctx, ev, first_at, n_out)
                    yield sse(self._chunk(ctx, None, ev["finish_reason"], include_usage))
                    if include_usage:
                        yield sse({"id": ctx["id"], "object": self._chunk(ctx, None, None, False)["object"],
                                   "created": ctx["created"], "model": self.model, "choices": [], "usage": usage})
                    status = 200
                    break
            yield SSE_DONE
        finally:
            if status == 499:  # the client went away or stalled mid-stream: cancel, so the server aborts and frees KV
                _cancel(ctx["gen"])
                span.set_attribute("treespec.client_stalled" if ctx.get("stalled") else "treespec.client_disconnected",
                                   True)
            self.metrics.request(ctx["route"], status)
            span.set_attribute("http.response.status_code", status)
            span.end()
