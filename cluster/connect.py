"""Reaching a Ray cluster and checking that it has what a job asks for.

``connect()`` starts a local Ray instance (CPU machine, tests) or joins one by address (``ray job submit`` sets
RAY_ADDRESS, ``ray up`` clusters), passing environment variables to every worker through the runtime env.
Ray 2.60 token authentication is left as Ray configures it (on by default): nothing here turns it off.
``check_resources()`` turns "asked for 8 GPUs on a CPU box" into a clear error before any worker starts, and on a
cluster that can grow asks its autoscaler for the workers and waits (cluster/capacity.py).
"""

from __future__ import annotations

import os
from typing import Any

from cluster.capacity import (BOOTSTRAP_CONFIG, CONFIG_ENV, Autoscaler, Capacity, Need, RayAutoscaler, detect_capacity,
                              fmt, wait_for_autoscaler)
from core.config import ConfigError

# NVLink multicast must stay off on the lent H100 hosts (see /work/shared/DESIGN.md); harmless elsewhere.
GPU_ENV_VARS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def connect(address: str | None = None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
            working_dir: str | None = None, log_to_driver: bool = True) -> None:
    """``ray.init`` once per process: by ``address`` (or RAY_ADDRESS), else a local instance (with its dashboard on
    127.0.0.1, for the State API Ray Train needs).

    ``env_vars`` reach every task and actor (Ray Train workers included); GPU_ENV_VARS are always added, and
    VLLM_LOGGING_LEVEL (WARNING unless this process has it set). ``log_to_driver=False`` keeps workers' output out
    of this process's terminal (a server's replicas log a line per request).
    """
    import ray

    if ray.is_initialized():
        return
    # vLLM logs every engine start at INFO (dozens of lines per rollout actor); a job's output is our progress bars
    # and lines. Set VLLM_LOGGING_LEVEL=INFO in the environment to see them again.
    quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    env = {**GPU_ENV_VARS, **quiet, **(env_vars or {})}
    runtime_env: dict[str, Any] = {"env_vars": env}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": log_to_driver}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API, which Ray Train polls (its PlacementGroupCleaner asks every second
        # whether the train controller is alive); without it a training job printed "Failed to query Ray Train
        # Controller actor state" hundreds of times. It listens on 127.0.0.1 only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def _shortfall(*, num_workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float,
               now: dict[str, float], maximum: dict[str, float] | None = None, source: str = "") -> str | None:
    """The refusal message when the workers do not fit ``maximum`` (``now`` when None), else None."""
    res = now if maximum is None else maximum

    def has(key: str, unit: str = "") -> str:
        here = f"{float(now.get(key, 0)):g}{unit}"
        if maximum is None:
            return here
        return (f"{here} now and at most {float(maximum.get(key, 0)):g}{unit} with every node its autoscaler may "
                f"add (from {source})")

    if use_gpu and num_workers * gpus_per_worker > float(res.get("GPU", 0)):
        return (f"scaling: {num_workers} GPU worker(s) asked for (scaling.num_workers={num_workers}, "
                f"scaling.use_gpu=true, scaling.gpus_per_worker={gpus_per_worker:g}) but the Ray cluster "
                f"has {has('GPU', ' GPU(s)')}")
    need = num_workers * cpus_per_worker
    if need > float(res.get("CPU", 0)):
        return (f"scaling: {num_workers} worker(s) × scaling.cpus_per_worker={cpus_per_worker:g} = "
                f"{need:g} CPUs, but the Ray cluster has {has('CPU')}")
    return None


def check_resources(*, num_workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float = 1.0,
                    resources: dict[str, float] | None = None, timeout_s: float = 900.0,
                    autoscaler: Autoscaler | None = None, poll_s: float = 5.0) -> None:
    """Raise ConfigError when the cluster cannot place ``num_workers`` workers of this shape.

    ``resources=None`` asks the connected Ray cluster (cluster/capacity.py: its CPUs/GPUs now and, where an
    autoscaler may add nodes, the most it can reach); a dict checks against that fixed shape (no autoscaler).

    - Fits now: returns.
    - A fixed cluster that lacks them, or ``timeout_s=0``: ConfigError at once with the numbers.
    - Above the autoscaler's maximum, or one worker larger than every node type: ConfigError at once with the
      numbers and the maximum — no request is made.
    - Within the maximum but not there yet: asks the autoscaler for one bundle per worker
      (``ray.autoscaler.sdk.request_resources``; ``autoscaler`` replaces it in tests), prints that it waits, and
      polls every ``poll_s`` until the totals hold the workers (returns) or ``timeout_s`` runs out (ConfigError
      naming what was asked, what arrived and the timeout). The request is withdrawn either way.

    LLAMARAY_SKIP_RESOURCE_CHECK=1 is an escape hatch that skips all of this (Ray Train then waits for its
    placement group as long as it takes); use it only where this check misjudges the cluster.
    """
    if os.environ.get("LLAMARAY_SKIP_RESOURCE_CHECK") == "1":
        return
    shape = dict(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                 gpus_per_worker=gpus_per_worker)
    cap = Capacity(now=dict(resources)) if resources is not None else detect_capacity()
    short = _shortfall(**shape, now=cap.now)
    if short is None:
        return
    if cap.maximum is None:
        raise ConfigError(short if resources is not None else
                          f"{short}; no autoscaler config was found (the GCS cluster config, ${CONFIG_ENV} or "
                          f"{BOOTSTRAP_CONFIG}), so the cluster is taken as fixed")
    if timeout_s <= 0:
        raise ConfigError(f"{short}; scaling.autoscale_timeout_s=0: not waiting for the autoscaler")
    never = _shortfall(**shape, now=cap.now, maximum=cap.maximum, source=cap.source)
    if never is not None:
        raise ConfigError(never)
    need = Need(num_workers, {"CPU": float(cpus_per_worker), **({"GPU": float(gpus_per_worker)} if use_gpu else {})})
    if cap.node_shapes and not any(all(float(n.get(k, 0)) >= v for k, v in need.bundle.items())
                                   for n in cap.node_shapes):
        raise ConfigError(f"scaling: one worker needs {fmt(need.bundle)} (scaling.cpus_per_worker="
                          f"{cpus_per_worker:g}{f', scaling.gpus_per_worker={gpus_per_worker:g}' if use_gpu else ''})"
                          f" on one node, but no node type of the cluster holds that much "
                          f"({'; '.join(fmt(n) for n in cap.node_shapes)}; from {cap.source})")
    wait_for_autoscaler(need, cap, autoscaler or RayAutoscaler(), timeout_s=timeout_s, poll_s=poll_s)
