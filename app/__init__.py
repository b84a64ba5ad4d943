"""The Ray Serve application: ``serve run app:deployment [model=... tp=... drafter=... ...]``.

- builder.py   app_builder(args) / deployment: arguments -> the bound application
- config.py    AppConfig: the arguments, their types and defaults
- ingress.py   Ingress deployment: OpenAI API (FastAPI), validation, trace context, SSE, /metrics
- server.py    LLMServer deployment: one engine per replica, stepped in a background thread
- protocol.py  request schemas, OpenAI error bodies, SSE framing
- security.py  API keys (from the environment) and the request-body bounds, as ASGI middleware
- tracing.py   OpenTelemetry (W3C trace context in, OTLP/HTTP out)
- metrics.py   Prometheus metrics (ingress /metrics and ray.util.metrics)

Request path: HTTP -> Ingress -> (handle, streaming) -> LLMServer.generate -> engine thread.
"""
from app.builder import app_builder, deployment

__all__ = ["app_builder", "deployment"]
