"""The application builder: ``serve run app:deployment key=value ...``.

Two deployments: ``Ingress`` (HTTP, OpenAI API) -> ``LLMServer`` (one engine per
replica, autoscaled on ongoing requests). The speculation Router actor is
created by the first LLM replica that reports, one per application.
"""
from __future__ import annotations

import os

from ray.serve import Application

from app.config import AppConfig
from app.ingress import Ingress
from app.server import LLMServer


def app_builder(args: dict) -> Application:
    """args: AppConfig fields as strings (command line) or typed values (Serve config file)."""
    cfg = AppConfig.from_args(args)
    check_model(cfg)
    num_gpus = cfg.num_gpus
    if cfg.engine.device.startswith("cuda") and num_gpus == 0 and not cfg.use_ray_executor:
        num_gpus = 1  # with the ray executor the shard actors hold the GPUs, not the server replica
    server_options = {
        "ray_actor_options": {"num_cpus": cfg.server_cpus, "num_gpus": num_gpus},
        # One more than a replica admits, so an overloaded replica answers 429 instead of requests
        # queueing unseen in front of it; max_queued_requests bounds the queue in the handle (503).
        "max_ongoing_requests": cfg.engine.max_num_seqs + cfg.max_waiting + 1,
        "max_queued_requests": max(1, cfg.max_waiting),
    }
    if cfg.num_replicas is not None:
        server_options["num_replicas"] = cfg.num_replicas
    else:
        server_options["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "initial_replicas": max(1, cfg.min_replicas),
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    server = LLMServer.options(**server_options).bind(cfg.to_dict())
    return Ingress.options(num_replicas=cfg.ingress_replicas).bind(server, cfg.to_dict())


# `serve run app:deployment` imports this name; Serve calls it with the key=value arguments.
deployment = app_builder


def check_model(cfg: AppConfig) -> None:
    """A checkpoint directory readable where the application is built is checked there, so an
    architecture or setting the engine refuses (engine/architectures.py), or a TP degree its heads
    do not split into, stops ``serve run`` with one line instead of failing every replica's
    start. A path that exists only on the cluster's workers is checked by the replicas."""
    from engine.config import ModelConfig
    from engine.weights import DEFAULT_MODEL

    model = cfg.engine.model
    if model != DEFAULT_MODEL and os.path.isfile(os.path.join(model, "config.json")):
        ModelConfig.from_path(model).validate_tp(cfg.engine.tp)
