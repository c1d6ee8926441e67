"""Adding an engine through the registry alone: a toy engine (tests/toy_engine.py, registered as "toy" on import)
runs rollouts on a real Ray and answers a real Serve deployment over HTTP, chosen by name; options an engine
cannot honour are refused with an error naming option and engine."""

from __future__ import annotations

import pytest
from test_serve import free_port, http  # same folder; pytest puts it on sys.path

from actors.engines import EngineOptions, GenParams, ReferenceEngine, engine_cls, engine_names
from bench.serve import build_tiny_checkpoint
from core.config import ConfigError
from tests.toy_engine import WORDS, ToyEngine

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt"))


def test_registered_by_name():
    assert "toy" in engine_names() and engine_cls("toy") is ToyEngine and ToyEngine.name == "toy"
    with pytest.raises(ConfigError, match="unknown engine 'nope'; known: auto, .*toy"):
        engine_cls("nope")


def test_unsupported_options_are_refused(model_dir):
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2: the 'reference' engine cannot honour it"):
        ReferenceEngine(model_dir, EngineOptions(tensor_parallel_size=2))
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=0.5: the 'toy' engine cannot honour it"):
        ToyEngine(model_dir, EngineOptions(gpu_memory_utilization=0.5))
    with pytest.raises(ConfigError, match=r"num_threads=1: the 'vllm' engine cannot honour it"):
        engine_cls("vllm").check_options(EngineOptions(num_threads=1))
    ToyEngine(model_dir, EngineOptions(seed=3, max_model_len=64, served_name="t"))  # common options are fine


def test_rollouts_and_serve_with_the_toy_engine(model_dir):
    import ray
    from ray import serve

    from actors.rollout import PromptItem, RolloutPool
    from actors.serve_config import LLMConfig, ScalingConfig
    from jobs.serve import ServeJobConfig, deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ConfigError, match="'toy' engine cannot honour"):  # refused before any actor starts
            RolloutPool(model_dir, num_actors=1, engine="toy", options=EngineOptions(device="cpu"))
        pool = RolloutPool(model_dir, num_actors=1, engine="toy", actor_options={"num_cpus": 0.5})
        try:
            assert pool.engine_name == "toy" and pool.health()[0].detail == "toy"
            items = [PromptItem("p1", [{"role": "user", "content": "1 + 1"}]), PromptItem("empty", [])]
            [results] = list(pool.map([items], GenParams(n=3, max_tokens=8)))
            assert results[0].error is None and [c.text for c in results[0].candidates] == ["".join(WORDS)] * 3
            assert results[1].error == "empty prompt"
        finally:
            pool.shutdown()

        cfg = ServeJobConfig(model=model_dir, port=free_port(), app_name="toy", route_prefix="/toy",
                             llm=LLMConfig(engine="toy"), scaling=ScalingConfig(num_cpus=0.5))
        url = deploy(cfg)
        status, body, _ = http("POST", f"{url}/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == "".join(WORDS[:3])
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
        status, body, _ = http("GET", f"{url}/v1/models")
        assert status == 200 and body["data"][0]["engine"] == "toy"
    finally:
        serve.shutdown()
        ray.shutdown()
