"""Reaching a Ray cluster and checking that it has what a job asks for.

``connect()`` starts a local Ray instance (CPU machine, tests) or joins one by address (``ray job submit`` sets
RAY_ADDRESS, ``ray up`` clusters), passing environment variables to every worker through the runtime env.
Ray 2.60 token authentication is left as Ray configures it (on by default): nothing here turns it off.
``check_resources()`` turns "asked for 8 GPUs on a CPU box" into a clear error before any worker starts.
"""

from __future__ import annotations

import os
from typing import Any

from model.llama import ConfigError

# NVLink multicast must stay off on the lent H100 hosts (see /work/shared/DESIGN.md); harmless elsewhere.
GPU_ENV_VARS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def connect(address: str | None = None, *, num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
            working_dir: str | None = None) -> None:
    """``ray.init`` once per process: by ``address`` (or RAY_ADDRESS), else a local instance.

    ``env_vars`` reach every task and actor (Ray Train workers included); GPU_ENV_VARS are always added.
    """
    import ray

    if ray.is_initialized():
        return
    env = {**GPU_ENV_VARS, **(env_vars or {})}
    runtime_env: dict[str, Any] = {"env_vars": env}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def check_resources(*, num_workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float = 1.0,
                    resources: dict[str, float] | None = None) -> None:
    """Raise ConfigError when the cluster cannot place ``num_workers`` workers of this shape.

    With ``resources=None`` it asks the connected Ray cluster; pass a dict to check against a known shape.
    On an autoscaling cluster the current total may grow later; set LLAMARAY_SKIP_RESOURCE_CHECK=1 there.
    """
    if os.environ.get("LLAMARAY_SKIP_RESOURCE_CHECK") == "1":
        return
    res = cluster_resources() if resources is None else resources
    gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    if use_gpu and num_workers * gpus_per_worker > gpus:
        raise ConfigError(f"scaling: {num_workers} GPU worker(s) asked for (scaling.num_workers={num_workers}, "
                          f"scaling.use_gpu=true, scaling.gpus_per_worker={gpus_per_worker:g}) but the Ray cluster "
                          f"has {gpus:g} GPU(s)")
    need = num_workers * cpus_per_worker
    if need > cpus:
        raise ConfigError(f"scaling: {num_workers} worker(s) × scaling.cpus_per_worker={cpus_per_worker:g} = "
                          f"{need:g} CPUs, but the Ray cluster has {cpus:g}")
