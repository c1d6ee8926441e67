"""The reference engine: the plain-PyTorch sampler of ``model/sampler.py`` on CPU or one GPU.

Batches go through ``model.sampler.generate`` (batched, KV cache, native n). Streams go through
``model.sampler.stream`` one request at a time in a worker thread, so a Serve replica's event loop stays free
(health checks, other requests, aborts); ``abort`` sets a flag the decode loop checks between tokens. No batching
across streams: this is the correctness reference and the fallback when vLLM is absent, not the fast path.

dtype "auto" is float32 on every device. Why not bf16 on GPU: the sampler decodes one token per step for a few
hundred rows of a ≤ 1B model, which is kernel-launch bound, so bf16 buys little speed, while fp32 keeps greedy
answers (held-out accuracy) identical to the CPU engine's and to the fp32 HF export it loads, with no near-tie
argmax flips from bf16 rounding. Pass ``dtype="bfloat16"`` for larger models.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from actors.engines.base import Candidate, Delta, EngineBase, EngineError, EngineHealth, GenParams
from actors.engines.registry import register

if TYPE_CHECKING:
    import torch


def reference_device(requested: str | None, *, cuda_available: bool, actor_gpu_ids: list | None) -> str:
    """The device a reference engine runs on. ``requested`` None: CUDA when this process may use a GPU — inside a
    Ray actor only if Ray assigned it one (``actor_gpu_ids``, from ``ray.get_gpu_ids()``; Ray 2.60 no longer hides
    the GPUs from a 0-GPU actor, so ``cuda_available`` alone would let a CPU actor grab the card), outside Ray
    (``actor_gpu_ids=None``) whenever CUDA is available. Anything else ("cpu", "cuda", "cuda:1") is used as given."""
    if requested is not None:
        return requested
    if not cuda_available:
        return "cpu"
    if actor_gpu_ids is not None and not actor_gpu_ids:
        return "cpu"
    return "cuda"


def _actor_gpu_ids() -> list | None:
    """The GPUs Ray gave this actor (None outside a Ray actor)."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return ray.get_gpu_ids()
    return None


@register("reference")
class ReferenceEngine(EngineBase):
    """``model/sampler.py`` behind the engine protocol (see the module docstring)."""

    honours = frozenset({"dtype", "device", "num_threads"})

    def __init__(self, model_dir: str, options=None):
        super().__init__(model_dir, options)
        self.model = None
        self.tokenizer = None
        self.device = None
        self._lock = threading.Lock()
        self._aborted: set[str] = set()

    async def start(self, streaming: bool = False) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch

        from model.hf import load_hf, resolve_dtype

        if self.opts.num_threads:
            torch.set_num_threads(self.opts.num_threads)
        gpus = _actor_gpu_ids()
        self.device = torch.device(reference_device(self.opts.device, cuda_available=torch.cuda.is_available(),
                                                    actor_gpu_ids=gpus))
        dtype = None if self.opts.dtype == "auto" else self.opts.dtype
        self.dtype = resolve_dtype(dtype, "engine_options.dtype") or torch.float32
        model, self.tokenizer = load_hf(self.model_dir, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.max_model_len = min(self.max_model_len, model.args.max_seq_len)
        print(f"[engine] reference engine on {self.device} ({self.dtype}); Ray GPU ids of this actor: {gpus}",
              file=sys.stderr, flush=True)

    def _require(self) -> None:
        if self.model is None:
            raise EngineError("engine not started")

    def generate(self, prompts: list[list[int]], params: GenParams) -> list[list[Candidate]]:
        from model.sampler import SamplingParams, generate

        self._require()
        stops = () if params.ignore_eos else tuple(getattr(self.tokenizer, "stop_ids", ()))
        sp = SamplingParams(max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, n=params.n, seed=(params.seed or 0) + self.opts.seed,
                            stop=params.stop, ignore_eos=params.ignore_eos, stop_token_ids=stops)
        outs = generate(self.model, prompts, sp, tokenizer=self.tokenizer)
        return [[Candidate(c.text, list(c.token_ids), c.finish_reason, c.cumulative_logprob) for c in per_prompt]
                for per_prompt in outs]

    async def stream(self, prompt_ids: list[int], params: GenParams, request_id: str) -> AsyncIterator[Delta]:
        self._require()
        if params.n != 1:
            raise EngineError(f"a stream is one sample; got n={params.n}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()

        def emit(item: Delta | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed (replica shutting down): nobody is listening
                pass

        worker = threading.Thread(target=self._decode, args=(list(prompt_ids), params, request_id, emit), daemon=True)
        self.tally.begin(request_id, len(prompt_ids), params.max_tokens)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"reference engine failed: {item}") from item
                self.tally.advance(request_id, len(item.token_ids))
                yield item
                if item.finish_reason is not None:
                    return
        finally:  # the consumer went away (client disconnect, timeout): stop the thread at its next token
            self.tally.end(request_id)
            if worker.is_alive():
                self._aborted.add(request_id)

    def _decode(self, prompt_ids: list[int], p: GenParams, request_id: str,
                emit: Callable[[Delta | BaseException], None]) -> None:
        """Runs in a worker thread: ``model.sampler.stream`` step by step, checking for an abort between tokens."""
        import torch

        from model.sampler import SamplingParams, stream

        try:
            with self._lock, torch.inference_mode():
                if request_id in self._aborted:  # aborted while waiting for the lock: no prefill
                    emit(Delta("", (), "abort"))
                    return
                sp = SamplingParams(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                                    top_k=p.top_k, stop=p.stop, ignore_eos=p.ignore_eos,
                                    seed=p.seed if p.seed is not None else secrets.randbits(62))
                steps = stream(self.model, [prompt_ids], sp, tokenizer=self.tokenizer)
                try:
                    for deltas in steps:
                        if request_id in self._aborted:
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

    def load_weights(self, model_dir: str) -> None:
        """Copy the new checkpoint into the tensors already on this engine's device (same dtype)."""
        from model.hf import load_hf

        self._require()
        model, _ = load_hf(model_dir, dtype=self.dtype)
        self.model.load_state_dict(model.state_dict())
        self.loaded(model_dir)

    def update_weights(self, weights: dict[str, torch.Tensor], version: str) -> None:
        """Copy the weights (HF names, checked first) into the live model's tensors, cast to this engine's dtype and
        device. A tied LM head needs nothing: ``output.weight`` is the embedding tensor itself. Streams wait."""
        import torch

        from model.hf import to_hf_name

        self._require()
        self.check_weights(weights)
        params = {to_hf_name(name): p for name, p in self.model.named_parameters(remove_duplicate=False)}
        with self._lock, torch.no_grad():
            for name, t in weights.items():
                params[name].copy_(t)
        self.loaded_in_memory(version)

    async def health(self) -> EngineHealth:
        if self.model is None:
            return self.health_report(False, "not started")
        return self.health_report(True, f"device={self.device}")

    async def shutdown(self) -> None:
        self.model = None
