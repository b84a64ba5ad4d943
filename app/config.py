"""Application arguments: ``serve run app:deployment key=value ...`` -> AppConfig.

Values arrive as strings from the command line and typed from a Serve config
file (cluster/serve.yaml); both are converted by the field types. The arguments
are flat: every field of ``EngineConfig`` (engine/config.py: model, tp, dtype,
device, drafter, tree_budget, ...) and the serving fields below. An unknown key or
a bad value stops the deployment with a one-line reason.

Engine fields left at "auto" resolve on each replica (``EngineConfig.resolve``),
on the hardware that runs it, the same way as for the CLI and the benchmarks.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields

from engine.config import DRAFTER_KINDS, EngineConfig

REQUEST_SPECULATION = ("auto", *DRAFTER_KINDS)  # a request's "speculation": auto, off or a drafter kind


@dataclass
class AppConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None  # the "model" clients send; defaults to the checkpoint's name
    torch_threads: int | None = None  # None: all cores of the machine (CPU)
    executor: str = "auto"  # local: engine in the replica process; ray: TP shard actors; auto: ray when tp > 1
    cpus_per_rank: float = 1.0  # ray executor: logical CPUs per TP shard actor (and for the drafter actor)
    feature_transport: str = "auto"  # ray executor: rank 0 -> drafter actor: auto, host, shm, cuda_ipc (actors/executor.py)
    # admission
    max_waiting: int = 32  # requests queued per replica beyond max_num_seqs before 429
    queue_timeout_s: float = 60.0  # a request not admitted (KV memory) within this gets 503
    # replicas and resources
    num_replicas: int | None = None  # fixed count; None means autoscaling between min and max
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    num_cpus: float | None = None  # per LLM server replica; None: 1 (local executor) or 0 (the shards hold them)
    num_gpus: float = 0.0
    ingress_replicas: int = 1
    # speculation router
    router: bool = True  # False: every replica speculates whenever its drafter is healthy
    report_interval_s: float = 1.0
    # observability
    otlp_endpoint: str | None = None  # OTLP/HTTP base URL; default $OTEL_EXPORTER_OTLP_ENDPOINT; none = off
    trace_export_delay_ms: int = 2000
    # access and request bounds (app/security.py; the keys come from the environment, never from here)
    require_api_keys: bool | None = None  # True: no ingress starts without a key; None: keys set where it is built
    max_request_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    request_read_timeout_s: float = 30.0  # a body that takes longer to arrive gets 408
    stream_idle_timeout_s: float = 60.0  # a streaming client that takes no data this long: generation cancelled
    max_messages: int = 2048  # per chat request
    max_stop_sequences: int = 4  # per request

    @classmethod
    def from_args(cls, args: dict | None) -> "AppConfig":
        """args: flat key -> value, EngineConfig's fields and AppConfig's own."""
        args = dict(args or {})
        engine_fields = {f.name for f in fields(EngineConfig)}
        app_fields = {f.name for f in fields(cls)} - {"engine"}
        unknown = sorted(set(args) - engine_fields - app_fields)
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(engine_fields | app_fields))}")
        engine_hints, app_hints = typing.get_type_hints(EngineConfig), typing.get_type_hints(cls)
        engine = EngineConfig(**{k: _convert(k, v, engine_hints[k]) for k, v in args.items() if k in engine_fields})
        cfg = cls(engine, **{k: _convert(k, v, app_hints[k]) for k, v in args.items() if k in app_fields})
        if cfg.otlp_endpoint is None:
            cfg.otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        if cfg.require_api_keys is None:  # keys set here but not reaching the ingress must not mean an open API
            from app.security import api_keys_configured

            cfg.require_api_keys = api_keys_configured()
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "AppConfig":
        """The inverse of ``to_dict`` (how deployments receive their config)."""
        return cls(**{**d, "engine": EngineConfig(**d["engine"])})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.executor not in ("auto", "local", "ray"):
            raise ValueError(f"executor must be auto, local or ray, got {self.executor!r}")
        from actors.executor import FEATURE_TRANSPORTS

        if self.feature_transport not in FEATURE_TRANSPORTS:
            raise ValueError(f"feature_transport must be one of {', '.join(FEATURE_TRANSPORTS)}, "
                             f"got {self.feature_transport!r}")
        if self.executor == "local" and self.engine.tp > 1:
            raise ValueError("tp > 1 needs executor=ray (the in-process engine does not shard)")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {self.min_replicas}, {self.max_replicas}")
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        for name in ("max_waiting", "ingress_replicas"):
            if getattr(self, name) < (0 if name == "max_waiting" else 1):
                raise ValueError(f"{name} is out of range: {getattr(self, name)}")
        if self.queue_timeout_s <= 0 or self.report_interval_s <= 0 or self.target_ongoing_requests <= 0:
            raise ValueError("queue_timeout_s, report_interval_s and target_ongoing_requests must be > 0")
        for name in ("max_request_bytes", "request_read_timeout_s", "stream_idle_timeout_s", "max_messages",
                     "max_stop_sequences"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def use_ray_executor(self) -> bool:
        return self.executor == "ray" or (self.executor == "auto" and self.engine.tp > 1)

    @property
    def server_cpus(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        return 0.0 if self.use_ray_executor else 1.0

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.engine.model in ("default", "", None):
            return "SmolLM2-135M-Instruct"
        return os.path.basename(os.path.normpath(self.engine.model))


def _convert(name: str, value, hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    target = args[0] if args else hint
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("", "none", "null"))):
        return None
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value)) if isinstance(value, str) else int(value)
        if target is float:
            return float(value)
        if typing.get_origin(target) is tuple:  # ints: "2,15,27" on a command line, a list in YAML
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(str(i).strip()) for i in items)
        return str(value)
    except (TypeError, ValueError):
        what = "list of ints" if typing.get_origin(target) is tuple else target.__name__
        raise ValueError(f"argument {name}={value!r} is not a valid {what}") from None
