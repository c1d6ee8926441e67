"""Multi-replica behaviour of the Serve deployment: API key, overload, a killed replica, autoscaling.

These use the reference engine (``actors/engines/reference.py::ReferenceEngine``, the plain-PyTorch sampler in a thread):
2 cores and the memory left here cannot host several vLLM replicas (each is an engine-core process plus a KV cache
and a ~35–50 s start), while what is tested — Serve's routing, back-pressure, replica replacement and autoscaling
around our deployment class — is the same whatever engine a replica holds. The vLLM path is test_serve.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve import free_port, http  # same folder; pytest puts it on sys.path

from bench.serve import build_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig, ScalingConfig
    from jobs.serve import ServeJobConfig

    model = build_tiny_checkpoint(tmp_path_factory.mktemp("scaling") / "ckpt", n_layers=4)
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    base = ServeJobConfig(model=str(model), port=port, request_timeout_s=60,
                          llm=LLMConfig(engine="reference", engine_options=EngineOptions(num_threads=1)),
                          scaling=ScalingConfig(num_cpus=1, health_check_period_s=1.0,
                                                graceful_shutdown_timeout_s=5.0))
    try:
        yield {"base": base, "port": port, "model": model}
    finally:
        serve.shutdown()
        ray.shutdown()


def app_config(cluster, name: str, *, llm: dict | None = None, **scaling):
    base = cluster["base"]
    return dataclasses.replace(base, app_name=name, route_prefix=f"/{name}",
                               llm=dataclasses.replace(base.llm, **(llm or {})),
                               scaling=dataclasses.replace(base.scaling, **scaling))


def deploy_app(cluster, name: str, *, llm: dict | None = None, **scaling) -> str:
    from jobs.serve import deploy

    return deploy(app_config(cluster, name, llm=llm, **scaling))


def replicas(app: str) -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[app].deployments["LLMServer"].replica_states)


def replica_actor_names(app: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


def delete(app: str) -> None:
    from ray import serve

    serve.delete(app)


def test_api_key(cluster):
    from openai import AuthenticationError, OpenAI

    url = deploy_app(cluster, "secure", llm={"api_key": "sk-test-0123456789"})
    try:
        for headers in ({}, {"Authorization": "Bearer wrong-key-000"}):
            status, err, hdrs = http("POST", f"{url}/v1/completions", {"prompt": "a"}, headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", err
            assert http("GET", f"{url}/v1/models", None, headers)[0] == 401
        assert http("GET", f"{url}/health")[0] == 200  # liveness probes need no key
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="nope-nope-nope", max_retries=0).models.list()
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-test-0123456789", max_retries=0)
        assert client.models.list().data[0].id == "secure"
        assert client.completions.create(model="secure", prompt="cat", max_tokens=3).usage.completion_tokens >= 1
        many = client.completions.create(model="secure", prompt="cat", max_tokens=8, n=3, temperature=1.0)
        assert len({c.text for c in many.choices}) > 1  # n choices are independent samples, not copies
    finally:
        delete("secure")


def test_overload_is_answered_fast_and_accepted_requests_complete(cluster):
    url = deploy_app(cluster, "overload", max_ongoing_requests=1, max_queued_requests=1, overload_status=429,
                     retry_after_s=2.0)
    try:
        body = {"prompt": "one two", "max_tokens": 400, "temperature": 0}

        def one(_):
            t0 = time.perf_counter()
            status, resp, headers = http("POST", f"{url}/v1/completions", body, timeout=120)
            return status, resp, headers, time.perf_counter() - t0

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(10)))
        ok = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] == 429]
        assert len(ok) + len(rejected) == 10, [r[:2] for r in results if r[0] not in (200, 429)]
        assert 1 <= len(ok) <= 4 and len(rejected) >= 6, (len(ok), len(rejected))
        slowest_ok = max(r[3] for r in ok)
        assert all(r[3] < min(2.0, slowest_ok / 2) for r in rejected), ([r[3] for r in rejected], slowest_ok)
        assert all(r[2].get("retry-after") == "2" for r in rejected)
        assert all(r[1]["usage"]["completion_tokens"] == 400 for r in ok)
        assert http("GET", f"{url}/health")[0] == 200
    finally:
        delete("overload")


def test_killed_replica_is_replaced_and_retrying_client_completes(cluster):
    import ray
    from openai import OpenAI

    url = deploy_app(cluster, "kill", min_replicas=2, max_replicas=2)
    try:
        before = replica_actor_names("kill")
        assert len(before) == 2
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=8, timeout=60)
        victim = sorted(before)[0]
        done: list[int] = []

        def one(i: int) -> int:
            n = client.completions.create(model="kill", prompt=f"dog {i}", max_tokens=60, temperature=0
                                          ).usage.completion_tokens
            done.append(i)
            return n

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            while len(done) < 4:
                time.sleep(0.05)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            results = [f.result() for f in futures]
        assert len(results) == 24 and all(n == 60 for n in results)
        deadline = time.monotonic() + 90
        while not (replicas("kill").get("RUNNING") == 2 and victim not in replica_actor_names("kill")
                   and len(replica_actor_names("kill")) == 2):
            assert time.monotonic() < deadline, (replicas("kill"), replica_actor_names("kill"))
            time.sleep(0.5)
        assert client.completions.create(model="kill", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    finally:
        delete("kill")


def scale_up_under_load_then_down(app: str, url: str, *, clients: int, max_tokens: int, replicas_under_load: int,
                                  while_up=None) -> None:
    """``clients`` threads stream completions of ``max_tokens`` back to back until ``replicas_under_load`` replicas
    run (``while_up()`` is then called, still under load); the load stops and the app must return to one replica."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=3, timeout=60)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.completions.create(model=app, prompt="sky", max_tokens=max_tokens, temperature=0)

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120  # a replica start takes seconds on a quiet box, ~60 s on a loaded one
        while replicas(app).get("RUNNING", 0) < replicas_under_load:
            assert time.monotonic() < deadline, f"never scaled up: {replicas(app)}"
            time.sleep(0.5)
        if while_up is not None:
            while_up()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    deadline = time.monotonic() + 90
    while replicas(app) != {"RUNNING": 1}:
        assert time.monotonic() < deadline, f"never scaled down: {replicas(app)}"
        time.sleep(0.5)


