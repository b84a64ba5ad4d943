"""Application arguments: ``serve run app:deployment key=value ...`` -> AppConfig -> EngineConfig.

Values arrive as strings from the command line and typed from a Serve config
file (cluster/serve.yaml); both are converted by the field types below. An
unknown key or a bad value stops the deployment with a one-line reason.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, fields

from engine.config import EngineConfig, auto_draft_min_prob, auto_draft_vocab_size, auto_dtype, auto_tree_budget

DRAFTER_CHOICES = ("auto", "off", "eagle", "medusa")
REQUEST_SPECULATION = ("auto", "off", "eagle", "medusa")


@dataclass
class AppConfig:
    # model and engine
    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct) or a HF checkpoint directory
    served_model_name: str | None = None  # the "model" clients send; defaults to the checkpoint's name
    tp: int = 1
    dtype: str = "auto"  # auto: bfloat16 on GPUs and bf16-capable CPUs, else float32
    device: str = "cpu"
    drafter: str = "auto"  # auto: the shipped drafter when there is one, else off; or off/eagle/medusa
    draft_path: str | None = None
    tree_budget: int | None = None  # largest draft tree per sequence (None: auto_tree_budget: 60 on GPU, 2-6 on CPU);
    # the router picks 0..tree_budget
    draft_vocab_size: int | None = None  # draft-head rows, most frequent first (None: 4096 on CPU, all on GPU; 0: all)
    draft_min_prob: float | None = None  # EAGLE: no deeper drafting below this path probability (None: 0.2 CPU, 0 GPU)
    draft_int8: bool = True  # CPU drafters keep int8 weights on AMX-INT8, AVX512-VNNI or AVX2 (output unchanged)
    lookup_tokens: int = 6  # prompt-lookup chain merged into each draft tree (0: off; engine/lookup.py)
    max_num_seqs: int = 16
    max_model_len: int = 2048
    num_blocks: int | None = None
    kv_cache_gib: float = 0.5
    torch_threads: int | None = None  # None: all cores of the machine (CPU)
    executor: str = "auto"  # local: engine in the replica process; ray: TP shard actors; auto: ray when tp > 1
    cpus_per_rank: float = 1.0  # ray executor: logical CPUs per TP shard actor (and for the drafter actor)
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

    @classmethod
    def from_args(cls, args: dict | None) -> "AppConfig":
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown argument(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        hints = typing.get_type_hints(cls)
        values = {k: _convert(k, v, hints[k]) for k, v in args.items()}
        cfg = cls(**values)
        if cfg.otlp_endpoint is None:
            cfg.otlp_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        cfg.validate()
        return cfg

    def __post_init__(self):
        if self.dtype == "auto":
            self.dtype = auto_dtype(self.device)
        if self.tree_budget is None:
            self.tree_budget = auto_tree_budget(self.device)
        if self.draft_vocab_size is None:
            self.draft_vocab_size = auto_draft_vocab_size(self.device) or 0
        if self.draft_min_prob is None:
            self.draft_min_prob = auto_draft_min_prob(self.device)

    def validate(self) -> None:
        if self.executor not in ("auto", "local", "ray"):
            raise ValueError(f"executor must be auto, local or ray, got {self.executor!r}")
        if self.executor == "local" and self.tp > 1:
            raise ValueError("tp > 1 needs executor=ray (the in-process engine does not shard)")
        if self.drafter not in DRAFTER_CHOICES:
            raise ValueError(f"drafter must be one of {DRAFTER_CHOICES}, got {self.drafter!r}")
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
        self.engine_config(speculation="eagle")  # EngineConfig's own checks (tree_budget included)

    @property
    def use_ray_executor(self) -> bool:
        return self.executor == "ray" or (self.executor == "auto" and self.tp > 1)

    @property
    def server_cpus(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        return 0.0 if self.use_ray_executor else 1.0

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model in ("default", "", None):
            return "SmolLM2-135M-Instruct"
        return os.path.basename(os.path.normpath(self.model))

    def engine_config(self, speculation: str) -> EngineConfig:
        return EngineConfig(
            model=self.model, tp=self.tp, dtype=self.dtype, device=self.device,
            num_blocks=self.num_blocks, kv_cache_gib=self.kv_cache_gib, max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len, speculation=speculation, draft_path=self.draft_path,
            tree_budget=self.tree_budget if speculation != "off" else 0, draft_vocab_size=self.draft_vocab_size,
            draft_min_prob=self.draft_min_prob, draft_int8=self.draft_int8,
            lookup_tokens=self.lookup_tokens,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"argument {name}={value!r} is not a valid {target.__name__}") from None
