"""What a Ray cluster holds now, the most its autoscaler may grow it to, and asking the autoscaler for more.

``check_resources`` (cluster/connect.py) uses this to tell three cases apart before any worker starts:

- the job fits now: go;
- it can never fit (above the maximum, or one worker larger than every node type): refuse at once, with the numbers;
- it fits the maximum but not now: ask the autoscaler (``ray.autoscaler.sdk.request_resources``) and wait.

Where the maximum comes from, in this order (the first one found wins):

1. **Ray's GCS cluster config** — ``ray._private.state.state.get_cluster_config()``: the
   ``autoscaler_pb2.ClusterConfig`` an autoscaler reports to the GCS (``GcsClient.report_cluster_config``, kept
   under the internal-KV key ``__autoscaler_cluster_config``): one ``NodeGroupConfig`` (resources, min_count,
   max_count) per node type; the maximum is Ray's own ``state.get_max_resources_from_cluster_config()``. Ray Data's
   autoscaler reads it the same way. It is what Ray itself exposes to a driver, but nothing in the Ray 2.60 wheel
   calls ``report_cluster_config`` (neither autoscaler behind ``ray up``), so it is there only where a platform or
   a later Ray reports it.
2. **The autoscaler's own config file** — ``$LLAMARAY_AUTOSCALING_CONFIG``, else ``~/ray_bootstrap_config.yaml``:
   the file ``ray up`` writes on the head node and hands to the autoscaler (``--autoscaling-config`` in
   cluster.yaml's ``head_start_ray_commands``), each node type's ``resources`` already filled in from the instance
   type. Ray's own tools take that file as the mark of a cluster-launcher cluster (Ray Tune's ``_is_ray_cluster``,
   ``ray cluster-dump``), and a ``ray job submit`` entrypoint runs on the head node, where the file is. It is read
   with the v2 autoscaler's own class (``ray.autoscaler.v2.instance_manager.config.AutoscalingConfig``:
   ``get_node_type_configs()``, ``get_max_num_worker_nodes()``), so ``max_workers`` means here what it means to the
   autoscaler. A file the autoscaler already reads was chosen over a new llamaray setting (say, an env var holding
   the maximum by hand) because it cannot drift from what the autoscaler will do; the env var only points at
   another such file (a driver off the head, or KubeRay: a YAML in the cluster-launcher format with
   ``available_node_types`` / ``resources`` / ``max_workers``).
3. Neither: a **fixed cluster** — the maximum is what it has now.

A node type with no ``resources`` in the file (``ray up`` fills them in for AWS instance types; the ``local`` provider
leaves them empty) adds nothing to the maximum, and the refusal names it: the v2 autoscaler, ``ray up``'s default,
bin-packs a request onto the declared shapes, so it cannot launch such a node for a request either.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from core.config import ConfigError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
"""Where ``ray up`` puts the autoscaler's config on the head node (Ray's own path, see the module docstring)."""
CONFIG_ENV = "LLAMARAY_AUTOSCALING_CONFIG"
"""Points at an autoscaler config YAML elsewhere than BOOTSTRAP_CONFIG."""


def _num(d: dict[str, float], key: str) -> float:
    return float(d.get(key, 0) or 0)


def fmt(res: dict[str, float]) -> str:
    """``{"CPU": 2, "GPU": 1}`` → ``2 CPU / 1 GPU`` (the two resources the check looks at; inf = unbounded)."""
    return " / ".join(f"{_num(res, k):g} {k}" for k in ("CPU", "GPU"))


@dataclass(frozen=True)
class Capacity:
    """The connected cluster's CPUs/GPUs now and, when an autoscaler may add nodes, the most it can reach."""

    now: dict[str, float]
    """Total resources of the live nodes (``ray.cluster_resources()``)."""
    maximum: dict[str, float] | None = None
    """Totals with every node type at its ``max_workers`` (inf = unbounded); None for a fixed cluster."""
    node_shapes: tuple[dict[str, float], ...] = ()
    """Resources of each node type the autoscaler knows (one worker must fit on one node); empty when unknown."""
    source: str = ""
    """Where ``maximum`` was read (shown in messages)."""


