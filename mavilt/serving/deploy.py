"""Each deployment's Serve options from the config's ``serve`` section: resources, replicas or autoscaling,
queue limits. One place, so ``serve/app.py`` stays a list of deployments."""

from __future__ import annotations

from typing import Any

# The ingress only awaits the parts, so it holds many requests at once; a model part holds two batches (one
# running, one filling), never fewer than the batch size (Serve's default of 5 would cap every batch at 5).
INGRESS_ONGOING = 256
# The ingress's own queue must not be the one that overflows: Serve's proxy answers that with a plain-text 503
# and no retry hint (and counts a burst still being assigned to replicas as queued). The model parts' queues
# (serve.max_queued_requests) fill first, and the API answers those with its JSON 503 and Retry-After.
INGRESS_QUEUED = 1024


def deployment_options(name: str, serve_cfg) -> dict[str, Any]:
    d = getattr(serve_cfg, name)
    if name == "ingress":
        ongoing, queued = INGRESS_ONGOING, max(INGRESS_QUEUED, serve_cfg.max_queued_requests)
    else:
        ongoing, queued = 2 * serve_cfg.max_batch_size, serve_cfg.max_queued_requests
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "max_ongoing_requests": ongoing,
        "max_queued_requests": queued,
    }
    if d.min_replicas == d.max_replicas:
        opts["num_replicas"] = d.max_replicas
    else:
        opts["autoscaling_config"] = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas,
                                      "initial_replicas": max(d.min_replicas, 1),
                                      "target_ongoing_requests": d.target_ongoing_requests,
                                      "upscale_delay_s": d.upscale_delay_s, "downscale_delay_s": d.downscale_delay_s,
                                      "look_back_period_s": d.look_back_period_s}
    return opts


def batch_settings(serve_cfg) -> dict[str, Any]:
    return {"max_batch_size": serve_cfg.max_batch_size, "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s}
