"""A deployment without a running replica answers 503 + Retry-After at once instead of holding requests.

Ray Serve parks a request for as long as no replica exists; ``scaling.no_replica_timeout_s`` bounds that wait
(``actors/serve_router.py``). One replica (min_replicas 1) is killed and its replacement takes ~10 s to load
(``tests/slow_start_engine.py``, standing in for vLLM's ≈45 s): requests meanwhile get a fast 503 with
Retry-After, and the service answers again once the new replica runs. With ``no_replica_timeout_s: null`` (Serve's
own behaviour) the first request would hang until the replacement is up, and the test fails.
"""

from __future__ import annotations

import shutil
import time

import pytest
from test_serve import free_port, http  # same folder; pytest puts it on sys.path

from actors.serve_config import ScalingConfig
from bench.serve import build_tiny_checkpoint
from core.config import ConfigError


def test_no_replica_timeout_is_validated():
    assert ScalingConfig().no_replica_timeout_s == 1.0
    assert ScalingConfig(no_replica_timeout_s=None).no_replica_timeout_s is None
    with pytest.raises(ConfigError, match="no_replica_timeout_s"):
        ScalingConfig(no_replica_timeout_s=-1)
    with pytest.raises(ConfigError, match="max_surge_percent"):  # the promote's way of never having no replica
        ScalingConfig(max_surge_percent=101)


def kill_the_replica(app: str) -> None:
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{app}#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_only_replica_gives_fast_503_then_recovers(tmp_path):
    import ray
    from ray import serve

    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig
    from jobs.serve import ServeJobConfig, deploy
    from tests.slow_start_engine import MARKER, SlowStartEngine

    model = tmp_path / "ckpt"
    shutil.copytree(build_tiny_checkpoint(tmp_path / "tiny", n_layers=2), model)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ServeJobConfig(model=str(model), port=free_port(), app_name="lone", route_prefix="/lone",
                             request_timeout_s=120,
                             llm=LLMConfig(engine="reference", engine_options=EngineOptions(num_threads=1)),
                             scaling=ScalingConfig(num_cpus=1, health_check_period_s=1.0, retry_after_s=3,
                                                   graceful_shutdown_timeout_s=2.0))
        url = deploy(cfg, engine_cls=SlowStartEngine)
        body = {"prompt": "cat", "max_tokens": 2}
        assert http("POST", f"{url}/v1/completions", body)[0] == 200

        (model / MARKER).write_text("10")  # the replacement replica loads for 10 s
        kill_the_replica("lone")
        for _ in range(2):  # the first waits no_replica_timeout_s (1 s), the next is answered at once
            t0 = time.perf_counter()
            status, resp, headers = http("POST", f"{url}/v1/completions", body, timeout=120)
            elapsed = time.perf_counter() - t0
            assert status == 503, (status, resp, elapsed)
            assert headers.get("retry-after") == "3" and "No replica" in resp["raw"], (headers, resp)
            assert elapsed < 4.0, elapsed

        deadline = time.monotonic() + 120
        while (status := http("POST", f"{url}/v1/completions", body, timeout=120)[0]) != 200:
            assert status == 503 and time.monotonic() < deadline, status
            time.sleep(0.5)
        assert http("GET", f"{url}/health")[0] == 200
    finally:
        serve.shutdown()
        ray.shutdown()


def test_router_fails_waiting_requests_once_the_last_replica_goes(monkeypatch):
    """The router alone (no cluster), with Serve's own choice stubbed to wait forever, as it does for a request
    queued behind busy replicas: such a request waits while replicas exist, fails no_replica_timeout_s after the
    last one goes, new requests then fail at once, and they wait again once a replica is back."""
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    from actors.serve_router import FailFastRouter, NoReplicaError

    async def waits_forever(self, pending_request, *, is_retry=False):
        await asyncio.Event().wait()

    async def no_probe(self, replicas, backoff_index):
        pass

    monkeypatch.setattr(PowerOfTwoChoicesRequestRouter, "_choose_replica_for_request", waits_forever)
    monkeypatch.setattr(PowerOfTwoChoicesRequestRouter, "_probe_queue_lens", no_probe)
    replica = SimpleNamespace(replica_id="r1", node_id="n1", availability_zone=None, multiplexed_model_ids=set())

    async def scenario():
        loop = asyncio.get_running_loop()
        router = FailFastRouter(deployment_id=DeploymentID(name="LLMServer", app_name="app"),
                                handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(no_replica_timeout_s=0.3, retry_after_s=2)
        router.update_replicas([replica])
        waiting = asyncio.ensure_future(router._choose_replica_for_request(None))
        await asyncio.sleep(0.6)
        assert not waiting.done()  # behind busy replicas: no bound
        t0 = loop.time()
        router.on_replica_actor_died("r1")
        with pytest.raises(NoReplicaError) as e:
            await waiting
        assert 0.25 < loop.time() - t0 < 1.0 and e.value.status_code == 503 and e.value.retry_after_s == 2
        assert "app/LLMServer" in str(e.value)
        t0 = loop.time()
        with pytest.raises(NoReplicaError):
            await router._choose_replica_for_request(None)
        assert loop.time() - t0 < 0.1  # the outage is known: answered at once
        router.update_replicas([replica])
        back = asyncio.ensure_future(router._choose_replica_for_request(None))
        await asyncio.sleep(0.6)
        assert not back.done()
        back.cancel()

    asyncio.run(scenario())