@dataclass(frozen=True)
class Need:
    """What a job's workers ask for in total: ``num_workers`` bundles of ``bundle``."""

    num_workers: int
    bundle: dict[str, float]

    @property
    def total(self) -> dict[str, float]:
        return {k: v * self.num_workers for k, v in self.bundle.items()}

    def fits(self, res: dict[str, float]) -> bool:
        return all(_num(res, k) >= v for k, v in self.total.items())

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per worker, as ``request_resources(bundles=…)`` and Ray Train's placement group want them."""
        return [dict(self.bundle) for _ in range(self.num_workers)]


class Autoscaler(Protocol):
    """The three things check_resources does with an autoscaler (tests inject a fake)."""

    def request(self, bundles: list[dict[str, float]]) -> None:
        """Ask the cluster to grow until these bundles fit (replaces any earlier request)."""

    def release(self) -> None:
        """Withdraw the request so that idle nodes may be scaled down again."""

    def cluster_resources(self) -> dict[str, float]:
        """Total resources of the live nodes now."""


class RayAutoscaler:
    """Ray's autoscaler through ``ray.autoscaler.sdk.request_resources`` (v1 and v2 alike)."""

    def request(self, bundles: list[dict[str, float]]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)

    def release(self) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])

    def cluster_resources(self) -> dict[str, float]:
        import ray

        return dict(ray.cluster_resources())


