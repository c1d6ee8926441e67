"""The load generator of the serving benchmarks (bench/serve.py, bench/gpu_serve.py): streaming requests through the
``openai`` async client against any OpenAI-compatible server (ours, vLLM's, Ray's ``ray.serve.llm``).

Per request: TTFT (request sent → first chunk carrying content; the chat role chunk does not count), the gaps
between content chunks (inter-token latency; a server that coalesces deltas shows bursty gaps), end-to-end latency
and the completion tokens from the stream's usage chunk (``stream_options.include_usage``). A failed request is
counted (``errors``, first messages kept) instead of ending the run.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import time
import urllib.request
from typing import Any


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank; NaN when empty)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def client(base_url: str, api_key: str = "bench"):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=600)


async def one(cl, model: str, prompt: str | list[dict], max_tokens: int, *, chat: bool = False,
              sampling: dict | None = None) -> dict:
    """One streaming request. ``prompt`` is text (a completion, or a chat of one user message) or chat messages."""
    sampling = {"temperature": 0, **(sampling or {})}
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens, error = 0, None
    try:
        common = dict(model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                      **sampling)
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            stream = await cl.chat.completions.create(messages=messages, **common)
        else:
            stream = await cl.completions.create(prompt=prompt, **common)
        async for chunk in stream:
            if chunk.choices:
                c = chunk.choices[0]
                if (c.delta.content if chat else c.text):
                    stamps.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # noqa: BLE001 — counted, not fatal: overload answers are part of what is measured
        error = f"{type(e).__name__}: {e}"[:300]
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens, "latency": t1 - t0,
            "error": error}


def summarize(results: list[dict], wall: float, max_tokens: int | None = None) -> dict:
    """Percentiles (ms) over the successful requests, tokens/s over ``wall``, error count and first messages."""
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] * 1e3 for r in ok]
    itl = [g * 1e3 for r in ok for g in r["itl"]]
    lat = [r["latency"] * 1e3 for r in ok]
    per_req = [r["tokens"] for r in ok]
    tokens = sum(per_req)
    out: dict[str, Any] = {
        "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens, "wall_s": round(wall, 3),
        "ttft_ms_p50": round(pct(ttft, 0.5), 2), "ttft_ms_p95": round(pct(ttft, 0.95), 2),
        "itl_ms_p50": round(pct(itl, 0.5), 2), "itl_ms_p95": round(pct(itl, 0.95), 2),
        "latency_ms_p50": round(pct(lat, 0.5), 2), "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "tokens_per_request_min": min(per_req, default=0),
        "tokens_per_request_mean": round(tokens / len(per_req), 1) if per_req else 0.0}
    if max_tokens is not None:
        out["full_length"] = sum(1 for n in per_req if n == max_tokens)
    if len(ok) < len(results):
        out["error_samples"] = sorted({r["error"] for r in results if r["error"]})[:3]
    return out


async def load(base_url: str, model: str, prompts: list, concurrency: int, max_tokens: int, *, chat: bool = False,
               warmup: int = 2, sampling: dict | None = None) -> dict:
    """Send every prompt, ``concurrency`` at a time (after ``warmup`` short requests); ``summarize`` of the run."""
    cl = client(base_url)
    for p in prompts[:warmup]:
        await one(cl, model, p, 8, chat=chat, sampling=sampling)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(p) -> dict:
        async with sem:
            return await one(cl, model, p, max_tokens, chat=chat, sampling=sampling)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    wall = time.perf_counter() - t0
    await cl.close()
    return summarize(results, wall, max_tokens)


async def sustained(base_url: str, model: str, next_prompt, concurrency: int, max_tokens: int,
                    stop: asyncio.Event, *, chat: bool = False, sampling: dict | None = None) -> list[dict]:
    """``concurrency`` workers, each sending one request after another (``next_prompt()`` gives the prompt) until
    ``stop`` is set; the requests in flight then finish. Returns every request's record (``one``)."""
    cl = client(base_url)
    results: list[dict] = []

    async def worker() -> None:
        while not stop.is_set():
            results.append(await one(cl, model, next_prompt(), max_tokens, chat=chat, sampling=sampling))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await cl.close()
    return results


def median_rounds(rounds: list[dict]) -> dict:
    """Medians over rounds of ``load`` summaries (errors summed)."""
    keys = ["ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95", "latency_ms_p50", "tokens_per_s"]
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in rounds), 2) for k in keys}
    out["rounds"] = len(rounds)
    out["requests_per_round"] = rounds[0]["requests"]
    out["errors"] = sum(r["errors"] for r in rounds)
    out["tokens_per_request_min"] = min(r["tokens_per_request_min"] for r in rounds)
    if "full_length" in rounds[0]:
        out["full_length_frac"] = round(sum(r["full_length"] for r in rounds) / sum(r["requests"] for r in rounds), 3)
    samples = sorted({s for r in rounds for s in r.get("error_samples", [])})[:3]
    if samples:
        out["error_samples"] = samples
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers 200 (raises when ``proc`` exits first or on timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")
