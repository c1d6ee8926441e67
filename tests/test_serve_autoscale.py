"""The ``engine_load`` autoscaling signal without a cluster: the engines' load tally and the policy's arithmetic.
The deployment scaling up on it is tests/test_serve_scaling.py::test_engine_load_signal_scales_up_long_requests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from actors.engines import EngineLoad, LoadTally
from actors.serve_autoscale import METRIC, EngineLoadPolicy
from actors.serve_config import ScalingConfig
from core.config import ConfigError


def test_tally_counts_prompts_until_the_first_token_then_what_is_left_to_generate():
    t = LoadTally()
    t.begin("a", prompt_tokens=10, max_tokens=100)
    t.begin("b", prompt_tokens=5, max_tokens=20)
    assert t.load() == EngineLoad(running=0, waiting=2, pending_tokens=135)
    t.advance("a", 1)
    assert t.load() == EngineLoad(running=1, waiting=1, pending_tokens=99 + 25)
    t.advance("a", 30)
    t.advance("b", 0)  # an empty delta changes nothing
    assert t.load() == EngineLoad(running=1, waiting=1, pending_tokens=69 + 25)
    t.end("a")
    t.end("a")  # ending twice is harmless (abort + finish)
    t.end("b")
    assert t.load() == EngineLoad()


def ctx(metrics, *, replicas=1, target=1, ongoing=0.0, queued=0.0):
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=replicas, target_num_replicas=target,
                           total_num_requests=ongoing, total_queued_requests=queued)


def test_policy_sizes_replicas_from_tokens_and_counts_serve_queued_requests():
    policy = EngineLoadPolicy(target_load=1000)
    assert policy(ctx({METRIC: {"r1": 1500.0, "r2": 1500.0}}, replicas=2, ongoing=6))[0] == 3.0
    # 4 requests at the replicas hold 2000 tokens (500 each); 4 more wait in Serve's queue: 4000 tokens in all
    assert policy(ctx({METRIC: {"r1": 2000.0}}, ongoing=8, queued=4))[0] == 4.0
    assert policy(ctx({METRIC: {"r1": 0.0}}))[0] == 0.0  # idle: Serve's bounds keep min_replicas
    assert policy(ctx({}, target=2))[0] == 2  # no report yet: the current target stands
    assert policy(ctx(None, target=2))[0] == 2


def test_signal_is_validated_and_selects_the_policy():
    from actors.server import autoscaling_config

    with pytest.raises(ConfigError, match="scaling.signal"):
        ScalingConfig(signal="kv_cache")
    with pytest.raises(ConfigError, match="target_engine_load"):
        ScalingConfig(target_engine_load=0)
    assert "policy" not in autoscaling_config(ScalingConfig(max_replicas=2))
    policy = autoscaling_config(ScalingConfig(max_replicas=2, signal="engine_load", target_engine_load=300))["policy"]
    assert policy.policy_function == "actors.serve_autoscale.EngineLoadPolicy"
    assert policy.policy_kwargs == {"target_load": 300}