def _from_gcs_cluster_config(now: dict[str, float]) -> Capacity | None:
    """Maximum from the ClusterConfig an autoscaler reported to the GCS; None when none (or an empty one) is there."""
    import ray._private.state as state

    config = state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    maximum = {k: (math.inf if v >= sys.maxsize else float(v))
               for k, v in (state.state.get_max_resources_from_cluster_config() or {}).items()}
    shapes = tuple({k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs
                   if g.max_count != 0 and g.resources)
    return Capacity(now=now, maximum=maximum, node_shapes=shapes, source="the autoscaler's cluster config in the GCS")


def maximum_from_autoscaling_config(raw: dict[str, Any]) -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
    """(totals at the maximum, node shapes) of an autoscaler config (the cluster.yaml format, resources filled in).

    The head node counts once; workers of each type up to its ``max_workers``, and all workers together up to the
    top-level ``max_workers``. Each resource's maximum is taken on its own (the largest nodes for that resource
    first), so it is an upper bound: a job above it can never fit; one below it is left to the autoscaler.
    """
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    cfg = AutoscalingConfig(raw, skip_content_hash=True)
    types = cfg.get_node_type_configs() or {}
    head = cfg.get_head_node_type()
    cap = cfg.get_max_num_worker_nodes()
    head_res = dict(types[head].resources) if head in types else {}
    # (resources, how many worker nodes of this shape may be launched); the head type's count includes the head.
    workers = [(dict(t.resources), t.max_worker_nodes - (1 if name == head else 0)) for name, t in types.items()]
    keys = {k for res, _ in workers for k in res} | set(head_res)
    maximum: dict[str, float] = {}
    for key in keys:
        total, left = float(head_res.get(key, 0)), (math.inf if cap is None else cap)
        for res, count in sorted(workers, key=lambda w: -float(w[0].get(key, 0))):
            take = min(count, left)
            total += take * float(res.get(key, 0))
            left -= take
        maximum[key] = total
    shapes = tuple(res for res, count in workers if res and count > 0) + ((head_res,) if head_res else ())
    return maximum, shapes


def _from_autoscaling_config_file(now: dict[str, float]) -> Capacity | None:
    import yaml

    explicit = os.environ.get(CONFIG_ENV)
    path = os.path.expanduser(explicit or BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        if explicit:
            raise ConfigError(f"{CONFIG_ENV}={explicit}: no such file (it must name the autoscaler's config YAML)")
        return None
    with open(path) as f:
        raw = yaml.safe_load(f)
    try:
        maximum, shapes = maximum_from_autoscaling_config(raw)
    except Exception as e:  # noqa: BLE001 — Ray's validation (jsonschema, asserts): name the file
        raise ConfigError(f"the autoscaler config {path} could not be read as one: {e}") from e
    unknown = sorted(name for name, t in raw.get("available_node_types", {}).items() if not t.get("resources"))
    note = f"; node types without resources there, counted as none: {', '.join(unknown)}" if unknown else ""
    return Capacity(now=now, maximum=maximum, node_shapes=shapes, source=path + note)


def detect_capacity(now: dict[str, float] | None = None) -> Capacity:
    """The connected cluster's Capacity: the GCS cluster config, else the autoscaler's config file, else fixed."""
    if now is None:
        now = RayAutoscaler().cluster_resources()
    found = _from_gcs_cluster_config(now) or _from_autoscaling_config_file(now)
    if found is None:
        return Capacity(now=now)
    # Nodes added by hand (``ray start --address``) count too: the maximum is never below what is there.
    maximum = {k: max(_num(found.maximum or {}, k), _num(now, k)) for k in {*now, *(found.maximum or {})}}
    return Capacity(now=now, maximum=maximum, node_shapes=found.node_shapes, source=found.source)


def wait_for_autoscaler(need: Need, capacity: Capacity, autoscaler: Autoscaler, *, timeout_s: float,
                        poll_s: float = 5.0) -> dict[str, float]:
    """Ask ``autoscaler`` for ``need``'s bundles and poll until the cluster's totals hold them; return those totals.

    Prints one line to stderr when it starts and one each time the totals change, so a user watching
    ``ray job logs -f`` sees why nothing happens yet. Raises ConfigError after ``timeout_s`` naming what was asked,
    what arrived and the timeout.

    The request is withdrawn (``request_resources(bundles=[])``) as soon as the resources are there, and on timeout:
    a request persists until replaced, so leaving it would keep the nodes up after the job ends. Between the
    withdrawal and Ray Train's placement group (seconds later) the new nodes are idle, far below the autoscaler's
    ``idle_timeout_minutes`` (10 in cluster.yaml); once the workers are placed the nodes are busy. One request
    stands for the whole cluster: two jobs waiting at the same time replace each other's request.
    """
    have = dict(capacity.now)
    print(f"llamaray: waiting up to {timeout_s:g} s for the autoscaler to add nodes: have {fmt(have)}, need "
          f"{fmt(need.total)} ({need.num_workers} worker(s) of {fmt(need.bundle)}; the autoscaler can reach "
          f"{fmt(capacity.maximum or {})}, from {capacity.source})", file=sys.stderr, flush=True)
    autoscaler.request(need.bundles())
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            now = autoscaler.cluster_resources()
            if need.fits(now):
                print(f"llamaray: the cluster now has {fmt(now)}; starting the workers", file=sys.stderr, flush=True)
                return now
            if fmt(now) != fmt(have):
                print(f"llamaray: the cluster has {fmt(now)} of {fmt(need.total)} needed; still waiting",
                      file=sys.stderr, flush=True)
                have = now
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"scaling: the autoscaler did not bring the cluster to {fmt(need.total)} within "
                    f"scaling.autoscale_timeout_s={timeout_s:g}: asked for {need.num_workers} bundle(s) of "
                    f"{fmt(need.bundle)}; the cluster has {fmt(now)} (had {fmt(capacity.now)} when asked). "
                    f"`ray status` and the autoscaler's log (monitor.* under /tmp/ray/session_latest/logs on the "
                    f"head) say why no node came (cloud quota, no capacity in the zone, a failing setup command)")
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    finally:
        autoscaler.release()
