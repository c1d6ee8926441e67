"""check_resources on a cluster that can grow: ask the autoscaler and wait, or refuse at once what can never fit.

The maximum is always found the real way: a ClusterConfig reported to a real local GCS (what an autoscaler
reports; Ray's ``state.get_cluster_config()`` reads it back) or an autoscaler config file read by Ray's own
``AutoscalingConfig``. Only the request itself (and the nodes it brings) is faked: no autoscaler can launch nodes
here. One local Ray with 1 CPU serves the module (``address="local"``: never another engineer's running cluster).
"""

from __future__ import annotations

import time

import pytest
import yaml

from cluster.capacity import CONFIG_ENV, detect_capacity, maximum_from_autoscaling_config
from cluster.connect import check_resources
from core.config import ConfigError

# cluster.yaml as `ray up` bootstraps it on AWS: resources filled in from the instance types.
BOOTSTRAPPED = {
    "cluster_name": "llamaray", "max_workers": 3,
    "provider": {"type": "aws", "region": "us-west-2"}, "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {
        "head": {"resources": {"CPU": 16}, "node_config": {}},
        "gpu-8x-h100": {"min_workers": 0, "max_workers": 4, "resources": {"CPU": 192, "GPU": 8}, "node_config": {}},
    },
    "head_node_type": "head",
}


class FakeAutoscaler:
    """Records the request; the cluster 'gets' ``arrives`` after ``after`` polls (never when None)."""

    def __init__(self, now: dict[str, float], arrives: dict[str, float] | None = None, after: int = 2):
        self.now, self.arrives, self.after = now, arrives, after
        self.requests: list[list[dict[str, float]]] = []
        self.released = 0
        self.polls = 0

    def request(self, bundles):
        self.requests.append(bundles)

    def release(self):
        self.released += 1

    def cluster_resources(self):
        self.polls += 1
        return dict(self.arrives) if self.arrives is not None and self.polls > self.after else dict(self.now)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _report(ray, groups: list[tuple[str, dict[str, float], int, int]]) -> None:
    """Report a ClusterConfig to the GCS as an autoscaler does (an empty list clears it)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, min_count, max_count in groups:
        g = config.node_group_configs.add(name=name, min_count=min_count, max_count=max_count)
        g.resources.update(resources)
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())


@pytest.fixture
def fixed(local_ray, monkeypatch, tmp_path):
    """The local cluster with no autoscaler config anywhere (no GCS config, no ~/ray_bootstrap_config.yaml)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv("LLAMARAY_SKIP_RESOURCE_CHECK", raising=False)
    _report(local_ray, [])
    yield local_ray
    _report(local_ray, [])


@pytest.fixture
def growable(fixed):
    """The local head (1 CPU) plus a worker group the 'autoscaler' may launch once: 1 + 2 = 3 CPUs at most."""
    _report(fixed, [("head", {"CPU": 1}, 1, 1), ("cpu-2", {"CPU": 2}, 0, 1)])
    return fixed


def test_fixed_cluster_refuses_at_once_with_the_numbers(fixed):
    fake = FakeAutoscaler(now={"CPU": 1.0}, arrives={"CPU": 8.0})
    assert detect_capacity().maximum is None
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"2 worker\(s\) × scaling.cpus_per_worker=1 = 2 CPUs, but the Ray cluster "
                                          r"has 1; no autoscaler config was found"):
        check_resources(num_workers=2, use_gpu=False, cpus_per_worker=1, autoscaler=fake, poll_s=0.01)
    assert time.monotonic() - t0 < 2 and fake.requests == []
    check_resources(num_workers=1, use_gpu=False, cpus_per_worker=1)  # what fits still passes


def test_above_the_autoscalers_maximum_is_refused_at_once(growable):
    cap = detect_capacity()
    assert cap.maximum["CPU"] == 3 and cap.now["CPU"] == 1 and "GCS" in cap.source
    fake = FakeAutoscaler(now={"CPU": 1.0}, arrives={"CPU": 8.0})
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"= 4 CPUs, but the Ray cluster has 1 now and at most 3 with every node "
                                          r"its autoscaler may add"):
        check_resources(num_workers=4, use_gpu=False, cpus_per_worker=1, autoscaler=fake, timeout_s=60, poll_s=0.01)
    with pytest.raises(ConfigError, match=r"2 GPU worker.*has 0 GPU\(s\) now and at most 0 GPU\(s\)"):
        check_resources(num_workers=2, use_gpu=True, cpus_per_worker=1, autoscaler=fake, timeout_s=60, poll_s=0.01)
    # 3 CPUs in total, but no node holds one 3-CPU worker.
    with pytest.raises(ConfigError, match=r"one worker needs 3 CPU / 0 GPU .* no node type of the cluster"):
        check_resources(num_workers=1, use_gpu=False, cpus_per_worker=3, autoscaler=fake, timeout_s=60, poll_s=0.01)
    assert time.monotonic() - t0 < 2 and fake.requests == [] and fake.released == 0


def test_within_the_maximum_asks_the_autoscaler_and_waits(growable, capsys):
    fake = FakeAutoscaler(now={"CPU": 1.0}, arrives={"CPU": 3.0}, after=2)
    check_resources(num_workers=2, use_gpu=False, cpus_per_worker=1, autoscaler=fake, timeout_s=10, poll_s=0.01)
    assert fake.requests == [[{"CPU": 1.0}, {"CPU": 1.0}]]
    assert fake.released == 1  # the request is withdrawn once the nodes are there
    err = capsys.readouterr().err
    assert "waiting up to 10 s for the autoscaler to add nodes: have 1 CPU / 0 GPU, need 2 CPU / 0 GPU" in err
    assert "the autoscaler can reach 3 CPU / 0 GPU" in err
    assert "the cluster now has 3 CPU / 0 GPU; starting the workers" in err


