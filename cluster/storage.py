"""Where a job's results go, and whether every node of the cluster can see them.

``storage_dir(s)`` turns a job's ``run.storage`` (or ``out``) setting into the absolute directory it will write:

- an absolute path, or ``file:///abs/path``: that path;
- a relative path in a normal shell: relative to the current directory, as always;
- a relative path inside a job started by ``ray job submit --working-dir …``: the job's current directory is Ray's
  unpacked copy of the working dir (``…/runtime_resources/working_dir_files/_ray_pkg_…``), which Ray deletes when
  it garbage-collects packages, so the path is resolved against ``$LLAMARAY_STORAGE`` (``cluster.yaml`` sets it on
  every node to the shared mount) or, when that is unset, ``~/llamaray`` — and the job says so on stderr;
- an object-store URI (``s3://``, ``gs://``, …): refused with a clear message for now. The jobs write their run
  directories (metrics, reports, exports, RS shards, prepared data) as plain files that Ray Train workers, rollout
  actors and Serve replicas on other nodes read back; mount the bucket on every node instead (s3fs, gcsfuse, EFS,
  Filestore) and give the mount's path.

``check_shared(path)`` proves, before any worker starts, that every alive node of a multi-node cluster sees the same
directory: it writes a marker file on this node and a zero-CPU task pinned to each other node reads it back. A
node-local path (a laptop's /tmp, an instance's local disk) is refused naming the nodes that do not see it.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from model.llama import ConfigError

STORAGE_ENV = "LLAMARAY_STORAGE"
"""Base directory for relative storage settings of submitted jobs (the cluster's shared mount)."""


def ray_package_dir(cwd: Path | None = None) -> Path | None:
    """The unpacked ``--working-dir`` package this process runs in (a submitted job), or None."""
    cwd = Path.cwd() if cwd is None else cwd
    parts = cwd.resolve().parts
    for i in range(len(parts) - 1):
        if parts[i] == "runtime_resources" and parts[i + 1] in ("working_dir_files", "py_modules_files"):
            return Path(*parts[: i + 3]) if len(parts) > i + 2 else None
    return None


def durable_base() -> Path:
    """Where relative storage of a submitted job goes: $LLAMARAY_STORAGE, else ~/llamaray."""
    base = os.environ.get(STORAGE_ENV)
    return Path(base).expanduser() if base else Path.home() / "llamaray"


_announced: set[str] = set()


def storage_dir(storage: str | Path, what: str = "run.storage") -> Path:
    """The absolute directory a storage setting names (see the module docstring); ConfigError for a bad one."""
    s = str(storage).strip()
    if not s:
        raise ConfigError(f"{what} is empty")
    if "://" in s:
        scheme, rest = s.split("://", 1)
        if scheme != "file":
            raise ConfigError(
                f"{what}={s!r}: {scheme}:// storage is not supported for llamaray run directories (metrics, reports, "
                f"exports and RS shards are written as files that workers, rollout actors and Serve replicas on "
                f"other nodes read back). Mount the bucket on every node (s3fs, gcsfuse, EFS, Filestore) and give "
                f"the mount's path, e.g. {what}=/mnt/shared/runs")
        if not rest.startswith("/"):
            raise ConfigError(f"{what}={s!r}: a file:// URI needs an absolute path (file:///abs/path)")
        return Path(rest)
    p = Path(s).expanduser()
    if p.is_absolute():
        return p
    pkg = ray_package_dir()
    if pkg is None:
        return p.resolve()
    out = durable_base() / p
    if str(out) not in _announced:
        _announced.add(str(out))
        print(f"llamaray: {what}={s!r} is relative and this job runs in Ray's working-dir package ({pkg}), which Ray "
              f"deletes; writing to {out} instead (${STORAGE_ENV} or ~/llamaray)", file=sys.stderr, flush=True)
    return out


def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def check_shared(path: str | Path, what: str = "run.storage") -> None:
    """On a multi-node cluster, refuse ``path`` unless every alive node sees the same directory (ConfigError).

    Needs a connected Ray; on one node it only makes sure the directory can be created. The probe is a marker file
    written here and read by a zero-CPU task pinned to each other node (soft=False): an NFS/EFS mount passes, a
    node-local disk does not. Nodes that cannot run the probe within 60 s are reported too.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}: cannot create {root}: {e}") from e
    me = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != me]
    if not others:
        return
    marker = root / f".llamaray-shared-{uuid.uuid4().hex[:12]}"
    token = uuid.uuid4().hex
    marker.write_text(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                          ).remote(str(marker)) for n in others}
        blind = []
        for node_id, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=60)
            except Exception as e:  # noqa: BLE001 — a node that cannot answer cannot be trusted with the run
                seen = f"<no answer: {type(e).__name__}>"
            if seen != token:
                blind.append(node_id[:12])
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"{what}: {root} is not shared storage — {len(blind)} of the cluster's {len(others) + 1} nodes "
            f"(node ids {', '.join(blind)}) do not see files written to it on this node. Checkpoints, data and "
            f"exports must be readable by every worker, rollout actor and replica: use a path on a filesystem every "
            f"node mounts (NFS, EFS, Filestore, a mounted bucket; cluster.yaml shows one) or set ${STORAGE_ENV}")
