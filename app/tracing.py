"""OpenTelemetry tracing: W3C trace context in, OTLP/HTTP (protobuf) out.

Each process (ingress replica, LLM server replica) builds its own
``TracerProvider`` with a batch exporter to ``<endpoint>/v1/traces``; with no
endpoint it is a no-op tracer and nothing is exported. The trace context
crosses from the ingress to the server inside the request payload as a W3C
``traceparent`` carrier dict. Of a request's headers only ``traceparent`` and
``tracestate`` are read; no other header (``Authorization`` above all) becomes a
span attribute, and requests refused for their API key are not traced.

Spans of one request (one per phase, never one per token)::

    POST /v1/chat/completions        ingress (SERVER; the client's traceparent is its parent)
      llm.request                    server replica
        speculation.policy           the router decision in force when the request arrived
        llm.queue                    waiting for admission (KV blocks, batch slots)
        llm.prefill                  the prompt's forward, up to the first token
        llm.decode                   first token to finish: accepted tokens, tree sizes, mode
"""
from __future__ import annotations

import logging
import os
import time

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
log = logging.getLogger(__name__)


def traces_url(endpoint: str) -> str:
    """An OTLP base URL (as in OTEL_EXPORTER_OTLP_ENDPOINT) -> the traces URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class Tracing:
    """A tracer for one process; ``enabled`` is False (no-op spans) without an endpoint."""

    def __init__(self, service: str, endpoint: str | None = None, export_delay_ms: int = 2000,
                 attributes: dict | None = None):
        endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        self.endpoint = endpoint
        self.provider = None
        if not endpoint:
            self.tracer = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": service, **(attributes or {})})
        self.provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=5)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=export_delay_ms))
        self.tracer = self.provider.get_tracer("treespec")
        log.info("tracing %s to %s", service, traces_url(endpoint))

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush(5000)


def extract(carrier: dict | None):
    """A carrier dict ({'traceparent': ...}) -> an OpenTelemetry context (empty when absent or invalid)."""
    return _propagator.extract(carrier or {})


def inject(span) -> dict:
    """The carrier dict that makes ``span`` the parent on the other side."""
    carrier: dict = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def wall_ns(perf: float, now_perf: float | None = None, now_ns: int | None = None) -> int:
    """A time.perf_counter() reading -> epoch nanoseconds (span timestamps)."""
    now_perf = time.perf_counter() if now_perf is None else now_perf
    now_ns = time.time_ns() if now_ns is None else now_ns
    return now_ns - int((now_perf - perf) * 1e9)
