"""The request timeout (``request_timeout_s``, Serve's HTTP option): a generation that outlives it is answered with
an error status instead of holding the client forever, and the server stays healthy.

Reference engine, one replica: the timeout is enforced by Serve's proxy in front of any engine (see
test_serve_scaling.py for why CPU tests use the reference sampler), and a fresh Serve instance is needed because the
HTTP options are fixed when Serve starts.
"""

from __future__ import annotations

import time

import pytest
from test_serve import free_port, http  # same folder; pytest puts it on sys.path

from bench.serve import build_tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_request_outliving_the_timeout_is_cut_off(tmp_path):
    import ray
    from ray import serve

    from actors.engines import EngineOptions
    from actors.serve_config import LLMConfig, ScalingConfig
    from jobs.serve import ServeJobConfig, deploy

    from model.hf import save_hf
    from model.llama import ModelArgs, build_model
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(build_tiny_checkpoint(tmp_path / "small"))
    # A long context, so one request can legitimately run for many seconds (4000 tokens ≫ the 2 s timeout).
    model = save_hf(build_model(ModelArgs.from_name("tiny", n_layers=4, vocab_size=512, max_seq_len=4096)), tok,
                    tmp_path / "ckpt")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ServeJobConfig(model=str(model), port=free_port(), request_timeout_s=2.0, app_name="slow",
                             route_prefix="/slow",
                             llm=LLMConfig(engine="reference", engine_options=EngineOptions(num_threads=1)),
                             scaling=ScalingConfig(num_cpus=1, graceful_shutdown_timeout_s=2.0))
        url = deploy(cfg)
        status, body, _ = http("POST", f"{url}/v1/completions", {"prompt": "a", "max_tokens": 2}, timeout=60)
        assert status == 200, body  # short requests are unaffected
        t0 = time.perf_counter()
        long = {"prompt": "a", "max_tokens": 4000, "temperature": 0}
        status, body, _ = http("POST", f"{url}/v1/completions", long, timeout=60)
        elapsed = time.perf_counter() - t0
        assert status in (408, 503, 504), (status, body)
        assert elapsed < 20, elapsed
        assert http("GET", f"{url}/health")[0] == 200
        status, _, _ = http("POST", f"{url}/v1/completions", {"prompt": "b", "max_tokens": 2}, timeout=60)
        assert status == 200
    finally:
        serve.shutdown()
        ray.shutdown()