def test_autoscaling_up_under_load_and_down_when_idle(cluster):
    url = deploy_app(cluster, "auto", min_replicas=1, max_replicas=3, target_ongoing_requests=1.0,
                     upscale_delay_s=1.0, downscale_delay_s=4.0, metrics_interval_s=0.5)
    try:
        assert replicas("auto") == {"RUNNING": 1}
        scale_up_under_load_then_down("auto", url, clients=4, max_tokens=100, replicas_under_load=2)
    finally:
        delete("auto")


def test_engine_load_signal_scales_up_long_requests(cluster):
    """Two long requests in flight: Serve's own signal (target 8 ongoing requests) would keep one replica; the
    engine_load signal counts their tokens (~2 × 200 against a target of 150 per replica) and adds one, then
    goes back to one replica when idle."""
    url = deploy_app(cluster, "tokens", min_replicas=1, max_replicas=2, signal="engine_load",
                     target_engine_load=150, target_ongoing_requests=8, upscale_delay_s=1.0, downscale_delay_s=3.0,
                     metrics_interval_s=0.5)

    def health_reports_the_load():
        status, health, _ = http("GET", f"{url}/health")
        assert status == 200 and set(health["load"]) == {"running", "waiting", "pending_tokens",
                                                         "kv_cache_usage"}, health

    try:
        scale_up_under_load_then_down("tokens", url, clients=2, max_tokens=200, replicas_under_load=2,
                                      while_up=health_reports_the_load)
    finally:
        delete("tokens")


def test_metrics_reach_prometheus(cluster):
    """Request count, latency, TTFT, tokens/s and queue depth are exported through Ray's metrics agent."""
    import ray
    from openai import OpenAI

    url = deploy_app(cluster, "metrics")
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            list(client.completions.create(model="metrics", prompt="a", max_tokens=5, stream=True))
        port = ray._private.worker.global_worker.node.metrics_export_port
        want = ["llamaray_requests_total", "llamaray_request_latency_s", "llamaray_ttft_s", "llamaray_tokens_per_s",
                "llamaray_ongoing_requests"]
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            missing = [m for m in want if m not in text]
            if not missing:
                break
            assert time.monotonic() < deadline, f"metrics never exported: {missing}"
            time.sleep(1)
        assert 'endpoint="completions"' in text
    finally:
        delete("metrics")


def test_failed_promote_keeps_serving_the_old_model(cluster, tmp_path):
    """A corrupt model.safetensors is refused before the redeploy (a rolling update to replicas that cannot start
    would leave the application DEPLOY_FAILED): promote reports it and the old model keeps answering."""
    import shutil

    from actors.engines import model_hash
    from jobs.promote import promote
    from core.config import ConfigError

    cfg = app_config(cluster, "keep")
    url = deploy_app(cluster, "keep")
    try:
        bad = tmp_path / "bad"
        shutil.copytree(cluster["model"], bad)
        (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        with pytest.raises(ConfigError, match="model.safetensors: not a readable safetensors file"):
            promote(dataclasses.replace(cfg, model=str(bad)), settle_s=15)
        status, body, _ = http("GET", f"{url}/v1/models")
        assert status == 200 and body["data"][0]["hash"] == model_hash(cluster["model"])
        status, body, _ = http("POST", f"{url}/v1/completions", {"prompt": "cat", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    finally:
        delete("keep")


def test_serve_config_file_is_valid_for_serve_deploy(tmp_path):
    """serve_config.yaml parses with Ray's own schema and its application builds (no cluster needed)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from actors.server import app_builder

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "actors.server:app_builder" and schema.http_options.host == "0.0.0.0"
    built = app_builder(app.args)
    opts = built._bound_deployment._deployment_config
    assert opts.user_config == {"model_dir": str(Path(app.args["model"]).resolve())}
    assert opts.autoscaling_config.max_replicas == 8 and opts.max_queued_requests == 256
    (override,) = app.deployments  # the in-place promote path: a deployment-level user_config override
    assert override.name == built._bound_deployment.name == "LLMServer"
    assert set(override.user_config) == {"model_dir"}
    with pytest.raises(ValueError, match="args.model"):
        app_builder({"llm": {}})
    with pytest.raises(ValueError, match="max_replica"):
        app_builder({"model": "/x", "scaling": {"max_replica": 2}})


def test_serve_job_rejects_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    from jobs.serve import main

    (tmp_path / "config.json").write_text("{")
    assert main(["--config", "serve-tiny", "--model", str(tmp_path)]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err
    assert main(["--config", "serve-tiny", "--model", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["--config", "serve-tiny", "--model", str(tmp_path), "--set", "scaling.overload_status=418"]) == 2
    assert "overload_status must be 503 or 429" in capsys.readouterr().err
