"""The ``engine_load`` autoscaling policy: replicas are counted from the tokens of work their engines hold.

Serve's default policy divides in-flight requests by ``target_ongoing_requests``; for an LLM a request may be 5
tokens or 5 000, so the count says little about how busy a replica is. Here each replica reports
``LLMServer.record_autoscaling_stats() -> {"pending_tokens": …}`` (Ray 2.60's custom autoscaling metrics: Serve
calls it every ``metrics_interval_s`` and averages it over the look-back window) and ``EngineLoadPolicy`` (Ray's
custom policy hook, ``AutoscalingConfig(policy=AutoscalingPolicy(policy_function=EngineLoadPolicy,
policy_kwargs=…))``) turns the sum into a replica count. Serve wraps the policy with the deployment's bounds,
``upscale_delay_s`` / ``downscale_delay_s`` and smoothing, exactly as for its own policy.

Serve ships the policy to its controller by value (cloudpickle), so this module imports the standard library only.
"""

from __future__ import annotations

from typing import Any

METRIC = "pending_tokens"
"""The custom metric each replica reports (``EngineLoad.pending_tokens``)."""


class EngineLoadPolicy:
    """desired replicas = (tokens the replicas hold + requests queued in Serve × mean tokens per request held)
    / ``target_load``; until the replicas have reported, the current target stands."""

    def __init__(self, target_load: float):
        self.target_load = float(target_load)

    def __call__(self, ctx: Any) -> tuple[float, dict]:  # ctx: ray.serve.config.AutoscalingContext
        per_replica = (ctx.aggregated_metrics or {}).get(METRIC, {})
        if ctx.current_num_replicas == 0 or not per_replica:
            return ctx.target_num_replicas, {}
        held = sum(per_replica.values())
        queued = ctx.total_queued_requests  # waiting in Serve's handles, not at any engine yet
        at_replicas = max(ctx.total_num_requests - queued, 1.0)
        load = held + queued * held / at_replicas
        return load / self.target_load, {}
