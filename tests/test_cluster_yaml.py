"""cluster.yaml is a valid Ray autoscaler config (what `ray up` checks first)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first; raises on schema errors
    assert config["head_node_type"] in config["available_node_types"]
    setup = " ".join(config["setup_commands"])
    assert "scripts/setup.sh" in setup and "ENGINE=gpu" in setup


def test_cluster_yaml_keeps_token_auth_and_shared_storage_on_every_node():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    for start in (head, workers):
        assert "RAY_AUTH_MODE=token" in start and "LLAMARAY_STORAGE=/mnt/shared/llamaray" in start
    assert "--dashboard-host=127.0.0.1" in head  # the job API is reached through `ray dashboard` (a tunnel)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    mount = " ".join(config["initialization_commands"])
    assert "mount -t nfs4" in mount and "/mnt/shared" in mount
