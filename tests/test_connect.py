"""cluster.connect.connect() on a machine with no cluster: the local instance it starts serves Ray's State API on
127.0.0.1. Ray Train's PlacementGroupCleaner polls that API every second during training; before the dashboard was
started, every training job printed "Failed to query Ray Train Controller actor state" hundreds of times."""

import ray


def test_local_instance_serves_the_state_api_on_loopback(monkeypatch):
    from ray.util.state import list_actors

    from cluster.connect import connect

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect(num_cpus=1)
    try:
        ctx = ray.get_runtime_context()
        # The address Ray Train's cleaner resolves (the GCS's record of the dashboard), queried the same way.
        assert isinstance(list_actors(address=ctx.gcs_address), list)
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        assert url.startswith("127.0.0.1:"), url
    finally:
        ray.shutdown()
