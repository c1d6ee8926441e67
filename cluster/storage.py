"""Where a job's results go, and whether every node of the cluster can reach them.

A storage setting (``run.storage`` of pretrain/SFT/DPO, ``out`` of rejection sampling) is a path or a URI:

- an absolute path, or ``file:///abs/path``: that directory;
- a relative path in a normal shell: relative to the current directory, as always;
- a relative path inside a job started by ``ray job submit --working-dir …``: the job's current directory is Ray's
  unpacked copy of the working dir (``…/runtime_resources/working_dir_files/_ray_pkg_…``), which Ray deletes when
  it garbage-collects packages, so the path is resolved against ``$LLAMARAY_STORAGE`` (``cluster.yaml`` sets it on
  every node to the shared mount) or, when that is unset, ``~/llamaray`` — and the job says so on stderr;
- an object-store URI (``s3://bucket/runs``, ``gs://…``, ``abfs://…``, ``hdfs://…``: the schemes pyarrow's
  ``FileSystem.from_uri`` knows, query options such as ``?endpoint_override=host:port&scheme=http`` included; the
  credentials come from the usual environment, e.g. ``AWS_ACCESS_KEY_ID``/``AWS_ENDPOINT_URL``): pretrain, SFT, DPO
  and rejection sampling take it (``RunStore``); the jobs that read their inputs as plain local files (pipeline,
  rs-rounds, serve, export, import) refuse it with a ConfigError naming the job (``storage_dir``/``require_path``).

``RunStore`` is one run directory. For a path it IS the directory: ``local`` is it and ``upload``/``download`` do
nothing, so local runs behave exactly as before. For a URI, ``local`` is a staging copy on each node
(``$LLAMARAY_STAGING``, else ``~/.cache/llamaray/staging``, then ``<scheme>/<bucket>/<path>``): a process writes its
files there as usual and ``upload(sub)`` copies them to the URI; ``download(sub)`` brings what another node (or an
earlier driver) wrote. Both copy only files whose (size, mtime) differ and then give the local file the remote
mtime, so a tree that is in sync costs one listing; a local file is written under a temporary name and renamed
(readers see a whole file or none); deletions are not mirrored. Who moves what:

- the driver downloads ``data`` (and an SFT/DPO ``init``) before it prepares anything — a resumed run on a fresh disk
  finds its prepared data — and uploads what it prepared and ``config.json`` before the workers start;
- every Train worker downloads the inputs it reads as files (tokenizer, validation split, SFT/DPO rows and init);
  the pretraining split is read by Ray Data tasks straight from the URI (pyarrow reads ``s3://`` natively);
- rank 0 downloads ``metrics`` when it starts (the truth after a restart on any node), uploads it before every
  checkpoint/eval report and uploads the whole tree (metrics, report, ``hf/``, ``adapter/``) at the end;
- checkpoints never pass through the staging copy: Ray Train writes them to the URI (``RunConfig(storage_path=URI)``)
  and ``ray.train.get_checkpoint()`` brings the latest back after a restart or a new driver;
- rejection sampling (all its files are written by the driver) uploads each shard as soon as it is renamed into
  place, ``metrics.csv`` with it, and the selected files before ``manifest.json`` (last, as locally).

``check_shared(path_or_uri)`` proves, before any worker starts, that every alive node reaches the same storage: it
writes a marker (a file, or an object under the URI) on this node and a zero-CPU task pinned to each other node reads
it back. A node-local path (a laptop's /tmp, an instance's local disk) is refused naming the nodes that do not see
it; a URI that cannot be written here (no such bucket, no credentials, unreachable endpoint) is refused at once.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from core.config import ConfigError

STORAGE_ENV = "LLAMARAY_STORAGE"
"""Base directory for relative storage settings of submitted jobs (the cluster's shared mount)."""
STAGING_ENV = "LLAMARAY_STAGING"
"""Where each node keeps its staging copy of URI run directories (default ~/.cache/llamaray/staging)."""
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
"""Object-store schemes of pyarrow's FileSystem.from_uri (what Ray Train's storage_path takes)."""
URI_JOBS = "pretrain, sft, dpo and rs"
"""The jobs whose storage may be a URI."""


def is_uri(storage: str | Path) -> bool:
    """True for an object-store URI (``scheme://…`` other than ``file://``)."""
    s = str(storage).strip()
    return "://" in s and not s.startswith("file://")


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


def staging_base() -> Path:
    """Where this node stages URI run directories: $LLAMARAY_STAGING, else ~/.cache/llamaray/staging."""
    base = os.environ.get(STAGING_ENV)
    return Path(base).expanduser().resolve() if base else Path.home() / ".cache" / "llamaray" / "staging"


_announced: set[str] = set()


def require_path(value: str | Path, what: str, job: str) -> None:
    """ConfigError when ``value`` (an input or output of ``job`` that is read as local files) is an object-store URI."""
    if is_uri(value):
        scheme = str(value).split("://", 1)[0]
        raise ConfigError(
            f"{what}={str(value)!r}: llamaray {job} reads and writes this as plain files on every node, so it takes a "
            f"path, not a {scheme}:// URI (URIs work for the run storage of {URI_JOBS}). Copy it to a local "
            f"directory first (e.g. `aws s3 cp --recursive`, `gcloud storage cp -r`), or mount the bucket on every "
            f"node (s3fs, gcsfuse, EFS, Filestore) and give the mount's path")


def storage_dir(storage: str | Path, what: str = "run.storage", job: str = "") -> Path:
    """The absolute directory a storage PATH names (see the module docstring); ConfigError for a bad one.

    Object-store URIs are refused here, naming ``job``: the jobs that take them open a ``RunStore`` instead."""
    s = str(storage).strip()
    if not s:
        raise ConfigError(f"{what} is empty")
    if is_uri(s):
        require_path(s, what, job or "(this job)")
    if s.startswith("file://"):
        rest = s[len("file://"):]
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


def check_uri(uri: str, what: str = "run.storage") -> str:
    """``uri`` without a trailing slash if pyarrow knows its object-store scheme, else ConfigError (no network)."""
    parts = urlsplit(str(uri).strip())
    if parts.scheme not in URI_SCHEMES:
        raise ConfigError(f"{what}={uri!r}: unknown storage scheme {parts.scheme + '://'!r}; give a path, a file:// "
                          f"URI or an object-store URI ({', '.join(s + '://' for s in URI_SCHEMES)})")
    if not parts.netloc:
        raise ConfigError(f"{what}={uri!r}: no bucket (or host) in the URI, e.g. {parts.scheme}://bucket/runs")
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def uri_join(uri: str, sub: str) -> str:
    """``uri`` + ``/sub``, keeping the URI's query (pyarrow's ``?endpoint_override=…`` options) at the end."""
    if not sub:
        return uri
    p = urlsplit(uri)
    return urlunsplit(p._replace(path=p.path.rstrip("/") + "/" + str(sub).strip("/")))


@lru_cache(maxsize=32)
def _filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow (filesystem, path) of a URI, once per process (S3 may ask the endpoint for the bucket's region)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _fs_path(uri: str) -> tuple[Any, str]:
    p = urlsplit(uri)
    fs, root = _filesystem(urlunsplit(p._replace(path="")))  # one filesystem per bucket and options
    return fs, f"{root.rstrip('/')}/{p.path.strip('/')}".rstrip("/") or "/"  # s3: bucket/key; hdfs: /path


def resolve(address: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of a file address: a URI's filesystem, or (None, the path) for a local path —
    ``pq.read_table(path, filesystem=fs)`` reads either."""
    return _fs_path(str(address)) if is_uri(address) else (None, str(address))


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith(".tmp")  # temporary files of atomic writes


@dataclass(frozen=True)
class RunStore:
    """One run directory: ``local`` where this process reads and writes its files, ``uri`` where it lives.

    With ``uri`` empty ``local`` is the storage itself and ``upload``/``download`` do nothing. Picklable: the driver
    opens it and sends it to the Train workers, which stage it under the same ``local`` path on their own node."""

    local: Path
    """The directory this process uses (the run directory itself, or its staging copy for a URI)."""
    uri: str = ""
    """The run directory's URI ("" for a path)."""

    @classmethod
    def open(cls, storage: str | Path, name: str = "", what: str = "run.storage") -> RunStore:
        """The run ``name`` under ``storage`` (a path or URI; ``name`` empty: ``storage`` itself). No network."""
        if not is_uri(storage):
            d = storage_dir(storage, what)
            return cls(d / name if name else d)
        uri = uri_join(check_uri(str(storage), what), name)
        p = urlsplit(uri)
        return cls(staging_base() / p.scheme / p.netloc / p.path.strip("/"), uri)

    def location(self, sub: str = "") -> str:
        """Where ``sub`` of the run lives, as the user names it: a URI, or the local path."""
        return uri_join(self.uri, sub) if self.uri else str(self.local / sub)

    def location_of(self, path: str | Path) -> str:
        """``location`` of a local path inside ``local``; any other path as it is."""
        p = Path(path)
        if p.is_absolute() and p.is_relative_to(self.local):
            rel = p.relative_to(self.local).as_posix()
            return self.location("" if rel == "." else rel)
        return str(path)

    def ray_storage_path(self) -> str:
        """``RunConfig(storage_path=…)`` for Ray Train, whose run name is the last component of this directory."""
        if not self.uri:
            return str(self.local.parent)
        p = urlsplit(self.uri)
        return urlunsplit(p._replace(path=p.path.rsplit("/", 1)[0]))

    def files(self, sub: str, pattern: str = "part-*.parquet") -> list[str]:
        """Sorted addresses of the files in ``sub`` matching ``pattern``: local paths, or URIs that pyarrow (and so a
        Ray Data task on any node) opens as they are."""
        if not self.uri:
            return sorted(str(p) for p in (self.local / sub).glob(pattern))
        import pyarrow.fs as pafs

        fs, base = _fs_path(self.location(sub))
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        return sorted(self.location(f"{sub}/{Path(i.path).name}") for i in infos
                      if i.is_file and fnmatch.fnmatch(Path(i.path).name, pattern))

    def read_text(self, sub: str) -> str | None:
        """The file ``sub`` as text, None when it does not exist (yet)."""
        return read_text_at(self.location(sub))

    def upload(self, *paths: str | Path | None) -> None:
        """Copy ``paths`` (subpaths of the run or local paths inside ``local``; none = everything) to the URI."""
        for sub in self._subs(paths):
            self._sync(sub, up=True)

    def download(self, *paths: str | Path | None) -> None:
        """Bring ``paths`` (as for upload) from the URI into ``local``; what the URI lacks is left alone."""
        for sub in self._subs(paths):
            self._sync(sub, up=False)

    def _subs(self, paths: tuple[str | Path | None, ...]) -> list[str]:
        """The run-relative subpaths of ``paths``; paths outside the run (a user's own tokenizer or init) are theirs
        to share and are skipped. Nothing for a path store."""
        if not self.uri:
            return []
        if not paths:
            return [""]
        subs = []
        for p in paths:
            if p is None:
                continue
            p = Path(p)
            if not p.is_absolute():
                subs.append(p.as_posix())
            elif p.is_relative_to(self.local):
                rel = p.relative_to(self.local).as_posix()
                subs.append("" if rel == "." else rel)
        return subs

    def _sync(self, sub: str, *, up: bool) -> None:
        """Copy the file or tree ``sub`` one way, skipping files whose (size, mtime) already match; afterwards the
        local file carries the remote mtime, so the next sync in either direction skips it."""
        import pyarrow.fs as pafs

        here = pafs.LocalFileSystem()
        remote_fs, remote = _fs_path(self.location(sub))
        local = str(self.local / sub) if sub else str(self.local)
        src_fs, src, dst_fs, dst = (here, local, remote_fs, remote) if up else (remote_fs, remote, here, local)
        top = src_fs.get_file_info(src)
        if top.type == pafs.FileType.NotFound:
            return
        if top.type == pafs.FileType.File:
            todo = {"": top}
            have = {"": dst_fs.get_file_info(dst)}
        else:
            todo = {i.path[len(src.rstrip("/")) + 1:]: i for i in
                    src_fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.is_file}
            have = {i.path[len(dst.rstrip("/")) + 1:]: i for i in
                    dst_fs.get_file_info(pafs.FileSelector(dst, recursive=True, allow_not_found=True)) if i.is_file}
        for rel, s in sorted(todo.items()):
            if any(_skipped(part) for part in rel.split("/")):
                continue
            d = have.get(rel)
            if d is not None and d.is_file and d.size == s.size and d.mtime_ns == s.mtime_ns:
                continue
            target = f"{dst.rstrip('/')}/{rel}" if rel else dst
            if up:
                pafs.copy_files(s.path, target, source_filesystem=here, destination_filesystem=remote_fs)
                stamp = remote_fs.get_file_info(target).mtime_ns
                if stamp is not None:
                    os.utime(s.path, ns=(stamp, stamp))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
                pafs.copy_files(s.path, tmp, source_filesystem=remote_fs, destination_filesystem=here)
                if s.mtime_ns is not None:
                    os.utime(tmp, ns=(s.mtime_ns, s.mtime_ns))
                os.replace(tmp, target)  # atomic: a reader on this node sees the whole file or the old one


def read_text_at(address: str) -> str | None:
    """The file at a local path or URI as text; None when it does not exist (or is not a readable file)."""
    try:
        if is_uri(address):
            fs, p = _fs_path(address)
            with fs.open_input_stream(p) as f:
                return f.read().decode()
        return Path(address).read_text()
    except OSError:  # FileNotFoundError, IsADirectoryError included
        return None


def _write_marker(path: str, token: str) -> None:
    if is_uri(path):
        fs, p = _fs_path(path)
        with fs.open_output_stream(p) as f:
            f.write(token.encode())
    else:
        Path(path).write_text(token)


def _remove_marker(path: str) -> None:
    try:
        if is_uri(path):
            fs, p = _fs_path(path)
            fs.delete_file(p)
        else:
            Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def check_shared(path: str | Path, what: str = "run.storage") -> None:
    """Refuse (ConfigError) storage that some alive node of the cluster does not reach: a path or a URI.

    Needs a connected Ray. A path on one node: only makes sure the directory can be created. A URI: a marker object
    is written (and removed) here even on one node — a missing bucket, missing credentials or an unreachable
    endpoint fail now, before any worker starts. On several nodes a zero-CPU task pinned to each other node
    (soft=False) reads the marker back: an NFS/EFS mount or a bucket passes, a node-local disk does not (nor a node
    without the bucket's credentials). Nodes that cannot run the probe within 60 s are reported too.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    uri = is_uri(path)
    name = f".llamaray-shared-{uuid.uuid4().hex[:12]}"
    if uri:
        root = check_uri(str(path), what)
        marker = uri_join(root, name)
    else:
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{what}: cannot create {root}: {e}") from e
        marker = str(root / name)
    me = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != me]
    if not others and not uri:
        return
    token = uuid.uuid4().hex
    try:
        _write_marker(marker, token)
    except OSError as e:
        raise ConfigError(f"{what}={root}: cannot write there from this node ({e}). Check that the bucket exists, "
                          f"the credentials (AWS_ACCESS_KEY_ID/…, GOOGLE_APPLICATION_CREDENTIALS, an instance role) "
                          f"and, for an S3-compatible store, the endpoint (AWS_ENDPOINT_URL or "
                          f"?endpoint_override=host:port&scheme=http)") from e
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(read_text_at)
        refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                          ).remote(marker) for n in others}
        blind = []
        for node_id, ref in refs.items():
            try:
                seen = ray.get(ref, timeout=60)
            except Exception as e:  # noqa: BLE001 — a node that cannot answer cannot be trusted with the run
                seen = f"<no answer: {type(e).__name__}>"
            if seen != token:
                blind.append(node_id[:12])
    finally:
        _remove_marker(marker)
    if blind and uri:
        raise ConfigError(
            f"{what}: {root} is not reachable from {len(blind)} of the cluster's {len(others) + 1} nodes (node ids "
            f"{', '.join(blind)}): they cannot read an object written there from this node. Every worker reads and "
            f"writes the run there: give every node the bucket's credentials and network route (instance role, "
            f"AWS_*/GOOGLE_* variables in the runtime env)")
    if blind:
        raise ConfigError(
            f"{what}: {root} is not shared storage — {len(blind)} of the cluster's {len(others) + 1} nodes "
            f"(node ids {', '.join(blind)}) do not see files written to it on this node. Checkpoints, data and "
            f"exports must be readable by every worker, rollout actor and replica: use a path on a filesystem every "
            f"node mounts (NFS, EFS, Filestore, a mounted bucket; cluster.yaml shows one), an object-store URI "
            f"(s3://, gs://; for {URI_JOBS}) or set ${STORAGE_ENV}")
