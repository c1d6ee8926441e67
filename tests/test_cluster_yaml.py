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