def test_the_wait_ends_with_what_was_asked_what_arrived_and_the_timeout(growable, capsys):
    fake = FakeAutoscaler(now={"CPU": 1.0}, arrives={"CPU": 2.0}, after=1)  # a node came, but too small
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        check_resources(num_workers=3, use_gpu=False, cpus_per_worker=1, autoscaler=fake, timeout_s=0.3, poll_s=0.05)
    assert 0.3 <= time.monotonic() - t0 < 3
    msg = str(e.value)
    assert "did not bring the cluster to 3 CPU / 0 GPU within scaling.autoscale_timeout_s=0.3" in msg
    assert "asked for 3 bundle(s) of 1 CPU / 0 GPU; the cluster has 2 CPU / 0 GPU (had 1 CPU / 0 GPU" in msg
    assert fake.requests == [[{"CPU": 1.0}] * 3] and fake.released == 1
    assert "the cluster has 2 CPU / 0 GPU of 3 CPU / 0 GPU needed; still waiting" in capsys.readouterr().err


def test_timeout_zero_and_the_escape_hatch(growable, monkeypatch):
    fake = FakeAutoscaler(now={"CPU": 1.0}, arrives={"CPU": 3.0})
    with pytest.raises(ConfigError, match="autoscale_timeout_s=0: not waiting"):
        check_resources(num_workers=2, use_gpu=False, cpus_per_worker=1, autoscaler=fake, timeout_s=0)
    monkeypatch.setenv("LLAMARAY_SKIP_RESOURCE_CHECK", "1")
    check_resources(num_workers=64, use_gpu=True, cpus_per_worker=1, autoscaler=fake)
    assert fake.requests == []


def test_the_maximum_from_the_autoscalers_config_file(fixed, tmp_path, monkeypatch):
    """~/ray_bootstrap_config.yaml (what `ray up` leaves on the head) read with Ray's AutoscalingConfig."""
    maximum, shapes = maximum_from_autoscaling_config(BOOTSTRAPPED)
    # The head, plus 3 GPU nodes (top-level max_workers caps the type's 4).
    assert maximum == {"CPU": 16 + 3 * 192, "GPU": 3 * 8}
    assert {"CPU": 192, "GPU": 8} in shapes and {"CPU": 16} in shapes
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(BOOTSTRAPPED))
    cap = detect_capacity()
    assert (cap.maximum["CPU"], cap.maximum["GPU"]) == (592, 24)
    assert cap.source == str(tmp_path / "ray_bootstrap_config.yaml")
    fake = FakeAutoscaler(now=cap.now, arrives={"CPU": 1 + 192.0, "GPU": 8.0}, after=0)
    with pytest.raises(ConfigError, match=r"32 GPU worker.*has 0 GPU\(s\) now and at most 24 GPU\(s\).*"
                                          r"ray_bootstrap_config.yaml"):
        check_resources(num_workers=32, use_gpu=True, cpus_per_worker=1, autoscaler=fake, poll_s=0.01)
    with pytest.raises(ConfigError, match=r"one worker needs 1 CPU / 16 GPU .*gpus_per_worker=16.*192 CPU / 8 GPU"):
        check_resources(num_workers=1, use_gpu=True, cpus_per_worker=1, gpus_per_worker=16, autoscaler=fake)
    assert fake.requests == []
    check_resources(num_workers=8, use_gpu=True, cpus_per_worker=1, autoscaler=fake, poll_s=0.01)
    assert fake.requests == [[{"CPU": 1.0, "GPU": 1.0}] * 8]
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=f"{CONFIG_ENV}=.*nope.yaml: no such file"):
        detect_capacity()


def test_scaling_settings_carry_the_timeout_to_the_check(monkeypatch):
    import cluster.connect
    from jobs.trainer import RunSettings, ScalingSettings, check_cluster

    assert ScalingSettings().autoscale_timeout_s == 900
    with pytest.raises(ConfigError, match="autoscale_timeout_s must be >= 0"):
        ScalingSettings(autoscale_timeout_s=-1)
    seen = {}
    monkeypatch.setattr(cluster.connect, "connect", lambda *a, **k: None)
    try:  # the shared-storage preflight (cluster/storage.py) is not what this test is about
        import cluster.storage
        monkeypatch.setattr(cluster.storage, "check_shared", lambda *a, **k: None)
    except ImportError:
        pass
    monkeypatch.setattr(cluster.connect, "check_resources", lambda **k: seen.update(k))
    check_cluster(RunSettings(), ScalingSettings(num_workers=3, autoscale_timeout_s=42))
    assert seen["timeout_s"] == 42 and seen["num_workers"] == 3


def test_the_real_request_lands_where_the_autoscaler_reads_it(fixed):
    """RayAutoscaler goes through ray.autoscaler.sdk.request_resources: here (autoscaler v1, as a local head runs)
    the request is the internal-KV entry the monitor reads each round; the release empties it."""
    import json

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    from cluster.capacity import RayAutoscaler

    scaler = RayAutoscaler()
    scaler.request([{"CPU": 1.0, "GPU": 1.0}] * 2)
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == [{"CPU": 1.0, "GPU": 1.0}] * 2
    scaler.release()
    assert json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)) == []
    assert scaler.cluster_resources()["CPU"] == 1
