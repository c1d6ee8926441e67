"""A real multi-node Ray cluster on this machine, for tests: ``ray start --head`` plus more ``ray start --address``
nodes, each its own raylet process group, with Ray's token authentication on.

Every node listens on 127.0.0.1 only, on ports picked free for this cluster (so two clusters never collide), and
shares a token file written for the cluster (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``): the same settings a
user's shell needs for ``ray job submit`` / ``serve deploy`` (see the README's "On a cluster"). A node may get a
private directory (``private=``): it is started in its own mount namespace with a tmpfs over that path, so the path
is node-local for real, as a laptop's /tmp is on a cloud cluster. ``kill_node`` SIGKILLs a node's whole process group
(raylet, object store, workers): a node loss, not a clean shutdown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_make_private_mounts() -> bool:
    """Whether this machine lets us start a node in its own mount namespace (root + util-linux ``unshare``)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


def _kill_session(sid: int) -> None:
    """SIGKILL every process whose session id is ``sid``."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    os.kill(int(d.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """Head + worker nodes as real Ray processes; ``env`` is what a client needs to reach it (token auth on)."""

    def __init__(self, root: Path, *, head_cpus: int = 1, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / "auth_token"
        token.write_text(uuid.uuid4().hex)
        self.port = free_port()
        self.dashboard_port = free_port()
        # each node its own Ray temp dir, as each machine of a real cluster has: nodes sharing one session dir share
        # runtime_resources/, and one node's runtime-env agent then deletes a working-dir package that a job on
        # another node runs in. Short paths: Ray's unix sockets live under it (~107-character limit).
        self.temp_root = Path(f"/tmp/lrc-{self.port}")
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self._node_env = {**os.environ, **self.env, **(env or {}), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                          "RAY_USAGE_STATS_ENABLED": "0",
                          # a dead node is noticed in ~3 s instead of ~30 s (GCS health checks of raylets)
                          "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                          "RAY_health_check_timeout_ms": "1000"}
        self._node_env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []
        self._saved_env: dict[str, str | None] = {}
        self.head = self._start("head", head_cpus, {"head": 1.0}, head=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, num_cpus: int, resources: dict[str, float], *, head: bool = False,
               private: Path | None = None, env: dict[str, str] | None = None) -> Node:
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               "--num-gpus=0", f"--resources={json.dumps(resources)}", "--disable-usage-stats",
               f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--temp-dir={self.temp_root / name}"]
        if head:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        if private is not None:
            private.mkdir(parents=True, exist_ok=True)
            inner = f"mount -t tmpfs tmpfs {private} && exec {subprocess.list2cmdline(cmd)}"
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**self._node_env, **(env or {})})
        node = Node(name, proc, log, num_cpus, resources)
        self.nodes.append(node)
        self._wait_for(lambda: name in (self._alive_names() or []), f"node {name} to join", node, 180)
        return node

    def add_node(self, name: str, *, num_cpus: int = 1, private: Path | None = None,
                 env: dict[str, str] | None = None) -> Node:
        """Start one more node; its custom resource ``{name: 1}`` lets a test place work on it. Ray gives a new
        raylet 30 s to register with the GCS, which 2 busy cores can exceed (twice in a row with two test modules
        running at once on a loaded box): a node that gave up is started again, up to three tries."""
        tries = 3
        for attempt in range(1, tries + 1):
            try:
                return self._start(name, num_cpus, {name: 1.0}, private=private, env=env)
            except RuntimeError:
                if attempt == tries:
                    raise
                self.nodes = [n for n in self.nodes if n.alive]

    def _alive_names(self) -> list[str] | None:
        """Custom resource names of the nodes GCS counts as alive (via ``ray list nodes``: no driver needed), or
        None when the query gave no answer. A query that hangs or fails is "unknown", neither "joined" nor "dead":
        while the head's dashboard is still starting on a loaded box, ``ray list`` has hung past 60 s (CI, stop 19)
        — the caller's deadline decides, not one query."""
        try:
            r = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format=json", f"--address={self.address}",
                                "--filter", "state=ALIVE", "--detail"], capture_output=True, text=True,
                               env=self._node_env, timeout=30)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            rows = json.loads(r.stdout)
        except json.JSONDecodeError:
            return None
        names = []
        for row in rows:
            res = row.get("resources_total") or {}
            names += [k for k in res if k == "head" or any(k == n.name for n in self.nodes)]
        return names

    def _wait_for(self, cond, what: str, node: Node | None, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node is not None and not node.alive:
                raise RuntimeError(f"{what}: the process exited; log:\n{node.log.read_text()[-8000:]}")
            if cond():
                return
            time.sleep(1.0)
        log = node.log.read_text()[-3000:] if node else ""
        raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{log}")

    def kill_node(self, node: Node, *, wait_dead: bool = True) -> None:
        """A machine loss: SIGKILL every process of the node's session (``ray start`` was started as a session
        leader): raylet, object store and its Ray workers, which Ray puts in process groups of their own — killing
        only the node's process group left a Serve replica answering for ~1-2 s."""
        _kill_session(node.proc.pid)
        node.proc.wait(timeout=30)
        if wait_dead:
            self._wait_for(lambda: node.name not in (self._alive_names() or [node.name]),  # no answer: not yet dead
                           f"GCS to mark {node.name} dead", None, 90)

    def client_env(self) -> dict[str, str]:
        """Environment of a client shell: RAY_ADDRESS + the token settings (what the README tells users)."""
        return {**os.environ, **self.env, "RAY_ADDRESS": self.dashboard_url,
                "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}

    def job_client(self):
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader
        from ray.job_submission import JobSubmissionClient

        # the SDK reads the token settings from this process's environment, cached at import: refresh the cache
        self._saved_env = self._saved_env or {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        _enable_token_auth()
        AuthenticationTokenLoader.instance().reset_cache()
        return JobSubmissionClient(self.dashboard_url)

    def wait_job(self, client, job_id: str, timeout: float) -> str:
        from ray.job_submission import JobStatus

        deadline = time.time() + timeout
        while time.time() < deadline:
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(status.value)
            time.sleep(2.0)
        client.stop_job(job_id)
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s; logs:\n"
                           f"{client.get_job_logs(job_id)[-4000:]}")

    def shutdown(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._saved_env:  # the token loader caches the token it read: drop this cluster's, or a later local
            from ray._raylet import AuthenticationTokenLoader  # ray.init sends it to a GCS with another token

            AuthenticationTokenLoader.instance().reset_cache()
        for node in reversed(self.nodes):
            _kill_session(node.proc.pid)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_root, ignore_errors=True)

    def package_dirs(self) -> list[Path]:
        """The unpacked ``--working-dir`` packages of submitted jobs, on every node."""
        return list(self.temp_root.glob("*/session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
